"""`LabelledDataModule`: train/val/test splits of one labelled shard folder, for fine-tuning.

Which clip goes where is decided from each clip's json before training starts:
- official splits: `test_filter: {split: test}`, `val_filter: {split: valid}`;
- cross-validation (ESC-50): `fold: 1` tests on fold 1, validates on `val_fold` ("next"
  fold, "test" like SSAST's ESC-50 recipe, a fold number, or none), trains on the rest;
- any predicate on the json, e.g. leave-one-speaker-out: `test_filter: {speaker: theo}`;
- corpora without a validation split (FSDD): `val_fraction: 0.1` holds out a fixed tenth
  of the training clips, chosen by a hash of the clip id (same on every rank and run).
Training takes every clip that is neither test nor validation unless `train_filter` says.
A clip is never in both the validation and the test set unless the recipe asks for it
(`val_fold: test`, SSAST's ESC-50 protocol): the epoch kept is chosen on validation data.

Training reshuffles every epoch, applies mixup (on waveforms, Beta(alpha, alpha), labels
mixed too), SpecAugment and noise as the originals; evaluation is finite, in order,
unaugmented, and every clip is read exactly once over all ranks (no padding), so metrics
gathered across ranks are exact.

Batches: `{"fbank": (B, T, F), "frames": (B,) long (each clip's own frames; the rest is
padding), "target": (B, num_classes) float32, "label": (B,) long (argmax; -1 for
multi-label), "id": list[str]}`.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch

from ssamba.data.loader import FiniteLoader, distributed_rank_world, make_loader, rank_batches
from ssamba.data.shard_format import LABELS_NAME, read_labels
from ssamba.data.shards import ClipRef, SkipCounter, catalogue, clip_id, list_shards
from ssamba.data.streams import Clip, ClipBatches
from ssamba.data.transforms import CropPosition, batch_features, crop_wave, resolve_features
from ssamba.features import (
    DEFAULT_FEATURES,
    FbankConfig,
    FeatureConfig,
    mix_targets,
    mix_waves,
    sample_mixup_lambda,
)

Subset = Literal["train", "val", "test"]
STAGE_SUBSETS: dict[str, tuple[Subset, ...]] = {
    "fit": ("train", "val"),
    "validate": ("val",),
    "test": ("test",),
}


def matches(meta: dict[str, Any], predicate: dict[str, Any]) -> bool:
    """True when every field of `predicate` equals the clip's json (a list: any of them).

    Values compare as strings, so `fold: 1` in YAML matches `"fold": 1` or `"1"`.
    """
    for field, wanted in predicate.items():
        if field not in meta:
            return False
        allowed = wanted if isinstance(wanted, list) else [wanted]
        if str(meta[field]) not in {str(v) for v in allowed}:
            return False
    return True


@dataclass
class LabelledBatch:
    """Crop, mixup, filterbank and targets: clips -> the labelled batch dict."""

    cfg: FbankConfig
    class_index: dict[str, int]
    multi_label: bool
    train: bool
    crop: CropPosition
    mixup: float
    mixup_alpha: float

    def __call__(
        self, clips: list[Clip], rng: random.Random
    ) -> tuple[dict[str, Any] | None, list[str]]:
        waves = [crop_wave(c.wave, self.cfg, self.crop, rng) for c in clips]
        targets = [self.target(c) for c in clips]
        if self.train and self.mixup > 0 and len(clips) > 1:
            waves, targets = self._mix(waves, targets, rng)
        fbank, frames, kept = batch_features(waves, self.cfg, self.train)
        rejected = [c.id for i, c in enumerate(clips) if i not in kept]
        if not kept:
            return None, rejected
        target = torch.stack([targets[i] for i in kept])
        label = torch.full((len(kept),), -1) if self.multi_label else target.argmax(1)
        return {
            "fbank": fbank,
            "frames": frames,
            "target": target,
            "label": label,
            "id": [clips[i].id for i in kept],
        }, rejected

    def target(self, clip: Clip) -> torch.Tensor:
        """(num_classes,) multi-hot of the clip's labels (one-hot for single-label sets)."""
        target = torch.zeros(len(self.class_index))
        for label in clip.meta.get("labels", []):
            target[self.class_index[label]] = 1.0
        return target

    def _mix(
        self, waves: list[torch.Tensor], targets: list[torch.Tensor], rng: random.Random
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """With probability `mixup`, mix each clip with a random other clip of the batch.

        The originals draw the partner from the whole dataset; the batch is already a
        random draw (reshuffled every epoch), and reusing it costs no second decode.
        """
        mixed_waves, mixed_targets = list(waves), list(targets)
        for i in range(len(waves)):
            if rng.random() >= self.mixup:
                continue
            j = rng.choice([k for k in range(len(waves)) if k != i])
            lam = sample_mixup_lambda(self.mixup_alpha, rng)
            mixed_waves[i] = mix_waves(waves[i], waves[j], lam)
            mixed_targets[i] = mix_targets(targets[i], targets[j], lam)
        return mixed_waves, mixed_targets


class LabelledDataModule(L.LightningDataModule):
    """Labelled train/val/test loaders over one shard folder (splits, folds or predicates)."""

    def __init__(
        self,
        shards: str,
        batch_size: int = 32,
        num_workers: int = 4,
        fold: int | None = None,
        val_fold: int | Literal["next", "test"] | None = "next",
        test_filter: dict[str, Any] | None = None,
        val_filter: dict[str, Any] | None = None,
        val_fraction: float = 0.0,
        train_filter: dict[str, Any] | None = None,
        multi_label: bool | None = None,
        features: FeatureConfig = DEFAULT_FEATURES,
        train_crop: CropPosition = "random",
        eval_crop: CropPosition = "start",
        freqm: int = 0,
        timem: int = 0,
        noise: bool = False,
        mixup: float = 0.0,
        mixup_alpha: float = 10.0,
        labels_per_class: int | None = None,
        budget_seed: int = 0,
        seed: int = 0,
    ) -> None:
        """
        Args:
            shards: shard folder written by `ssamba shard` (tars, index.json, labels.csv).
            batch_size: clips per batch on each rank.
            num_workers: DataLoader worker processes per rank (decode + fbank run there).
            fold: cross-validation: test on clips whose json `fold` equals this
                (overrides `test_filter`). None: no folds.
            val_fold: with `fold`: validate on the "next" fold (wrapping round), on the
                "test" fold (as SSAST's ESC-50 recipe), on a given fold, or None (none).
            test_filter: json predicate of the test set, e.g. `{speaker: theo}`,
                `{split: [test]}`. None: `{split: test}`.
            val_filter: json predicate of the validation set, e.g. `{split: valid}`.
                None: no validation (unless `fold` and `val_fold` give one).
            val_fraction: hold out this share of the training clips as the validation
                set (a hash of the clip id picks them: fixed across runs and ranks), for
                corpora without a validation split; 0 = off. Excludes `val_filter` and
                `val_fold`.
            train_filter: json predicate of the training set (test and validation clips
                are never trained on). None: every clip in neither the test nor the
                validation set.
            multi_label: multi-hot targets with label -1 (AudioSet) or one-hot with a
                label index. None: multi-label if any clip has more than one label.
            features: the model input (`FeatureConfig`: kind, bins, target_length, stats,
                pad); "shards" statistics and an "auto" length read `shards`' stats.json.
                Use the padding and statistics the encoder was pretrained with.
            train_crop: where training crops clips longer than `target_length`.
            eval_crop: where evaluation crops them ("start" as the originals, or "center").
            freqm: SpecAugment frequency mask width (training only; 0 = off).
            timem: SpecAugment time mask width (training only; 0 = off).
            noise: SSAST's noise + time roll augmentation (training only).
            mixup: probability that a training clip is mixed with another (waveforms and
                targets; SC v2 uses 0.6, AS-20K 0.5).
            mixup_alpha: Beta(alpha, alpha) of the mixing weight (the originals: 10).
            labels_per_class: train on only this many clips of each class (single-label
                data), for label-efficiency studies; None: every training clip. The clips
                are the first k of each class in an order drawn from `budget_seed` and the
                clip ids alone, so every model trained with the same seed sees the same
                clips, and a smaller budget is a subset of a larger one.
            budget_seed: seed of that draw.
            seed: base seed of shuffling, crops and mixup.
        """
        super().__init__()
        self.save_hyperparameters()
        self.hparams.features = asdict(features)  # plain data: checkpoints load weights-only
        if batch_size <= 0 or num_workers < 0:
            raise ValueError(
                f"batch_size must be > 0 and num_workers >= 0, got {batch_size}, {num_workers}"
            )
        if not 0.0 <= mixup <= 1.0:
            raise ValueError(f"mixup: a probability in [0, 1], got {mixup}")
        if labels_per_class is not None and labels_per_class < 1:
            raise ValueError(f"labels_per_class: at least 1 clip per class, got {labels_per_class}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction: a share in [0, 1), got {val_fraction}")
        if val_fraction and val_filter is not None:
            raise ValueError(
                "val_fraction: give one validation set: val_fraction, val_filter or "
                f"val_fold (got val_fraction {val_fraction}, val_filter {val_filter})"
            )
        self.shard_list = list_shards(shards)
        labels_csv = Path(shards) / LABELS_NAME
        if not labels_csv.is_file():
            raise FileNotFoundError(
                f"{labels_csv} not found: {shards} is not a labelled shard folder"
            )
        self.classes = read_labels(labels_csv)
        self.class_index = {class_id: i for i, (class_id, _) in enumerate(self.classes)}
        self.fbank: FbankConfig = resolve_features(
            features, shards, freqm=freqm, timem=timem, noise=noise
        )
        self.counters = {
            name: SkipCounter(num_workers) for name in ("scan", "train", "val", "test")
        }
        self.subsets: dict[str, list[ClipRef]] | None = None
        self.predicates: dict[str, Any] = {}
        self._values: dict[str, list[str]] = {}
        self.multi_label = multi_label
        self._loaders: dict[str, FiniteLoader] = {}

    @property
    def num_classes(self) -> int:
        """Classes in labels.csv (the width of `target`)."""
        return len(self.classes)

    @property
    def class_names(self) -> list[str]:
        """Display names in label-index order."""
        return [name for _, name in self.classes]

    def setup(self, stage: str | None = None) -> None:
        """Split the clips into subsets (once), then build the loaders `stage` needs."""
        self.split_clips(stage)
        for subset in self._stage_subsets(stage):
            if subset not in self._loaders:
                self._loaders[subset] = self._loader(subset)

    def split_clips(self, stage: str | None = None) -> dict[str, int]:
        """Scan the shards, check labels and assign clips to subsets; clips per subset.

        Everything that can be wrong with the data of a stage (labels outside labels.csv,
        a missing fold, an empty or test-overlapping subset) fails here, before any step
        runs; `ssamba finetune` calls it before training. The scan runs once.
        """
        if self.subsets is None:
            clips = catalogue(self.shard_list, self.counters["scan"])
            if self.multi_label is None:
                self.multi_label = any(len(c.meta.get("labels", [])) > 1 for c in clips)
            self._check_labels(clips)
            self._values = {
                field: sorted({str(c.meta[field]) for c in clips if field in c.meta})[:20]
                for field in ("split", "fold", "speaker")
            }
            self.subsets, self.predicates = self._assign(clips)
        for subset in self._stage_subsets(stage):
            if not self.subsets[subset]:
                values = "; ".join(f"{f}: {v}" for f, v in self._values.items() if v)
                raise ValueError(
                    f"{self.hparams.shards}: the {subset} set ({self.predicates[subset]}) "
                    f"matches no clip; values present: {values}"
                )
        return {name: len(clips) for name, clips in self.subsets.items()}

    def _stage_subsets(self, stage: str | None) -> list[Subset]:
        """The configured subsets a stage reads (all of them for None)."""
        wanted = STAGE_SUBSETS.get(stage or "", ("train", "val", "test"))
        return [s for s in wanted if self.predicates.get(s) is not None]

    def train_dataloader(self) -> FiniteLoader:
        return self._get("train")

    def val_dataloader(self) -> FiniteLoader | list:
        self.setup("fit")
        return self._get("val") if self.predicates.get("val") is not None else []

    def test_dataloader(self) -> FiniteLoader:
        return self._get("test")

    def skipped(self) -> dict[str, int]:
        """Corrupt clips skipped so far on this rank, per reason (all subsets)."""
        totals = [c.totals() for c in self.counters.values()]
        return {reason: sum(t[reason] for t in totals) for reason in totals[0]}

    def _get(self, subset: Subset) -> FiniteLoader:
        if subset not in self._loaders:
            self.setup("test" if subset == "test" else "fit")
        if subset not in self._loaders:
            raise ValueError(f"{self.hparams.shards}: no {subset} set is configured")
        return self._loaders[subset]

    def _loader(self, subset: Subset) -> FiniteLoader:
        assert self.subsets is not None and self.multi_label is not None
        hp = self.hparams
        if self.trainer is not None:
            rank, world = self.trainer.global_rank, self.trainer.world_size
        else:
            rank, world = distributed_rank_world()
        clips, train = self.subsets[subset], subset == "train"
        length = rank_batches(len(clips), hp.batch_size, rank, world, drop_last=train)
        if length == 0:
            raise ValueError(
                f"{hp.shards}: the {subset} set has {len(clips)} clips, too few for one batch "
                f"of {hp.batch_size} on each of {world} ranks"
            )
        builder = LabelledBatch(
            self.fbank,
            self.class_index,
            self.multi_label,
            train=train,
            crop=hp.train_crop if train else hp.eval_crop,
            mixup=hp.mixup,
            mixup_alpha=hp.mixup_alpha,
        )
        batches = ClipBatches(
            clips, builder, hp.batch_size, rank, world, train, hp.seed, self.counters[subset]
        )
        return FiniteLoader(make_loader(batches, hp.num_workers), length)

    def _check_labels(self, clips: list[ClipRef]) -> None:
        assert self.multi_label is not None
        labels_csv = Path(self.hparams.shards) / LABELS_NAME
        check_labels(clips, self.class_index, self.multi_label, labels_csv)

    def _assign(self, clips: list[ClipRef]) -> tuple[dict[str, list[ClipRef]], dict[str, Any]]:
        """(clips per subset, predicate per subset); a None predicate = subset not configured."""
        hp = self.hparams
        test, val = self._eval_predicates(clips)  # checks that a given fold exists
        if hp.val_fraction and hp.fold is not None and hp.val_fold:
            raise ValueError(
                "val_fraction: give one validation set: val_fraction, val_filter or "
                f"val_fold (got val_fraction {hp.val_fraction}, val_fold {hp.val_fold})"
            )
        test_clips = [c for c in clips if test is not None and matches(c.meta, test)]
        in_test = {id(c) for c in test_clips}
        pool = [
            c
            for c in clips
            if id(c) not in in_test
            and (hp.train_filter is None or matches(c.meta, hp.train_filter))
        ]
        if hp.val_fraction:
            val = f"{hp.val_fraction:.0%} of the training clips, held out by clip-id hash"
            val_clips = [c for c in pool if hash_share(clip_id(c)) < hp.val_fraction]
        else:
            val_clips = [c for c in clips if val is not None and matches(c.meta, val)]
            if val != test:
                _check_disjoint(val_clips, in_test, val, test)
        in_val = {id(c) for c in val_clips}
        predicates = {
            "test": test,
            "val": val,
            "train": hp.train_filter if hp.train_filter is not None else "not val or test",
        }
        train = [c for c in pool if id(c) not in in_val]
        if hp.labels_per_class is not None:
            train = self._label_budget(train, hp.labels_per_class)
            predicates["train"] = f"{predicates['train']}, {hp.labels_per_class} per class"
        subsets = {"test": test_clips, "val": val_clips, "train": train}
        return subsets, predicates

    def _label_budget(self, clips: list[ClipRef], per_class: int) -> list[ClipRef]:
        """The clips `draw_per_class` picks (seeded by `budget_seed`), in catalogue order."""
        ids = [clip_id(c) for c in clips]
        labels = [c.meta.get("labels", []) for c in clips]
        chosen = set(
            draw_per_class(ids, labels, per_class, self.hparams.budget_seed, list(self.class_index))
        )
        return [c for c in clips if clip_id(c) in chosen]

    def _eval_predicates(
        self, clips: list[ClipRef]
    ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """(test, val) predicates from `fold`/`val_fold` or the explicit filters."""
        hp = self.hparams
        if hp.fold is None:
            return (
                hp.test_filter if hp.test_filter is not None else {"split": "test"}
            ), hp.val_filter
        folds = sorted({int(c.meta["fold"]) for c in clips if "fold" in c.meta})
        for name, value in (("fold", hp.fold), ("val_fold", hp.val_fold)):
            if isinstance(value, int) and value not in folds:
                raise ValueError(
                    f"{name}: fold {value} does not exist in {hp.shards}; folds present: "
                    f"{folds if folds else 'none (no clip has a fold field)'}"
                )
        test = {"fold": hp.fold}
        if hp.val_fold is None:
            return test, None
        if hp.val_fold == "test":
            return test, test
        if hp.val_fold == "next":
            return test, {"fold": folds[(folds.index(hp.fold) + 1) % len(folds)]}
        return test, {"fold": hp.val_fold}


def hash_share(clip_id: str) -> float:
    """A fixed number in [0, 1) per clip id: the same split on every rank, run and machine."""
    digest = hashlib.blake2b(clip_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def draw_per_class(
    ids: Sequence[str],
    labels: Sequence[Sequence[str]],
    per_class: int,
    seed: int,
    classes: Sequence[str] = (),
) -> list[str]:
    """The first `per_class` ids of each class in an order drawn from `seed` and the ids
    alone, in the order given: every model drawn with the same seed sees the same clips,
    and a smaller budget is a subset of a larger one.

    ids: (clips,) clip ids; labels: each clip's labels (exactly one each); classes: every
    class that must hold `per_class` clips (besides those present). ValueError names the
    clip with another count, or the classes with fewer than `per_class` clips.
    """
    by_class: dict[str, list[str]] = {label: [] for label in classes}
    for clip, clip_labels in zip(ids, labels, strict=True):
        if len(clip_labels) != 1:
            raise ValueError(
                f"labels_per_class: needs single-label clips; clip {clip!r} has labels "
                f"{list(clip_labels)}"
            )
        by_class.setdefault(clip_labels[0], []).append(clip)
    short = {label: len(c) for label, c in by_class.items() if len(c) < per_class}
    if short:
        raise ValueError(
            f"labels_per_class={per_class}: classes with fewer training clips: "
            + ", ".join(f"{label!r} ({n})" for label, n in sorted(short.items()))
        )

    def order(clip: str) -> str:
        return hashlib.sha256(f"{seed}:{clip}".encode()).hexdigest()

    chosen = {c for group in by_class.values() for c in sorted(group, key=order)[:per_class]}
    return [c for c in ids if c in chosen]


def check_labels(
    clips: Sequence[ClipRef], class_index: dict[str, int], multi_label: bool, labels_csv: Path
) -> None:
    """Every label must be an id of `labels_csv` (`class_index`), and single-label clips
    have exactly one; ValueError names the shard, the clip and the label."""
    for clip in clips:
        name = f"{clip.shard}: clip {clip_id(clip)!r}"
        labels = clip.meta.get("labels", [])  # a list of str (parse_sample_meta)
        if not multi_label and len(labels) != 1:
            raise ValueError(f"{name} has {len(labels)} labels {labels} in a single-label set")
        for label in labels:
            if label not in class_index:
                examples = ", ".join(list(class_index)[:5])
                raise ValueError(
                    f"{name} has label {label!r}, which is not in {labels_csv} "
                    f"({len(class_index)} classes: {examples}, ...)"
                )


def _check_disjoint(val_clips: list[ClipRef], in_test: set[int], val: Any, test: Any) -> None:
    """Refuse validation clips that are also test clips: the kept epoch would see the test set."""
    shared = [clip_id(c) for c in val_clips if id(c) in in_test]
    if shared:
        raise ValueError(
            f"the val set ({val}) and the test set ({test}) share {len(shared)} clips "
            f"(e.g. {shared[:3]}): choosing the epoch on them would tune on test data; "
            "narrow val_filter, or use val_fraction"
        )
