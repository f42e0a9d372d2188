"""Efficiency at every length: time and peak memory of whole tiny encoders vs tokens.

SSAMBA's efficiency figure (`src/inference/inference_amba.py`) redone for every model
ssamba builds, on CPU (or CUDA with `SSAMBA_BENCH_DEVICE=cuda`):

- models: ssamba-tiny, aum-tiny, ssast-tiny with SDPA, with the original naive (L x L)
  attention, and with factorized time/frequency attention (FTA) where
  `ssamba.models.transformer.ATTENTION_IMPLS` has it;
- workloads: inference (fp32, `torch.inference_mode`, mean pooling) and a training step
  (forward + backward of the encoder, loss = mean square of the mean-pooled embedding),
  at batch 1 and 4;
- input: (batch, frames, 128) random filterbanks, 16x16 patches at stride 16, so
  tokens = frames / 2, from 512 to 32k tokens, including the paper's 22,016.

Every point runs in its own spawned process (`in_fresh_process`), so its peak memory is
its own. Time: median wall time of the timed calls after one warm-up call (CUDA events
on GPU); a call slower than `LONG_CALL_S` is timed once, and the warm-up call itself is
the measurement when it alone took longer than `LONG_CALL_S` (column `runs` = 0).
Memory: on CPU the peak resident set size above the process's own baseline (taken after
the model and input exist, so weights are excluded and allocator slack included); on
CUDA `max_memory_allocated` above the baseline.

Points are skipped, with the reason in `status`, when their peak memory is predicted
above `SSAMBA_BENCH_MEM_GB` (default 16) or above the memory the machine has available,
when one call is predicted longer than `SSAMBA_BENCH_MAX_CALL_S` (default 300), or when
it would not finish within what is left of `SSAMBA_BENCH_BUDGET_S` (default: no budget).
`SSAMBA_BENCH_TOKENS` (comma-separated) replaces the token counts;
`SSAMBA_BENCH_MODELS`, `SSAMBA_BENCH_MODES` and `SSAMBA_BENCH_BATCHES` (comma-separated)
keep a subset of the models, workloads and batch sizes. The CSV is rewritten
after every point; `SSAMBA_BENCH_RESUME=<efficiency.csv>` continues an interrupted run.
Predictions extrapolate the model's smaller measured points on log-log axes (the naive
attention also by the size of its (tokens x tokens) matrices).

Besides the rows (`efficiency.csv`), `run` writes `efficiency.md` (tables, the 22k
comparison, fitted slopes, the targets), `efficiency_slopes.csv` and `efficiency.png`
(log-log time and memory with slopes fitted over 2k..32k tokens).

    python -m ssamba.bench efficiency [--quick]
"""

from __future__ import annotations

import math
import os
import time
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from ssamba.bench.report import in_fresh_process, peak_rss_bytes, rss_bytes, write_csv

# name -> (family, EncoderConfig overrides); the original SSAST computed attention naively.
MODELS: dict[str, tuple[str, dict]] = {
    "ssamba-tiny": ("ssamba", {}),
    "aum-tiny": ("aum", {}),
    "ssast-tiny-sdpa": ("ssast", {"attention": "sdpa"}),
    "ssast-tiny-naive": ("ssast", {"attention": "naive"}),
    "ssast-tiny-fta": ("ssast", {"attention": "fta"}),
}
TOKENS = [512, 1024, 2048, 4096, 8192, 16384, 22016, 32768]
QUICK_TOKENS = [512, 1024, 2048]
BATCHES = (1, 4)
MODES = ("inference", "training")
# The paper's comparison point: SSAMBA-tiny vs SSAST-tiny at ~22k patches (batch 4).
COMPARISON_TOKENS = 22016
SLOPE_RANGE = (2048, 32768)  # tokens over which log-log slopes are fitted
QUICK_SLOPE_RANGE = (0, 2048)
SUBJECT, NAIVE, SDPA = "ssamba-tiny", "ssast-tiny-naive", "ssast-tiny-sdpa"
# Targets of the issue (the paper's "92.7% faster, 95.4% less memory" at 22k tokens).
TARGET_SPEEDUP, TARGET_MEMORY_RATIO, TARGET_SLOPE = 14.0, 22.0, 1.05
REPEATS, QUICK_REPEATS = 3, 2
LONG_CALL_S = 20.0
MEM_GB, MAX_CALL_S = 16.0, 300.0
FREQ_BINS, PATCH = 128, 16


def run(out_dir: Path, quick: bool) -> list[dict]:
    """One row per (mode, tokens, batch, model); also writes the table, slopes and plot.

    `quick`: 512..2048 tokens, 2 timed calls.
    """
    device = os.environ.get("SSAMBA_BENCH_DEVICE", "cpu")
    out_dir.mkdir(parents=True, exist_ok=True)
    limits = _Limits.from_env()
    chosen = _env_subset("SSAMBA_BENCH_MODELS", list(MODELS))
    models = {
        name: spec
        for name, spec in MODELS.items()
        if name in chosen and (spec[1].get("attention") != "fta" or _has_fta())
    }
    modes = _env_subset("SSAMBA_BENCH_MODES", list(MODES))
    batches = [int(b) for b in _env_subset("SSAMBA_BENCH_BATCHES", [str(b) for b in BATCHES])]
    tokens_list = QUICK_TOKENS if quick else TOKENS
    if os.environ.get("SSAMBA_BENCH_TOKENS"):  # e.g. "512,2048,8192,22016,32768"
        tokens_list = [int(t) for t in os.environ["SSAMBA_BENCH_TOKENS"].split(",")]
    repeats = QUICK_REPEATS if quick else REPEATS
    previous = read_rows(os.environ.get("SSAMBA_BENCH_RESUME"))
    rows: list[dict] = []
    for mode in modes:
        for tokens in tokens_list:
            for batch in batches:
                for name, (family, overrides) in models.items():
                    point = {
                        "model": name,
                        "family": family,
                        "overrides": overrides,
                        "mode": mode,
                        "batch": batch,
                        "tokens": tokens,
                        "repeats": repeats,
                        "device": device,
                    }
                    row = previous.get((name, mode, batch, tokens))
                    if row is None:
                        reason = limits.skip_reason(point, rows)
                        row = _skipped(point, reason) if reason else _measure_fresh(point, limits)
                    print(_progress(row), flush=True)
                    rows.append(row)
                    write_csv(rows, out_dir / "efficiency.csv")  # an interrupted run keeps its rows
    slope_range = QUICK_SLOPE_RANGE if quick else SLOPE_RANGE
    slopes = fit_slopes(rows, slope_range)
    comparison = compare(rows, COMPARISON_TOKENS if not quick else max(tokens_list))
    write_csv(slopes, out_dir / "efficiency_slopes.csv")
    (out_dir / "efficiency.md").write_text(markdown(rows, slopes, comparison, slope_range))
    plot(rows, slopes, out_dir / "efficiency.png", slope_range)
    for line in _comparison_lines(comparison):
        print(line)
    return rows


def _env_subset(key: str, allowed: list[str]) -> list[str]:
    """The comma-separated subset of `allowed` named by environment variable `key` (all
    of them when it is unset or empty); an unknown name is a one-line error."""
    names = [n.strip() for n in os.environ.get(key, "").split(",") if n.strip()]
    unknown = sorted(set(names) - set(allowed))
    if unknown:
        raise SystemExit(f"{key}: unknown {', '.join(unknown)} (choose from {', '.join(allowed)})")
    return names or allowed


def read_rows(path: str | None) -> dict[tuple, dict]:
    """Rows of an earlier (interrupted) run's efficiency.csv by (model, mode, batch, tokens):
    `SSAMBA_BENCH_RESUME=bench-results/efficiency.csv` keeps them instead of re-measuring."""
    if not path:
        return {}
    import csv

    ints, floats = ("batch", "tokens", "frames", "runs", "threads"), ("ms", "peak_mb", "load_avg")
    out = {}
    with open(path, newline="") as f:
        for raw in csv.DictReader(f):
            row = {k: (None if v == "" else v) for k, v in raw.items()}
            row.update({k: int(row[k]) for k in ints if row.get(k) is not None})
            row.update({k: float(row[k]) for k in floats if row.get(k) is not None})
            row["scan"], row["status"] = row.get("scan") or "", row.get("status") or ""
            out[(row["model"], row["mode"], row["batch"], row["tokens"])] = row
    return out


# --------------------------------------------------------------------------- limits
class _Limits:
    """When to skip a point instead of running it (see the module docstring)."""

    def __init__(self, mem_bytes: float, max_call_s: float, budget_s: float | None) -> None:
        self.mem_bytes, self.max_call_s = mem_bytes, max_call_s
        self.deadline = None if budget_s is None else time.monotonic() + budget_s

    @classmethod
    def from_env(cls) -> _Limits:
        budget = os.environ.get("SSAMBA_BENCH_BUDGET_S")
        return cls(
            float(os.environ.get("SSAMBA_BENCH_MEM_GB", MEM_GB)) * 2**30,
            float(os.environ.get("SSAMBA_BENCH_MAX_CALL_S", MAX_CALL_S)),
            float(budget) if budget else None,
        )

    def skip_reason(self, point: dict, rows: list[dict]) -> str:
        seconds, peak = predict(point, rows)
        if peak > self.mem_bytes:
            return f"skipped: predicted {peak / 2**30:.1f} GB > cap {self.mem_bytes / 2**30:.0f} GB"
        available = _available_bytes(point["device"])
        if peak > available:
            return f"skipped: predicted {peak / 2**30:.1f} GB > {available / 2**30:.1f} GB free"
        if seconds > self.max_call_s:
            return f"skipped: predicted {seconds:.0f} s per call > {self.max_call_s:.0f} s"
        # warm-up + timed call(s) + ~10 s to start the process
        if self.deadline is not None and 2 * seconds + 10 > self.deadline - time.monotonic():
            return f"skipped: predicted {seconds:.0f} s per call, past the time budget"
        return ""


def predict(point: dict, rows: list[dict]) -> tuple[float, float]:
    """(seconds per call, peak bytes) predicted from the measured rows; (0, 0) if unknown.

    Same model, mode and batch: a log-log line through the two longest measured points
    (slope at least 1); one point: slope 2 (attention-like, to be safe). The same tokens at
    a smaller batch scale by the batch ratio. The naive attention is also at least its
    (tokens x tokens) matrices: 2 per call in inference, one per block more in training.
    """
    same = [
        r
        for r in rows
        if r["status"] == "ok"
        and (r["model"], r["mode"], r["batch"]) == (point["model"], point["mode"], point["batch"])
    ]
    seconds = peak = 0.0
    if same:
        last = sorted(same, key=lambda r: r["tokens"])[-2:]
        for key, scale in (("ms", 1e-3), ("peak_mb", 2**20)):
            y = [max(r[key], 1e-9) * scale for r in last]
            slope = 2.0
            if len(last) == 2 and last[1]["tokens"] > last[0]["tokens"]:
                slope = math.log(y[1] / y[0]) / math.log(last[1]["tokens"] / last[0]["tokens"])
            value = y[-1] * (point["tokens"] / last[-1]["tokens"]) ** max(slope, 1.0)
            if key == "ms":
                seconds = value
            else:
                peak = value
    for r in rows:
        if (
            r["status"] == "ok"
            and (r["model"], r["mode"], r["tokens"])
            == (point["model"], point["mode"], point["tokens"])
            and r["batch"] < point["batch"]
        ):
            ratio = point["batch"] / r["batch"]
            seconds = max(seconds, r["ms"] * 1e-3 * ratio)
            peak = max(peak, r["peak_mb"] * 2**20 * ratio)
    if point["overrides"].get("attention") == "naive":
        from ssamba.models.encoder import EncoderConfig

        cfg = EncoderConfig.preset(point["family"], "tiny", **point["overrides"])
        tokens = point["tokens"] + cfg.prefix_tokens
        matrix = point["batch"] * cfg.num_heads * tokens**2 * 4  # float32
        held = 2 if point["mode"] == "inference" else cfg.depth + 2
        peak = max(peak, held * matrix)
    return seconds, peak


def _available_bytes(device: str) -> float:
    """Memory the point may use: MemAvailable on CPU, the free device memory on CUDA."""
    if device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info()
        return free
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return float("inf")


def _has_fta() -> bool:
    from ssamba.models.transformer import ATTENTION_IMPLS

    return "fta" in ATTENTION_IMPLS


# --------------------------------------------------------------------------- one point
def _row(point: dict) -> dict:
    """A row with every column, so all rows of the CSV share one header."""
    return {
        "model": point["model"],
        "mode": point["mode"],
        "batch": point["batch"],
        "tokens": point["tokens"],
        "frames": frames_for(point["tokens"]),
        "ms": None,
        "peak_mb": None,
        "runs": 0,
        "status": "",
        "device": point["device"],
        "threads": None,
        "scan": "",
        "load_avg": round(os.getloadavg()[0], 2),
    }


def _skipped(point: dict, reason: str) -> dict:
    return {**_row(point), "status": reason}


def _measure_fresh(point: dict, limits: _Limits) -> dict:
    try:
        return in_fresh_process(_measure, point)
    except BrokenProcessPool:  # the kernel's OOM killer, most likely
        return {**_row(point), "status": "failed: the process died (out of memory?)"}


def frames_for(tokens: int) -> int:
    """Input frames giving `tokens` 16x16 patches over 128 mel bins: 8 rows, tokens / 8 columns."""
    rows = FREQ_BINS // PATCH
    if tokens % rows:
        raise ValueError(f"tokens={tokens}: must be a multiple of {rows} (patch rows)")
    return tokens // rows * PATCH


def _measure(point: dict) -> dict:
    """Build the encoder, then time its workload and record its peak memory (child process)."""
    from ssamba.cli import sleeping_openmp_threads

    sleeping_openmp_threads()  # as the CLI runs (before torch is imported)
    import torch

    from ssamba.models.encoder import AudioEncoder, EncoderConfig
    from ssamba.models.scan import resolve_implementation

    row = _row(point)
    device = torch.device(point["device"])
    torch.manual_seed(0)
    cfg = EncoderConfig.preset(
        point["family"], "tiny", input_frames=frames_for(point["tokens"]), **point["overrides"]
    )
    encoder = AudioEncoder(cfg).to(device)
    if encoder.num_patches != point["tokens"]:
        raise ValueError(f"{point['model']}: {encoder.num_patches} tokens, not {point['tokens']}")
    fbank = torch.randn(point["batch"], cfg.input_frames, cfg.num_mel_bins, device=device)
    if point["mode"] == "inference":
        encoder.eval()

        def step() -> None:
            with torch.inference_mode():
                encoder(fbank, pool="mean")

    else:
        encoder.train()

        def step() -> None:
            encoder.zero_grad(set_to_none=True)
            encoder(fbank, pool="mean").pow(2).mean().backward()

    scan = resolve_implementation(device) if point["family"] != "ssast" else ""
    # (that loads, or after a source change rebuilds, the C++ kernel: not part of any timing)
    clock = _Clock(device)
    baseline = clock.memory_now()
    try:
        times = [clock.time(step)]  # warm-up: kernel load, allocator growth
        calls = (
            0 if times[0] > LONG_CALL_S else 1 if times[0] > LONG_CALL_S / 4 else point["repeats"]
        )
        if calls:
            times = [clock.time(step) for _ in range(calls)]
    except (RuntimeError, MemoryError) as err:  # allocation failures
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        return {**row, "status": f"failed: {first[:120]}"}
    times.sort()
    return {
        **row,
        "ms": 1000 * times[len(times) // 2],
        "peak_mb": (clock.peak_memory() - baseline) / 2**20,
        "runs": calls,
        "status": "ok",
        "threads": torch.get_num_threads(),
        "scan": scan,
        "load_avg": round(os.getloadavg()[0], 2),
    }


class _Clock:
    """Wall time (CUDA events on GPU) and peak memory of the process or the device."""

    def __init__(self, device) -> None:
        import torch

        self.torch, self.cuda = torch, device.type == "cuda"

    def time(self, fn) -> float:
        if not self.cuda:
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
        start, end = (self.torch.cuda.Event(enable_timing=True) for _ in range(2))
        start.record()
        fn()
        end.record()
        self.torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000

    def memory_now(self) -> int:
        if not self.cuda:
            return rss_bytes()
        self.torch.cuda.synchronize()
        self.torch.cuda.reset_peak_memory_stats()
        return self.torch.cuda.memory_allocated()

    def peak_memory(self) -> int:
        return self.torch.cuda.max_memory_allocated() if self.cuda else peak_rss_bytes()


def _progress(row: dict) -> str:
    what = f"{row['model']:17s} {row['mode']:9s} b{row['batch']} {row['tokens']:6d} tokens"
    if row["status"] != "ok":
        return f"  {what}: {row['status']}"
    return f"  {what}: {row['ms']:10.1f} ms {row['peak_mb']:9.1f} MB (load {row['load_avg']})"


# --------------------------------------------------------------------------- analysis
def fit_slopes(rows: list[dict], token_range: tuple[int, int]) -> list[dict]:
    """Least-squares log-log slope of time and memory vs tokens, per (model, mode, batch),
    over the measured points with tokens in `token_range` (inclusive); None below 2 points."""
    series: dict[tuple, list[dict]] = {}
    for r in rows:
        series.setdefault((r["model"], r["mode"], r["batch"]), []).append(r)
    out = []
    for (model, mode, batch), points in series.items():
        ok = [
            r
            for r in points
            if r["status"] == "ok" and token_range[0] <= r["tokens"] <= token_range[1]
        ]
        out.append(
            {
                "model": model,
                "mode": mode,
                "batch": batch,
                "from_tokens": min((r["tokens"] for r in ok), default=None),
                "to_tokens": max((r["tokens"] for r in ok), default=None),
                "points": len(ok),
                "time_slope": _slope([(r["tokens"], r["ms"]) for r in ok]),
                "memory_slope": _slope([(r["tokens"], r["peak_mb"]) for r in ok]),
            }
        )
    return out


def _slope(points: list[tuple[float, float]]) -> float | None:
    points = [(x, y) for x, y in points if x > 0 and y > 0]
    if len({x for x, _ in points}) < 2:
        return None
    xs = [math.log(x) for x, _ in points]
    ys = [math.log(y) for _, y in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )


def compare(rows: list[dict], tokens: int) -> list[dict]:
    """ssamba-tiny vs ssast-tiny (naive and SDPA) inference at `tokens`, per batch:
    time ratio (> 1: ssamba faster) and memory ratio (> 1: ssamba leaner)."""
    found = {
        (r["model"], r["batch"]): r
        for r in rows
        if r["mode"] == "inference" and r["tokens"] == tokens
    }
    out = []
    for batch in BATCHES:
        subject = found.get((SUBJECT, batch))
        for other in (NAIVE, SDPA):
            peer = found.get((other, batch))
            both = subject and peer and subject["status"] == peer["status"] == "ok"
            out.append(
                {
                    "tokens": tokens,
                    "batch": batch,
                    "vs": other,
                    "ssamba_ms": subject and subject["ms"],
                    "peer_ms": peer and peer["ms"],
                    "speedup": peer["ms"] / subject["ms"] if both else None,
                    "ssamba_mb": subject and subject["peak_mb"],
                    "peer_mb": peer and peer["peak_mb"],
                    "memory_ratio": peer["peak_mb"] / subject["peak_mb"] if both else None,
                    "note": "" if both else _missing(subject, peer),
                }
            )
    return out


def _missing(subject: dict | None, peer: dict | None) -> str:
    for name, r in (("ssamba", subject), ("peer", peer)):
        if r is None:
            return f"{name}: not run"
        if r["status"] != "ok":
            return f"{name}: {r['status']}"
    return ""


def _comparison_lines(comparison: list[dict]) -> list[str]:
    lines = []
    for c in comparison:
        head = f"{c['tokens']} tokens, batch {c['batch']}: ssamba-tiny vs {c['vs']}"
        if c["speedup"] is None:
            lines.append(f"{head}: n/a ({c['note']})")
        else:
            lines.append(
                f"{head}: {c['speedup']:.2f}x faster ({c['ssamba_ms']:.0f} vs {c['peer_ms']:.0f}"
                f" ms), {c['memory_ratio']:.2f}x less memory ({c['ssamba_mb']:.0f} vs "
                f"{c['peer_mb']:.0f} MB)"
            )
    return lines


def _fmt(value, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def markdown(
    rows: list[dict], slopes: list[dict], comparison: list[dict], slope_range: tuple[int, int]
) -> str:
    """The results as markdown: one table per (mode, batch), the comparison, slopes, targets."""
    device = rows[0]["device"] if rows else "cpu"
    memory = (
        "peak RSS above the process baseline (weights excluded, allocator slack included)"
        if device == "cpu"
        else "max_memory_allocated above the baseline"
    )
    loads = [r["load_avg"] for r in rows]
    lines = [
        "# Efficiency vs tokens (`python -m ssamba.bench efficiency`)",
        "",
        f"Device {device}; time = median wall ms per call; memory = {memory}. "
        f"1-min load average during the run: {min(loads, default=0):.1f}..{max(loads, default=0):.1f}.",
        "Each cell: ms / MB; `-` = not measured (see efficiency.csv `status`).",
        "",
    ]
    models = list(dict.fromkeys(r["model"] for r in rows))
    for mode in MODES:
        for batch in BATCHES:
            sub = [r for r in rows if r["mode"] == mode and r["batch"] == batch]
            if not sub:
                continue
            lines += [f"## {mode}, batch {batch}", ""]
            lines.append("| tokens | " + " | ".join(models) + " |")
            lines.append("|---" * (len(models) + 1) + "|")
            for tokens in sorted({r["tokens"] for r in sub}):
                cells = []
                for m in models:
                    r = next((r for r in sub if r["model"] == m and r["tokens"] == tokens), None)
                    ok = r is not None and r["status"] == "ok"
                    cells.append(f"{_fmt(r['ms'])} / {_fmt(r['peak_mb'])}" if ok else "-")
                lines.append(f"| {tokens:,} | " + " | ".join(cells) + " |")
            lines.append("")
    lines += [f"## ssamba-tiny vs ssast-tiny, inference at {comparison[0]['tokens']:,} tokens"]
    lines += [
        "",
        "| batch | vs | ssamba ms | peer ms | speed-up | ssamba MB | peer MB | memory ratio | note |",
    ]
    lines.append("|---" * 9 + "|")
    for c in comparison:
        lines.append(
            f"| {c['batch']} | {c['vs']} | {_fmt(c['ssamba_ms'])} | {_fmt(c['peer_ms'])} | "
            f"{_fmt(c['speedup'], 2)} | {_fmt(c['ssamba_mb'])} | {_fmt(c['peer_mb'])} | "
            f"{_fmt(c['memory_ratio'], 2)} | {c['note']} |"
        )
    lines += ["", f"## log-log slopes over {slope_range[0]:,}..{slope_range[1]:,} tokens", ""]
    lines += ["| model | mode | batch | points | time slope | memory slope |", "|---" * 6 + "|"]
    for s in slopes:
        lines.append(
            f"| {s['model']} | {s['mode']} | {s['batch']} | {s['points']} "
            f"({_fmt(s['from_tokens'])}..{_fmt(s['to_tokens'])}) | {_fmt(s['time_slope'], 2)} | "
            f"{_fmt(s['memory_slope'], 2)} |"
        )
    lines += ["", "## targets", ""] + [f"- {t}" for t in targets(slopes, comparison)]
    return "\n".join(lines) + "\n"


def targets(slopes: list[dict], comparison: list[dict]) -> list[str]:
    """Each target of the issue with the measured value and met / short."""

    def verdict(ok: bool | None) -> str:
        return "not measured" if ok is None else "met" if ok else "SHORT"

    out = []
    for c in comparison:
        if c["vs"] == NAIVE:
            out.append(
                f"batch {c['batch']}: >= {TARGET_SPEEDUP:g}x faster than {NAIVE}: "
                f"{_fmt(c['speedup'], 2)}x, "
                f"{verdict(None if c['speedup'] is None else c['speedup'] >= TARGET_SPEEDUP)}; "
                f">= {TARGET_MEMORY_RATIO:g}x less memory: {_fmt(c['memory_ratio'], 2)}x, "
                f"{verdict(None if c['memory_ratio'] is None else c['memory_ratio'] >= TARGET_MEMORY_RATIO)}"
            )
        else:
            out.append(
                f"batch {c['batch']}: faster than {SDPA}: {_fmt(c['speedup'], 2)}x, "
                f"{verdict(None if c['speedup'] is None else c['speedup'] > 1)}"
            )
    for s in slopes:
        if s["model"] == SUBJECT:
            for key in ("time_slope", "memory_slope"):
                value = s[key]
                out.append(
                    f"{SUBJECT} {s['mode']} batch {s['batch']} {key.replace('_', ' ')} <= "
                    f"{TARGET_SLOPE}: {_fmt(value, 2)}, "
                    f"{verdict(None if value is None else value <= TARGET_SLOPE)}"
                )
    return out


def plot(rows: list[dict], slopes: list[dict], path: Path, slope_range: tuple[int, int]) -> Path:
    """Log-log time and memory vs tokens: columns inference / training, batch 4 solid, 1 dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(MODES), figsize=(6 * len(MODES), 9), squeeze=False)
    models = list(dict.fromkeys(r["model"] for r in rows))
    colors = {m: f"C{i}" for i, m in enumerate(models)}
    slope_of = {(s["model"], s["mode"], s["batch"]): s for s in slopes}
    for col, mode in enumerate(MODES):
        for row_i, (key, label) in enumerate(
            (("ms", "time (ms)"), ("peak_mb", "peak memory (MB)"))
        ):
            ax = axes[row_i][col]
            for m in models:
                for batch in BATCHES:
                    pts = sorted(
                        (r["tokens"], r[key])
                        for r in rows
                        if (r["model"], r["mode"], r["batch"]) == (m, mode, batch)
                        and r["status"] == "ok"
                        and r[key] > 0
                    )
                    if not pts:
                        continue
                    s = slope_of.get((m, mode, batch), {}).get(
                        "time_slope" if key == "ms" else "memory_slope"
                    )
                    ax.plot(
                        *zip(*pts, strict=True),
                        marker="o",
                        markersize=3,
                        color=colors[m],
                        linestyle="-" if batch == max(BATCHES) else "--",
                        label=f"{m} b{batch} (slope {_fmt(s, 2)})",
                    )
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("tokens")
            ax.set_ylabel(label)
            ax.set_title(f"{mode}: {label.split(' (')[0]}")
            ax.grid(True, which="both", alpha=0.3)
            ax.axvspan(*slope_range, color="0.9", zorder=0)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=6)
    fig.suptitle(
        f"tiny encoders vs tokens ({rows[0]['device'] if rows else 'cpu'}; slopes fitted over "
        f"{slope_range[0]}..{slope_range[1]} tokens, shaded)"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
