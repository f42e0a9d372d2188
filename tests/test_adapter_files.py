"""Adapter runs' files through the one loader: evaluate, predict, embed, export and HEAR read them,
encoder files carry adapters (version 3), and the models' imports run one way."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_finetune import FSDD, SMALL, run_options

from ssamba import hear
from ssamba.embed.cli import main as embed_main
from ssamba.export import export_program
from ssamba.export import main as export_main
from ssamba.models.adapters import AdapterConfig, weights_sha256
from ssamba.models.encoder import AudioEncoder, EncoderConfig
from ssamba.models.encoder_file import EncoderFile, load_encoder_file
from ssamba.models.official import CheckpointError
from ssamba.predict import main as predict_main
from ssamba.tasks.evaluate_cli import main as evaluate_main
from ssamba.tasks.finetune_cli import latest_results
from ssamba.tasks.finetune_cli import main as finetune_main

MODELS = Path(__file__).resolve().parents[1] / "ssamba" / "models"


@pytest.fixture(scope="module")
def adapter_run(subset_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One short adapter run of the FSDD recipe on a random base encoder file."""
    root = tmp_path_factory.mktemp("adapter_run")
    torch.manual_seed(0)
    base = EncoderFile(AudioEncoder(EncoderConfig(**SMALL, input_frames=64)), None)
    base_path = base.save(root / "base.pt")
    options = [
        *run_options(subset_shards, root / "run"),
        f"--model.init={base_path}",
        "--model.mode=adapter",
        "--model.adapter.kind=bottleneck",
        "--model.adapter.size=8",
        "--data.batch_size=8",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=4",
    ]
    assert finetune_main(["--config", str(FSDD), *options]) == 0
    results = json.loads(latest_results(root / "run").read_text())
    return {"results": results, "file": results["encoder_file"]["-"], "base": base_path}


def test_an_adapter_file_loads_carrying_its_adapters_head_and_head_settings(
    adapter_run: dict,
) -> None:
    bundle = load_encoder_file(adapter_run["file"])

    assert bundle.encoder.adapter_config.kind == "bottleneck"
    assert bundle.labels == [str(d) for d in range(10)]
    assert bundle.head is not None and bundle.pooling == "mean"
    base = load_encoder_file(adapter_run["base"])
    assert weights_sha256(bundle.encoder) == weights_sha256(base.encoder)


def test_an_adapter_file_on_another_base_is_refused_naming_both(
    adapter_run: dict, tmp_path: Path
) -> None:
    torch.manual_seed(7)
    other = EncoderFile(AudioEncoder(EncoderConfig(**SMALL, input_frames=64)), None)
    other_path = other.save(tmp_path / "other.pt")

    with pytest.raises(CheckpointError, match=r"belong to base encoder .*base\.pt.*other\.pt"):
        load_encoder_file(adapter_run["file"], base=other_path)


def test_evaluate_scores_an_adapter_file_as_its_run_did(
    adapter_run: dict, subset_shards: Path, tmp_path: Path
) -> None:
    options = [f"--data.shards={subset_shards}", "--trainer.enable_progress_bar=false"]
    ckpt = adapter_run["file"]

    code = evaluate_main(["--ckpt", ckpt, "--config", str(FSDD), *options, "--out", str(tmp_path)])

    assert code == 0
    scored = json.loads((tmp_path / "results.json").read_text())
    assert scored["value"] == pytest.approx(adapter_run["results"]["value"], abs=1e-6)


def test_predict_labels_audio_with_an_adapter_file_as_with_its_export(
    adapter_run: dict, fsdd_dir: Path, tmp_path: Path
) -> None:
    clip = fsdd_dir / "recordings" / "3_theo_7.wav"
    exported = tmp_path / "classifier.pt"
    assert export_main([adapter_run["file"], str(exported)]) == 0
    records = {}
    for name, ckpt in (("adapters", adapter_run["file"]), ("exported", exported)):
        out = tmp_path / f"{name}.json"
        assert predict_main([str(clip), "--ckpt", str(ckpt), "--out", str(out)]) == 0
        records[name] = json.loads(out.read_text())[0]

    assert records["adapters"]["labels"] == records["exported"]["labels"]
    assert len(records["adapters"]["labels"]) >= 1
    assert records["adapters"]["probabilities"] == pytest.approx(
        records["exported"]["probabilities"], abs=1e-6
    )


def test_embed_reads_an_adapter_file_and_its_adapters_change_the_embedding(
    adapter_run: dict, fsdd_dir: Path, tmp_path: Path
) -> None:
    clip = fsdd_dir / "recordings" / "3_theo_7.wav"
    for name in ("file", "base"):
        out = tmp_path / f"{name}.npy"
        assert embed_main([str(clip), "--ckpt", str(adapter_run[name]), "--out", str(out)]) == 0
    adapted, base = np.load(tmp_path / "file.npy"), np.load(tmp_path / "base.npy")

    assert adapted.shape == base.shape == (1, SMALL["embed_dim"])
    assert not np.allclose(adapted, base)


def test_export_writes_an_adapter_file_as_one_self_contained_encoder_file(
    adapter_run: dict, tmp_path: Path
) -> None:
    out = tmp_path / "classifier.pt"

    assert export_main([adapter_run["file"], str(out)]) == 0

    Path(adapter_run["base"]).rename(tmp_path / "base-moved.pt")  # no longer needed
    try:
        exported = load_encoder_file(out)
    finally:
        (tmp_path / "base-moved.pt").rename(adapter_run["base"])
    original = load_encoder_file(adapter_run["file"])
    assert exported.encoder.adapter_config == original.encoder.adapter_config
    assert exported.labels == original.labels and exported.pooling == original.pooling
    fbank = torch.randn(2, 64, 128)
    with torch.no_grad():
        torch.testing.assert_close(
            exported.classifier()(exported.encoder(fbank)),
            original.classifier()(original.encoder(fbank)),
        )


def test_hear_loads_an_adapter_file(adapter_run: dict) -> None:
    model = hear.load_model(adapter_run["file"])
    audio = torch.randn(2, 8000) * 0.1

    scene = hear.get_scene_embeddings(audio, model)

    assert scene.shape == (2, SMALL["embed_dim"]) and torch.isfinite(scene).all()
    assert model.embedder.encoder.adapter_config.kind == "bottleneck"


def test_encoder_files_carry_lora_adapters_and_head_settings(tmp_path: Path) -> None:
    encoder = AudioEncoder(EncoderConfig(**SMALL, input_frames=64))
    encoder.add_adapters(AdapterConfig(kind="lora", size=2))
    with torch.no_grad():
        for p in encoder.adapters.parameters():
            p.normal_()
    head = {"1.weight": torch.randn(3, 64), "1.bias": torch.zeros(3)}
    path = EncoderFile(
        encoder, None, ["a", "b", "c"], head, pooling="stats", ignore_padding=True
    ).save(tmp_path / "lora.pt")

    loaded = load_encoder_file(path)

    fbank = torch.randn(1, 64, 128)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encoder.eval()(fbank), encoder.eval()(fbank))
    assert (loaded.pooling, loaded.ignore_padding) == ("stats", True)
    assert isinstance(loaded.classifier()[0], torch.nn.Identity)  # AuM-style bare Linear head


def _runtime_imports(path: Path) -> set[str]:
    """ssamba.models modules that `path` imports when it runs (TYPE_CHECKING blocks left out)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            found.update(
                n
                for n in names
                if n.count(".") == 2 and (MODELS / f"{n.split('.')[-1]}.py").is_file()
            )
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return {n.split(".")[-1] for n in found if n.startswith("ssamba.models.")}


def test_the_models_modules_import_each_other_without_a_circle() -> None:
    graph = {p.stem: _runtime_imports(p) - {p.stem} for p in MODELS.glob("*.py")}
    assert "adapters" in graph["encoder"] and "adapters" in graph["encoder_file"]

    def reaches(start: str, target: str, seen: set[str]) -> bool:
        return any(
            n == target or (n not in seen and reaches(n, target, seen | {n}))
            for n in graph.get(start, ())
        )

    circles = [m for m in graph if reaches(m, m, {m})]
    assert circles == [], f"import circles through {circles}"


@pytest.mark.parametrize("kind", ["bottleneck", "conv", "lora"])
def test_adapters_act_once_on_every_scan_path_and_in_an_exported_program(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reversed layers of SSAMBA's pairs run their mixer on flipped tokens; on the
    composed path (CUDA, SSAMBA_SCAN=ref, export) that once ran the adapter hook twice."""
    torch.manual_seed(0)
    encoder = AudioEncoder(EncoderConfig(**SMALL, input_frames=64)).eval()
    encoder.add_adapters(AdapterConfig(kind=kind, size=4))
    with torch.no_grad():
        for p in encoder.adapters.parameters():
            p.normal_()
    fbank = torch.randn(2, 64, 128)
    with torch.no_grad():
        fused = encoder.forward_features(fbank)
        monkeypatch.setenv("SSAMBA_SCAN", "ref")
        reference = encoder.forward_features(fbank)
        monkeypatch.delenv("SSAMBA_SCAN")
    torch.testing.assert_close(reference, fused, atol=1e-4, rtol=1e-4)

    _, diff = export_program(EncoderFile(encoder, None), tmp_path / "adapted.pt2")
    assert diff <= 1e-4
