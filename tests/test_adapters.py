"""Adapters and LoRA: inserted through `AudioEncoder.add_adapters` into every family,
frozen-encoder training, adapter files and the errors a user can act on."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from lightning.pytorch import Trainer
from torch import nn
from torch.utils.data import DataLoader

from ssamba.models.adapters import (
    AdapterConfig,
    base_state_dict,
    weights_sha256,
)
from ssamba.models.encoder import AudioEncoder, EncoderConfig
from ssamba.models.encoder_file import EncoderFile, load_encoder_file
from ssamba.models.official import CheckpointError
from ssamba.tasks.classify import ClassifyTask

FRAMES = 64
FAMILIES = {
    "ssamba": dict(family="ssamba", embed_dim=32, depth=2),
    "aum": dict(family="aum", embed_dim=32, depth=2),
    "ssast": dict(family="ssast", embed_dim=32, depth=2, num_heads=2),
}


def tiny(family: str, seed: int = 0, **overrides) -> AudioEncoder:
    torch.manual_seed(seed)
    cfg = EncoderConfig.from_dict({**FAMILIES[family], "input_frames": FRAMES, **overrides})
    return AudioEncoder(cfg).eval()


def features(batch: int = 3, seed: int = 1) -> torch.Tensor:
    """Normalised filterbanks of synthesised tones: (batch, frames, 128)."""
    from ssamba.features import FbankConfig, clip_features

    cfg = FbankConfig(target_length=FRAMES, mean=-8.0, std=4.0)
    t = torch.arange(8000) / 16000
    waves = [torch.sin(2 * torch.pi * (200 + 300 * i + seed) * t) for i in range(batch)]
    return torch.stack([clip_features(w, 16000, cfg, train=False) for w in waves])


def perturb(encoder: AudioEncoder) -> None:
    """Give every adapter non-zero weights (they start as the identity)."""
    with torch.no_grad():
        for p in encoder.adapters.parameters():
            p.add_(0.1 * torch.randn_like(p))


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize(
    "spec",
    [
        AdapterConfig(kind="bottleneck", placement="parallel"),
        AdapterConfig(kind="bottleneck", placement="sequential"),
        AdapterConfig(kind="conv", placement="parallel"),
        AdapterConfig(kind="lora", size=4),
    ],
    ids=lambda s: f"{s.kind}-{s.placement}",
)
def test_adapters_start_as_identity_keep_base_names_and_then_change_outputs(family, spec):
    encoder = tiny(family)
    x = features()
    before = encoder(x)
    names = set(encoder.state_dict())
    encoder.add_adapters(spec)
    torch.testing.assert_close(encoder(x), before)  # zero-initialised up / B
    assert set(base_state_dict(encoder)) == names  # base parameter names unchanged
    assert all(k.startswith("adapters.") for k in set(encoder.state_dict()) - names)
    perturb(encoder)
    assert not torch.allclose(encoder(x), before, atol=1e-4)
    # A base encoder file still loads strictly into a fresh encoder.
    fresh = tiny(family, seed=5)
    fresh.load_state_dict(base_state_dict(encoder))
    encoder.remove_adapters()
    torch.testing.assert_close(encoder(x), before)


@pytest.mark.parametrize("family", ["ssamba", "ssast"])
def test_lora_equals_the_merged_weights_on_every_path(family):
    """LoRA must reach projections whose weight the fused Mamba path reads directly."""
    encoder = tiny(family)
    encoder.add_adapters(AdapterConfig(kind="lora", size=4, where="mixer"))
    perturb(encoder)
    merged = tiny(family)
    state = base_state_dict(encoder)
    for key, lora in encoder.adapters.items():
        weight = next(k for k in state if k.replace(".", "_") == f"{key}_weight")
        state[weight] = state[weight] + lora.delta_weight().detach()
    merged.load_state_dict(state)
    x = features()
    torch.testing.assert_close(encoder(x), merged(x), atol=1e-5, rtol=1e-5)


def test_conv_adapter_mixes_neighbouring_tokens_and_bottleneck_does_not():
    encoder = tiny("ssast")
    x = features(batch=1)
    for kind, expect_mixing in (("bottleneck", False), ("conv", True)):
        encoder.add_adapters(AdapterConfig(kind=kind, size=8))
        perturb(encoder)
        adapter = next(iter(encoder.adapters.values()))
        tokens = torch.randn(1, 10, 32)
        changed = tokens.clone()
        changed[0, 5] += 1.0
        delta = (adapter(changed) - adapter(tokens)).abs().sum(-1)[0]
        assert bool(delta[[4, 6]].gt(1e-6).all()) == expect_mixing
        encoder.remove_adapters()
    assert encoder(x).shape == (1, 32)


@pytest.mark.parametrize("family", ["ssamba", "aum"])
def test_mlp_adapters_on_mamba_blocks_are_refused_naming_the_family(family):
    encoder = tiny(family)
    with pytest.raises(ValueError, match=rf"{family} family's Mamba blocks have no MLP"):
        encoder.add_adapters(AdapterConfig(where="mlp"))
    encoder.add_adapters(AdapterConfig(where="mixer"))
    with pytest.raises(ValueError, match="already has adapters"):
        encoder.add_adapters(AdapterConfig())


def test_bad_adapter_settings_are_named():
    with pytest.raises(ValueError, match=r"AdapterConfig\.kind"):
        AdapterConfig(kind="prefix")
    with pytest.raises(ValueError, match=r"AdapterConfig\.kernel_size"):
        AdapterConfig(kind="conv", kernel_size=4)


# ------------------------------------------------------------------ training, files


def batches(n: int, num_classes: int, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        label = torch.randint(0, num_classes, (4,), generator=generator)
        out.append(
            {
                "fbank": features(4, seed=i) + 0.5 * label[:, None, None],
                "target": nn.functional.one_hot(label, num_classes).float(),
                "label": label,
                "id": [f"c{i}_{j}" for j in range(4)],
            }
        )
    return out


def train(task: ClassifyTask, tmp_path) -> Trainer:
    trainer = Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    data = batches(3, task.hparams.num_classes)
    trainer.fit(task, DataLoader(data, batch_size=None), DataLoader(data[:1], batch_size=None))
    return trainer


@pytest.fixture
def base_file(tmp_path):
    path = tmp_path / "base.pt"
    EncoderFile(tiny("ssamba"), None).save(path)
    return path


def adapter_task(init, **adapter) -> ClassifyTask:
    spec = AdapterConfig(**{"kind": "bottleneck", "size": 8, **adapter})
    return ClassifyTask(num_classes=3, init=str(init), mode="adapter", adapter=spec, lr=1e-2)


@pytest.mark.parametrize("kind", ["bottleneck", "lora"])
def test_adapter_mode_trains_adapters_and_head_and_no_encoder_weight(tmp_path, base_file, kind):
    task = adapter_task(base_file, kind=kind, size=4)
    before = {k: v.clone() for k, v in base_state_dict(task.encoder).items()}
    adapters_before = {k: v.clone() for k, v in task.encoder.adapters.state_dict().items()}
    share = task.trainable_share()
    assert 0 < share["fraction"] <= 0.10
    trainer = train(task, tmp_path)
    for name, value in base_state_dict(task.encoder).items():
        assert torch.equal(value, before[name]), name
    changed = [
        k
        for k, v in task.encoder.adapters.state_dict().items()
        if not torch.equal(v, adapters_before[k])
    ]
    assert changed
    # The checkpoint reads as the untouched base encoder (no adapter keys, no head).
    ckpt = tmp_path / "final.ckpt"
    trainer.save_checkpoint(ckpt)
    bundle = load_encoder_file(ckpt)
    assert bundle.head is None
    assert weights_sha256(bundle.encoder) == weights_sha256(load_encoder_file(base_file).encoder)
    # ... and restores the adapters into the task.
    restored = adapter_task(base_file, kind=kind, size=4)
    checkpoint = torch.load(ckpt, weights_only=True)
    restored.on_load_checkpoint(checkpoint)
    restored.load_state_dict(checkpoint["state_dict"])
    x = features()
    torch.testing.assert_close(restored.eval()(x), task.eval()(x))


def test_adapter_file_reloads_on_its_base_and_refuses_another(tmp_path, base_file):
    task = adapter_task(base_file, kind="conv")
    train(task, tmp_path)
    path = task.save_adapter_file(tmp_path / "adapters.pt")
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == "ssamba-adapters"
    assert not any(k.startswith(("layers.", "patch_embed")) for k in payload["adapters"])
    x = features()
    expected = task.eval()(x)

    bundle = load_encoder_file(path)  # the base path recorded in the file
    head = nn.Sequential(nn.LayerNorm(32), nn.Linear(32, 3))
    head.load_state_dict(bundle.head)
    pooled = bundle.encoder.pool(bundle.encoder.forward_features(x), "mean")
    torch.testing.assert_close(head(pooled), expected)

    other = tmp_path / "other.pt"
    EncoderFile(tiny("ssamba", seed=7), None).save(other)
    with pytest.raises(CheckpointError, match=r"belong to base encoder .*not to .*other\.pt"):
        load_encoder_file(path, base=other)


def test_adapter_mode_needs_a_pretrained_encoder_file():
    with pytest.raises(ValueError, match="mode adapter: needs a pretrained encoder file"):
        ClassifyTask(
            num_classes=3,
            encoder=replace(EncoderConfig.from_dict(FAMILIES["ssamba"]), input_frames=FRAMES),
            mode="adapter",
        )


def test_adapted_encoders_of_two_tasks_share_one_frozen_copy(base_file):
    """Two adapter sets on deep copies of one base keep the base weights identical."""
    first, second = adapter_task(base_file), adapter_task(base_file, kind="lora")
    assert weights_sha256(first.encoder) == weights_sha256(second.encoder)
    copy.deepcopy(first)  # adapters survive a deep copy (DDP / checkpoint averaging)
