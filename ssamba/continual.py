"""`ssamba continual`: a sequence of classification tasks on one pretrained encoder.

    ssamba continual --config recipes/continual/fsdd_cpu.yaml --out work/continual/fsdd
    ssamba continual --derive-fsdd work/lists/fsdd        # the FSDD speaker / parity lists

A continual recipe (YAML) names the shared encoder, the methods and the tasks in order:

    init: runs/pretrain/.../encoder.pt       # the shared pretrained encoder file
    methods: [adapter, finetune, linear]
    adapter: {kind: bottleneck, size: 16}    # `ssamba.models.adapters.AdapterConfig`
    overrides: {trainer.max_epochs: 6}       # applied to every task
    method_overrides:                        # applied to every task of one method
      adapter: {model.lr: 1.0e-2}
    tasks:
      - name: digit                          # unique: results are keyed by it
        recipe: recipes/finetune/fsdd.yaml   # a fine-tuning recipe
        overrides: {data.shards: work/shards/fsdd}

Every path in it (init, the task recipes, shard folders) is relative to the current
directory, as on the command line. `--max-epochs` / `--max-steps` override every task's
training length (after the recipe's overrides).

Each task is its fine-tuning recipe with the overrides, parsed by `ssamba finetune`'s CLI
(so every key is checked), with its own label set and head. The task identity is known at
test time. Methods:
- adapter: the encoder stays frozen and shared; each task trains its own adapters + head
  and is saved as an adapter file (`DIR/adapter/<task>.pt`) that refers to the encoder
  by checksum; evaluating task j reloads its file onto the shared encoder;
- finetune: sequential full fine-tuning: one encoder carried from task to task
  (`DIR/finetune/after-<task>.pt`), a head per task; evaluating an earlier task uses the
  current encoder with that task's head, so what the encoder forgot shows;
- linear: the frozen encoder with a linear probe per task.
After each task every task seen so far is tested, each by its own `ClassifyTask`'s test
step (as `ssamba finetune` scores; for sequential fine-tuning with the current encoder
in place). Each training keeps its best epoch on its validation data, as `ssamba
finetune` does.

`DIR/results.json`: {"tasks": [...], "methods": {method: {"accuracy": [[acc of task j
after task i, j <= i]], "final": [...], "average_accuracy", "forgetting",
"backward_transfer", "trainable_params": [per task], "trainable_fraction", "minutes"}}};
`DIR/results.md` (a table) and `DIR/results.png` (accuracy of each task over the sequence).
Forgetting (Chaudhry et al.): mean over tasks j < last of (best accuracy of j before the
end - its final accuracy); backward transfer (Lopez-Paz & Ranzato): mean of (final -
accuracy right after training j).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from ssamba.files import atomic_path, atomic_write_text
from ssamba.models.encoder_file import EncoderFile, load_encoder_file
from ssamba.recipe_paths import recipe_path

PROG = "ssamba continual"
METHODS = ("adapter", "finetune", "linear")


class ContinualError(ValueError):
    """A continual recipe that cannot run; the message names the key and what to do."""


# ---------------------------------------------------------------------------- recipe
def read_recipe(path: str | Path, init: str | None = None) -> dict[str, Any]:
    """The recipe, checked: unique task names, known methods, readable task recipes."""
    try:
        path = recipe_path(path)
    except FileNotFoundError as err:
        raise ContinualError(str(err)) from None
    recipe = yaml.safe_load(path.read_text()) or {}
    known = {"init", "methods", "adapter", "overrides", "method_overrides", "tasks"}
    unknown = sorted(set(recipe) - known)
    if unknown:
        raise ContinualError(f"{path}: unknown keys {unknown}")
    if init is not None:
        recipe["init"] = init
    if not recipe.get("init"):
        raise ContinualError(f"{path}: init: the shared pretrained encoder file is required")
    methods = recipe.setdefault("methods", list(METHODS))
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ContinualError(f"{path}: methods {bad or methods}: expected some of {METHODS}")
    tasks = recipe.get("tasks") or []
    if not tasks:
        raise ContinualError(f"{path}: tasks: at least one task is needed")
    names = [str(t.get("name", "")) for t in tasks]
    for i, name in enumerate(names):
        if not name:
            raise ContinualError(f"{path}: task {i + 1} has no name")
        if names.index(name) != i:
            raise ContinualError(
                f"{path}: tasks {names.index(name) + 1} and {i + 1} share the name {name!r}; "
                "task names must be unique (results are keyed by them)"
            )
        try:  # from the cwd, as init, or one of ssamba's recipes by name
            task_recipe = recipe_path(tasks[i].get("recipe", "")).resolve()
        except FileNotFoundError:
            raise ContinualError(
                f"{path}: task {name!r}: recipe {tasks[i].get('recipe')} not found (paths in "
                "a continual recipe are relative to the current directory; ssamba's own "
                "recipes are also found by name, e.g. finetune/fsdd)"
            ) from None
        tasks[i] = {**tasks[i], "recipe": str(task_recipe)}
    return recipe


def _override_args(overrides: dict[str, Any] | None) -> list[str]:
    args = []
    for key, value in (overrides or {}).items():
        text = json.dumps(value) if isinstance(value, list | dict | bool) else str(value)
        args += [f"--{key}", "null" if value is None else text]
    return args


# ---------------------------------------------------------------------------- training
def train_task(
    recipe: dict[str, Any], task: dict[str, Any], method: str, init: str, folder: Path
) -> tuple[Any, Any, Any, float]:
    """Fit one task with one method; returns (ClassifyTask restored to its best epoch, its
    datamodule, its trainer, its test accuracy)."""
    from ssamba.tasks.finetune_cli import ClassifyCLI, RecipeError, build

    args = ["--config", task["recipe"], *_override_args(recipe.get("overrides"))]
    args += _override_args((recipe.get("method_overrides") or {}).get(method))
    args += _override_args(task.get("overrides"))
    args += _override_args(recipe.get("length"))
    args += ["--model.init", init, "--model.mode", method]
    args += ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
    args += ["--trainer.default_root_dir", str(folder)]
    if method == "adapter":
        args += _override_args({f"model.adapter.{k}": v for k, v in recipe["adapter"].items()})
    try:
        cli = ClassifyCLI(args, parse_only=True)
        build(cli, cli.config)
    except (RecipeError, SystemExit, argparse.ArgumentError) as err:
        raise ContinualError(f"task {task['name']!r} ({method}): {err}") from None
    model, trainer, data = cli.model, cli.trainer, cli.datamodule
    trainer.fit(model, datamodule=data)
    best = (
        trainer.checkpoint_callback.best_model_path or trainer.checkpoint_callback.last_model_path
    )
    # Testing the best checkpoint restores its weights into `model` (Lightning's restore).
    return model, data, trainer, scored_accuracy(trainer, model, data, best)


def scored_accuracy(trainer: Any, model: Any, data: Any, ckpt_path: str | None = None) -> float:
    """`test/acc` of `model` on `data`'s test set, by `ClassifyTask.test_step`."""
    return float(
        trainer.test(model, datamodule=data, ckpt_path=ckpt_path, verbose=False)[0]["test/acc"]
    )


def run_method(recipe: dict[str, Any], method: str, out: Path) -> dict[str, Any]:
    """Train the tasks in order with `method`; test every seen task after each one."""
    tasks, init = recipe["tasks"], str(Path(recipe["init"]).resolve())
    folder = out / method
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    matrix: list[list[float]] = []
    trainable: list[int] = []
    models: list[Any] = []  # each task's classifier: its head (and adapters), its data
    datas: list[Any] = []
    carried = init  # the encoder file each task starts from
    fraction = 0.0
    for i, task in enumerate(tasks):
        name = task["name"]
        print(f"== {method}: task {i + 1}/{len(tasks)} {name!r}", flush=True)
        model, data, trainer, accuracy = train_task(recipe, task, method, carried, folder / name)
        share = model.trainable_share()
        trainable.append(int(share["trainable_encoder_params"] + share["head_params"]))
        fraction = share["fraction"]
        models.append(model)
        datas.append(data)
        if method == "adapter":
            model.save_adapter_file(folder / f"{name}.pt")
        if method == "finetune":
            carried = str(folder / f"after-{name}.pt")
            EncoderFile(model.encoder, data.fbank, provenance={"kind": "continual"}).save(carried)
        row = []
        for j in range(i):
            if method == "finetune":  # what the encoder forgot: task j's head on it now
                models[j].encoder = model.encoder
            # adapter: task j's own adapters on the frozen shared encoder; linear: the
            # frozen encoder with task j's probe
            row.append(scored_accuracy(trainer, models[j], datas[j]))
        row.append(accuracy)
        print(f"   {method} after {name!r}: " + ", ".join(f"{a:.4f}" for a in row), flush=True)
        matrix.append(row)
    if method == "adapter":  # the shared encoder must be the one every file refers to
        load_encoder_file(folder / f"{tasks[0]['name']}.pt", base=init)
    return summarise(matrix, trainable, fraction, (time.perf_counter() - start) / 60)


def summarise(
    matrix: list[list[float]], trainable: list[int], fraction: float, minutes: float
) -> dict[str, Any]:
    """Average accuracy, forgetting and backward transfer of an accuracy matrix."""
    final = matrix[-1]
    earlier = range(len(final) - 1)
    forgetting = [max(matrix[i][j] for i in range(j, len(matrix) - 1)) - final[j] for j in earlier]
    transfer = [final[j] - matrix[j][j] for j in earlier]
    return {
        "accuracy": matrix,
        "final": final,
        "average_accuracy": statistics.fmean(final),
        "forgetting": statistics.fmean(forgetting) if forgetting else 0.0,
        "backward_transfer": statistics.fmean(transfer) if transfer else 0.0,
        "trainable_params": trainable,
        "trainable_fraction": fraction,
        "minutes": minutes,
    }


# ---------------------------------------------------------------------------- report
def write_report(results: dict[str, Any], out: Path) -> None:
    """results.json, results.md (a table) and results.png (a plot)."""
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    tasks = results["tasks"]
    lines = [
        "| method | " + " | ".join(f"final {t}" for t in tasks) + " | average | forgetting "
        "| backward transfer | trainable params / task | trainable share of encoder | minutes |",
        "|---" * (len(tasks) + 7) + "|",
    ]
    for method, r in results["methods"].items():
        cells = [f"{100 * a:.1f}%" for a in r["final"]]
        lines.append(
            f"| {method} | "
            + " | ".join(cells)
            + f" | {100 * r['average_accuracy']:.1f}% | {100 * r['forgetting']:.1f} pts "
            f"| {100 * r['backward_transfer']:+.1f} pts | {statistics.fmean(r['trainable_params']):,.0f} "
            f"| {100 * r['trainable_fraction']:.1f}% | {r['minutes']:.1f} |"
        )
    atomic_write_text(out / "results.md", "\n".join(lines) + "\n")
    _plot(results, out / "results.png")


def _plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = results["tasks"]
    methods = results["methods"]
    fig, axes = plt.subplots(1, len(methods), figsize=(4 * len(methods), 3.2), squeeze=False)
    for ax, (method, r) in zip(axes[0], methods.items(), strict=True):
        for j, name in enumerate(tasks):
            steps = list(range(j, len(tasks)))
            ax.plot(steps, [100 * r["accuracy"][i][j] for i in steps], marker="o", label=name)
        ax.set_xticks(range(len(tasks)), [f"after {t}" for t in tasks], rotation=20)
        ax.set_title(method)
        ax.set_ylim(0, 100)
        ax.set_ylabel("test accuracy (%)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as staged:
        fig.savefig(staged, format="png", dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------- FSDD lists
def derive_fsdd_lists(manifest: Path, out: Path) -> list[Path]:
    """Clip lists (CSV: path,label,split,speaker) for two more FSDD tasks: the speaker
    (6 classes) and the digit's parity (odd/even), from the fsdd shards' manifest.jsonl.
    FSDD's six speakers are all male (speakers.json), so gender is not a task."""
    rows = [json.loads(line) for line in Path(manifest).read_text().splitlines() if line]
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, label in (
        ("speaker", lambda r: r["speaker"]),
        ("parity", lambda r: "odd" if int(r["labels"][0]) % 2 else "even"),
    ):
        path = out / f"{name}.csv"
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "label", "split", "speaker", "id"])
            for r in rows:
                writer.writerow([r["path"], label(r), r["split"], r["speaker"], r["id"]])
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, help="continual recipe (recipes/continual/)")
    parser.add_argument("--out", type=Path, help="output folder (results.json, .md, .png)")
    parser.add_argument("--init", default=None, help="override the recipe's shared encoder")
    parser.add_argument("--methods", default=None, help="comma list, e.g. adapter,finetune")
    parser.add_argument(
        "--derive-fsdd",
        type=Path,
        default=None,
        metavar="DIR",
        help="write DIR/speaker.csv and DIR/parity.csv from work/shards/fsdd/manifest.jsonl",
    )
    parser.add_argument(
        "--manifest",
        type=Path,
        default=Path("work/shards/fsdd/manifest.jsonl"),
        help="with --derive-fsdd: the fsdd shards' manifest.jsonl",
    )
    parser.add_argument("--max-epochs", type=int, help="every task's trainer.max_epochs")
    parser.add_argument("--max-steps", type=int, help="every task's trainer.max_steps")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.derive_fsdd is not None:
            if not args.manifest.is_file():
                raise ContinualError(
                    f"--manifest {args.manifest}: no such file; --derive-fsdd reads the fsdd "
                    "shards' manifest.jsonl (shard FSDD first, or pass --manifest)"
                )
            for path in derive_fsdd_lists(args.manifest, args.derive_fsdd):
                print(f"wrote {path}")
            return 0
        if args.config is None or args.out is None:
            parser.error("--config and --out are required")
        recipe = read_recipe(args.config, args.init)
        if args.methods:
            recipe["methods"] = [m.strip() for m in args.methods.split(",")]
            unknown = [m for m in recipe["methods"] if m not in METHODS]
            if unknown:
                raise ContinualError(f"--methods: {unknown} not in {METHODS}")
        recipe.setdefault("adapter", {})
        recipe["length"] = {
            key: value
            for key, value in (
                ("trainer.max_epochs", args.max_epochs),
                ("trainer.max_steps", args.max_steps),
            )
            if value is not None
        }
        load_encoder_file(recipe["init"])  # fail before any training on a bad encoder file
        args.out.mkdir(parents=True, exist_ok=True)
        results: dict[str, Any] = {
            "tasks": [t["name"] for t in recipe["tasks"]],
            "init": str(recipe["init"]),
            "adapter": recipe["adapter"],
            "methods": {},
        }
        for method in recipe["methods"]:
            results["methods"][method] = run_method(recipe, method, args.out)
            write_report(results, args.out)  # partial results survive an interruption
        print((args.out / "results.md").read_text())
        return 0
    except (ContinualError, FileNotFoundError, ValueError) as err:
        print(f"{PROG}: error: {str(err).strip().splitlines()[0]}", file=sys.stderr)
        return 2
