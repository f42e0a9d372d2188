"""What `ssamba embed`, HEAR and s3prl take from an encoder file, and what they refuse.

Every consumer reads the file through `load_encoder_file`: the feature settings it carries
decide the filterbank normalisation, a Lightning .ckpt of our tasks works like the encoder
file exported from it, and a file holding pickled code is refused before it can run.
The reference outputs here are computed by hand from torchaudio's Kaldi filterbank.
"""

from __future__ import annotations

import math
import os
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
import torchaudio
from _encoder_files import INPUT_FRAMES, write_small_encoder

from ssamba import hear
from ssamba.audio import load_audio
from ssamba.embed import Embedder
from ssamba.embed.cli import main
from ssamba.features import FbankConfig
from ssamba.models import AudioEncoder, CheckpointError, EncoderConfig, load_encoder_file
from ssamba.models.encoder_file import EncoderFile
from ssamba.s3prl import UpstreamExpert
from ssamba.tasks.pretrain import MSPMConfig, PretrainTask

# An encoder pretrained on FSDD: its own statistics, 2.56 s inputs.
FSDD_MEAN, FSDD_STD = -8.77, 4.64
FSDD_FEATURES = FbankConfig(target_length=INPUT_FRAMES, mean=FSDD_MEAN, std=FSDD_STD)
FREQ_PATCHES, TIME_PATCHES, WIDTH = 8, 16, 32
STEP_SAMPLES, WINDOW_SAMPLES = 16 * 160, INPUT_FRAMES * 160


# ---------------------------------------------------------------------------- by hand
def kaldi_fbank(wave: torch.Tensor) -> torch.Tensor:
    """(samples,) -> (frames, 128): the filterbank of ssamba.features' chain (DC removed,
    25 ms Hann frames every 10 ms, HTK mel, no dither), unnormalised."""
    return torchaudio.compliance.kaldi.fbank(
        (wave - wave.mean()).unsqueeze(0),
        sample_frequency=16000,
        htk_compat=True,
        use_energy=False,
        window_type="hanning",
        num_mel_bins=128,
        dither=0.0,
        frame_shift=10,
        frame_length=25,
    )


def pad_frames(fbank: torch.Tensor, frames: int = INPUT_FRAMES) -> torch.Tensor:
    return torch.nn.functional.pad(fbank, (0, 0, 0, frames - fbank.shape[0]))


def normalised(fbank: torch.Tensor, mean: float = FSDD_MEAN, std: float = FSDD_STD) -> torch.Tensor:
    return (fbank - mean) / (2 * std)


def per_time_patch(tokens: torch.Tensor) -> torch.Tensor:
    """(1, 1 + F'*T', D) SSAMBA tokens (cls first, frequency-major patches) -> (T', F'*D)."""
    grid = tokens[0, 1:].reshape(FREQ_PATCHES, TIME_PATCHES, WIDTH)
    return grid.permute(1, 0, 2).reshape(TIME_PATCHES, FREQ_PATCHES * WIDTH)


def real_steps(num_samples: int) -> int:
    """Time patches whose centre lies inside the clip (centre of patch k: k * 160 + 87.5 ms)."""
    duration_ms = num_samples / 16
    return sum(1 for k in range(TIME_PATCHES) if k * 160 + 87.5 < duration_ms)


def with_one_final_norm(encoder: AudioEncoder, fbank: torch.Tensor) -> torch.Tensor:
    """Tokens with `norm_f` applied once by hand to what the last block pair hands it."""
    inputs: list[torch.Tensor] = []
    hook = encoder.norm_f.register_forward_hook(lambda m, args, out: inputs.append(args[0]))
    encoder.forward_features(fbank)
    hook.remove()
    return encoder.norm_f(inputs[0])


@pytest.fixture(scope="module")
def fsdd_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("fsdd_encoder")
    return write_small_encoder(folder / "encoder.pt", seed=3, features=FSDD_FEATURES)


@pytest.fixture(scope="module")
def digits(fsdd_dir: Path) -> list[torch.Tensor]:
    """Two spoken digits of unequal length, both shorter than one 2.56 s window."""
    names = ("6_nicolas_3.wav", "8_jackson_20.wav")
    return [load_audio(fsdd_dir / "recordings" / name)[0] for name in names]


# ---------------------------------------------------------------------------- features
def test_embed_hear_and_s3prl_normalise_with_the_statistics_the_file_carries(
    fsdd_encoder: Path, digits: list[torch.Tensor], fsdd_dir: Path, tmp_path: Path
) -> None:
    encoder = load_encoder_file(fsdd_encoder).encoder.eval()
    wave = digits[0]
    real = real_steps(len(wave))
    with torch.no_grad():
        model_input = normalised(pad_frames(kaldi_fbank(wave)))  # raw zeros, then normalise
        expected = per_time_patch(encoder.forward_features(model_input[None]))[:real]
        asli = normalised(pad_frames(kaldi_fbank(wave)), FbankConfig().mean, FbankConfig().std)
        with_asli = per_time_patch(encoder.forward_features(asli[None]))[:real]
    assert 0 < real < TIME_PATCHES
    assert not torch.allclose(expected, with_asli, atol=1e-3)  # the statistics matter

    clip = fsdd_dir / "recordings" / "6_nicolas_3.wav"
    out = tmp_path / "emb"
    args = [str(clip), "--ckpt", str(fsdd_encoder), "--out", str(out), "--pool", "none"]
    assert main([*args, "--freq", "concat"]) == 0
    embedded = torch.from_numpy(np.load(out / "6_nicolas_3.npy"))
    torch.testing.assert_close(embedded, expected, rtol=0, atol=1e-5)

    model = hear.load_model(str(fsdd_encoder))
    steps, _ = hear.get_timestamp_embeddings(wave[None], model)
    scene = hear.get_scene_embeddings(wave[None], model)
    torch.testing.assert_close(steps[0], expected, rtol=0, atol=1e-5)
    scene_by_hand = expected.reshape(real, FREQ_PATCHES, WIDTH).mean(dim=(0, 1))
    torch.testing.assert_close(scene[0], scene_by_hand, rtol=0, atol=1e-5)

    upstream = UpstreamExpert(str(fsdd_encoder))
    with torch.no_grad():
        hidden = upstream(digits)["last_hidden_state"]
        steps_s3prl = math.ceil(max(len(w) for w in digits) / STEP_SAMPLES)
        for row, clip_wave in enumerate(digits):
            # SSAMBA's upstream: zero-pad the waveform to the window, filterbank,
            # normalise, pad the leftover frames with zeros, final norm once
            window = torch.nn.functional.pad(clip_wave, (0, WINDOW_SAMPLES - len(clip_wave)))
            model_input = pad_frames(normalised(kaldi_fbank(window)))
            by_hand = per_time_patch(with_one_final_norm(encoder, model_input[None]))
            torch.testing.assert_close(hidden[row], by_hand[:steps_s3prl], rtol=0, atol=1e-5)


def test_a_file_without_features_uses_the_pretraining_statistics_and_says_so(
    tmp_path: Path,
) -> None:
    encoder = AudioEncoder(EncoderConfig.preset("aum", "tiny", embed_dim=32, depth=2))
    path = EncoderFile(encoder, None, provenance={"kind": "test"}).save(tmp_path / "aum.pt")

    with pytest.warns(UserWarning, match=r"aum\.pt: the file does not record the features"):
        embedder = Embedder.from_file(path)

    assert (embedder.fbank.mean, embedder.fbank.std) == (FbankConfig().mean, FbankConfig().std)


# ---------------------------------------------------------------------------- Lightning
def write_pretraining_checkpoint(path: Path, features: FbankConfig) -> AudioEncoder:
    """A `last.ckpt` as `ssamba pretrain` writes it: the task's state dict, hyperparameters
    and what its `on_save_checkpoint` adds; `features` as its data module reports them."""
    cfg = EncoderConfig.preset("ssamba", "tiny", embed_dim=WIDTH, depth=4)
    task = PretrainTask(encoder=cfg, input_frames=INPUT_FRAMES, objective=MSPMConfig(n_masked=50))
    checkpoint = {
        "state_dict": task.state_dict(),
        "global_step": 7,
        "hyper_parameters": dict(task.hparams),
    }
    task.on_save_checkpoint(checkpoint)
    checkpoint["features"] = features.for_inference().to_dict()
    torch.save(checkpoint, path)
    return task.encoder


def test_a_lightning_checkpoint_embeds_exactly_like_the_encoder_file_of_its_weights(
    tmp_path: Path, fsdd_dir: Path, digits: list[torch.Tensor]
) -> None:
    ckpt = tmp_path / "last.ckpt"
    encoder = write_pretraining_checkpoint(ckpt, FSDD_FEATURES)
    exported = EncoderFile(encoder, FSDD_FEATURES).save(tmp_path / "encoder.pt")
    clip = fsdd_dir / "recordings" / "6_nicolas_3.wav"

    for name, source in (("ckpt", ckpt), ("file", exported)):
        assert main([str(clip), "--ckpt", str(source), "--out", str(tmp_path / f"{name}.npy")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "ckpt.npy"), np.load(tmp_path / "file.npy"))

    audio = torch.stack([digit[:6000] for digit in digits])
    from_ckpt = hear.get_scene_embeddings(audio, hear.load_model(str(ckpt)))
    from_file = hear.get_scene_embeddings(audio, hear.load_model(str(exported)))
    torch.testing.assert_close(from_ckpt, from_file, rtol=0, atol=0)

    with torch.no_grad():
        upstream_ckpt = UpstreamExpert(str(ckpt))(digits)["last_hidden_state"]
        upstream_file = UpstreamExpert(str(exported))(digits)["last_hidden_state"]
    torch.testing.assert_close(upstream_ckpt, upstream_file, rtol=0, atol=0)


# ---------------------------------------------------------------------------- refusals
class RunsCodeWhenUnpickled:
    """Unpickling this runs a shell command: what a hostile checkpoint can hold."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def hostile_file(folder: Path, name: str) -> tuple[Path, Path]:
    """(a .pt encoder file or .ckpt with a pickled callable inside, the marker it would touch)."""
    marker = folder / f"pwned_by_{name}"
    payload = RunsCodeWhenUnpickled(marker)
    if name.endswith(".ckpt"):
        content = {"state_dict": {"encoder.pos_embed": torch.zeros(1)}, "callbacks": payload}
    else:
        content = {"format": "ssamba-encoder", "version": 2, "config": payload}
    path = folder / name
    torch.save(content, path)
    return path, marker


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("name", ["encoder.pt", "last.ckpt"])
def test_a_file_with_pickled_code_is_refused_by_every_consumer_without_running_it(
    tmp_path: Path, fsdd_dir: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    path, marker = hostile_file(tmp_path, name)
    clip = str(fsdd_dir / "recordings" / "6_nicolas_3.wav")

    assert main([clip, "--ckpt", str(path), "--out", str(tmp_path / "emb.npy")]) == 2
    message = one_line(capsys.readouterr().err)
    assert str(path) in message and "refused" in message
    for load in (hear.load_model, UpstreamExpert):
        with pytest.raises(CheckpointError, match="refused") as refused:
            load(str(path))
        assert "\n" not in str(refused.value)
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["text", "missing"])
def test_embed_with_a_text_or_missing_file_as_ckpt_says_so_in_one_line(
    tmp_path: Path, fsdd_dir: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    ckpt = tmp_path / ("notes.txt" if kind == "text" else "nowhere.pt")
    if kind == "text":
        ckpt.write_text("an encoder, honestly\n")
    clip = str(fsdd_dir / "recordings" / "6_nicolas_3.wav")

    assert main([clip, "--ckpt", str(ckpt), "--out", str(tmp_path / "emb.npy")]) == 2
    message = one_line(capsys.readouterr().err)
    assert message.startswith("ssamba embed: ") and str(ckpt) in message
    assert not (tmp_path / "emb.npy").exists()
