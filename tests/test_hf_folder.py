"""Hugging Face-style folders: safetensors + config.json, exact round trips, no pickle,
read by every consumer through the one loader."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from _encoder_files import INPUT_FRAMES

from ssamba.embed.cli import main as embed_main
from ssamba.export import main as export_main
from ssamba.features import FbankConfig
from ssamba.models.adapters import AdapterConfig
from ssamba.models.encoder import AudioEncoder, EncoderConfig
from ssamba.models.encoder_file import EncoderFile, load_encoder_file
from ssamba.models.official import CheckpointError


def classifier(family: str = "ssamba", adapters: AdapterConfig | None = None) -> EncoderFile:
    torch.manual_seed(0)
    cfg = EncoderConfig.preset(family, "tiny", embed_dim=32, depth=2, input_frames=INPUT_FRAMES)
    encoder = AudioEncoder(cfg).eval()
    if adapters is not None:
        encoder.add_adapters(adapters)
        with torch.no_grad():
            for p in encoder.adapters.parameters():
                p.normal_()
    head = {
        "0.weight": torch.rand(32),
        "0.bias": torch.rand(32),
        "1.weight": torch.randn(4, 32),
        "1.bias": torch.randn(4),
    }
    features = FbankConfig(target_length=INPUT_FRAMES, mean=-6.0, std=4.0, pad="floor")
    return EncoderFile(
        encoder,
        features,
        ["dog", "rain", "siren", "speech"],
        head,
        {"kind": "test", "source": "made here", "step": 12},
        pooling="stats" if adapters is None else "mean",
        multilabel=True,
    )


@pytest.mark.parametrize(
    "family,adapters",
    [("ssamba", None), ("ssast", None), ("ssamba", AdapterConfig(kind="lora", size=2))],
    ids=["ssamba", "ssast", "ssamba-lora"],
)
def test_a_folder_round_trips_weights_features_labels_head_and_settings(
    tmp_path: Path, family: str, adapters: AdapterConfig | None
) -> None:
    bundle = classifier(family, adapters)

    folder = bundle.save_pretrained(tmp_path / "model")
    loaded = EncoderFile.from_pretrained(folder)

    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    want, got = bundle.payload(), loaded.payload()
    for key in ("config", "features", "labels", "head_settings"):
        assert got[key] == want[key], key
    for key in ("state_dict", "head"):
        assert got[key].keys() == want[key].keys()
        for name in want[key]:
            assert torch.equal(got[key][name], want[key][name]), name
    if adapters is not None:
        assert got["adapters"]["config"] == want["adapters"]["config"]
        for name, value in want["adapters"]["state_dict"].items():
            assert torch.equal(got["adapters"]["state_dict"][name], value), name
    assert got["provenance"]["step"] == 12
    fbank = torch.randn(2, INPUT_FRAMES, 128)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.encoder.eval()(fbank), bundle.encoder(fbank), rtol=0, atol=0
        )


def test_the_folder_holds_no_pickle(tmp_path: Path) -> None:
    folder = classifier().save_pretrained(tmp_path / "model")

    config = json.loads((folder / "config.json").read_text())  # plain JSON
    assert config["format"] == "ssamba-encoder" and config["labels"][0] == "dog"
    weights = (folder / "model.safetensors").read_bytes()
    header = int.from_bytes(weights[:8], "little")  # safetensors: u64 length + JSON header
    assert json.loads(weights[8 : 8 + header])["encoder.pos_embed"]["dtype"] == "F32"
    assert not zipfile.is_zipfile(folder / "model.safetensors")  # not a torch.save zip
    assert b"\x80\x02" not in weights[: 8 + header] and b"\x80\x04" not in weights[:16]


def test_export_hf_writes_a_folder_that_embed_reads(tmp_path: Path, fsdd_dir: Path) -> None:
    source = classifier().save(tmp_path / "encoder.pt")
    clip = fsdd_dir / "recordings" / "4_george_9.wav"

    assert export_main([str(source), str(tmp_path / "hf"), "--format", "hf"]) == 0
    for ckpt, out in ((source, "file.npy"), (tmp_path / "hf", "folder.npy")):
        assert embed_main([str(clip), "--ckpt", str(ckpt), "--out", str(tmp_path / out)]) == 0

    np.testing.assert_array_equal(np.load(tmp_path / "folder.npy"), np.load(tmp_path / "file.npy"))


def test_a_broken_folder_is_named_in_one_line(tmp_path: Path) -> None:
    folder = classifier().save_pretrained(tmp_path / "model")
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")

    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors"):
        load_encoder_file(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no model\.safetensors beside config\.json"):
        load_encoder_file(folder)
