"""The encoder file, and the one loader that reads every checkpoint ssamba meets.

An encoder file goes from a waveform to embeddings (and class scores, when it carries a
head) with nothing but the file, as BEATs' checkpoints do. `torch.save` of:

    {"format": "ssamba-encoder", "version": 3,
     "config": EncoderConfig fields,
     "state_dict": AudioEncoder weights (the base encoder's, without adapters),
     "features": FbankConfig fields the encoder was trained on, as used at inference
                 (kind, mel bins, frames, frame shift, normalisation mean/std), or None,
     "labels": class names in the order of the head's outputs, or None,
     "head": state dict of `ClassifyTask.mlp_head` (LayerNorm `0.*` + Linear `1.*`;
             a bare Linear `1.*` for AuM's classifier), or None,
     "head_settings": {"pooling": how tokens are pooled before the head,
                       "ignore_padding": whether only the clip's own patches are pooled,
                       "multilabel": sigmoid per class (True) or softmax over classes},
     "adapters": {"config": AdapterConfig fields, "state_dict": their weights}, or None,
     "provenance": {"kind": what the weights came from, "source": its path,
                    "step": optimizer step, ...}}

Every producer writes it (end of pretraining, end of fine-tuning, `ssamba export`), and
every consumer (fine-tuning and evaluation init, embed, HEAR, s3prl, export, predict, the
demo) reads files through `load_encoder_file`, which also takes
- a Hugging Face-style folder of `EncoderFile.save_pretrained` (`config.json` +
  `model.safetensors`, `ssamba.models.hf_folder`): the same content, without pickle;
- an adapter file of an adapter run (`ssamba-adapters`: adapters, head and a reference to
  the base encoder by path and weights checksum): the base is read, checked against the
  checksum, and returned carrying the adapters;
- a Lightning `.ckpt` of `ssamba pretrain` or `ssamba finetune` (encoder weights under
  `encoder.*`, the config, features and labels that the tasks store beside them);
- an official SSAMBA / SSAST / AuM `.pth`, pretrained or fine-tuned (`ssamba.models.official`).

Nothing but tensors and plain containers is ever unpickled (`read_checkpoint`, the one
`torch.load` of ssamba, always `weights_only=True`): a file holding any other Python object
is refused with one line, because unpickling it could run code. Lightning's own resume of a
user's run (`--ckpt_path`) is the only other load.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ssamba.features import DATASET_STATS, FbankConfig
from ssamba.files import atomic_path
from ssamba.models import adapters as adapter_files
from ssamba.models import hf_folder
from ssamba.models.adapters import AdapterConfig, base_state_dict, weights_sha256
from ssamba.models.encoder import AudioEncoder, EncoderConfig
from ssamba.models.official import (
    OFFICIAL_FINETUNE_STRIDE,
    CheckpointError,
    load_official,
    load_strict,
    official_family,
)

FORMAT = "ssamba-encoder"
VERSION = 3
_ENCODER = "encoder."
_HEAD = "mlp_head."


@dataclass
class EncoderFile:
    """An encoder with what it needs to be used: feature settings, and head + labels if any.

    features: None when the source does not say (official AuM and fine-tuned files);
    consumers then choose a documented fallback and say so. head: state dict of the
    classifier (`ClassifyTask.mlp_head` keys), labels: its class names; pooling and
    ignore_padding: how the head's input is pooled from the tokens (`AudioEncoder.pool`);
    multilabel: the head scores each class alone (sigmoid), else one of them (softmax).
    The encoder may carry adapters (`encoder.adapters`); they are part of the classifier.
    """

    encoder: AudioEncoder
    features: FbankConfig | None
    labels: list[str] | None = None
    head: dict[str, Tensor] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    pooling: str = "mean"
    ignore_padding: bool = False
    multilabel: bool = False

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
        spec = getattr(self.encoder, "adapter_config", None)
        adapters = f", {spec.kind} adapters" if spec is not None else ""
        return (
            f"{cfg.family} encoder, width {cfg.embed_dim}, depth {cfg.depth}, grid "
            f"{self.encoder.grid}, {params / 1e6:.2f}M parameters{adapters}, {head} ({self.kind})"
        )

    def classifier(self) -> nn.Sequential:
        """The head as a module: pooled (batch, pooled_dim) -> logits (batch, classes).
        LayerNorm + Linear (`ClassifyTask.mlp_head`), Identity + Linear for AuM's bare one."""
        if not self.head:
            raise ValueError(
                f"{self.provenance.get('source', 'encoder')}: no classifier head (a pretrained "
                "encoder); fine-tune it first (ssamba finetune)"
            )
        weight = self.head["1.weight"]
        width = weight.shape[1]
        norm: nn.Module = nn.LayerNorm(width) if "0.weight" in self.head else nn.Identity()
        head = nn.Sequential(norm, nn.Linear(width, weight.shape[0]))
        head.load_state_dict(self.head)
        return head.eval()

    def payload(self) -> dict[str, Any]:
        """The file's content (module docstring): tensors on the CPU and plain containers."""
        adapters = getattr(self.encoder, "adapters", None)
        return {
            "format": FORMAT,
            "version": VERSION,
            "config": self.encoder.cfg.to_dict(),
            "state_dict": _cpu(base_state_dict(self.encoder)),
            "features": None if self.features is None else self.features.for_inference().to_dict(),
            "labels": None if self.labels is None else list(self.labels),
            "head": None if self.head is None else _cpu(self.head),
            "head_settings": {
                "pooling": self.pooling,
                "ignore_padding": self.ignore_padding,
                "multilabel": self.multilabel,
            },
            "adapters": None
            if adapters is None
            else {
                "config": self.encoder.adapter_config.to_dict(),
                "state_dict": _cpu(adapters.state_dict()),
            },
            "provenance": dict(self.provenance),
        }

    def save(self, path: str | Path) -> Path:
        """Write the file atomically; parent folders are created."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as staged:
            torch.save(self.payload(), staged)
        return path

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write a Hugging Face-style folder: config.json (config, features, labels, head
        settings, provenance) + model.safetensors (weights, head, adapters); no pickle."""
        return hf_folder.write_folder(self.payload(), folder)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> EncoderFile:
        """A folder of `save_pretrained`, or any file `load_encoder_file` reads."""
        return load_encoder_file(path)


def _cpu(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().cpu() for k, v in state.items()}


def load_encoder_file(
    path: str | Path,
    source_stride: int | tuple[int, int] | None = None,
    base: str | Path | EncoderFile | None = None,
) -> EncoderFile:
    """Read any checkpoint ssamba knows into an `EncoderFile` (see the module docstring).

    `source_stride` is the patch stride an official fine-tuned file was trained with,
    which its tensors cannot tell (default: the official recipes' 10). `base`: for an
    adapter file, its base encoder (a path or an `EncoderFile`) instead of the path the
    file records. Raises `FileNotFoundError` or `CheckpointError` (a `ValueError`) with
    one line that names the file, what it is and what to do.
    """
    path = Path(path)
    if hf_folder.is_folder(path):
        try:
            return _from_encoder_file(hf_folder.read_folder(path), path)
        except hf_folder.FolderError as err:
            raise CheckpointError(str(err)) from None
    payload = read_checkpoint(path)
    if not isinstance(payload, Mapping):
        raise CheckpointError(
            f"{path}: holds a {type(payload).__name__}, not a checkpoint (expected an encoder "
            f"file, a Lightning .ckpt of ssamba or an official SSAMBA/SSAST/AuM .pth)"
        )
    if payload.get("format") == FORMAT:
        return _from_encoder_file(payload, path)
    if payload.get("format") == adapter_files.FORMAT:
        return _from_adapter_file(payload, path, base)
    if isinstance(payload.get("format"), str):
        raise CheckpointError(
            f"{path}: a {payload['format']!r} file, not an encoder; it needs its own loader"
        )
    state = payload.get("state_dict")
    if isinstance(state, Mapping) and any(str(k).startswith(_ENCODER) for k in state):
        return _from_lightning(payload, path)
    return _from_official(payload, path, source_stride)


def read_checkpoint(path: str | Path, mmap: bool = False) -> Any:
    """The content of a torch.save file, unpickling only tensors and plain containers.

    The one `torch.load` of ssamba outside Lightning's resume. `mmap`: tensors are mapped,
    not read (cheap for a peek at a large file). Raises FileNotFoundError, or
    CheckpointError with one line naming the file (pickled code: refused).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if not path.is_file():
        raise CheckpointError(
            f"{path}: a folder, not a checkpoint file (nor a folder with {hf_folder.CONFIG_NAME})"
        )
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
    if version not in (1, 2, VERSION):
        raise CheckpointError(
            f"{path}: encoder file version {version!r}; this ssamba reads versions 1 to {VERSION}"
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
    adapters = payload.get("adapters")  # version 3
    if adapters is not None:
        _attach(encoder, adapters.get("config"), adapters.get("state_dict"), path)
    settings = payload.get("head_settings") or {}
    return EncoderFile(
        encoder,
        _features(features, path),
        labels,
        head,
        provenance,
        pooling=str(settings.get("pooling", "mean")),
        ignore_padding=bool(settings.get("ignore_padding", False)),
        multilabel=bool(settings.get("multilabel", False)),
    )


def _attach(encoder: AudioEncoder, config: Any, state: Any, path: Path) -> None:
    """Put stored adapters on `encoder` (eval mode: a file is read to be used)."""
    try:
        encoder.add_adapters(AdapterConfig.from_dict(config))
        encoder.adapters.load_state_dict(state)
    except (ValueError, TypeError, KeyError, RuntimeError) as err:
        raise CheckpointError(f"{path}: bad adapters: {_first_line(err)}") from None
    encoder.eval()


# ---------------------------------------------------------------------------- adapter file
def _from_adapter_file(
    payload: Mapping[str, Any], path: Path, base: str | Path | EncoderFile | None
) -> EncoderFile:
    """An adapter run's file (`ssamba.models.adapters.save_adapter_file`) on its base encoder.

    The base (`base`, or the path the file records) must have the recorded weights
    checksum; it is resized to the run's geometry and returned carrying the adapters,
    with the file's head, labels, features (if it has them) and head settings.
    """
    recorded = payload.get("base")
    if not isinstance(recorded, Mapping) or "sha256" not in recorded:
        raise CheckpointError(f"{path}: adapter file without its base encoder's reference")
    if base is None:
        base = recorded.get("path")
        if not base:
            raise CheckpointError(f"{path}: records no base encoder path; pass base=...")
    bundle = base if isinstance(base, EncoderFile) else load_encoder_file(base)
    got = weights_sha256(bundle.encoder)
    if got != recorded["sha256"]:
        raise CheckpointError(
            f"{path}: these adapters belong to base encoder {recorded.get('path')} (weights "
            f"sha256 {recorded['sha256'][:12]}...), not to "
            f"{bundle.provenance.get('source', 'the given encoder')} (sha256 {got[:12]}...); "
            "load them onto the encoder they were trained on"
        )
    encoder = bundle.encoder
    stride = payload.get("stride")
    encoder.resize_input(
        input_frames=payload.get("input_frames"), stride=None if stride is None else tuple(stride)
    )
    _attach(encoder, payload.get("adapter"), payload.get("adapters"), path)
    features = payload.get("features")
    return EncoderFile(
        encoder,
        bundle.features if features is None else _features(features, path),
        payload.get("labels"),
        dict(payload.get("head") or {}) or None,
        {"kind": "adapter file", "source": str(path), "base": dict(recorded)},
        pooling=str(payload.get("pooling", "mean")),
        ignore_padding=bool(payload.get("ignore_padding", False)),
        multilabel=bool(payload.get("multilabel", False)),
    )


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
    hparams = ckpt.get("hyper_parameters") or {}
    return EncoderFile(
        encoder,
        _features(ckpt.get("features"), path),
        ckpt.get("labels"),
        head,
        provenance,
        pooling=str(hparams.get("pooling") or "mean"),
        ignore_padding=bool(hparams.get("ignore_padding", False)),
        multilabel=bool(hparams.get("multilabel", False)),
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
