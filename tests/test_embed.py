"""`ssamba embed` and the windowing core it shares with HEAR."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from _encoder_files import INPUT_FRAMES, write_small_encoder

from ssamba import cli
from ssamba.audio import load_audio
from ssamba.embed import Embedder
from ssamba.embed.cli import main
from ssamba.features import FbankConfig, clip_features
from ssamba.models import load_encoder_file, to_official

STEP_MS = 160.0  # 16-frame time patches at 10 ms per frame


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_small_encoder(tmp_path_factory.mktemp("enc") / "encoder.pt")


@pytest.fixture(scope="module")
def embedder(encoder_file: Path) -> Embedder:
    return Embedder.from_file(encoder_file)


def test_long_recording_gives_one_step_per_time_patch_over_the_whole_clip(
    sample_wav: Path, encoder_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "emb"
    code = main([str(sample_wav), "--ckpt", str(encoder_file), "--pool", "none", "--out", str(out)])

    assert code == 0
    steps = np.load(out / "sample.npy")
    times = np.load(out / "sample.times.npy")
    duration_ms = 30_000  # sample.wav is 30 s; 12 windows of 2.56 s
    assert steps.dtype == np.float32 and steps.shape == (len(times), 32)
    assert np.allclose(np.diff(times), STEP_MS)  # one uniform grid across window borders
    assert times[0] > 0 and times[-1] < duration_ms < times[-1] + STEP_MS
    assert np.isfinite(steps).all()


def test_folder_with_a_broken_and_a_non_audio_file_embeds_the_others_and_names_both(
    fsdd_dir: Path, encoder_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "clips"
    (folder / "more").mkdir(parents=True)
    names = ["0_jackson_0.wav", "1_nicolas_0.wav", "7_theo_12.wav"]
    for name in names[:2]:
        shutil.copy(fsdd_dir / "recordings" / name, folder / name)
    shutil.copy(fsdd_dir / "recordings" / names[2], folder / "more" / names[2])
    (folder / "broken.wav").write_text("this is not audio")
    (folder / "notes.txt").write_text("labels, not audio")
    out = tmp_path / "emb.npy"

    code = main([str(folder), "--ckpt", str(encoder_file), "--out", str(out)])

    assert code == 1  # a failure is never silent
    captured = capsys.readouterr()
    assert "broken.wav" in captured.err and "cannot decode" in captured.err
    assert "notes.txt" in captured.out and "embedded 3 file(s)" in captured.out
    matrix = np.load(out)
    ids = (tmp_path / "emb.ids.txt").read_text().splitlines()
    assert matrix.shape == (3, 32) and matrix.dtype == np.float32
    assert sorted(Path(i).name for i in ids) == sorted(names)
    assert not np.allclose(matrix[0], matrix[1])


def test_missing_input_is_named_and_the_other_files_still_embedded(
    fsdd_dir: Path, encoder_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    clip = fsdd_dir / "recordings" / "3_george_0.wav"
    code = main(
        [str(clip), str(tmp_path / "nope.wav"), "--ckpt", str(encoder_file), "--out", str(tmp_path)]
    )

    assert code == 1
    assert "nope.wav: no such file or folder" in capsys.readouterr().err
    assert np.load(tmp_path / "3_george_0.npy").shape == (32,)


def test_mean_pooling_is_the_mean_of_the_real_patch_tokens_the_encoder_gives(
    fsdd_dir: Path, encoder_file: Path, embedder: Embedder
) -> None:
    wave, _ = load_audio(fsdd_dir / "recordings" / "5_yweweler_3.wav")
    encoder = load_encoder_file(encoder_file).encoder.eval()
    fbank = clip_features(wave, 16000, FbankConfig(target_length=INPUT_FRAMES), train=False)
    with torch.inference_mode():
        tokens = encoder.forward_features(fbank.unsqueeze(0))
        result = embedder.embed(wave.unsqueeze(0))
    real = int((result.times_ms < len(wave) / 16).sum())
    grid = encoder.patch_tokens(tokens).unflatten(1, encoder.grid)  # (1, F', T', D)
    expected = grid[:, :, :real].mean(dim=(1, 2))

    assert 0 < real < encoder.grid[1]  # a short digit: padding steps were dropped
    torch.testing.assert_close(result.pooled(0, "mean"), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(result.pooled(0, "cls"), encoder.pool(tokens, "cls"))


def test_overlapping_windows_keep_the_same_uniform_grid_of_steps(encoder_file: Path) -> None:
    tiled = Embedder.from_file(encoder_file).windowing.plan(16000 * 9)
    overlapping = Embedder.from_file(encoder_file, hop_seconds=0.8).windowing.plan(16000 * 9)

    assert len(overlapping.starts) > len(tiled.starts)
    torch.testing.assert_close(overlapping.times_ms, tiled.times_ms)


def test_steps_from_the_same_window_do_not_depend_on_the_hop(
    sample_wav: Path, encoder_file: Path
) -> None:
    wave, _ = load_audio(sample_wav)
    wave = wave[: 16000 * 6]
    with torch.inference_mode():
        tiled = Embedder.from_file(encoder_file).embed(wave.unsqueeze(0))
        overlapping = Embedder.from_file(encoder_file, hop_seconds=0.8).embed(wave.unsqueeze(0))

    assert tiled.steps[0].shape == overlapping.steps[0].shape
    first_window = tiled.times_ms < 1200  # owned by the first window in both plans
    torch.testing.assert_close(
        tiled.steps[0][:, first_window], overlapping.steps[0][:, first_window]
    )


@pytest.mark.parametrize(
    ("option", "value"), [("--window-seconds", "3.0"), ("--hop-seconds", "5"), ("--layer", "7")]
)
def test_bad_window_or_layer_is_refused_naming_the_option(
    fsdd_dir: Path,
    encoder_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    option: str,
    value: str,
) -> None:
    clip = str(fsdd_dir / "recordings" / "3_george_0.wav")
    code = main([clip, "--ckpt", str(encoder_file), "--out", str(tmp_path), option, value])

    assert code == 2
    assert option in capsys.readouterr().err


def test_official_checkpoint_embeds_with_the_pretraining_features(
    encoder_file: Path, tmp_path: Path
) -> None:
    official = tmp_path / "amba_tiny_400.pth"
    torch.save(to_official(load_encoder_file(encoder_file).encoder), official)

    embedder = Embedder.from_file(official)

    assert embedder.fbank.mean == FbankConfig().mean and embedder.num_layers == 2
    with torch.inference_mode():
        assert embedder.embed(torch.randn(1, 8000)).pooled(0, "mean").shape == (1, 32)


def test_ssamba_help_lists_embed_and_embed_help_explains_outputs(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["--help"]) == 0
    assert "embed" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["embed", "--help"])
    text = capsys.readouterr().out
    assert exit_info.value.code == 0
    for needle in ("--ckpt", "--pool", "--window-seconds", "emb.ids.txt", "exit status is 1"):
        assert needle in text
