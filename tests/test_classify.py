"""ClassifyTask: initial weights from every checkpoint kind, input adaptation, probing,
metrics, schedules and the errors a user can act on."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, Trainer
from torch.utils.data import DataLoader

from ssamba.models.encoder import AudioEncoder, EncoderConfig
from ssamba.models.encoder_file import EncoderFile
from ssamba.tasks.callbacks import EpochWeightAveraging
from ssamba.tasks.classify import ClassifyTask
from ssamba.tasks.metrics import classification_metrics, update_metrics
from ssamba.tasks.schedules import lr_factor

SMALL = EncoderConfig.preset("ssamba", "tiny", depth=2, embed_dim=32)


def save_encoder(encoder: AudioEncoder, path) -> None:
    EncoderFile(encoder, None).save(path)


def small_encoder(**overrides) -> AudioEncoder:
    torch.manual_seed(0)
    cfg = EncoderConfig.preset("ssamba", "tiny", **{"depth": 2, "embed_dim": 32, **overrides})
    return AudioEncoder(cfg).eval()


# ------------------------------------------------------------------ metrics


def reference_average_precision(scores: np.ndarray, positives: np.ndarray) -> float:
    """sklearn's average_precision_score, written out: sum over thresholds of dR * P."""
    order = np.argsort(-scores, kind="mergesort")
    scores, positives = scores[order], positives[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    true_pos = np.cumsum(positives)[last_of_tie]
    precision = true_pos / (last_of_tie + 1)
    recall = true_pos / positives.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def test_accuracy_and_map_agree_with_reference_computations():
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(40, 5, generator=generator)
    logits[::7, 2] = logits[1, 2]  # ties, which sklearn groups into one threshold
    labels = torch.arange(40) % 5
    target = torch.nn.functional.one_hot(labels, 5).float()
    metrics = classification_metrics(5, multilabel=False, prefix="val/")
    update_metrics(metrics, logits[:25], target[:25])  # two batches, like an epoch
    update_metrics(metrics, logits[25:], target[25:])
    result = {k: float(v) for k, v in metrics.compute().items()}

    expected_acc = float((logits.argmax(1) == labels).float().mean())
    probs = logits.sigmoid().numpy()
    expected_map = np.mean(
        [reference_average_precision(probs[:, c], target[:, c].numpy()) for c in range(5)]
    )
    assert result["val/acc"] == pytest.approx(expected_acc)
    assert result["val/mAP"] == pytest.approx(expected_map, abs=1e-6)


def test_multilabel_metrics_give_map_only():
    target = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]]).float()
    logits = torch.tensor([[2.0, -1, 0.5], [0.1, 1.5, -2], [-0.3, 0.2, 0.1], [0, -1, 3]])
    metrics = classification_metrics(3, multilabel=True, prefix="test/")
    update_metrics(metrics, logits, target)
    result = {k: float(v) for k, v in metrics.compute().items()}
    probs = logits.sigmoid().numpy()
    expected = np.mean(
        [reference_average_precision(probs[:, c], target[:, c].numpy()) for c in range(3)]
    )
    assert set(result) == {"test/mAP"}
    assert result["test/mAP"] == pytest.approx(expected, abs=1e-6)


# ------------------------------------------------------------------ schedules


def test_multistep_factor_matches_torch_multisteplr_stepped_per_epoch():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(range(6, 1000, 2)), 0.85)
    for epoch in range(20):
        ours = lr_factor(
            10 * epoch,
            epoch,
            schedule="multistep",
            warmup_steps=0,
            decay_start=6,
            decay_every=2,
            decay_gamma=0.85,
        )
        assert ours == pytest.approx(optimizer.param_groups[0]["lr"]), epoch
        optimizer.step()
        scheduler.step()


def test_warmup_rises_linearly_then_cosine_reaches_zero():
    common = dict(schedule="cosine", warmup_steps=10, decay_start=0, decay_every=1, decay_gamma=1.0)
    factors = [lr_factor(step, 0, total_steps=110, **common) for step in range(110)]
    assert factors[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert all(b <= a for a, b in itertools.pairwise(factors[10:]))
    assert lr_factor(110, 0, total_steps=110, **common) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="cosine needs a known number of steps"):
        lr_factor(0, 0, total_steps=math.inf, **common)


# ------------------------------------------------------------------ initial weights


def official_layout(encoder: AudioEncoder) -> dict[str, torch.Tensor]:
    """The encoder's weights under the key names of an official SSAMBA pretraining .pth.

    docs/originals.md#checkpoints: `module.` (DataParallel), `module.v.*` (VisionMamba), `module.mask_embed`,
    the MSPM heads, the unused 1000-class head and the input-size scalars.
    """
    dim = encoder.embed_dim
    state = {
        f"module.v.{k}": v.clone() for k, v in encoder.state_dict().items() if k != "mask_embed"
    }
    state["module.mask_embed"] = encoder.mask_embed.detach().clone()
    for head in ("cpredlayer", "gpredlayer"):
        state[f"module.{head}.0.weight"] = torch.randn(dim, dim)
        state[f"module.{head}.0.bias"] = torch.randn(dim)
        state[f"module.{head}.2.weight"] = torch.randn(256, dim)
        state[f"module.{head}.2.bias"] = torch.randn(256)
    state["module.v.head.weight"] = torch.randn(1000, dim)
    state["module.v.head.bias"] = torch.randn(1000)
    state["module.p_input_fdim"] = torch.tensor(encoder.cfg.num_mel_bins)
    state["module.p_input_tdim"] = torch.tensor(encoder.cfg.input_frames)
    return state


def fbank_batch(batch: int, frames: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, frames, 128, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["official", "exported"])
def test_loaded_encoder_gives_the_source_models_outputs(tmp_path, kind):
    source = small_encoder(input_frames=128)
    path = tmp_path / f"{kind}.pth"
    if kind == "official":
        torch.save(official_layout(source), path)
    else:
        save_encoder(source, path)
    task = ClassifyTask(num_classes=4, init=str(path)).eval()
    fbank = fbank_batch(2, 128)
    with torch.no_grad():
        expected = source.forward_features(fbank)
        got = task.encoder.forward_features(fbank)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_finetuned_checkpoint_restores_encoder_and_head(tmp_path):
    source = small_encoder(input_frames=128)
    save_encoder(source, tmp_path / "encoder.pt")
    task = ClassifyTask(num_classes=3, init=str(tmp_path / "encoder.pt"), stride=10)
    trainer = fit(task, tmp_path, batches=1)
    best = trainer.checkpoint_callback.best_model_path

    restored = ClassifyTask(num_classes=3, init=best).eval()
    assert restored.head_source == best
    assert restored.encoder.grid == (12, 12)
    task.load_state_dict(torch.load(best, weights_only=True)["state_dict"])
    fbank = fbank_batch(2, 128)
    with torch.no_grad():
        torch.testing.assert_close(restored(fbank), task.eval()(fbank), rtol=0, atol=0)


def test_checkpoint_of_another_size_or_family_is_refused_naming_both(tmp_path):
    save_encoder(small_encoder(), tmp_path / "encoder.pt")
    with pytest.raises(
        ValueError, match=r"holds a ssamba encoder \(embed_dim 32, depth 2\).*embed_dim 64"
    ):
        ClassifyTask(
            num_classes=3, init=str(tmp_path / "encoder.pt"), encoder=replace(SMALL, embed_dim=64)
        )
    with pytest.raises(ValueError, match="asks for ssast"):
        ClassifyTask(
            num_classes=3,
            init=str(tmp_path / "encoder.pt"),
            encoder=EncoderConfig(family="ssast", depth=2, embed_dim=32, num_heads=2),
        )


def test_missing_or_unreadable_init_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere\.pt"):
        ClassifyTask(num_classes=3, init=str(tmp_path / "nowhere.pt"))
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"notes\.txt is not a readable checkpoint"):
        ClassifyTask(num_classes=3, init=str(tmp_path / "notes.txt"))
    with pytest.raises(ValueError, match=r"model\.encoder: required with random init"):
        ClassifyTask(num_classes=3, init=None)


@pytest.mark.parametrize("frames", [128, 512, 1024])
def test_stride_change_keeps_conv_weights_and_resizes_positions(tmp_path, frames):
    source = small_encoder(input_frames=1024)  # pretrained at 1024 frames, stride 16: 8 x 64
    save_encoder(source, tmp_path / "encoder.pt")
    task = ClassifyTask(
        num_classes=5, init=str(tmp_path / "encoder.pt"), input_frames=frames, stride=10
    )
    time_patches = (frames - 16) // 10 + 1
    assert task.encoder.grid == (12, time_patches)
    assert task.encoder.pos_embed.shape == (1, 1 + 12 * time_patches, 32)
    assert torch.equal(task.encoder.patch_embed.proj.weight, source.patch_embed.proj.weight)
    assert torch.equal(task.encoder.cls_token, source.cls_token)
    with torch.no_grad():
        assert task.eval()(fbank_batch(1, frames)).shape == (1, 5)


# ------------------------------------------------------------------ training behaviour


def synthetic_batches(n: int, num_classes: int, frames: int = 128, batch: int = 4) -> list[dict]:
    generator = torch.Generator().manual_seed(1)
    batches = []
    for i in range(n):
        label = torch.randint(0, num_classes, (batch,), generator=generator)
        batches.append(
            {
                "fbank": torch.randn(batch, frames, 128, generator=generator),
                "target": torch.nn.functional.one_hot(label, num_classes).float(),
                "label": label,
                "id": [f"clip{i}_{j}" for j in range(batch)],
            }
        )
    return batches


def fit(task: ClassifyTask, tmp_path, epochs: int = 1, batches: int = 2, callbacks=()) -> Trainer:
    trainer = Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=list(callbacks),
    )
    data = synthetic_batches(batches, task.hparams.num_classes)
    loader = DataLoader(data, batch_size=None)
    trainer.fit(
        task, train_dataloaders=loader, val_dataloaders=DataLoader(data[:1], batch_size=None)
    )
    return trainer


def test_linear_probe_trains_the_head_and_leaves_the_encoder_untouched(tmp_path):
    task = ClassifyTask(
        num_classes=3, encoder=replace(SMALL, input_frames=128), mode="linear", lr=1e-2
    )
    encoder_before = {k: v.clone() for k, v in task.encoder.state_dict().items()}
    head_before = {k: v.clone() for k, v in task.mlp_head.state_dict().items()}
    seen_modes = []

    class RecordMode(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            seen_modes.append(pl_module.encoder.training)

    fit(task, tmp_path, batches=3, callbacks=[RecordMode()])
    for name, value in task.encoder.state_dict().items():
        assert torch.equal(value, encoder_before[name]), name
    assert any(not torch.equal(v, head_before[k]) for k, v in task.mlp_head.state_dict().items())
    assert seen_modes and not any(seen_modes)  # frozen encoder stays in eval mode
    assert all(not p.requires_grad for p in task.encoder.parameters())


def test_ignore_padding_pools_the_clip_s_own_patches_and_needs_frames(tmp_path):
    task = ClassifyTask(
        num_classes=3, encoder=replace(SMALL, input_frames=128), ignore_padding=True
    ).eval()
    fbank = torch.randn(2, 128, 128, generator=torch.Generator().manual_seed(0))
    frames = torch.tensor([128, 40])
    with torch.no_grad():
        tokens = task.encoder.forward_features(fbank)
        embedded = task.embed(fbank, frames)
    own = task.encoder.clip_patches(frames)
    torch.testing.assert_close(embedded, task.encoder.pool(tokens, "mean", own))
    torch.testing.assert_close(embedded[0], task.encoder.pool(tokens, "mean")[0])
    assert not torch.allclose(embedded[1], task.encoder.pool(tokens, "mean")[1])
    batch = synthetic_batches(1, 3)[0]  # no "frames"
    with pytest.raises(ValueError, match="ignore_padding needs batches with 'frames'"):
        task.training_step(batch, 0)


def test_weight_averaging_tests_the_mean_of_the_chosen_epochs(tmp_path):
    snapshots = {}

    class Snapshot(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            snapshots[trainer.current_epoch + 1] = {
                k: v.clone() for k, v in pl_module.mlp_head.state_dict().items()
            }

    task = ClassifyTask(
        num_classes=3, encoder=replace(SMALL, input_frames=128), lr=1e-2, weight_averaging=[2, 3]
    )
    trainer = fit(task, tmp_path, epochs=4, callbacks=[Snapshot()])
    averaging = next(cb for cb in trainer.callbacks if isinstance(cb, EpochWeightAveraging))
    for name, value in task.mlp_head.state_dict().items():
        expected = (snapshots[2][name].double() + snapshots[3][name].double()) / 2
        torch.testing.assert_close(value, expected.float())
    saved = torch.load(averaging.averaged_path, weights_only=True)["state_dict"]
    torch.testing.assert_close(saved["mlp_head.1.weight"], task.mlp_head[1].weight.detach())


def test_multilabel_batch_in_a_single_label_task_names_the_clip(tmp_path):
    task = ClassifyTask(num_classes=3, encoder=replace(SMALL, input_frames=128))
    batch = synthetic_batches(1, 3)[0]
    batch["label"][2] = -1
    with pytest.raises(ValueError, match="clip 'clip0_2' has several labels"):
        task.training_step(batch, 0)
    with pytest.raises(ValueError, match="'acc' is undefined for multi-label"):
        ClassifyTask(num_classes=3, encoder=SMALL, multilabel=True, loss="bce", metric="acc")
