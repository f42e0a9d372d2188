"""`ssamba export --format exported-program|onnx`: programs that run on torch alone, checked
against the eager encoder before they are written."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from ssamba.audio import load_audio
from ssamba.embed import Embedder
from ssamba.embed.cli import main as embed_main
from ssamba.export import (
    ClipEmbedder,
    ExportError,
    export_program,
    main,
    onnx_runner,
    scan_decomposition,
)
from ssamba.features import FbankConfig, clip_features
from ssamba.models.encoder import AudioEncoder, EncoderConfig
from ssamba.models.encoder_file import EncoderFile, load_encoder_file
from ssamba.models.scan import selective_scan_ref
from tests._encoder_files import INPUT_FRAMES, write_small_encoder

REPO = Path(__file__).resolve().parents[1]

# Runs a program in a fresh interpreter, where `import ssamba` fails (argv[3] "without": the
# program must need torch only) or after `import ssamba.models` (argv[3] "with").
RUN_PROGRAM = textwrap.dedent(
    """
    import sys
    if sys.argv[3] == "without":
        sys.modules["ssamba"] = None  # any import of ssamba (or its C++ kernels) now fails
    else:
        import ssamba.models  # registers ssamba's ops
    import torch
    program = torch.export.load(sys.argv[1]).module()
    worst = 0.0
    for case in torch.load(sys.argv[2]):
        embedding, steps = program(case["fbank"])
        assert steps.shape == case["steps"].shape, (steps.shape, case["steps"].shape)
        worst = max(worst, (embedding - case["embedding"]).abs().max().item(),
                    (steps - case["steps"]).abs().max().item())
    print(f"max abs diff {worst:.3g}")
    sys.exit(0 if worst <= 1e-4 else 1)
    """
)


def eager_cases(path: Path, shapes: list[tuple[int, int]]) -> list[dict]:
    """The eager ClipEmbedder's outputs on random features of each (batch, frames)."""
    bundle = load_encoder_file(path)
    model = ClipEmbedder(bundle.encoder.eval(), bundle.features).eval()
    cases = []
    for batch, frames in shapes:
        fbank = torch.randn(batch, frames, bundle.encoder.cfg.num_mel_bins)
        with torch.no_grad():
            embedding, steps = model(fbank)
        cases.append({"fbank": fbank, "embedding": embedding, "steps": steps})
    return cases


# (batch, frames): batch 3 and 1 (traced at 2); one window; a clip 235 windows long; a part
# of a window; less than a patch
SHAPES = {
    "ssamba": [(1, INPUT_FRAMES), (1, 60_000), (3, 1000), (3, 100), (1, 5)],
    "aum": [(3, 1000), (1, 5)],
    "ssast": [(3, 1000), (1, 5)],
}


@pytest.mark.parametrize("family", ["ssamba", "aum", "ssast"])
def test_exported_program_takes_any_length_runs_without_ssamba_and_matches_eager(
    family, tmp_path, capsys
):
    source = write_small_encoder(tmp_path / "encoder.pt", family=family)
    out = tmp_path / "encoder.pt2"

    assert main([str(source), str(out), "--format", "exported-program"]) == 0

    assert "max abs diff" in capsys.readouterr().out
    sidecar = json.loads((tmp_path / "encoder.pt2.json").read_text())  # how to make inputs
    assert sidecar["input"]["recipe"]["window_frames"] == INPUT_FRAMES
    assert sidecar["input"]["shape"] == ["batch", "frames", 128]
    assert sidecar["max_abs_diff_vs_eager"] <= 1e-4
    torch.save(eager_cases(source, SHAPES[family]), tmp_path / "expected.pt")
    check = run_program(out, tmp_path / "expected.pt", "without")
    assert check.returncode == 0, check.stdout + check.stderr


def run_program(program: Path, expected: Path, ssamba: str) -> subprocess.CompletedProcess:
    """RUN_PROGRAM on `program` and the `eager_cases` saved in `expected`."""
    return subprocess.run(
        [sys.executable, "-c", RUN_PROGRAM, str(program), str(expected), ssamba],
        capture_output=True,
        text=True,
        cwd=program.parent,  # not the repository: ssamba must not be found by accident
    )


def test_a_program_keeping_ssambas_kernels_matches_eager_and_loads_only_with_ssamba(
    tmp_path, capsys
):
    source = write_small_encoder(tmp_path / "encoder.pt", family="ssamba")
    out = tmp_path / "encoder.pt2"

    assert main([str(source), str(out), "--format", "exported-program", "--keep-kernels"]) == 0

    sidecar = json.loads((tmp_path / "encoder.pt2.json").read_text())
    assert sidecar["ssamba_ops"] == ["ssamba.mamba_inner.default"]  # eager's fused mixer
    assert "import ssamba.models" in sidecar["runs_with"]
    torch.save(eager_cases(source, SHAPES["ssamba"][:3]), tmp_path / "expected.pt")
    with_ssamba = run_program(out, tmp_path / "expected.pt", "with")
    assert with_ssamba.returncode == 0, with_ssamba.stdout + with_ssamba.stderr
    without = run_program(out, tmp_path / "expected.pt", "without")
    assert without.returncode != 0 and "mamba_inner" in without.stderr


def test_keep_kernels_with_another_format_is_refused_in_one_line(tmp_path, capsys):
    source = write_small_encoder(tmp_path / "encoder.pt", family="ssamba")

    code = main([str(source), str(tmp_path / "e.onnx"), "--format", "onnx", "--keep-kernels"])

    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--keep-kernels" in err
    assert list(tmp_path.iterdir()) == [source]


def test_the_program_keeps_the_steps_that_lie_on_the_audio(tmp_path):
    """16-frame patches of 10 ms frames, 25 ms long: step k is centred at 160 k + 87.5 ms."""
    bundle = load_encoder_file(write_small_encoder(tmp_path / "encoder.pt"))
    model = ClipEmbedder(bundle.encoder, bundle.features)
    # frames cover (frames - 1) * 10 + 25 ms: 8 frames reach 95 ms, past step 0's centre
    counts = {frames: model.kept_steps(frames) for frames in (1, 7, 8, 24, 256, 257, 1000)}
    assert counts == {1: 1, 7: 1, 8: 1, 24: 2, 256: 16, 257: 16, 1000: 63}
    centres = 160 * torch.arange(100) + 87.5
    for frames, count in counts.items():
        covered = (frames - 1) * 10 + 25
        assert count == max(1, int((centres < covered).sum()))


def test_the_scan_decomposition_equals_the_reference_scan():
    torch.manual_seed(0)
    batch, dim, n = 2, 6, 4
    for length in (1, 7, 8, 9, 65, 129):
        for reverse in (False, True):
            u, delta, z = (torch.randn(batch, dim, length) for _ in range(3))
            B, C = torch.randn(batch, n, length), torch.randn(batch, n, length)
            A, D, bias = -5 * torch.rand(dim, n), torch.randn(dim), torch.randn(dim)
            expected = selective_scan_ref(
                u, delta, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=True,
                return_last_state=True, reverse=reverse,
            )  # fmt: skip
            out, last, _ = scan_decomposition(u, delta, A, B, C, D, z, bias, True, reverse)
            torch.testing.assert_close(out, expected[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(last, expected[1], atol=1e-5, rtol=1e-5)


def test_a_program_that_disagrees_with_eager_is_not_written(tmp_path, monkeypatch):
    import ssamba.export as export

    source = write_small_encoder(tmp_path / "encoder.pt", family="ssast")
    monkeypatch.setattr(export, "TOLERANCE", -1.0)  # no program can pass

    with pytest.raises(ExportError, match="not written"):
        export_program(load_encoder_file(source), tmp_path / "enc.pt2")
    assert not (tmp_path / "enc.pt2").exists()
    assert list(tmp_path.iterdir()) == [source]


def test_onnx_export_takes_any_length_and_matches_eager(tmp_path, capsys):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    source = write_small_encoder(tmp_path / "encoder.pt", family="ssamba")
    out = tmp_path / "encoder.onnx"

    code = main([str(source), str(out), "--format", "onnx"])

    output = capsys.readouterr()
    assert code == 0, output.err  # an export that fails is a failure, whatever it says
    assert out.is_file() and "max abs diff" in output.out
    run = onnx_runner(out)
    for case in eager_cases(source, [(1, INPUT_FRAMES), (1, 6000), (3, 100)]):
        embedding, steps = run(case["fbank"])
        torch.testing.assert_close(embedding, case["embedding"], atol=1e-4, rtol=0)
        torch.testing.assert_close(steps, case["steps"], atol=1e-4, rtol=0)


def readme_snippet(marker: str) -> str:
    """The python block after `<!-- snippet: marker -->` in README.md."""
    text = (REPO / "README.md").read_text()
    after = text.split(f"<!-- snippet: {marker} -->", 1)[1]
    return after.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.parametrize("clip_name", ["fsdd", "sample"])
def test_the_readme_torchaudio_recipe_and_the_exported_file_equal_ssamba_embed(
    clip_name, tmp_path, fsdd_dir, sample_wav
):
    features = FbankConfig(target_length=INPUT_FRAMES, mean=-5.5, std=3.5, pad="floor")
    source = write_small_encoder(tmp_path / "model.pt", features=features)
    assert main([str(source), str(tmp_path / "encoder.pt2"), "--format", "exported-program"]) == 0
    # an FSDD digit (0.4 s, 8 kHz: one window) or the 30 s recording (12 windows)
    original = fsdd_dir / "recordings" / "7_jackson_3.wav" if clip_name == "fsdd" else sample_wav
    clip = tmp_path / "clip.wav"
    clip.write_bytes(original.read_bytes())
    recipe = json.loads((tmp_path / "encoder.pt2.json").read_text())["input"]["recipe"]
    assert recipe["normalisation"] == {
        "formula": "(x - mean) / (2 * std)",
        "mean": -5.5,
        "std": 3.5,
    }
    assert recipe["padding"] == "floor" and recipe["window_frames"] == INPUT_FRAMES

    script = (
        'import sys\nsys.modules["ssamba"] = None\n'
        + readme_snippet("torchaudio-only")
        + '\ntorch.save([clip_embedding[0], steps[0]], "snippet.pt")\n'
    )
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr
    assert embed_main([str(clip), "--ckpt", str(source), "--out", str(tmp_path / "e.npy")]) == 0
    wave, _ = load_audio(clip)
    expected_steps = Embedder.from_file(source).embed(wave[None]).steps[0][0]

    embedding, steps = torch.load(tmp_path / "snippet.pt")
    expected = torch.from_numpy(np.load(tmp_path / "e.npy"))[0]
    torch.testing.assert_close(embedding, expected, atol=1e-5, rtol=1e-5)
    # whole-clip features against a window's own (its DC, its float sums): 1e-5 apart
    torch.testing.assert_close(steps, expected_steps, atol=1e-4, rtol=1e-4)


def test_overlapping_windows_give_the_steps_ssamba_embed_gives(tmp_path, sample_wav):
    """16 x 16 patches every 10 frames: 25 steps span 250 of a window's 256 frames, so
    windows start every 250 frames and overlap."""
    torch.manual_seed(0)
    cfg = EncoderConfig.preset(
        "ssamba", "tiny", embed_dim=32, depth=2, input_frames=INPUT_FRAMES, stride=[16, 10]
    )
    features = FbankConfig(target_length=INPUT_FRAMES)
    source = EncoderFile(AudioEncoder(cfg).eval(), features).save(tmp_path / "encoder.pt")
    wave, _ = load_audio(sample_wav)
    wave = wave[: 16000 * 7]  # 698 frames: windows at 0, 250 and 500
    fbank = clip_features(wave, 16000, replace(features, target_length=None), train=False)

    with torch.no_grad():
        encoder = load_encoder_file(source).encoder.eval()
        embedding, steps = ClipEmbedder(encoder, features)(fbank[None])

    expected = Embedder.from_file(source).embed(wave[None])
    assert steps.shape[1] == len(expected.times_ms) == 70  # every 100 ms from 87.5 ms
    torch.testing.assert_close(steps[0], expected.steps[0][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(embedding, expected.pooled(0, "mean"), atol=1e-4, rtol=1e-4)
