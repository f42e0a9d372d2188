"""Hugging Face-style folders: `config.json` + `model.safetensors`, no pickle anywhere.

The same content as an encoder file (`ssamba.models.encoder_file`), split as Hugging Face
hubs expect it, readable from any language and memory-mappable:

    DIR/config.json         {"format": "ssamba-encoder", "version": 3, "config", "features",
                             "labels", "head_settings", "adapters": {"config"} | None,
                             "provenance"}   (the encoder file's fields without tensors)
    DIR/model.safetensors   "encoder.<name>" the encoder's weights, "head.<name>" the
                            classifier head, "adapters.<name>" the adapters' weights

`write_folder(payload, DIR)` splits an encoder file's payload, `read_folder(DIR)` joins it
back, so the one loader (`load_encoder_file`) builds the encoder from a folder exactly as
from a file. This module works on payloads only: it imports no model code.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# payload key -> prefix of its tensors in model.safetensors
_TENSORS = {"state_dict": "encoder.", "head": "head."}
_ADAPTERS = "adapters."


class FolderError(ValueError):
    """A folder that is not a readable ssamba folder; the message is one line."""


def is_folder(path: Path) -> bool:
    """A folder holding `config.json` (the marker of a Hugging Face-style folder)."""
    return path.is_dir() and (path / CONFIG_NAME).is_file()


def write_folder(payload: Mapping[str, Any], folder: str | Path) -> Path:
    """Write an encoder file's payload as DIR/config.json + DIR/model.safetensors.

    Both files are staged in the folder and renamed into place, so an interrupted write
    leaves the previous pair (or nothing), never half a file.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Tensor] = {}
    config = {k: v for k, v in payload.items() if k not in (*_TENSORS, "adapters")}
    for key, prefix in _TENSORS.items():
        for name, tensor in (payload.get(key) or {}).items():
            tensors[prefix + name] = tensor
    adapters = payload.get("adapters")
    config["adapters"] = None if adapters is None else {"config": adapters["config"]}
    config["head"] = payload.get("head") is not None
    for name, tensor in ((adapters or {}).get("state_dict") or {}).items():
        tensors[_ADAPTERS + name] = tensor
    # safetensors refuses views that share memory (e.g. a LoRA's tied projection): own copies
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    with tempfile.TemporaryDirectory(dir=folder, prefix=".ssamba-") as tmp:
        staged = Path(tmp)
        save_file(tensors, str(staged / WEIGHTS_NAME), metadata={"format": "pt"})
        (staged / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            os.replace(staged / name, folder / name)
    return folder


def read_folder(folder: str | Path) -> dict[str, Any]:
    """An encoder file's payload from DIR/config.json + DIR/model.safetensors (FolderError
    with one line naming the folder when a part is missing or unreadable)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        config = json.loads((folder / CONFIG_NAME).read_text())
    except (OSError, ValueError) as err:
        raise FolderError(f"{folder / CONFIG_NAME}: not readable JSON ({err})") from None
    if not isinstance(config, dict):
        raise FolderError(f"{folder / CONFIG_NAME}: expected a JSON object")
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise FolderError(f"{folder}: no {WEIGHTS_NAME} beside {CONFIG_NAME}")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as err:
        raise FolderError(f"{weights}: not a readable safetensors file ({err})") from None
    payload = dict(config)
    for key, prefix in _TENSORS.items():
        part = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
        payload[key] = part
    if not config.get("head"):
        payload["head"] = None
    adapters = config.get("adapters")
    if adapters is not None:
        state = {
            k.removeprefix(_ADAPTERS): v for k, v in tensors.items() if k.startswith(_ADAPTERS)
        }
        payload["adapters"] = {"config": adapters.get("config"), "state_dict": state}
    return payload
