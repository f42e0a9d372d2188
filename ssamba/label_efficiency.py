"""`ssamba label-efficiency`: does pretraining pay off, and at how many labels?

    ssamba label-efficiency --shards work/shards/fsdd --out work/le/official
    ssamba label-efficiency --shards work/shards/fsdd --loso speaker --out work/le/loso
    ssamba label-efficiency --shards work/shards/fsdd --encoder runs/.../encoder.pt ...
    ssamba label-efficiency --shards work/shards/fsdd --pretrain-shards work/shards/a \\
        work/shards/b --pretrain-recipe recipes/pretrain/fsdd_eat_cpu.yaml

1. Pretrain an encoder on unlabelled audio with `ssamba pretrain` (`--pretrain-recipe`,
   the CPU recipe by default; `--pretrain-shards`, by default the labelled folder's
   training split with its labels unused), unless `--encoder` names one.
2. For every fold (the folder's test split, or with `--loso FIELD` one fold per value of
   that json field, e.g. per speaker), every seed and every label budget
   (`--labels-per-class 1,5,20,all`), draw the training clips with `LabelledDataModule`
   (`labels_per_class`, `budget_seed` = the seed): the pretrained and the random-init
   encoder are trained on exactly the same clips, and smaller budgets are subsets of
   larger ones.
3. Train, for both inits (the pretrained file, and the same architecture from random
   weights drawn from the seed):
   - a linear probe: a logistic regression (L2, L-BFGS, to convergence) on the frozen
     encoder's pooled clip embeddings (every block's pooled output side by side, or
     `--probe-read last`: the final output only), computed once per encoder;
   - a fine-tune: `ClassifyTask` (the `ssamba finetune` model and optimiser) for
     `max(--finetune-min-steps, --finetune-epochs x batches)` steps on a cosine schedule,
     then tested with its last weights. No validation set picks the epoch: at 1 label
     per class a validation set would hold more labels than the training set.
4. Write `--out/results.json` (one record per run), `results.md` (mean +/- std over
   seeds and folds, pretrained minus random) and `results.png` (accuracy vs labels per
   class, both inits, both modes).

Filterbanks are computed once per clip (evaluation crop, no augmentation) with the
encoder file's own feature settings, so both inits see exactly what pretraining saw.
Every input problem (no test split, a class with fewer clips than a budget, an unlabelled
folder, a missing encoder) stops the command with one line before any training.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ssamba.files import UnwritableError, writable_folder
from ssamba.recipe_paths import RECIPES, recipe_path

PROG = "ssamba label-efficiency"
CPU_RECIPE = RECIPES / "pretrain" / "fsdd_tiny_cpu.yaml"
INITS = ("pretrained", "random")
MODES = ("linear", "finetune")


class InputError(ValueError):
    """Bad input found before training; the message names the problem in one line."""


@dataclass(frozen=True)
class Fold:
    """One train/test partition: its name and the json predicate of its test clips."""

    name: str
    test_filter: dict[str, Any]


@dataclass(frozen=True)
class FinetuneSettings:
    """How each fine-tune trains (ClassifyTask's optimiser, a fixed number of steps)."""

    lr: float = 3e-3
    batch_size: int = 32
    epochs: int = 5
    min_steps: int = 60
    warmup_steps: int = 20
    pooling: str = "mean"
    ignore_padding: bool = False  # mean pooling over the clip's own patches only
    probe_read: str = "layers"
    probe_l2: float = 1e-3  # the linear probe's L2 weight (standardised features)
    budgets: tuple[int | None, ...] | None = None  # fine-tuned budgets (None: every one)

    def steps(self, clips: int) -> int:
        return max(self.min_steps, self.epochs * math.ceil(clips / self.batch_size))


@dataclass
class Run:
    """One trained and tested model: a row of results.json."""

    init: str
    mode: str
    labels_per_class: int | None
    seed: int
    fold: str
    accuracy: float
    train_clips: int
    train_ids_sha: str  # sha256 of the sorted training clip ids: equal across inits
    seconds: float


# ---------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shards", type=Path, required=True, help="labelled shard folder")
    parser.add_argument("--out", type=Path, default=Path("runs/label_efficiency"))
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--encoder", type=Path, help="an encoder file: skip pretraining")
    source.add_argument(
        "--pretrain-shards",
        type=Path,
        nargs="+",
        help="unlabelled shard folders to pretrain on (default: --shards' train split)",
    )
    parser.add_argument("--pretrain-recipe", type=Path, default=CPU_RECIPE)
    parser.add_argument(
        "--pretrain-args",
        default="",
        help="extra `ssamba pretrain` overrides, one string, e.g. '--trainer.max_steps=500'",
    )
    parser.add_argument("--labels-per-class", default="1,5,20,all", help="budgets, comma list")
    parser.add_argument(
        "--finetune-labels-per-class",
        help="budgets that are also fine-tuned (default: all of --labels-per-class); "
        "fine-tuning costs far more than a probe",
    )
    parser.add_argument("--seeds", default="0,1,2", help="comma list of seeds")
    parser.add_argument(
        "--loso", metavar="FIELD", help="leave one group out: one fold per value of FIELD"
    )
    parser.add_argument("--folds", help="with --loso: only these groups (comma list)")
    parser.add_argument("--modes", default="linear,finetune", help="linear, finetune or both")
    parser.add_argument("--finetune-epochs", type=int, default=FinetuneSettings.epochs)
    parser.add_argument("--finetune-min-steps", type=int, default=FinetuneSettings.min_steps)
    parser.add_argument("--finetune-lr", type=float, default=FinetuneSettings.lr)
    parser.add_argument("--pooling", choices=("mean", "cls"), default="mean")
    parser.add_argument(
        "--ignore-padding",
        action="store_true",
        help="probes and fine-tunes pool only the patches holding each clip's own frames, "
        "not the padding of clips shorter than the window (ClassifyTask's ignore_padding)",
    )
    parser.add_argument(
        "--probe-read",
        choices=("last", "layers"),
        default="layers",
        help="what the linear probe reads: the pooled output, or every block's pooled output",
    )
    parser.add_argument(
        "--probe-l2",
        type=float,
        default=FinetuneSettings.probe_l2,
        help="L2 weight of the linear probe's logistic regression (standardised features)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    return parser


def parse_budgets(text: str) -> list[int | None]:
    """ "1,5,20,all" -> [1, 5, 20, None] (None = every training clip), sorted."""
    budgets: list[int | None] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if part == "all":
            budgets.append(None)
        elif part.isdigit() and int(part) > 0:
            budgets.append(int(part))
        else:
            raise InputError(f"--labels-per-class: {part!r} is not a positive integer or 'all'")
    if not budgets:
        raise InputError("--labels-per-class: give at least one budget")
    return sorted(set(budgets), key=lambda k: math.inf if k is None else k)


def parse_ints(text: str, option: str) -> list[int]:
    try:
        values = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise InputError(f"{option}: {text!r} is not a comma list of integers") from None
    if not values:
        raise InputError(f"{option}: give at least one value")
    return values


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.monotonic()
    try:
        budgets = parse_budgets(args.labels_per_class)
        tuned = parse_budgets(args.finetune_labels_per_class or args.labels_per_class)
        if set(tuned) - set(budgets):
            raise InputError("--finetune-labels-per-class: budgets not in --labels-per-class")
        seeds = parse_ints(args.seeds, "--seeds")
        modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        if not modes or set(modes) - set(MODES):
            raise InputError(f"--modes: {args.modes!r}; choose from {', '.join(MODES)}")
        if not args.probe_l2 >= 0:  # also refuses nan
            raise InputError(f"--probe-l2: {args.probe_l2} is not a weight >= 0")
        writable_folder(args.out, "--out")
        folds = plan_folds(args.shards, args.loso, args.folds)
        check_budgets(args.shards, folds, budgets, seeds)
        if args.encoder:
            check_encoder(args.encoder)
        encoder = args.encoder or pretrain(args)
        settings = FinetuneSettings(
            lr=args.finetune_lr,
            epochs=args.finetune_epochs,
            min_steps=args.finetune_min_steps,
            pooling=args.pooling,
            ignore_padding=args.ignore_padding,
            probe_read=args.probe_read,
            probe_l2=args.probe_l2,
            budgets=tuple(tuned),
        )
        runs = evaluate(args.shards, encoder, folds, budgets, seeds, modes, settings)
    except (InputError, UnwritableError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    minutes = (time.monotonic() - started) / 60
    split = f"leave-one-{args.loso}-out" if args.loso else "official split"
    write_outputs(runs, args.out, encoder, split, minutes, vars(args))
    return 0


# ---------------------------------------------------------------------------- checks
def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def labelled_data(shards: Path, **kwargs: Any) -> Any:
    """A `LabelledDataModule` over `shards` (no workers, no validation), split now."""
    from ssamba.data.labelled import LabelledDataModule

    kwargs.setdefault("val_fraction", 0.0)
    try:
        data = LabelledDataModule(str(shards), num_workers=0, **kwargs)
        data.split_clips()
    except (ValueError, FileNotFoundError) as error:
        raise InputError(_one_line(error)) from error
    return data


def plan_folds(shards: Path, loso: str | None, only: str | None) -> list[Fold]:
    """The official test split, or one fold per value of `loso`; checked against the data."""
    if not (shards / "labels.csv").is_file():
        kind = "an unlabelled shard folder" if shards.is_dir() else "not a folder"
        raise InputError(
            f"--shards {shards}: {kind} (no labels.csv); label-efficiency needs labelled "
            "clips (unlabelled audio goes to --pretrain-shards)"
        )
    if loso is None:
        if only:
            raise InputError("--folds: only with --loso (the official split has one fold)")
        try:
            labelled_data(shards, test_filter={"split": "test"})
        except InputError as error:
            raise InputError(
                f"--shards {shards}: no test split ({error}); use --loso FIELD instead"
            ) from error
        return [Fold("official", {"split": "test"})]
    from ssamba.data.shards import SkipCounter, catalogue, list_shards

    clips = catalogue(list_shards(shards), SkipCounter(0))
    groups = sorted({str(c.meta[loso]) for c in clips if loso in c.meta})
    if len(groups) < 2:
        raise InputError(
            f"--loso {loso}: {shards} has {len(groups)} value(s) of {loso!r} in its clips' "
            "json; leave-one-group-out needs at least 2"
        )
    if only:
        wanted = [g.strip() for g in only.split(",") if g.strip()]
        unknown = [g for g in wanted if g not in groups]
        if unknown:
            raise InputError(f"--folds: {unknown} are not values of {loso!r}: {groups}")
        groups = wanted
    return [Fold(group, {loso: group}) for group in groups]


def check_budgets(
    shards: Path, folds: list[Fold], budgets: list[int | None], seeds: list[int]
) -> None:
    """Every fold must hold the largest budget of every class (fails before training)."""
    largest = max((k for k in budgets if k is not None), default=None)
    if largest is None:
        return
    for fold in folds:
        try:
            labelled_data(
                shards, test_filter=fold.test_filter, labels_per_class=largest, budget_seed=0
            )
        except InputError as error:
            raise InputError(f"fold {fold.name}: {error}") from error


def check_encoder(path: Path) -> None:
    """Read the encoder file before any training: a missing, foreign or unsafe file stops here."""
    from ssamba.models.encoder_file import load_encoder_file

    try:
        load_encoder_file(path)
    except (OSError, ValueError) as err:  # CheckpointError is a ValueError
        raise InputError(f"--encoder: {err}") from None


# ---------------------------------------------------------------------------- pretraining
def pretrain(args: argparse.Namespace) -> Path:
    """Run `ssamba pretrain` with the recipe; returns the exported encoder file."""
    import shlex

    from ssamba.data.shard_format import fbank_stats
    from ssamba.tasks.pretrain_cli import main as pretrain_main

    out = (args.out / "pretrain").resolve()
    if args.pretrain_shards:
        for folder in args.pretrain_shards:
            if not folder.is_dir():
                raise InputError(f"--pretrain-shards {folder}: no such folder")
        sources = ", ".join(f"{{shards: {p.resolve()}}}" for p in args.pretrain_shards)
    else:
        sources = f"{{shards: {args.shards.resolve()}, splits: [train]}}"
    try:
        recipe = recipe_path(args.pretrain_recipe)
    except FileNotFoundError as error:
        raise InputError(f"--pretrain-recipe {error}") from None
    # The labelled folder's normalisation: pretraining and the probes see the same inputs.
    mean, std = fbank_stats(str(args.shards))
    argv = [
        "--config",
        str(recipe),
        f"--data.sources=[{sources}]",
        f"--data.val={{shards: {args.shards.resolve()}, splits: [test]}}",
        f"--data.stats=[{mean}, {std}]",
        f"--trainer.default_root_dir={out}",
        f"--trainer.logger.init_args.save_dir={out}",
        *shlex.split(args.pretrain_args),
    ]
    print(f"== pretrain: ssamba pretrain {shlex.join(argv)}", flush=True)
    before = set(out.rglob("encoder.pt")) if out.is_dir() else set()
    code = pretrain_main(argv)
    if code != 0:
        raise InputError(f"pretraining failed (ssamba pretrain exit {code}); see above")
    found = sorted(set(out.rglob("encoder.pt")) - before, key=lambda p: p.stat().st_mtime)
    if not found:
        raise InputError(f"pretraining wrote no encoder.pt under {out}")
    return found[-1]


# ---------------------------------------------------------------------------- evaluation
@dataclass
class Features:
    """Every clip of the folder: filterbanks, labels, ids (one row each)."""

    fbank: torch.Tensor  # (clips, frames, bins)
    frames: torch.Tensor  # (clips,) long: each clip's own frames (the rest is padding)
    label: torch.Tensor  # (clips,) long
    ids: list[str]
    num_classes: int

    def rows(self, ids: Sequence[str]) -> torch.Tensor:
        index = {clip_id: i for i, clip_id in enumerate(self.ids)}
        return torch.tensor([index[i] for i in ids], dtype=torch.long)


def clip_features(shards: Path, fbank_cfg: Any) -> Features:
    """Filterbanks of every clip in `shards` with `fbank_cfg` (evaluation crop, no aug)."""
    from ssamba.data.labelled import LabelledBatch
    from ssamba.data.shard_format import LABELS_NAME, read_labels
    from ssamba.data.shards import SkipCounter, catalogue, list_shards
    from ssamba.data.streams import ClipBatches

    classes = read_labels(shards / LABELS_NAME)
    class_index = {class_id: i for i, (class_id, _) in enumerate(classes)}
    clips = catalogue(list_shards(shards), SkipCounter(0))
    builder = LabelledBatch(
        replace(fbank_cfg, freqm=0, timem=0, noise=False),
        class_index,
        False,
        train=False,
        crop="start",
        mixup=0.0,
        mixup_alpha=10.0,
    )
    batches = ClipBatches(clips, builder, 256, 0, 1, False, 0, SkipCounter(0))
    fbanks, frames, labels, ids = [], [], [], []
    for batch in batches:
        fbanks.append(batch["fbank"])
        frames.append(batch["frames"])
        labels.append(batch["label"])
        ids += batch["id"]
    return Features(torch.cat(fbanks), torch.cat(frames), torch.cat(labels), ids, len(classes))


def train_ids(shards: Path, fold: Fold, budget: int | None, seed: int) -> tuple[list, list]:
    """(training ids, test ids) of a fold at a budget: LabelledDataModule's draw."""
    data = labelled_data(
        shards, test_filter=fold.test_filter, labels_per_class=budget, budget_seed=seed
    )
    assert data.subsets is not None
    ids = [[str(c.meta.get("id", c.key)) for c in data.subsets[s]] for s in ("train", "test")]
    return ids[0], ids[1]


def build_task(
    encoder_file: Path,
    init: str,
    seed: int,
    mode: str,
    settings: FinetuneSettings,
    num_classes: int,
) -> Any:
    """ClassifyTask around the pretrained file or a seeded random encoder of its shape."""
    from ssamba.models.encoder_file import load_encoder_file
    from ssamba.tasks.classify import ClassifyTask

    bundle = load_encoder_file(encoder_file)
    torch.manual_seed(seed)  # random weights and the head's init come from the seed
    common = dict(
        num_classes=num_classes,
        pooling=settings.pooling,
        ignore_padding=settings.ignore_padding,
        mode=mode,
        optimizer="adam",
        lr=settings.lr,
        weight_decay=5e-7,
        schedule="cosine",
        warmup_steps=settings.warmup_steps,
    )
    if init == "pretrained":
        return ClassifyTask(init=str(encoder_file), **common)
    return ClassifyTask(init="random", encoder=bundle.encoder.cfg, **common)


@torch.no_grad()
def embed_all(
    task: Any, fbank: torch.Tensor, frames: torch.Tensor, read: str = "last", batch: int = 256
) -> torch.Tensor:
    """Frozen clip embeddings (clips, dim): the pooled output ("last"), or ("layers") the
    pooled output of every block (pair) side by side (clips, blocks * dim).

    fbank: (clips, frames, bins); frames: (clips,) their own frames (the task's
    `ignore_padding` reads them)."""
    task.eval()
    encoder, pooling = task.encoder, task.hparams.pooling

    def one(chunk: torch.Tensor, own_frames: torch.Tensor) -> torch.Tensor:
        if read == "last":
            return task.embed(chunk, own_frames)
        keep = task.clip_patches(own_frames)
        layers = encoder.forward_features(chunk, return_layers=True)
        return torch.cat([encoder.pool(x, pooling, keep) for x in layers], dim=1)

    return torch.cat(
        [one(fbank[i : i + batch], frames[i : i + batch]) for i in range(0, len(fbank), batch)]
    )


def linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int,
    l2: float,
) -> float:
    """Logistic regression on standardised embeddings (L-BFGS); test accuracy."""
    mean, std = train_x.mean(0), train_x.std(0, unbiased=False).clamp(min=1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    weight = torch.zeros(train_x.shape[1], num_classes, requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    optimiser = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=200, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = F.cross_entropy(train_x @ weight + bias, train_y) + l2 * weight.square().sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    with torch.no_grad():
        return float(((test_x @ weight + bias).argmax(1) == test_y).float().mean())


def finetune(
    task: Any,
    features: Features,
    train_rows: torch.Tensor,
    test_rows: torch.Tensor,
    settings: FinetuneSettings,
    seed: int,
) -> float:
    """Fine-tune `task` on `train_rows` of `features` for settings.steps(...) on a cosine
    schedule; accuracy on `test_rows`."""
    from ssamba.tasks.schedules import apply_lr, lr_factor

    optimiser = task.configure_optimizers()
    steps = settings.steps(len(train_rows))
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    task.train()
    for step in range(steps):
        if len(order) < min(settings.batch_size, len(train_rows)):
            order += train_rows[torch.randperm(len(train_rows), generator=generator)].tolist()
        rows, order = order[: settings.batch_size], order[settings.batch_size :]
        apply_lr(
            [optimiser],
            lr_factor(
                step, 0, schedule="cosine", warmup_steps=settings.warmup_steps, total_steps=steps
            ),
        )
        targets = F.one_hot(features.label[rows], task.hparams.num_classes).float()
        loss = task.loss(task(features.fbank[rows], features.frames[rows]), targets)
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(task.parameters(), 1.0)
        optimiser.step()
    task.eval()
    with torch.no_grad():
        chunks = test_rows.split(256)
        logits = torch.cat([task(features.fbank[c], features.frames[c]) for c in chunks])
    return float((logits.argmax(1) == features.label[test_rows]).float().mean())


def evaluate(
    shards: Path,
    encoder_file: Path,
    folds: list[Fold],
    budgets: list[int | None],
    seeds: list[int],
    modes: list[str],
    settings: FinetuneSettings,
) -> list[Run]:
    """Every (fold, seed, budget, init, mode): train, test, record."""
    from ssamba.models.encoder_file import load_encoder_file

    bundle = load_encoder_file(encoder_file)
    fbank_cfg = bundle.features or labelled_data(shards).fbank
    features = clip_features(shards, fbank_cfg)
    classes = features.num_classes
    print(
        f"== {len(features.ids)} clips, {features.num_classes} classes, features "
        f"{tuple(features.fbank.shape[1:])} (pad {getattr(fbank_cfg, 'pad', 'zeros')})",
        flush=True,
    )
    embeddings: dict[tuple[str, int], torch.Tensor] = {}
    if "linear" in modes:
        embeddings[("pretrained", 0)] = embed_all(
            build_task(encoder_file, "pretrained", 0, "linear", settings, classes),
            features.fbank,
            features.frames,
            settings.probe_read,
        )
        for seed in seeds:
            embeddings[("random", seed)] = embed_all(
                build_task(encoder_file, "random", seed, "linear", settings, classes),
                features.fbank,
                features.frames,
                settings.probe_read,
            )
    runs: list[Run] = []
    for fold in folds:
        for seed in seeds:
            for budget in budgets:
                train, test = train_ids(shards, fold, budget, seed)
                sha = hashlib.sha256("\n".join(sorted(train)).encode()).hexdigest()[:16]
                rows, test_rows = features.rows(train), features.rows(test)
                y, test_y = features.label[rows], features.label[test_rows]
                for init in INITS:
                    for mode in modes:
                        if mode == "finetune" and budget not in (settings.budgets or budgets):
                            continue
                        began = time.monotonic()
                        if mode == "linear":
                            emb = embeddings[(init, 0 if init == "pretrained" else seed)]
                            acc = linear_probe(
                                emb[rows],
                                y,
                                emb[test_rows],
                                test_y,
                                features.num_classes,
                                settings.probe_l2,
                            )
                        else:
                            task = build_task(
                                encoder_file, init, seed, "finetune", settings, classes
                            )
                            acc = finetune(task, features, rows, test_rows, settings, seed)
                        run = Run(
                            init,
                            mode,
                            budget,
                            seed,
                            fold.name,
                            acc,
                            len(train),
                            sha,
                            time.monotonic() - began,
                        )
                        runs.append(run)
                        print(
                            f"fold {fold.name} seed {seed} labels/class {budget or 'all'} "
                            f"{init:10s} {mode:8s} acc {acc:.3f} ({run.seconds:.0f} s)",
                            flush=True,
                        )
    return runs


# ---------------------------------------------------------------------------- outputs
def summarise(runs: list[Run]) -> list[dict[str, Any]]:
    """Mean +/- std per (mode, budget, init) over seeds (fold means first) and folds."""
    rows = []
    keys = sorted(
        {(r.mode, r.labels_per_class) for r in runs},
        key=lambda k: (MODES.index(k[0]), math.inf if k[1] is None else k[1]),
    )
    for mode, budget in keys:
        row: dict[str, Any] = {"mode": mode, "labels_per_class": budget}
        for init in INITS:
            cell = [r for r in runs if (r.mode, r.labels_per_class, r.init) == (mode, budget, init)]
            per_seed = {}
            for r in cell:
                per_seed.setdefault(r.seed, []).append(r.accuracy)
            seed_means = [statistics.fmean(v) for v in per_seed.values()]
            values = seed_means if len(seed_means) > 1 else [r.accuracy for r in cell]
            row[init] = {
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "n": len(values),
            }
        row["difference"] = row["pretrained"]["mean"] - row["random"]["mean"]
        rows.append(row)
    return rows


def format_table(summary: list[dict[str, Any]], split: str, minutes: float, seeds: int) -> str:
    lines = [
        "| mode | labels per class | pretrained | random init | pretrained - random |",
        "|---|---|---|---|---|",
    ]
    for row in summary:
        cells = [f"{row[i]['mean'] * 100:.1f} ± {row[i]['std'] * 100:.1f}" for i in INITS]
        budget = row["labels_per_class"] or "all"
        lines.append(
            f"| {row['mode']} | {budget} | {cells[0]} | {cells[1]} | "
            f"{row['difference'] * 100:+.1f} |"
        )
    runs = max((row["pretrained"]["n"] for row in summary), default=1)
    over = f"mean ± std over {runs} {'seeds' if seeds > 1 else 'folds'}" if runs > 1 else "one run"
    lines.append(f"\nTest accuracy (%), {split}, {over}; {minutes:.1f} minutes in all.")
    return "\n".join(lines)


def plot(summary: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Accuracy vs labels per class (log x; 'all' at the right), both inits and modes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted(
        {r["labels_per_class"] for r in summary}, key=lambda k: math.inf if k is None else k
    )
    numeric = [k for k in budgets if k is not None]
    all_x = (max(numeric) * 4) if numeric else 1
    xs = {k: (all_x if k is None else k) for k in budgets}
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode in MODES:
        for init in INITS:
            rows = [r for r in summary if r["mode"] == mode]
            if not rows:
                continue
            ax.errorbar(
                [xs[r["labels_per_class"]] for r in rows],
                [r[init]["mean"] * 100 for r in rows],
                yerr=[r[init]["std"] * 100 for r in rows],
                marker="o" if init == "pretrained" else "s",
                linestyle="-" if mode == "finetune" else "--",
                capsize=3,
                label=f"{init} {mode}",
            )
    ax.set_xscale("log")
    ax.set_xticks(list(xs.values()), [str(k or "all") for k in xs])
    ax.set_xlabel("labels per class")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_outputs(
    runs: list[Run], out: Path, encoder: Path, split: str, minutes: float, options: dict
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(runs)
    seeds = len({r.seed for r in runs})
    table = format_table(summary, split, minutes, seeds)
    results = {
        "split": split,
        "encoder": str(Path(encoder).resolve()),
        "minutes": minutes,
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in options.items()},
        "runs": [asdict(r) for r in runs],
        "summary": summary,
    }
    results["options"]["pretrain_shards"] = [str(p) for p in options.get("pretrain_shards") or []]
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(table + "\n")
    picture = plot(summary, out / "results.png", f"pretrained vs random init, {split}")
    print("\n" + table)
    print(f"\nresults: {out / 'results.json'}\ntable:   {out / 'results.md'}\nplot:    {picture}")


if __name__ == "__main__":
    sys.exit(main())
