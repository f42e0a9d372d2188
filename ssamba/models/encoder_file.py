"""The encoder file, and the one loader that reads every checkpoint ssamba meets.

An encoder file goes from a waveform to embeddings (and class scores, when it carries a
head) with nothing but the file, as BEATs' checkpoints do. `torch.save` of:

    {"format": "ssamba-encoder", "version": 2,
     "config": EncoderConfig fields,
     "state_dict": AudioEncoder weights,
     "features": FbankConfig fields the encoder was trained on, as used at inference
                 (kind, mel bins, frames, frame shift, normalisation mean/std), or None,
     "labels": class names in the order of the head's outputs, or None,
     "head": state dict of `ClassifyTask.mlp_head` (LayerNorm `0.*` + Linear `1.*`;
             a bare Linear `1.*` for AuM's classifier), or None,
     "provenance": {"kind": what the weights came from, "source": its path,
                    "step": optimizer step, ...}}

Every producer writes it (end of pretraining, end of fine-tuning, `ssamba export`), and
every consumer (fine-tuning and evaluation init, embed, HEAR, s3prl, export, the demo)
reads files through `load_encoder_file`, which also takes
- a Lightning `.ckpt` of `ssamba pretrain` or `ssamba finetune` (encoder weights under
  `encoder.*`, the config, features and labels that the tasks store beside them);
- an official SSAMBA / SSAST / AuM `.pth`, pretrained or fine-tuned (`ssamba.models.official`).

Nothing but tensors and plain containers is ever unpickled (`weights_only=True`): a file
holding any other Python object is refused with one line, because unpickling it could run
code. Lightning's own resume of a user's run (`--ckpt_path`) is the only full load.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ssamba.features import DATASET_STATS, FbankConfig
from ssamba.files import atomic_path
from ssamba.models.encoder import AudioEncoder, EncoderConfig
from ssamba.models.official import (
    OFFICIAL_FINETUNE_STRIDE,
    CheckpointError,
    load_official,
    load_strict,
    official_family,
)

FORMAT = "ssamba-encoder"
VERSION = 2
_ENCODER = "encoder."
_HEAD = "mlp_head."


@dataclass
class EncoderFile:
    """An encoder with what it needs to be used: feature settings, and head + labels if any.

    features: None when the source does not say (official AuM and fine-tuned files);
    consumers then choose a documented fallback and say so. head: state dict of the
    classifier (`ClassifyTask.mlp_head` keys), labels: its class names.
    """

    encoder: AudioEncoder
    features: FbankConfig | None
    labels: list[str] | None = None
    head: dict[str, Tensor] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.features is not None and self.features.feature_dim != self.encoder.cfg.num_mel_bins:
            raise CheckpointError(
                f"{self.provenance.get('source', 'encoder')}: features give "
                f"{self.features.feature_dim} bins per frame but the encoder reads "
                f"{self.encoder.cfg.num_mel_bins}"
            )

    @property
    def kind(self) -> str:
        return str(self.provenance.get("kind", "encoder file"))

    def describe(self) -> str:
        """One line: family, size, grid, parameters, head."""
        cfg = self.encoder.cfg
        params = sum(p.numel() for p in self.encoder.parameters())
        head = f"head for {len(self.labels or []) or '?'} classes" if self.head else "no head"
        return (
            f"{cfg.family} encoder, width {cfg.embed_dim}, depth {cfg.depth}, grid "
            f"{self.encoder.grid}, {params / 1e6:.2f}M parameters, {head} ({self.kind})"
        )

    def save(self, path: str | Path) -> Path:
        """Write the file; parent folders are created."""
        if getattr(self.encoder, "adapters", None) is not None:
            raise ValueError(
                "this encoder carries adapters: save an adapter file "
                "(ssamba.models.adapters) or call encoder.remove_adapters() first"
            )
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "format": FORMAT,
            "version": VERSION,
            "config": self.encoder.cfg.to_dict(),
            "state_dict": {k: v.detach().cpu() for k, v in self.encoder.state_dict().items()},
            "features": None if self.features is None else self.features.for_inference().to_dict(),
            "labels": None if self.labels is None else list(self.labels),
            "head": None
            if self.head is None
            else {k: v.detach().cpu() for k, v in self.head.items()},
            "provenance": dict(self.provenance),
        }
        with atomic_path(path) as staged:
            torch.save(payload, staged)
        return path


def load_encoder_file(
    path: str | Path, source_stride: int | tuple[int, int] | None = None
) -> EncoderFile:
    """Read any checkpoint ssamba knows into an `EncoderFile` (see the module docstring).

    `source_stride` is the patch stride an official fine-tuned file was trained with,
    which its tensors cannot tell (default: the official recipes' 10). Raises
    `FileNotFoundError` or `CheckpointError` (a `ValueError`) with one line that names
    the file, what it is and what to do.
    """
    path = Path(path)
    payload = read_weights_only(path)
    if not isinstance(payload, Mapping):
        raise CheckpointError(
            f"{path}: holds a {type(payload).__name__}, not a checkpoint (expected an encoder "
            f"file, a Lightning .ckpt of ssamba or an official SSAMBA/SSAST/AuM .pth)"
        )
    if payload.get("format") == FORMAT:
        return _from_encoder_file(payload, path)
    if isinstance(payload.get("format"), str):
        raise CheckpointError(
            f"{path}: a {payload['format']!r} file, not an encoder; it needs its own loader"
        )
    state = payload.get("state_dict")
    if isinstance(state, Mapping) and any(str(k).startswith(_ENCODER) for k in state):
        return _from_lightning(payload, path)
    return _from_official(payload, path, source_stride)


def read_weights_only(path: str | Path, mmap: bool = False) -> Any:
    """torch.load with `weights_only=True`, every failure as a one-line CheckpointError
    (pickled code named, never torch's advice to load it with `weights_only=False`).
    `mmap`: map the tensors rather than read them (zip checkpoints only), for a cheap look."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if not path.is_file():
        raise CheckpointError(f"{path}: a folder, not a checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        if found:  # an object the weights-only unpickler will not build
            what = found.group(1)
            raise CheckpointError(
                f"{path}: refused: it holds pickled Python code ({what}) that loading would "
                f"run; ssamba reads only tensors and plain containers (encoder files, "
                f"checkpoints of ssamba's tasks, official .pth files)"
            ) from None
        raise CheckpointError(f"{path} is not a readable checkpoint ({_reason(err)})") from None
    except Exception as err:  # torch.load of arbitrary bytes fails in many ways
        raise CheckpointError(f"{path} is not a readable checkpoint ({_first_line(err)})") from None


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _reason(err: pickle.UnpicklingError) -> str:
    """What the weights-only unpickler stopped at, without torch's paragraphs around it
    (which advise loading the file with `weights_only=False`)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    advice = ("Weights only load failed", "Check the documentation of torch.load")
    found = [line for line in lines if not line.startswith(advice)]
    return found[0] if found else "not tensors and plain containers only"


# ---------------------------------------------------------------------------- our file
def _from_encoder_file(payload: Mapping[str, Any], path: Path) -> EncoderFile:
    version = payload.get("version")
    if version not in (1, VERSION):
        raise CheckpointError(
            f"{path}: encoder file version {version!r}; this ssamba reads versions 1 and {VERSION}"
        )
    encoder = _build(payload.get("config"), payload.get("state_dict"), path)
    if version == 1:  # first release: features (if any) and heads lived in "extra"
        extra = payload.get("extra") or {}
        features, labels, head = extra.get("fbank"), None, None
        provenance = {"kind": "encoder file (version 1)", "source": str(path)}
        if "pretrain_step" in extra:
            provenance["step"] = int(extra["pretrain_step"])
    else:
        features, labels, head = payload["features"], payload["labels"], payload["head"]
        provenance = {"source": str(path), **(payload.get("provenance") or {})}
    return EncoderFile(encoder, _features(features, path), labels, head, provenance)


def _build(config: Any, state: Any, path: Path) -> AudioEncoder:
    if not isinstance(config, Mapping) or not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: encoder file without a config or weights")
    try:
        cfg = EncoderConfig.from_dict(_current_config(config))
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: bad encoder config: {err}") from None
    encoder = AudioEncoder(cfg)
    load_strict(encoder, state, source=str(path))
    return encoder


def _current_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A stored config as EncoderConfig fields; first-release task checkpoints stored
    `{family, size, **overrides}`."""
    config = dict(config)
    if "size" in config:
        return EncoderConfig.preset(config.pop("family"), config.pop("size"), **config).to_dict()
    return config


def _features(data: Any, path: Path) -> FbankConfig | None:
    if data is None:
        return None
    try:
        return FbankConfig.from_dict(data)
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: bad feature settings: {err}") from None


# ---------------------------------------------------------------------------- Lightning
def _from_lightning(ckpt: Mapping[str, Any], path: Path) -> EncoderFile:
    """A `.ckpt` of PretrainTask or ClassifyTask: they keep the encoder under `encoder.*`
    and store `encoder_config`, `features` and (ClassifyTask) `labels` in the checkpoint."""
    config = ckpt.get("encoder_config") or (ckpt.get("hyper_parameters") or {}).get("encoder")
    if not isinstance(config, Mapping):
        raise CheckpointError(
            f"{path}: a Lightning checkpoint without 'encoder_config': not written by "
            f"ssamba's tasks, so which encoder its weights belong to is unknown"
        )
    state = ckpt["state_dict"]
    own = {k.removeprefix(_ENCODER): v for k, v in state.items() if k.startswith(_ENCODER)}
    head = {k.removeprefix(_HEAD): v for k, v in state.items() if k.startswith(_HEAD)} or None
    provenance = {
        "kind": "fine-tuning checkpoint" if head else "pretraining checkpoint",
        "source": str(path),
        "step": int(ckpt.get("global_step", 0)),
    }
    encoder = _build(config, own, path)
    return EncoderFile(
        encoder, _features(ckpt.get("features"), path), ckpt.get("labels"), head, provenance
    )


# ---------------------------------------------------------------------------- official
def _from_official(
    payload: Mapping[str, Any], path: Path, source_stride: int | tuple[int, int] | None
) -> EncoderFile:
    """An official .pth: the architecture is read off the tensors (`load_official`).

    Pretrained SSAMBA/SSAST files record their input geometry and were trained on the
    AudioSet + LibriSpeech statistics; fine-tuned ones record neither, so their stride is
    the official recipes' (or `source_stride`) and their features are unknown.
    """
    state = payload.get("model") or payload.get("state_dict") or payload
    try:
        family = official_family(state)
        pretrained = any(str(k).endswith("p_input_tdim") for k in state) or family == "aum"
        if source_stride is None and not pretrained:
            source_stride = OFFICIAL_FINETUNE_STRIDE
        encoder, heads = load_official(state, family, source_stride=source_stride, source=str(path))
    except CheckpointError as err:
        raise CheckpointError(
            f"{err} (not an encoder file, a Lightning .ckpt of ssamba's tasks, nor an "
            f"official SSAMBA/SSAST/AuM checkpoint)"
        ) from None
    features = None
    if family != "aum" and any(str(k).endswith("p_input_tdim") for k in state):
        mean, std = DATASET_STATS["asli"]
        features = FbankConfig(target_length=encoder.cfg.input_frames, mean=mean, std=std)
    head = {k.removeprefix(_HEAD): v for k, v in heads.items() if k.startswith(_HEAD)}
    if family == "aum" and "head.weight" in heads:  # AuM's classifier: a bare Linear
        head = {"1.weight": heads["head.weight"], "1.bias": heads["head.bias"]}
    provenance = {
        "kind": f"official {family} checkpoint ({'pretrained' if pretrained else 'fine-tuned'})",
        "source": str(path),
    }
    if not pretrained:
        provenance["stride"] = list(encoder.cfg.stride)
    return EncoderFile(encoder, features, None, head or None, provenance)
