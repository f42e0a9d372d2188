"""`ssamba export IN OUT [--format encoder|hf|exported-program|onnx]`: write an encoder to use elsewhere.

IN is anything `ssamba.models.load_encoder_file` reads (an adapter run's file too): a Lightning .ckpt of `ssamba
pretrain` / `ssamba finetune`, an official SSAMBA/SSAST/AuM .pth (pretrained or
fine-tuned), or an encoder file. Formats:

- `encoder` (default): a self-describing encoder file (re-written in the current format),
  keeping the feature settings, labels, head and adapters that IN carries;
- `hf`: the same as a Hugging Face-style folder OUT/ (`config.json` + `model.safetensors`,
  no pickle; `EncoderFile.save_pretrained`), which every ssamba command reads;
- `exported-program`: `torch.export` of the encoder, saved with `torch.export.save`: fbank
  features (batch, frames, mel_bins) in, the mean-pooled embedding (batch, dim) and the
  tokens (batch, prefix + patches, dim) out; any batch size, the encoder's frame count.
  Load it with `torch.export.load(OUT).module()`: it needs torch only, not ssamba or its
  C++ kernels;
- `onnx`: the same program as ONNX (needs `pip install 'ssamba[onnx]'`), checked with
  onnxruntime.

The program is traced with the selective scan and the Mamba conv as ssamba's registered
ops (`ssamba::selective_scan`, `ssamba::causal_conv1d_silu`), then those ops are
decomposed into plain ATen ops (`scan_decomposition`, `conv_decomposition`), so the file
runs wherever torch does. Before anything is written, the program's outputs are compared
with the eager encoder's on random features; a file whose largest difference exceeds
`TOLERANCE` is refused. `OUT.json` goes alongside: the complete input recipe (sample rate,
DC removal, the Kaldi filterbank options, frames, padding rule, the normalisation
`(x - mean) / (2 * std)` with its constants), where each time step of the tokens lies,
and the input and output shapes; docs/export.md turns it into a few lines of torchaudio.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssamba.embed import Windowing, trained_features
from ssamba.features import FbankConfig, kaldi_options
from ssamba.files import writable_folder
from ssamba.models.encoder import AudioEncoder
from ssamba.models.encoder_file import EncoderFile, load_encoder_file

PROG = "ssamba export"
FORMATS = ("encoder", "hf", "exported-program", "onnx")
PROGRAM_FORMATS = ("exported-program", "onnx")
TOLERANCE = 1e-4
OUTPUTS = ("embedding", "tokens")
EXAMPLE_BATCH = 2


class ExportError(ValueError):
    """An export that cannot be made or fails its check; the message is one line."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", type=Path, help="a .ckpt, an official .pth or encoder file")
    parser.add_argument(
        "out", type=Path, help="file to write (e.g. encoder.pt, encoder.pt2), or a folder (hf)"
    )
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="encoder",
        help="encoder: ssamba encoder file (default); hf: a folder with config.json and "
        "model.safetensors; exported-program: torch.export program; onnx: ONNX model",
    )
    parser.add_argument(
        "--source-stride",
        type=int,
        default=None,
        help="official fine-tuned files only: the patch stride they were trained with "
        "(default: 10, the official recipes' value)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        writable_folder(args.out.parent, "OUT's folder")
        bundle = load_encoder_file(args.checkpoint, source_stride=args.source_stride)
        if args.out.resolve() == args.checkpoint.resolve():
            raise ValueError(f"{args.out}: the output would overwrite the input")
        bundle.provenance.setdefault("source", str(args.checkpoint))
        if args.format == "encoder":
            path = bundle.save(args.out)
            print(f"{path}: {bundle.describe()}")
        elif args.format == "hf":
            path = bundle.save_pretrained(args.out)
            print(f"{path}/: config.json + model.safetensors of the {bundle.describe()}")
        else:
            path, diff = export_program(bundle, args.out, args.format)
            print(f"{path}: {args.format} of the {bundle.describe()}")
            print(f"checked against the eager encoder: max abs diff {diff:.2e} (<= {TOLERANCE:g})")
            print(f"{sidecar_path(path)}: feature settings and input/output shapes")
    except (OSError, ValueError) as err:  # CheckpointError and ExportError are ValueErrors
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    if bundle.features is None:
        print(
            f"{PROG}: note: {args.checkpoint} does not say which features the encoder was "
            "trained on; consumers will assume the AudioSet+LibriSpeech pretraining settings"
        )
    return 0


# --------------------------------------------------------------------------- the program
class Embedder(nn.Module):
    """What an exported encoder computes: fbank (batch, frames, mel_bins) ->
    (mean-pooled embedding (batch, dim), tokens (batch, prefix + patches, dim))."""

    def __init__(self, encoder: AudioEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, fbank: Tensor) -> tuple[Tensor, Tensor]:
        tokens = self.encoder.forward_features(fbank)
        return self.encoder.pool(tokens, "mean"), tokens


def export_program(
    bundle: EncoderFile, out: Path, fmt: str = "exported-program"
) -> tuple[Path, float]:
    """Write `bundle`'s encoder to `out` as `fmt` ("exported-program" | "onnx") and its sidecar.

    Returns (out, largest absolute difference to the eager encoder). Raises ExportError,
    leaving no file, when the export fails or its outputs differ by more than TOLERANCE.
    """
    if fmt not in PROGRAM_FORMATS:
        raise ExportError(f"format: expected one of {PROGRAM_FORMATS}, got {fmt!r}")
    encoder = bundle.encoder.eval()
    cfg = encoder.cfg
    generator = torch.Generator().manual_seed(0)
    fbank = torch.randn(EXAMPLE_BATCH, cfg.input_frames, cfg.num_mel_bins, generator=generator)
    with torch.no_grad():
        expected = Embedder(encoder)(fbank)
    program = export_encoder(encoder, fbank)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Written beside OUT and renamed once checked: a failed check leaves nothing behind.
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".ssamba-export-") as tmp:
        staged = Path(tmp) / out.name
        if fmt == "onnx":
            _save_onnx(program, fbank, staged)
            got = run_onnx(staged, fbank)
        else:
            torch.export.save(program, staged)
            got = torch.export.load(staged).module()(fbank)
        diff = max_abs_diff(expected, got)
        if not diff <= TOLERANCE:
            raise ExportError(
                f"{out}: not written: the {fmt} outputs differ from the eager encoder's by "
                f"{diff:.2e} (> {TOLERANCE:g})"
            )
        os.replace(staged, out)
    sidecar_path(out).write_text(json.dumps(_sidecar(bundle, fmt, diff), indent=2) + "\n")
    return out, diff


def export_encoder(encoder: AudioEncoder, fbank: Tensor) -> torch.export.ExportedProgram:
    """`torch.export` of `Embedder(encoder)` with a dynamic batch, in core ATen ops only.

    fbank: an example input (batch >= 2, so the batch dimension can stay symbolic).
    """
    batch = torch.export.Dim("batch", min=1)
    with _registered_ops(encoder):
        program = torch.export.export(
            Embedder(encoder), (fbank,), dynamic_shapes=({0: batch},), strict=False
        )
    # Only ssamba's ops: the rest stays the ATen ops the encoder called (a smaller graph,
    # and much faster than decomposing everything to core ATen).
    program = program.run_decompositions(
        {
            torch.ops.ssamba.selective_scan.default: scan_decomposition,
            torch.ops.ssamba.causal_conv1d_silu.default: conv_decomposition,
        }
    )
    left = sorted(
        {
            str(node.target)
            for node in program.graph.nodes
            if node.op == "call_function" and str(node.target).startswith("ssamba.")
        }
    )
    if left:
        raise ExportError(f"the exported program still calls ssamba's own ops: {', '.join(left)}")
    return program


@contextlib.contextmanager
def _registered_ops(encoder: AudioEncoder) -> Iterator[None]:
    """Trace the Mamba mixers through the registered scan and conv ops, one per direction:
    the unfused path (`use_fast_path=False`) with the C++ implementation chosen. Tracing
    uses the ops' fake kernels only, so the C++ build is not needed here."""
    mixers = [m for m in encoder.modules() if hasattr(m, "use_fast_path")]
    fast = [m.use_fast_path for m in mixers]
    scan = os.environ.get("SSAMBA_SCAN")
    os.environ["SSAMBA_SCAN"] = "cpp"
    for mixer in mixers:
        mixer.use_fast_path = False
    try:
        yield
    finally:
        for mixer, flag in zip(mixers, fast, strict=True):
            mixer.use_fast_path = flag
        if scan is None:
            os.environ.pop("SSAMBA_SCAN", None)
        else:
            os.environ["SSAMBA_SCAN"] = scan


def scan_decomposition(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    delta_softplus: bool,
    reverse: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """`ssamba::selective_scan` in ATen ops: the recurrence h_t = a_t h_{t-1} + b_t as a
    Hillis-Steele scan, log2(length) steps of (a, b) <- (a a_shifted, b + a b_shifted).

    A loop over time would trace into `length` copies of the step; this graph has
    ~6 log2(length) nodes. Every product is of decays in (0, 1]: nothing overflows.
    Memory: a few (batch, dim, length, d_state) tensors. Returns (out, last state, the
    op's chunk states as zeros: only its backward reads them).
    """
    from ssamba.models.scan import CHUNK

    dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    length = u.shape[-1]
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    dt = (F.softplus(delta) if delta_softplus else delta).to(dtype)
    time_first = [u.to(dtype), dt, B.to(dtype), C.to(dtype)] + ([z] if z is not None else [])
    if reverse:
        time_first = [t.flip(-1) for t in time_first]
    u_, dt, B_, C_ = time_first[:4]
    a = torch.exp(dt[..., None] * A.to(dtype)[:, None, :])  # (batch, dim, length, d_state)
    b = (dt * u_)[..., None] * B_.transpose(1, 2)[:, None]
    step = 1
    while step < length:
        b = b + a * F.pad(b, (0, 0, step, 0))[:, :, :length]
        a = a * F.pad(a, (0, 0, step, 0), value=1.0)[:, :, :length]
        step *= 2
    y = (b * C_.transpose(1, 2)[:, None]).sum(-1)  # (batch, dim, length)
    if D is not None:
        y = y + D.to(dtype)[:, None] * u_
    if z is not None:
        y = y * F.silu(time_first[4].to(dtype))
    if reverse:
        y = y.flip(-1)
    batch, dim = u.shape[:2]
    chunks = u.new_zeros(batch, max(1, -(-length // CHUNK)), A.shape[1], dim, dtype=dtype)
    return y.to(u.dtype), b[:, :, -1].to(u.dtype), chunks


def conv_decomposition(x: Tensor, weight: Tensor, bias: Tensor | None, look_ahead: bool) -> Tensor:
    """`ssamba::causal_conv1d_silu` with `F.conv1d`: silu of the depthwise conv, causal or
    (look_ahead) reading the next taps, as the Mamba mixer's PyTorch path computes it."""
    taps, length = weight.shape[-1], x.shape[-1]
    kernel = weight.flip(-1) if look_ahead else weight
    out = F.conv1d(x, kernel, bias, padding=taps - 1, groups=x.shape[1])
    return F.silu(out[..., taps - 1 :] if look_ahead else out[..., :length])


# --------------------------------------------------------------------------- ONNX
def _save_onnx(program: torch.export.ExportedProgram, fbank: Tensor, path: Path) -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise ExportError(
            f"--format onnx needs onnx and onnxscript ({err}); pip install 'ssamba[onnx]'"
        ) from None
    try:
        onnx_program = torch.onnx.export(
            program, (fbank,), input_names=["fbank"], output_names=list(OUTPUTS), dynamo=True
        )
        onnx_program.save(str(path))
    except Exception as err:  # the exporter raises many kinds
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ExportError(
            f"the encoder (its selective scan) could not be expressed in ONNX: {first}"
        ) from None


def run_onnx(path: Path, fbank: Tensor) -> tuple[Tensor, ...]:
    """The ONNX model's outputs on `fbank`, with onnxruntime on CPU."""
    try:
        import onnxruntime
    except ImportError:
        raise ExportError(
            "--format onnx checks the model with onnxruntime, which is not installed; "
            "pip install 'ssamba[onnx]'"
        ) from None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {session.get_inputs()[0].name: fbank.numpy()})
    return tuple(torch.from_numpy(o) for o in outputs)


# --------------------------------------------------------------------------- checks, sidecar
def max_abs_diff(expected: tuple[Tensor, ...], got: tuple[Tensor, ...]) -> float:
    """Largest |expected - got| over all outputs; inf if their number or shapes differ."""
    if len(expected) != len(got):
        return float("inf")
    worst = 0.0
    for e, g in zip(expected, got, strict=True):
        if tuple(e.shape) != tuple(g.shape):
            return float("inf")
        worst = max(worst, (e.double() - g.double()).abs().max().item())
    return worst


def sidecar_path(path: Path) -> Path:
    """OUT.json: the settings an exported program's user needs, e.g. encoder.pt2.json."""
    return path.with_name(path.name + ".json")


def input_recipe(bundle: EncoderFile) -> dict[str, Any]:
    """How to compute the program's input from a waveform, step by step, with every
    constant: what `ssamba embed` does for a clip of at most one window (docs/export.md)."""
    cfg = bundle.encoder.cfg
    fbank = _inference_features(bundle)
    return {
        "sample_rate": fbank.sample_rate,
        "channels": "mono: average the channels",
        "steps": [
            "remove DC: subtract the waveform's mean",
            f"torchaudio.compliance.kaldi.{fbank.kind}(wave[None], **kaldi) -> (frames, "
            f"{fbank.feature_dim})",
            f"pad or cut to {cfg.input_frames} frames (padding rule below; a longer clip: "
            "keep the first frames, or cut it into windows as `ssamba embed` does)",
            "normalise: (x - mean) / (2 * std)",
        ],
        "features": fbank.kind,
        "kaldi": kaldi_options(fbank),
        "frames": cfg.input_frames,
        "padding": fbank.pad,
        "padding_rule": PADDING_RULES[fbank.pad],
        "normalisation": {
            "formula": "(x - mean) / (2 * std)",
            "mean": fbank.mean,
            "std": fbank.std,
        },
        "assumed": bundle.features is None,
    }


def _inference_features(bundle: EncoderFile) -> FbankConfig:
    """The features `ssamba embed` computes for this encoder (the pretraining defaults
    when the file records none: export's own note says so once, hence no warning here)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return trained_features(bundle)


# The two `FbankConfig.pad` rules, said for users of an exported file.
PADDING_RULES = {
    "zeros": "append frames of 0 (log-mel domain, before normalising)",
    "floor": "append copies of each bin's minimum over the clip's own frames (before normalising)",
}


def time_steps(bundle: EncoderFile) -> dict[str, Any]:
    """Where each time step of the tokens lies, to pool only steps inside a short clip as
    `ssamba embed` does: patch tokens are frequency-major (index = f * T + t)."""
    encoder = bundle.encoder
    windowing = Windowing.for_encoder(encoder, _inference_features(bundle))
    first = torch.arange(encoder.grid[1]) * windowing.stride_frames
    return {
        "prefix_tokens": {"count": encoder.cfg.prefix_tokens, "start": encoder.prefix_start},
        "grid": list(encoder.grid),
        "centres_ms": windowing.centre_ms(first).tolist(),
        "rule": "a clip's embedding averages the time steps whose centre is before the "
        "clip's end (at least the first), each the mean of its frequency patches",
    }


def _sidecar(bundle: EncoderFile, fmt: str, diff: float) -> dict:
    cfg = bundle.encoder.cfg
    tokens = cfg.prefix_tokens + bundle.encoder.num_patches
    return {
        "format": fmt,
        "input": {
            "name": "fbank",
            "shape": ["batch", cfg.input_frames, cfg.num_mel_bins],
            "recipe": input_recipe(bundle),
        },
        "outputs": {
            "embedding": ["batch", cfg.embed_dim],
            "tokens": ["batch", tokens, cfg.embed_dim],
        },
        "pooling": "mean of the patch tokens",
        "time_steps": time_steps(bundle),
        "prefix_tokens": {"count": cfg.prefix_tokens, "start": bundle.encoder.prefix_start},
        "features": None if bundle.features is None else bundle.features.for_inference().to_dict(),
        "encoder": cfg.to_dict(),
        "labels": bundle.labels,
        "provenance": bundle.provenance,
        "max_abs_diff_vs_eager": diff,
        "torch": torch.__version__,
    }
