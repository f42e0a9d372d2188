"""Lightning callbacks of the tasks and the recipes (`trainer.callbacks` in YAML).

`EpochWeightAveraging` is the originals' AudioSet-20K weight averaging, on Lightning's
`WeightAveraging`. `BatchLog` records which clips every rank trained on at every step, with the rank's own
loss on them. It answers questions the averaged TensorBoard curves cannot: which clips sat
in the batch behind a loss spike, what a weighted data mix really fed each rank, and
whether DDP ranks step together on different data. Switch it on from the command line:

    ssamba pretrain --config recipe.yaml --trainer.callbacks+=ssamba.tasks.callbacks.BatchLog
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO, Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import WeightAveraging

__all__ = ["BatchLog", "EpochWeightAveraging"]


class EpochWeightAveraging(WeightAveraging):
    """Uniform average of the weights at the end of epochs `first_epoch..last_epoch`.

    The AudioSet-20K recipe of SSAST/SSAMBA evaluates the average of the epoch snapshots
    12..40 (`--wa_start 12 --wa_end 40`; epochs counted from 1, inclusive). Lightning's
    `WeightAveraging` keeps the running average (in checkpoints too, so resuming keeps
    it) and puts it into the model when training ends; it is then also saved to
    `averaged_path`, the checkpoint the fine-tuning runner tests.
    """

    def __init__(self, first_epoch: int, last_epoch: int, filename: str = "averaged.ckpt"):
        if not 1 <= first_epoch <= last_epoch:
            raise ValueError(
                f"model.weight_averaging: need 1 <= first <= last epoch, got "
                f"[{first_epoch}, {last_epoch}]"
            )
        super().__init__(use_buffers=True)
        self.first_epoch, self.last_epoch, self.filename = first_epoch, last_epoch, filename
        self.averaged_path: str | None = None

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return epoch_idx is not None and self.first_epoch <= epoch_idx + 1 <= self.last_epoch

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        averaged = self._average_model
        if averaged is None or int(averaged.n_averaged) == 0:
            raise RuntimeError(
                f"model.weight_averaging: training ended at epoch {trainer.current_epoch} "
                f"before the averaging window [{self.first_epoch}, {self.last_epoch}] began"
            )
        super().on_train_end(trainer, pl_module)
        directory = Path(trainer.checkpoint_callback.dirpath or trainer.default_root_dir)
        self.averaged_path = str(directory / self.filename)
        trainer.save_checkpoint(self.averaged_path, weights_only=True)

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Validate the weights being trained: the best-epoch checkpoint is chosen on them."""

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """See `on_validation_epoch_start`."""


class BatchLog(Callback):
    """One JSON line per training batch and rank: `<folder>/rank<global rank>.jsonl`.

    Each line is `{"step", "batch", "epoch", "rank", "world", "ids", "loss"}`: `step` is the
    optimizer step the batch contributes to (0-based, as `trainer.global_step` before the
    update), `ids` the batch's clip ids in order, `loss` this rank's loss on them (before
    DDP averages gradients). Files are appended to, so a resumed run continues them.
    """

    def __init__(self, folder: str | None = None) -> None:
        """
        Args:
            folder: where the files go; default `<trainer.log_dir>/batches`.
        """
        self.folder = folder
        self._file: IO[str] | None = None
        self._step = 0

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        # trainer.log_dir is broadcast from rank 0: every rank must ask.
        root = Path(trainer.log_dir or trainer.default_root_dir)
        folder = Path(self.folder) if self.folder else root / "batches"
        folder.mkdir(parents=True, exist_ok=True)
        self._file = (folder / f"rank{trainer.global_rank}.jsonl").open("a")

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._step = trainer.global_step

    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self._file is None:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        record = {
            "step": self._step,
            "batch": batch_idx,
            "epoch": trainer.current_epoch,
            "rank": trainer.global_rank,
            "world": trainer.world_size,
            "ids": list(batch["id"]),
            "loss": None if loss is None else float(loss),
        }
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
