"""`ssamba label-efficiency`: does pretraining pay off, and at how many labels?

    ssamba label-efficiency --shards work/shards/fsdd --out work/le/official
    ssamba label-efficiency --shards work/shards/fsdd --loso speaker --out work/le/loso
    ssamba label-efficiency --shards work/shards/fsdd --loso speaker --dev-groups nicolas
    ssamba label-efficiency --shards work/shards/fsdd --encoder runs/.../encoder.pt ...
    ssamba label-efficiency --shards work/shards/fsdd --pretrain-shards work/shards/a \\
        work/shards/b --pretrain-recipe recipes/pretrain/fsdd_eat_cpu.yaml

1. The protocol (docs/evaluation-protocol.md) fixes, before anything trains, each fold's
   test clips, the labelled clips its probes may train on, and the clips pretraining may
   read; no test clip is ever pretrained on:
   - official split (default): test = the folder's `split: test` clips; labels and
     pretraining audio = every other clip;
   - `--loso FIELD` (e.g. speaker): held-out groups (`--heldout`, by default the last
     third of FIELD's values in sorted order; FSDD: theo, yweweler) that no pretraining
     hears; one fold per held-out group, tested on it, its probes trained on the labelled
     clips of the other, non-held-out groups, which are also the pretraining audio;
   - `--loso FIELD --dev-groups G`: the development protocol on the non-held-out groups
     only (test on G, labels and pretraining from the rest); levers are chosen here, and
     the held-out groups are not read. `--dev-rotate`: every non-held-out group in turn
     (or those of --dev-groups), each fold with its own pretraining on the other
     non-held-out groups: a mean over several test groups and several pretrainings.
2. Pretrain an encoder with `ssamba pretrain` (`--pretrain-recipe`, the CPU recipe by
   default) on the protocol's pretraining clips, by clip id (once per fold with
   `--dev-rotate`, once for every fold otherwise; once per seed of `--pretrain-seeds`,
   whose pretrained rows average every pretraining); its validation clips are a fixed
   tenth of them, never a test clip. `--pretrain-shards` pretrains
   on other folders instead, `--pretrain-extra` on other folders beside those clips (e.g.
   `make devset-speech`: more voices), both refused when any test clip's audio is in
   them. `--encoder` names an encoder file and skips pretraining (its pretraining data is
   then unknown).
3. For every fold, seed and label budget (`--labels-per-class 1,5,20,all`), draw the
   training clips (`draw_per_class`: k per class, seeded, smaller budgets nested): every
   init is trained on exactly the same clips.
4. Train and test, on the same clips:
   - the pretrained encoder file and the same architecture from random weights drawn from
     the seed: a linear probe (a logistic regression on the frozen encoder's pooled
     embeddings: by default each frequency band's token statistics, `--pooling`, of every
     block's output side by side, or `--probe-read last`) and a
     fine-tune (`ClassifyTask`, the `ssamba finetune` model and optimiser, a fixed number
     of steps on a cosine schedule, tested with its last weights: at 1 label per class a
     validation set would hold more labels than the training set);
   - `fbank-stats`: the hand-crafted baseline, the same probe on each clip's per-mel-bin
     mean and standard deviation of the same filterbank window over its own frames.
5. Write `--out/run-N/` (a new folder per run): `results.json` (protocol, folds with their
   test and pretraining clip ids, one record per run with its training clip ids),
   `results.md` (mean +/- std over seeds and folds, pretrained minus random) and
   `results.png` (accuracy vs labels per class).

Filterbanks are computed once per clip (evaluation crop, no augmentation) with the
encoder file's own feature settings, so every init sees exactly what pretraining saw.
Every input problem (no test split, a class with fewer clips than a budget, an unlabelled
folder, a missing encoder, test audio in `--pretrain-shards`) stops the command with one
line and exit code 2 before any training.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import re
import statistics
import sys
import textwrap
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, get_args

import torch

from ssamba.data.labelled import draw_per_class, hash_share
from ssamba.data.shards import clip_id
from ssamba.files import UnwritableError, atomic_path, atomic_write_text, writable_folder
from ssamba.models.encoder import Pooling
from ssamba.recipe_paths import RECIPES, recipe_path
from ssamba.tasks.probe import linear_probe

PROG = "ssamba label-efficiency"
CPU_RECIPE = RECIPES / "pretrain" / "fsdd_tiny_cpu.yaml"
INITS = ("pretrained", "random", "fbank-stats")
LEARNED = ("pretrained", "random")  # the inits with an encoder (fbank-stats has none)
MODES = ("linear", "finetune")
PRETRAIN_VAL_SHARE = 0.1  # of the pretraining clips, for pretraining's masked accuracy


class InputError(ValueError):
    """Bad input found before training; the message names the problem in one line."""


@dataclass(frozen=True)
class Fold:
    """One train/test partition: its test clips, the labelled clips it may train on and
    the clips its encoder's pretraining may read."""

    name: str
    test_ids: tuple[str, ...]
    train_ids: tuple[str, ...]  # the labelled pool its budgets are drawn from
    pretraining_ids: tuple[str, ...]  # folds with the same clips share one pretraining


@dataclass(frozen=True)
class Protocol:
    """What every fold tests, trains on and pretrains on."""

    description: str  # said in the table, e.g. "held-out speakers theo, yweweler"
    folds: list[Fold]

    def pretraining_pools(self) -> dict[tuple[str, ...], list[Fold]]:
        """The folds of each distinct pretraining pool (one pretraining each), in order."""
        pools: dict[tuple[str, ...], list[Fold]] = {}
        for fold in self.folds:
            pools.setdefault(fold.pretraining_ids, []).append(fold)
        return pools


@dataclass(frozen=True)
class Catalogue:
    """The labelled folder's clips: ids, single labels and json, in catalogue order."""

    ids: list[str]
    labels: list[list[str]]
    meta: list[dict[str, Any]]

    def where(self, keep: Any) -> tuple[str, ...]:
        """Ids of the clips whose json `keep(meta)` accepts."""
        return tuple(i for i, m in zip(self.ids, self.meta, strict=True) if keep(m))

    def draw(self, pool: Sequence[str], budget: int | None, seed: int) -> list[str]:
        """`budget` clips per class of `pool` (every one for None), drawn from `seed`."""
        if budget is None:
            return list(pool)
        label = dict(zip(self.ids, self.labels, strict=True))
        return draw_per_class(pool, [label[i] for i in pool], budget, seed)


@dataclass(frozen=True)
class FinetuneSettings:
    """How each fine-tune trains (ClassifyTask's optimiser, a fixed number of steps)."""

    lr: float = 3e-3
    batch_size: int = 32
    epochs: int = 5
    min_steps: int = 60
    warmup_steps: int = 20
    # band statistics: pooling over every patch averages the frequency bands together and
    # loses which band holds what (docs/learning-quality.md, the rotating development run)
    pooling: str = "band-stats"
    ignore_padding: bool = False  # pooling over the clip's own patches only
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
    train_ids: list[str]  # the clips this model was trained on, as passed to its training
    seconds: float
    pretrain_seed: int | None = None  # --pretrain-seeds' seed of a pretrained row's encoder


# ---------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shards", type=Path, required=True, help="labelled shard folder")
    parser.add_argument(
        "--out", type=Path, default=Path("runs/label_efficiency"), help="writes OUT/run-N/"
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--encoder", type=Path, help="an encoder file: skip pretraining")
    source.add_argument(
        "--pretrain-shards",
        type=Path,
        nargs="+",
        help="unlabelled shard folders to pretrain on (default: the protocol's pretraining "
        "clips of --shards); refused when they hold a test clip's audio",
    )
    source.add_argument(
        "--pretrain-extra",
        type=Path,
        nargs="+",
        help="unlabelled shard folders pretrained on beside the protocol's pretraining clips "
        "of --shards (each folder an equal share of every batch); refused when they hold a "
        "test clip's audio",
    )
    parser.add_argument("--pretrain-recipe", type=Path, default=CPU_RECIPE)
    parser.add_argument(
        "--pretrain-args",
        default="",
        help="extra `ssamba pretrain` overrides, one string, e.g. '--trainer.max_steps=500'",
    )
    parser.add_argument(
        "--pretrain-seeds",
        metavar="S1,S2",
        help="pretrain once per seed (its seed_everything, model.seed and data.seed), the "
        "pretrained rows averaged over every pretraining and each one's own mean shown "
        "(default: once, the recipe's seed). One pretraining's random draws move FSDD's "
        "development mean by 4-5 points: compare levers with 2-3",
    )
    parser.add_argument("--labels-per-class", default="1,5,20,all", help="budgets, comma list")
    parser.add_argument(
        "--finetune-labels-per-class",
        help="budgets that are also fine-tuned (default: all of --labels-per-class); "
        "fine-tuning costs far more than a probe",
    )
    parser.add_argument("--seeds", default="0,1,2", help="comma list of seeds")
    parser.add_argument(
        "--loso",
        metavar="FIELD",
        help="leave groups out: held-out values of this json field (e.g. speaker) are "
        "never pretrained or trained on; one fold per held-out value",
    )
    parser.add_argument(
        "--heldout",
        metavar="G1,G2",
        help="with --loso: the held-out groups (default: the last third of the sorted values)",
    )
    parser.add_argument(
        "--dev-groups",
        metavar="G1,G2",
        help="with --loso: the development protocol: test on these non-held-out groups, "
        "train and pretrain on the other non-held-out ones; held-out groups are not read",
    )
    parser.add_argument(
        "--dev-rotate",
        action="store_true",
        help="with --loso: the development protocol on every non-held-out group in turn (or "
        "those of --dev-groups): one fold per group, its probes trained and its encoder "
        "pretrained on the other non-held-out groups (one pretraining per fold); the "
        "figures average over test groups and pretrainings",
    )
    parser.add_argument("--folds", help="only these folds (comma list of group names)")
    parser.add_argument("--modes", default="linear,finetune", help="linear, finetune or both")
    parser.add_argument("--finetune-epochs", type=int, default=FinetuneSettings.epochs)
    parser.add_argument("--finetune-min-steps", type=int, default=FinetuneSettings.min_steps)
    parser.add_argument("--finetune-lr", type=float, default=FinetuneSettings.lr)
    parser.add_argument(
        "--pooling",
        choices=get_args(Pooling),
        default=FinetuneSettings.pooling,
        help="how probes and fine-tunes pool the patch tokens: the mean and standard "
        "deviation over time of each frequency band's tokens, the bands side by side "
        "('band-stats', the default: it keeps which band holds what), their mean and "
        "standard deviation over every patch ('stats'), their mean, or the cls token",
    )
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


def parse_names(text: str | None) -> list[str]:
    return [p.strip() for p in (text or "").split(",") if p.strip()]


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
        pretrain_seeds: list[int | None] = [None]
        if args.pretrain_seeds is not None:
            if args.encoder:
                raise InputError("--pretrain-seeds: --encoder names a trained encoder")
            pretrain_seeds = list(parse_ints(args.pretrain_seeds, "--pretrain-seeds"))
        modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        if not modes or set(modes) - set(MODES):
            raise InputError(f"--modes: {args.modes!r}; choose from {', '.join(MODES)}")
        if not args.probe_l2 >= 0:  # also refuses nan
            raise InputError(f"--probe-l2: {args.probe_l2} is not a weight >= 0")
        clips = read_catalogue(args.shards)
        protocol = plan_protocol(clips, args)
        check_budgets(clips, protocol.folds, budgets)
        if args.encoder:
            check_encoder(args.encoder)
        elif args.pretrain_shards or args.pretrain_extra:
            option = "--pretrain-shards" if args.pretrain_shards else "--pretrain-extra"
            folders = args.pretrain_shards or args.pretrain_extra
            check_no_test_audio(args.shards, protocol.folds, folders, option)
        if not args.encoder:  # a recipe file, or a packaged recipe by name
            try:
                args.pretrain_recipe = recipe_path(args.pretrain_recipe)
            except FileNotFoundError as error:
                raise InputError(f"--pretrain-recipe {error}") from None
        from ssamba.tasks.finetune_cli import new_run_folder

        writable_folder(args.out, "--out")  # last check: a refusal above leaves nothing
        out = new_run_folder(args.out)
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
        runs: list[Run] = []
        folds: list[dict[str, Any]] = []
        # one encoder serves every fold when it does not depend on the fold's clips
        shared = args.encoder or args.pretrain_shards
        pools = {(): protocol.folds} if shared else protocol.pretraining_pools()
        for ids, pool_folds in pools.items():
            for pretrain_seed in pretrain_seeds:
                if args.encoder:
                    encoder, pretrained_on = args.encoder, None
                else:
                    folder = re.sub(r"[^\w.-]", "_", pool_folds[0].name)  # a group as a folder
                    name = "pretrain" if len(pools) == 1 else f"pretrain-{folder}"
                    if pretrain_seed is not None:
                        name += f"-seed{pretrain_seed}"
                    encoder, pretrained_on = pretrain(args, ids, out / name, pretrain_seed)
                # random init and fbank-stats do not depend on the pretraining: once
                inits = INITS if pretrain_seed == pretrain_seeds[0] else ("pretrained",)
                runs += evaluate(
                    args.shards,
                    clips,
                    encoder,
                    pool_folds,
                    budgets,
                    seeds,
                    modes,
                    settings,
                    inits,
                    pretrain_seed,
                )
                folds += [
                    {
                        "name": f.name,
                        "test_ids": list(f.test_ids),
                        "pretraining_ids": pretrained_on,
                        "encoder": str(Path(encoder).resolve()),
                        "pretrain_seed": pretrain_seed,
                    }
                    for f in pool_folds
                ]
    except (InputError, UnwritableError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    minutes = (time.monotonic() - started) / 60
    write_outputs(runs, out, protocol.description, folds, minutes, vars(args))
    return 0


# ---------------------------------------------------------------------------- protocol
def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def read_catalogue(shards: Path) -> Catalogue:
    """The labelled folder's clips with their labels checked against labels.csv."""
    from ssamba.data.labelled import check_labels
    from ssamba.data.shard_format import LABELS_NAME, read_labels
    from ssamba.data.shards import SkipCounter, catalogue, list_shards

    labels_csv = shards / LABELS_NAME
    if not labels_csv.is_file():
        kind = "an unlabelled shard folder" if shards.is_dir() else "not a folder"
        raise InputError(
            f"--shards {shards}: {kind} (no labels.csv); label-efficiency needs labelled "
            "clips (unlabelled audio goes to --pretrain-shards)"
        )
    try:
        clips = catalogue(list_shards(shards), SkipCounter(0))
        class_index = {c: i for i, (c, _) in enumerate(read_labels(labels_csv))}
        check_labels(clips, class_index, False, labels_csv)
    except (ValueError, FileNotFoundError) as error:
        raise InputError(_one_line(error)) from error
    return Catalogue(
        [clip_id(c) for c in clips], [c.meta["labels"] for c in clips], [c.meta for c in clips]
    )


def plan_protocol(clips: Catalogue, args: argparse.Namespace) -> Protocol:
    """The folds, and the clips pretraining may read, of the options' protocol."""
    if args.loso is None:
        if args.folds or args.heldout or args.dev_groups or args.dev_rotate:
            raise InputError(
                "--folds, --heldout, --dev-groups and --dev-rotate need --loso (the official "
                "split has one fold)"
            )
        test = clips.where(lambda m: str(m.get("split")) == "test")
        if not test:
            splits = sorted({str(m.get("split")) for m in clips.meta})
            raise InputError(
                f"--shards {args.shards}: no test split (no clip has split 'test'; splits "
                f"present: {splits}); use --loso FIELD instead"
            )
        train = clips.where(lambda m: str(m.get("split")) != "test")
        return Protocol("official split", [Fold("official", test, train, train)])
    field = args.loso
    groups = sorted({str(m[field]) for m in clips.meta if field in m})
    if len(groups) < 3:
        raise InputError(
            f"--loso {field}: {args.shards} has {len(groups)} value(s) of {field!r} in its "
            "clips' json; held-out groups need at least 3 (some to hold out, some to learn from)"
        )
    heldout = parse_names(args.heldout) or groups[-max(1, len(groups) // 3) :]
    dev = parse_names(args.dev_groups)
    if args.dev_rotate and not dev:
        dev = [g for g in groups if g not in heldout]
    for option, names in (("--heldout", heldout), ("--dev-groups", dev)):
        unknown = [g for g in names if g not in groups]
        if unknown:
            raise InputError(f"{option}: {unknown} are not values of {field!r}: {groups}")
    if set(dev) & set(heldout):
        raise InputError(
            f"--dev-groups: {sorted(set(dev) & set(heldout))} are held out; development "
            f"groups come from the others: {[g for g in groups if g not in heldout]}"
        )
    tested = dev or heldout
    only = parse_names(args.folds)
    unknown = [g for g in only if g not in tested]
    if unknown:
        raise InputError(f"--folds: {unknown} are not among the tested groups {tested}")

    def learned_from(test: str) -> list[str]:
        # --dev-rotate: every group but the fold's own; otherwise no tested group at all
        left_out = [test] if args.dev_rotate else tested
        return [g for g in groups if g not in heldout and g not in left_out]

    if not all(learned_from(g) for g in tested):
        raise InputError(f"--heldout/--dev-groups: no {field} is left to train on: {groups}")
    folds = []
    for g in only or tested:
        peers = set(learned_from(g))  # once per fold, not once per clip
        pool = clips.where(lambda m, peers=peers: str(m.get(field)) in peers)
        folds.append(Fold(g, clips.where(lambda m, g=g: str(m.get(field)) == g), pool, pool))
    kind = "development" if dev else "held-out"
    named = f"{kind} {field}{'s' if len(tested) > 1 else ''} {', '.join(tested)}"
    if args.dev_rotate:
        description = (
            f"{named} in turn (each never pretrained on; probes trained and encoder "
            f"pretrained on the other non-held-out {field}s, one pretraining per fold)"
        )
    else:
        learn = ", ".join(learned_from(tested[0]))
        description = f"{named} (never pretrained on; probes trained on {learn})"
    return Protocol(description, folds)


def check_budgets(clips: Catalogue, folds: list[Fold], budgets: list[int | None]) -> None:
    """Every fold must hold the largest budget of every class (fails before training)."""
    largest = max((k for k in budgets if k is not None), default=None)
    if largest is None:
        return
    for fold in folds:
        try:
            clips.draw(fold.train_ids, largest, 0)
        except ValueError as error:
            raise InputError(f"fold {fold.name}: {_one_line(error)}") from error


def check_encoder(path: Path) -> None:
    """Read the encoder file before any training: a missing, foreign or unsafe file stops here."""
    from ssamba.models.encoder_file import load_encoder_file

    try:
        load_encoder_file(path)
    except (OSError, ValueError) as err:  # CheckpointError is a ValueError
        raise InputError(f"--encoder: {err}") from None


def audio_hashes(folder: Path, ids: set[str] | None = None) -> dict[str, str]:
    """sha256 of each clip's decoded samples -> its id (only `ids` when given): the same
    audio under another id or in another container hashes alike."""
    from ssamba.data.shards import decode_clip, iter_shard, list_shards

    hashes = {}
    for shard in list_shards(folder):
        for raw in iter_shard(shard.path):
            name = str((raw.meta or {}).get("id", raw.key))
            if ids is not None and name not in ids:
                continue
            try:
                wave, _ = decode_clip(raw)
            except Exception:  # corrupt clips are skipped by every reader, here too
                continue
            hashes[hashlib.sha256(wave.numpy().tobytes()).hexdigest()] = name
    return hashes


def check_no_test_audio(
    shards: Path, folds: list[Fold], pretrain_shards: list[Path], option: str
) -> None:
    """Refuse pretraining folders (given by `option`) that hold any fold's test audio."""
    test_ids = {i for fold in folds for i in fold.test_ids}
    tests = audio_hashes(shards, test_ids)
    for folder in pretrain_shards:
        if not folder.is_dir():
            raise InputError(f"{option} {folder}: no such folder")
        found = {h: name for h, name in audio_hashes(folder).items() if h in tests}
        if found:
            digest, name = next(iter(found.items()))
            raise InputError(
                f"{option} {folder}: {len(found)} of its clips are test clips of "
                f"{shards} (same audio), e.g. {name!r} is test clip {tests[digest]!r}; "
                "pretraining on test audio would overstate what it learns"
            )


# ---------------------------------------------------------------------------- pretraining
def pretrain_sources(
    args: argparse.Namespace, ids: Sequence[str]
) -> tuple[list[dict[str, Any]], dict[str, Any], list[str]]:
    """(sources, validation source, every clip id they hold) for `ssamba pretrain`: the
    pretraining clips `ids` of --shards (and every clip of --pretrain-extra), or
    --pretrain-shards; validation is a fixed share of the first folder's clips by clip-id
    hash, so no test clip is read."""
    from ssamba.data.shards import SkipCounter, catalogue, list_shards

    def every_id(folder: Path) -> list[str]:
        return [clip_id(c) for c in catalogue(list_shards(folder), SkipCounter(0))]

    if args.pretrain_shards:
        folders = [f.resolve() for f in args.pretrain_shards]
        held = [every_id(f) for f in folders]
    else:
        extra = [f.resolve() for f in args.pretrain_extra or []]
        folders = [args.shards.resolve(), *extra]
        held = [list(ids), *map(every_id, extra)]
    val = [i for i in held[0] if hash_share(i) < PRETRAIN_VAL_SHARE]
    first = [i for i in held[0] if hash_share(i) >= PRETRAIN_VAL_SHARE]
    sources = [{"shards": str(folders[0]), "ids": first}]
    sources += [{"shards": str(f)} for f in folders[1:]]  # every clip of the others
    return sources, {"shards": str(folders[0]), "ids": val}, [i for ids in held for i in ids]


def pretrain(
    args: argparse.Namespace, ids: Sequence[str], folder: Path, seed: int | None = None
) -> tuple[Path, list[str]]:
    """Run `ssamba pretrain` with the recipe on the clips `ids` (and --pretrain-extra or
    --pretrain-shards), logging under `folder`, with every seed of the run set to `seed`
    (None: the recipe's); returns the exported encoder file and the ids of every clip
    pretraining read."""
    import shlex

    from ssamba.data.shard_format import fbank_stats
    from ssamba.tasks.cli_common import SetupError
    from ssamba.tasks.pretrain_cli import pretrain as pretrain_run

    folder = folder.resolve()
    sources, val, read = pretrain_sources(args, ids)
    # The labelled folder's normalisation: pretraining and the probes see the same inputs.
    mean, std = fbank_stats(args.shards)
    argv = [
        "--config",
        str(args.pretrain_recipe),
        f"--data.sources={json.dumps(sources)}",
        f"--data.val={json.dumps(val)}",
        f"--data.features.stats=[{mean}, {std}]",
        f"--trainer.default_root_dir={folder}",
        f"--trainer.logger.init_args.save_dir={folder}",
        *shlex.split(args.pretrain_args),
    ]
    if seed is not None:  # model and data keep their own seeds: all three, or none
        argv += [f"--seed_everything={seed}", f"--model.seed={seed}", f"--data.seed={seed}"]
    shown = [a if len(a) < 200 else a[:120] + " ...]" for a in argv]
    print(f"== pretrain on {len(read)} clips: ssamba pretrain {shlex.join(shown)}", flush=True)
    try:
        result = pretrain_run(argv)
    except SetupError as error:
        raise InputError(f"--pretrain-recipe/--pretrain-args: {error}") from error
    return Path(result.files["encoder"]), read


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


def fbank_stats_features(features: Features) -> torch.Tensor:
    """The hand-crafted baseline: each clip's per-mel-bin mean and standard deviation over
    its own frames of the filterbank window (clips, 2 * bins)."""
    frames = features.frames.clamp(1, features.fbank.shape[1])
    own = torch.arange(features.fbank.shape[1])[None, :] < frames[:, None]  # (clips, frames)
    weight = own[..., None].float()
    mean = (features.fbank * weight).sum(1) / frames[:, None]
    var = ((features.fbank - mean[:, None]) ** 2 * weight).sum(1) / frames[:, None]
    return torch.cat([mean, var.sqrt()], dim=1)


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


def finetune(
    shards: Path,
    encoder_file: Path,
    init: str,
    seed: int,
    settings: FinetuneSettings,
    fbank_cfg: Any,
    train_ids: Sequence[str],
    test_ids: Sequence[str],
) -> float:
    """Fine-tune `init` on `train_ids` with Lightning (`ClassifyTask` on a
    `LabelledDataModule` holding exactly those clips, evaluation crop, no augmentation) for
    settings.steps(...) steps on a cosine schedule; its last weights' `test/acc` on
    `test_ids`, scored by `ClassifyTask.test_step` as `ssamba finetune` scores."""
    import tempfile

    from lightning.pytorch import Trainer

    from ssamba.data.labelled import LabelledDataModule
    from ssamba.features import FeatureConfig
    from ssamba.tasks.cli_common import quiet_lightning

    data = LabelledDataModule(
        str(shards),
        batch_size=min(settings.batch_size, len(train_ids)),
        num_workers=0,
        train_filter={"id": list(train_ids)},
        test_filter={"id": list(test_ids)},
        features=FeatureConfig(
            kind=fbank_cfg.kind,
            num_mel_bins=fbank_cfg.num_mel_bins,
            num_ceps=fbank_cfg.num_ceps,
            target_length=fbank_cfg.target_length,
            stats=(fbank_cfg.mean, fbank_cfg.std),
            pad=fbank_cfg.pad,
        ),
        train_crop="start",  # the clips the probes read, every step
        seed=seed,
    )
    task = build_task(encoder_file, init, seed, "finetune", settings, data.num_classes)
    quiet_lightning()
    # Lightning's per-Trainer notices (devices, "max_steps reached"), once per fine-tune.
    notices = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = notices.level
    notices.setLevel(logging.WARNING)
    try:
        with tempfile.TemporaryDirectory(prefix="ssamba-le-") as folder, warnings.catch_warnings():
            # No validation set on purpose (see the module's docstring): the task's
            # checkpoint callback and Lightning would say so at every epoch.
            warnings.filterwarnings("ignore", message=".*could not find the monitored key")
            warnings.filterwarnings("ignore", message=".*Total length of `list` across ranks")
            trainer = Trainer(
                accelerator="cpu",
                max_steps=settings.steps(len(train_ids)),
                max_epochs=-1,
                gradient_clip_val=1.0,
                logger=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                num_sanity_val_steps=0,
                default_root_dir=folder,
            )
            trainer.fit(task, datamodule=data)
            return float(trainer.test(task, datamodule=data, verbose=False)[0]["test/acc"])
    finally:
        notices.setLevel(level)


def evaluate(
    shards: Path,
    clips: Catalogue,
    encoder_file: Path,
    folds: list[Fold],
    budgets: list[int | None],
    seeds: list[int],
    modes: list[str],
    settings: FinetuneSettings,
    inits: Sequence[str] = INITS,
    pretrain_seed: int | None = None,
) -> list[Run]:
    """Every (fold, seed, budget, init, mode): train, test, record; `pretrain_seed` is
    recorded on the pretrained rows (the seed `encoder_file` was pretrained with)."""
    from ssamba.models.encoder_file import load_encoder_file

    bundle = load_encoder_file(encoder_file)
    fbank_cfg = bundle.features
    if fbank_cfg is None:
        from ssamba.data.labelled import LabelledDataModule

        fbank_cfg = LabelledDataModule(str(shards), num_workers=0).fbank
    features = clip_features(shards, fbank_cfg)
    classes = features.num_classes
    print(
        f"== {len(features.ids)} clips, {features.num_classes} classes, features "
        f"{tuple(features.fbank.shape[1:])} (pad {getattr(fbank_cfg, 'pad', 'zeros')})",
        flush=True,
    )
    embeddings: dict[tuple[str, int], torch.Tensor] = {}
    if "linear" in modes:
        embeddings[("fbank-stats", 0)] = fbank_stats_features(features)
        embeddings[("pretrained", 0)] = embed_all(
            build_task(encoder_file, "pretrained", 0, "linear", settings, classes),
            features.fbank,
            features.frames,
            settings.probe_read,
        )
        for seed in seeds if "random" in inits else ():
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
                train = clips.draw(fold.train_ids, budget, seed)
                rows, test_rows = features.rows(train), features.rows(fold.test_ids)
                y, test_y = features.label[rows], features.label[test_rows]
                for init in inits:
                    for mode in modes:
                        if mode == "finetune" and (
                            init not in LEARNED or budget not in (settings.budgets or budgets)
                        ):
                            continue
                        began = time.monotonic()
                        if mode == "linear":
                            emb = embeddings[(init, seed if init == "random" else 0)]
                            acc = linear_probe(
                                emb[rows],
                                y,
                                emb[test_rows],
                                test_y,
                                features.num_classes,
                                settings.probe_l2,
                            )
                        else:
                            acc = finetune(
                                shards,
                                encoder_file,
                                init,
                                seed,
                                settings,
                                fbank_cfg,
                                train,
                                fold.test_ids,
                            )
                        trained_on = [features.ids[i] for i in rows.tolist()]
                        run = Run(
                            init,
                            mode,
                            budget,
                            seed,
                            fold.name,
                            acc,
                            len(trained_on),
                            trained_on,
                            time.monotonic() - began,
                            pretrain_seed if init == "pretrained" else None,
                        )
                        runs.append(run)
                        print(
                            f"fold {fold.name} seed {seed} labels/class {budget or 'all'} "
                            f"{init:11s} {mode:8s} acc {acc:.3f} ({run.seconds:.0f} s)",
                            flush=True,
                        )
    return runs


# ---------------------------------------------------------------------------- outputs
def summarise(runs: list[Run]) -> list[dict[str, Any]]:
    """Mean +/- std per (mode, budget, init) over seeds (fold means first; a seed per
    pretraining seed and probe seed pair with --pretrain-seeds) and folds; an init that
    did not run in a mode (fbank-stats is only probed) is left out of its row."""
    rows = []
    keys = sorted(
        {(r.mode, r.labels_per_class) for r in runs},
        key=lambda k: (MODES.index(k[0]), math.inf if k[1] is None else k[1]),
    )
    for mode, budget in keys:
        row: dict[str, Any] = {"mode": mode, "labels_per_class": budget}
        for init in INITS:
            cell = [r for r in runs if (r.mode, r.labels_per_class, r.init) == (mode, budget, init)]
            if not cell:
                continue
            per_seed: dict[tuple[int | None, int], list[float]] = {}
            for r in cell:
                per_seed.setdefault((r.pretrain_seed, r.seed), []).append(r.accuracy)
            seed_means = [statistics.fmean(v) for v in per_seed.values()]
            values = seed_means if len(seed_means) > 1 else [r.accuracy for r in cell]
            row[init] = {
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "n": len(values),
            }
            pretrainings = list(dict.fromkeys(k[0] for k in per_seed))
            if len(pretrainings) > 1:
                # How far one pretraining moves the cell: each pretraining's own mean over
                # its probe seeds (fold means first), the spread that decides whether a
                # lever's difference is more than a pretraining's random draws.
                row[init]["per_pretraining"] = [
                    {
                        "pretrain_seed": seed,
                        "mean": statistics.fmean(
                            m for (p, _), m in zip(per_seed, seed_means, strict=True) if p == seed
                        ),
                    }
                    for seed in pretrainings
                ]
        row["difference"] = row["pretrained"]["mean"] - row["random"]["mean"]
        rows.append(row)
    return rows


def _cell(value: dict[str, Any] | None) -> str:
    """ "mean ± std" in %, the mean alone for a single run, "-" where nothing ran."""
    if value is None:
        return "-"
    if value["n"] < 2:
        return f"{value['mean'] * 100:.1f}"
    return f"{value['mean'] * 100:.1f} ± {value['std'] * 100:.1f}"


def format_table(
    summary: list[dict[str, Any]],
    protocol: str,
    minutes: float,
    seeds: int,
    pretrain_seeds: Sequence[int | None] = (None,),
) -> str:
    each = len(pretrain_seeds) > 1  # a column of each pretraining's own mean
    lines = [
        "| mode | labels per class | pretrained | random init | fbank-stats | "
        "pretrained - random |" + (" pretrained, each pretraining |" if each else ""),
        "|---|---|---|---|---|---|" + ("---|" if each else ""),
    ]
    for row in summary:
        cells = [_cell(row.get(i)) for i in INITS]
        budget = row["labels_per_class"] or "all"
        line = (
            f"| {row['mode']} | {budget} | {' | '.join(cells)} | {row['difference'] * 100:+.1f} |"
        )
        if each:  # in the footnote's order of seeds, whatever order the runs came in
            means = {m["pretrain_seed"]: m["mean"] for m in row["pretrained"]["per_pretraining"]}
            line += " " + " / ".join(f"{means[s] * 100:.1f}" for s in pretrain_seeds) + " |"
        lines.append(line)
    runs = max((row["pretrained"]["n"] for row in summary), default=1)
    over = f"mean ± std over {runs} {'seeds' if seeds > 1 else 'folds'}" if runs > 1 else "one run"
    if len(pretrain_seeds) > 1:
        listed = ", ".join(str(s) for s in pretrain_seeds)
        over += (
            f" (pretrained: every seed of each pretraining, pretraining seeds {listed}; the "
            "last column gives each pretraining's own mean, in that order)"
        )
    lines.append(
        f"\nTest accuracy (%), {protocol}, {over}; fbank-stats: a linear probe on each "
        f"clip's per-mel-bin mean and std; {minutes:.1f} minutes in all."
    )
    return "\n".join(lines)


def plot(summary: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Accuracy vs labels per class (log x; 'all' at the right), every init and mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted(
        {r["labels_per_class"] for r in summary}, key=lambda k: math.inf if k is None else k
    )
    numeric = [k for k in budgets if k is not None]
    all_x = (max(numeric) * 4) if numeric else 1
    xs = {k: (all_x if k is None else k) for k in budgets}
    markers = {"pretrained": "o", "random": "s", "fbank-stats": "^"}
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode in MODES:
        for init in INITS:
            rows = [r for r in summary if r["mode"] == mode and init in r]
            if not rows:
                continue
            ax.errorbar(
                [xs[r["labels_per_class"]] for r in rows],
                [r[init]["mean"] * 100 for r in rows],
                yerr=[r[init]["std"] * 100 for r in rows],
                marker=markers[init],
                linestyle="-" if mode == "finetune" else "--",
                capsize=3,
                label=f"{init} {mode}",
            )
    ax.set_xscale("log")
    ax.set_xticks(list(xs.values()), [str(k or "all") for k in xs])
    ax.set_xlabel("labels per class")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(textwrap.fill(title, 90), fontsize=8)  # protocol descriptions run long
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as staged:
        fig.savefig(staged, format="png", dpi=120)
    plt.close(fig)
    return path


def write_outputs(
    runs: list[Run],
    out: Path,
    protocol: str,
    folds: list[dict[str, Any]],
    minutes: float,
    options: dict,
) -> None:
    """results.json, results.md and results.png in `out` (a new run folder); `folds`
    name each fold's encoder file, "encoder" the one they share (null when they differ)."""
    summary = summarise(runs)
    seeds = len({r.seed for r in runs})
    pretrain_seeds = sorted(
        {r.pretrain_seed for r in runs if r.init == "pretrained"}, key=lambda s: s or 0
    )
    table = format_table(summary, protocol, minutes, seeds, pretrain_seeds)
    results = {
        "protocol": protocol,
        "encoder": folds[0]["encoder"] if len({f["encoder"] for f in folds}) == 1 else None,
        "minutes": minutes,
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in options.items()},
        "folds": folds,
        "summary": summary,
        "runs": [asdict(r) for r in runs],
    }
    for key in ("pretrain_shards", "pretrain_extra"):
        results["options"][key] = [str(p) for p in options.get(key) or []]
    atomic_write_text(out / "results.json", json.dumps(results, indent=1) + "\n")
    atomic_write_text(out / "results.md", table + "\n")
    picture = plot(summary, out / "results.png", protocol)
    print("\n" + table)
    print(f"\nresults: {out / 'results.json'}\ntable:   {out / 'results.md'}\nplot:    {picture}")


if __name__ == "__main__":
    sys.exit(main())
