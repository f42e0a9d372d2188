"""`ssamba export IN OUT [--format encoder|hf|exported-program|onnx]`: write an encoder to use elsewhere.

IN is anything `ssamba.models.load_encoder_file` reads (an adapter run's file too): a Lightning .ckpt of `ssamba
pretrain` / `ssamba finetune`, an official SSAMBA/SSAST/AuM .pth (pretrained or
fine-tuned), or an encoder file. Formats:

- `encoder` (default): a self-describing encoder file (re-written in the current format),
  keeping the feature settings, labels, head and adapters that IN carries;
- `hf`: the same as a Hugging Face-style folder OUT/ (`config.json` + `model.safetensors`,
  no pickle; `EncoderFile.save_pretrained`), which every ssamba command reads;
- `exported-program`: `torch.export` of `ClipEmbedder`, saved with `torch.export.save`:
  normalised fbank features (batch, frames, mel_bins) of clips of any length in, the clip
  embedding (batch, dim) and the time-step embeddings (batch, steps, dim) out, as `ssamba
  embed` computes them (windows of the encoder's frame count, one batch through the
  encoder). Load it with `torch.export.load(OUT).module()`: it needs torch only, not
  ssamba or its C++ kernels;
- `onnx`: the same program as ONNX (needs `pip install 'ssamba[onnx]'`), checked with
  onnxruntime; batch and frames are dynamic axes there too.

The program is traced with the selective scan and the Mamba conv as ssamba's registered
ops (`ssamba::selective_scan`, `ssamba::causal_conv1d_silu`), then those ops are
decomposed into plain ATen ops (`scan_decomposition`, `conv_decomposition`), so the file
runs wherever torch does, 6-64x slower than eager (docs/export.md). `--keep-kernels`
(exported-program only) keeps ssamba's fused C++ Mamba mixer (`ssamba::mamba_inner`) in
the program instead: eager's speed, but the file loads only where `import ssamba.models`
has registered that op. Before anything is written, the program's outputs are compared
with the eager `ClipEmbedder`'s on random features of several lengths and batch sizes
(`check_shapes`); a file whose largest difference exceeds `TOLERANCE` is refused.
`OUT.json` goes alongside: the complete input recipe (sample rate, DC removal, the Kaldi
filterbank options, the normalisation `(x - mean) / (2 * std)` with its constants), where
each time step lies, and the input and output shapes; docs/export.md turns it into a few
lines of torchaudio.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx.experimental import _config as fx_config

from ssamba.embed import Windowing, trained_features
from ssamba.embed.embedder import time_steps
from ssamba.features import FbankConfig, kaldi_options
from ssamba.files import atomic_write_text, replace_durably, writable_folder
from ssamba.models.encoder import AudioEncoder
from ssamba.models.encoder_file import EncoderFile, load_encoder_file

PROG = "ssamba export"
FORMATS = ("encoder", "hf", "exported-program", "onnx")
PROGRAM_FORMATS = ("exported-program", "onnx")
TOLERANCE = 1e-4
OUTPUTS = ("embedding", "steps")
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
        "--keep-kernels",
        action="store_true",
        help="exported-program only: keep ssamba's fused C++ Mamba mixer in the program "
        "(eager speed; loading the file then needs `import ssamba.models`) instead of "
        "decomposing it into torch ops (runs with torch alone, 6-64x slower)",
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
        if args.keep_kernels and args.format != "exported-program":
            raise ExportError(
                f"--keep-kernels: only --format exported-program can hold ssamba's kernels, "
                f"not {args.format}"
            )
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
            path, diff = export_program(bundle, args.out, args.format, args.keep_kernels)
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
class ClipEmbedder(nn.Module):
    """What an exported encoder computes: `ssamba embed` on a clip of any length, from its
    normalised features.

    fbank (batch, frames, bins), frames >= 1 -> (embedding (batch, dim), steps (batch,
    steps, dim)). The frames are cut into the windows `ssamba embed` uses (`Windowing`:
    `window` frames every `hop`), the last one padded as the features pad a short clip
    (`zeros`: the normalised value of 0; `floor`: each bin's minimum over the window's own
    frames), and all windows go through the encoder as one batch, so the cost grows
    linearly with the length. `steps` are the time patches (each the mean of its frequency
    patches), window after window, up to the last one centred on the audio the frames
    cover ((frames - 1) shifts + one frame length), at least one; `embedding` is their
    mean: both equal `ssamba embed`'s steps and `--pool mean` for the same audio.
    """

    def __init__(self, encoder: AudioEncoder, features: FbankConfig) -> None:
        super().__init__()
        self.encoder = encoder
        windowing = Windowing.for_encoder(encoder, features)
        self.window, self.hop = windowing.window_frames, windowing.hop_frames
        self.floor = features.pad == "floor"
        self.pad_value = (0.0 - features.mean) / (2 * features.std)  # 0 in the feature domain
        # Step k is kept while 2 * its centre < 2 * the covered duration, in samples:
        # (2 k stride + patch - 1) shift + length < 2 (frames - 1) shift + 2 length,
        # i.e. k Y < 2 shift frames + C. Integers only, so the count stays exact for a
        # symbolic number of frames.
        shift = windowing.shift_samples
        length = round(windowing.sample_rate * windowing.length_ms / 1000)
        self._shift2 = 2 * shift
        self._per_step = 2 * windowing.stride_frames * shift  # Y
        self._offset = length - (windowing.patch_frames + 1) * shift  # C

    def kept_steps(self, frames: int) -> int:
        """How many time steps are centred on the audio of `frames` frames (at least one)."""
        reach = self._shift2 * frames + self._offset
        return torch.sym_max(1, (reach + self._per_step - 1) // self._per_step)

    def forward(self, fbank: Tensor) -> tuple[Tensor, Tensor]:
        batch, frames, bins = fbank.shape
        # as `Windowing.plan`: one window, and one more per hop (or part) beyond it
        beyond = torch.sym_max(frames, self.window) - self.window
        windows = 1 + (beyond + self.hop - 1) // self.hop
        total = (windows - 1) * self.hop + self.window
        padded = F.pad(fbank, (0, 0, 0, total - frames), value=self.pad_value)
        # (batch, windows, bins, window) -> (batch * windows, window, bins)
        x = padded.unfold(1, self.window, self.hop).transpose(2, 3)
        x = x.reshape(batch * windows, self.window, bins)
        if self.floor:
            position = torch.arange(windows, device=fbank.device)[:, None] * self.hop
            real = (position + torch.arange(self.window, device=fbank.device)) < frames
            real = real.repeat(batch, 1)[..., None]  # (batch * windows, window, 1)
            floor = x.masked_fill(~real, float("inf")).amin(dim=1, keepdim=True)
            x = torch.where(real, x, floor)
        steps = time_steps(self.encoder, self.encoder.forward_features(x), "mean")
        grid = self.encoder.grid[1]
        steps = steps.reshape(batch, windows * grid, steps.shape[-1])
        steps = steps[:, : torch.sym_min(self.kept_steps(frames), windows * grid)]
        return steps.mean(dim=1), steps


def check_shapes(window: int) -> tuple[tuple[int, int], ...]:
    """(batch, frames) an exported program is checked at: the example it is traced at (two
    and a half windows), one window alone, and clips shorter than a patch."""
    return ((EXAMPLE_BATCH, window * 5 // 2), (1, window), (EXAMPLE_BATCH, 3))


def export_program(
    bundle: EncoderFile, out: Path, fmt: str = "exported-program", keep_kernels: bool = False
) -> tuple[Path, float]:
    """Write `bundle`'s encoder to `out` as `fmt` ("exported-program" | "onnx") and its sidecar.

    keep_kernels: keep ssamba's fused C++ mixer op in the program (exported-program only;
    see `export_encoder`). Returns (out, largest absolute difference to the eager
    `ClipEmbedder` over the `check_shapes`). Raises ExportError, leaving no file, when the
    export fails or its outputs differ by more than TOLERANCE.
    """
    if fmt not in PROGRAM_FORMATS:
        raise ExportError(f"format: expected one of {PROGRAM_FORMATS}, got {fmt!r}")
    if keep_kernels and fmt != "exported-program":
        raise ExportError(f"keep_kernels: {fmt} files cannot hold ssamba's kernels")
    model = ClipEmbedder(bundle.encoder.eval(), _inference_features(bundle)).eval()
    generator = torch.Generator().manual_seed(0)
    bins = bundle.encoder.cfg.num_mel_bins
    inputs = [
        torch.randn(batch, frames, bins, generator=generator)
        for batch, frames in check_shapes(model.window)
    ]
    with torch.no_grad():
        expected = [model(fbank) for fbank in inputs]
    program = export_encoder(model, inputs[0], keep_kernels)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Written beside OUT and renamed once checked: a failed check leaves nothing behind.
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".ssamba-export-") as tmp:
        staged = Path(tmp) / out.name
        if fmt == "onnx":
            _save_onnx(program, inputs[0], staged)
            run = onnx_runner(staged)
        else:
            torch.export.save(program, staged)
            run = torch.export.load(staged).module()
        # without autograd: the loaded program's weights require grad, and a graph kept
        # for every intermediate of a 24-layer encoder fills any memory
        with torch.no_grad():
            diff = max(max_abs_diff(e, run(x)) for e, x in zip(expected, inputs, strict=True))
        if not diff <= TOLERANCE:
            raise ExportError(
                f"{out}: not written: the {fmt} outputs differ from the eager encoder's by "
                f"{diff:.2e} (> {TOLERANCE:g})"
            )
        replace_durably(staged, out)
    sidecar = _sidecar(bundle, fmt, diff, ssamba_ops(program))
    atomic_write_text(sidecar_path(out), json.dumps(sidecar, indent=2) + "\n")
    return out, diff


def export_encoder(
    model: ClipEmbedder, fbank: Tensor, keep_kernels: bool = False
) -> torch.export.ExportedProgram:
    """`torch.export` of `model` with a free batch and number of frames.

    By default the Mamba mixers are traced through ssamba's scan and conv ops, which are
    then decomposed into ATen ops: the program needs torch only. With `keep_kernels` they
    are traced through eager's fused C++ mixer op (`ssamba::mamba_inner`), which stays in
    the program: eager's speed, and loading needs that op registered (`import
    ssamba.models`). fbank: an example input: batch >= 2 and more than one window, so
    that neither dimension is specialised to 1.
    """
    dims = ({0: torch.export.Dim("batch", min=1), 1: torch.export.Dim("frames", min=1)},)
    # Size-oblivious tracing: no guard that a size is not 1 (one window, batch 1); what the
    # symbolic maths cannot prove (the kept steps fit the windows) becomes a check run with
    # the program, not a refusal to export. No autograd: the fused op then keeps nothing
    # for a backward (its `save` argument is traced as False).
    with (
        _mixers_on_cpp_kernels(model.encoder, fused=keep_kernels),
        fx_config.patch(backed_size_oblivious=True),
        torch.no_grad(),
    ):
        program = torch.export.export(
            model,
            (fbank,),
            dynamic_shapes=dims,
            strict=False,
            prefer_deferred_runtime_asserts_over_guards=True,
        )
        if keep_kernels:
            return program
        # Only ssamba's ops: the rest stays the ATen ops the encoder called (a smaller
        # graph, and much faster than decomposing everything to core ATen).
        program = program.run_decompositions(
            {
                torch.ops.ssamba.selective_scan.default: scan_decomposition,
                torch.ops.ssamba.causal_conv1d_silu.default: conv_decomposition,
            }
        )
    left = ssamba_ops(program)
    if left:
        raise ExportError(f"the exported program still calls ssamba's own ops: {', '.join(left)}")
    return program


def ssamba_ops(program: torch.export.ExportedProgram) -> list[str]:
    """The ssamba ops `program` calls (sorted names; empty: it runs with torch alone)."""
    return sorted(
        {
            str(node.target)
            for node in program.graph.nodes
            if node.op == "call_function" and str(node.target).startswith("ssamba.")
        }
    )


@contextlib.contextmanager
def _mixers_on_cpp_kernels(encoder: AudioEncoder, fused: bool) -> Iterator[None]:
    """Trace the Mamba mixers through ssamba's C++ ops: the fused mixer op (`fused`, eager's
    path) or the unfused path's scan and conv ops, one per direction. Tracing uses the
    ops' fake kernels only, so the C++ build is not needed here."""
    mixers = [m for m in encoder.modules() if hasattr(m, "use_fast_path")]
    fast = [m.use_fast_path for m in mixers]
    scan = os.environ.get("SSAMBA_SCAN")
    os.environ["SSAMBA_SCAN"] = "cpp"
    for mixer in mixers:
        mixer.use_fast_path = fused
    try:
        yield
    finally:
        for mixer, flag in zip(mixers, fast, strict=True):
            mixer.use_fast_path = flag
        if scan is None:
            os.environ.pop("SSAMBA_SCAN", None)
        else:
            os.environ["SSAMBA_SCAN"] = scan


# Time steps per chunk of `scan_decomposition`: 6-8 measured fastest on a 2-core CPU for
# 513 tokens (docs/export.md).
SCAN_CHUNK = 8


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
    """`ssamba::selective_scan` in ATen ops, as a chunked scan of h_t = a_t h_{t-1} + b_t.

    The (static) length is cut into chunks of SCAN_CHUNK steps: a loop over the steps of a
    chunk runs all chunks at once from a zero state; the decay from each chunk's start is
    exp(cumsum(dt A)) (sums of non-positive terms: nothing overflows); a log-depth scan over
    the chunks' ends gives the state entering each; h = local state + decay * entering
    state. About 4x faster than a log-depth scan over the whole length here (it touches
    every step log2(length) times), still far slower than the fused C++ kernel.
    Memory: a few (batch, dim, length, d_state) tensors. Returns (out, last state, the
    op's chunk states as zeros: only its backward reads them).
    """
    from ssamba.models.scan import CHUNK

    dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    batch, dim, length = u.shape
    n, step = A.shape[1], SCAN_CHUNK
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    dt = (F.softplus(delta) if delta_softplus else delta).to(dtype)
    time_last = [u.to(dtype), dt, B.to(dtype), C.to(dtype)] + ([z] if z is not None else [])
    if reverse:
        time_last = [t.flip(-1) for t in time_last]
    u_, dt, B_, C_ = time_last[:4]
    chunks = -(-length // step)
    pad = chunks * step - length  # padded steps have dt = 0: a = 1, b = 0

    def chunked(t: Tensor) -> Tensor:  # (batch, rows, length) -> (batch, rows, chunks, step)
        return F.pad(t, (0, pad)).view(t.shape[0], t.shape[1], chunks, step)

    dA = chunked(dt)[..., None] * A.to(dtype)[:, None, None, :]  # (batch, dim, chunks, step, n)
    a = torch.exp(dA)
    b = chunked(dt * u_)[..., None] * chunked(B_).permute(0, 2, 3, 1)[:, None]
    states = [b[:, :, :, 0]]
    for i in range(1, step):
        states.append(a[:, :, :, i] * states[-1] + b[:, :, :, i])
    local = torch.stack(states, 3)  # from a zero state at each chunk's start
    decay = torch.exp(torch.cumsum(dA, 3))  # from each chunk's start
    # the state at each chunk's end, by a log-depth scan over the chunks' (decay, state)
    carry, ends = decay[:, :, :, -1], local[:, :, :, -1]  # (batch, dim, chunks, n)
    shift = 1
    while shift < chunks:
        ends = ends + carry * F.pad(ends, (0, 0, shift, 0))[:, :, :chunks]
        carry = carry * F.pad(carry, (0, 0, shift, 0), value=1.0)[:, :, :chunks]
        shift *= 2
    entering = F.pad(ends, (0, 0, 1, 0))[:, :, :chunks, None]  # zero into the first chunk
    h = local + decay * entering  # (batch, dim, chunks, step, n)
    y = (h * chunked(C_).permute(0, 2, 3, 1)[:, None]).sum(-1)
    y = y.reshape(batch, dim, chunks * step)[..., :length]
    if D is not None:
        y = y + D.to(dtype)[:, None] * u_
    if z is not None:
        y = y * F.silu(time_last[4].to(dtype))
    if reverse:
        y = y.flip(-1)
    last = h[:, :, -1, step - 1 - pad]
    chunk_states = u.new_zeros(batch, max(1, -(-length // CHUNK)), n, dim, dtype=dtype)
    return y.to(u.dtype), last.to(u.dtype), chunk_states


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


def onnx_runner(path: Path) -> Callable[[Tensor], tuple[Tensor, ...]]:
    """fbank -> the ONNX model's outputs, with onnxruntime on CPU."""
    try:
        import onnxruntime
    except ImportError:
        raise ExportError(
            "--format onnx checks the model with onnxruntime, which is not installed; "
            "pip install 'ssamba[onnx]'"
        ) from None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(fbank: Tensor) -> tuple[Tensor, ...]:
        return tuple(torch.from_numpy(o) for o in session.run(None, {name: fbank.numpy()}))

    return run


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
    constant (docs/export.md)."""
    cfg = bundle.encoder.cfg
    fbank = _inference_features(bundle)
    return {
        "sample_rate": fbank.sample_rate,
        "channels": "mono: average the channels",
        "steps": [
            "remove DC: subtract the waveform's mean",
            f"torchaudio.compliance.kaldi.{fbank.kind}(wave[None], **kaldi) -> (frames, "
            f"{fbank.feature_dim}), every frame of the clip",
            "normalise: (x - mean) / (2 * std)",
            f"the program cuts windows of {cfg.input_frames} frames and pads the last "
            "(padding rule below) itself",
        ],
        "features": fbank.kind,
        "kaldi": kaldi_options(fbank),
        "window_frames": cfg.input_frames,
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


def step_layout(bundle: EncoderFile) -> dict[str, Any]:
    """Where the program's time steps lie: one per time patch, windows one after another."""
    windowing = Windowing.for_encoder(bundle.encoder, _inference_features(bundle))
    patch, stride = windowing.patch_frames, windowing.stride_frames
    shift, length = windowing.shift_ms, windowing.length_ms
    return {
        "hop_frames": windowing.hop_frames,  # window starts: frames 0, hop, 2 hop, ...
        "stride_frames": stride,
        "centre_ms": f"({stride} k + {(patch - 1) / 2:g}) * {shift:g} + {length / 2:g}",
        "kept": "the steps centred before the end of the audio the frames cover "
        f"((frames - 1) * {shift:g} + {length:g} ms), at least one",
        "embedding": "the mean of the kept steps; each step is the mean of its frequency patches",
    }


def _sidecar(bundle: EncoderFile, fmt: str, diff: float, ops: list[str]) -> dict:
    cfg = bundle.encoder.cfg
    return {
        "format": fmt,
        # what running the file needs: ssamba's ops registered first, or nothing of ssamba
        "ssamba_ops": ops,
        "runs_with": (
            "torch and ssamba: import ssamba.models before torch.export.load"
            if ops
            else {"onnx": "onnxruntime"}.get(fmt, "torch")
        ),
        "input": {
            "name": "fbank",
            "shape": ["batch", "frames", cfg.num_mel_bins],
            "recipe": input_recipe(bundle),
        },
        "outputs": {
            "embedding": ["batch", cfg.embed_dim],
            "steps": ["batch", "steps", cfg.embed_dim],
        },
        "time_steps": step_layout(bundle),
        "features": None if bundle.features is None else bundle.features.for_inference().to_dict(),
        "encoder": cfg.to_dict(),
        "labels": bundle.labels,
        "provenance": bundle.provenance,
        "max_abs_diff_vs_eager": diff,
        "torch": torch.__version__,
    }
