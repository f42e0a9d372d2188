"""`ssamba export --format exported-program|onnx`: programs that run on torch alone, checked
against the eager encoder before they are written."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from ssamba.embed.cli import main as embed_main
from ssamba.export import ExportError, export_program, main
from ssamba.features import FbankConfig
from ssamba.models.encoder_file import load_encoder_file
from tests._encoder_files import INPUT_FRAMES, write_small_encoder

REPO = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter where `import ssamba` fails: the program must need torch only.
WITHOUT_SSAMBA = textwrap.dedent(
    """
    import sys
    sys.modules["ssamba"] = None  # any import of ssamba (or its C++ kernels) now fails
    import torch
    program = torch.export.load(sys.argv[1]).module()
    data = torch.load(sys.argv[2])
    embedding, tokens = program(data["fbank"])
    diff = max((embedding - data["embedding"]).abs().max().item(),
               (tokens - data["tokens"]).abs().max().item())
    print(f"max abs diff {diff:.3g}")
    sys.exit(0 if diff <= 1e-4 else 1)
    """
)


def _eager_outputs(path: Path, batch: int) -> dict:
    encoder = load_encoder_file(path).encoder.eval()
    fbank = torch.randn(batch, INPUT_FRAMES, encoder.cfg.num_mel_bins)
    with torch.no_grad():
        tokens = encoder.forward_features(fbank)
    return {"fbank": fbank, "embedding": encoder.pool(tokens, "mean"), "tokens": tokens}


@pytest.mark.parametrize("family", ["ssamba", "aum", "ssast"])
def test_exported_program_runs_without_ssamba_and_matches_eager(family, tmp_path, capsys):
    source = write_small_encoder(tmp_path / "encoder.pt", family=family)
    out = tmp_path / "encoder.pt2"

    assert main([str(source), str(out), "--format", "exported-program"]) == 0

    assert "max abs diff" in capsys.readouterr().out
    sidecar = json.loads((tmp_path / "encoder.pt2.json").read_text())  # how to make inputs
    assert sidecar["features"]["target_length"] == INPUT_FRAMES
    assert sidecar["input"]["shape"] == ["batch", INPUT_FRAMES, 128]
    assert sidecar["max_abs_diff_vs_eager"] <= 1e-4
    # batch 3: the program was traced at batch 2 and keeps the batch dimension free
    torch.save(_eager_outputs(source, batch=3), tmp_path / "expected.pt")
    check = subprocess.run(
        [sys.executable, "-c", WITHOUT_SSAMBA, str(out), str(tmp_path / "expected.pt")],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # not the repository: ssamba must not be found by accident
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_a_program_that_disagrees_with_eager_is_not_written(tmp_path, monkeypatch):
    import ssamba.export as export

    source = write_small_encoder(tmp_path / "encoder.pt", family="ssast")
    monkeypatch.setattr(export, "TOLERANCE", -1.0)  # no program can pass

    with pytest.raises(ExportError, match="not written"):
        export_program(load_encoder_file(source), tmp_path / "enc.pt2")
    assert not (tmp_path / "enc.pt2").exists()
    assert list(tmp_path.iterdir()) == [source]


def test_onnx_export_runs_and_matches_eager(tmp_path, capsys):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    source = write_small_encoder(tmp_path / "encoder.pt", family="ssamba")
    out = tmp_path / "encoder.onnx"

    code = main([str(source), str(out), "--format", "onnx"])

    output = capsys.readouterr()
    assert code == 0, output.err  # an export that fails is a failure, whatever it says
    assert out.is_file() and "max abs diff" in output.out


def docs_snippet(marker: str) -> str:
    """The python block after `<!-- snippet: marker -->` in docs/export.md."""
    text = (REPO / "docs" / "export.md").read_text()
    after = text.split(f"<!-- snippet: {marker} -->", 1)[1]
    return after.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_docs_torchaudio_recipe_and_the_exported_file_equal_ssamba_embed(tmp_path, fsdd_dir):
    features = FbankConfig(target_length=INPUT_FRAMES, mean=-5.5, std=3.5, pad="floor")
    source = write_small_encoder(tmp_path / "model.pt", features=features)
    assert main([str(source), str(tmp_path / "encoder.pt2"), "--format", "exported-program"]) == 0
    clip = tmp_path / "clip.wav"
    clip.write_bytes((fsdd_dir / "recordings" / "7_jackson_3.wav").read_bytes())
    recipe = json.loads((tmp_path / "encoder.pt2.json").read_text())["input"]["recipe"]
    assert recipe["normalisation"] == {
        "formula": "(x - mean) / (2 * std)",
        "mean": -5.5,
        "std": 3.5,
    }
    assert recipe["padding"] == "floor" and recipe["frames"] == INPUT_FRAMES

    script = (
        'import sys\nsys.modules["ssamba"] = None\n'
        + docs_snippet("torchaudio-only")
        + '\ntorch.save(clip_embedding, "snippet.pt")\n'
    )
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr
    assert embed_main([str(clip), "--ckpt", str(source), "--out", str(tmp_path / "e.npy")]) == 0

    expected = torch.from_numpy(np.load(tmp_path / "e.npy"))[0]
    torch.testing.assert_close(torch.load(tmp_path / "snippet.pt"), expected, atol=1e-5, rtol=1e-5)
