"""Reading shards into batches: `PretrainDataModule` (endless weighted streams for
pretraining) and `LabelledDataModule` (splits, folds and predicates for fine-tuning).

Both are LightningDataModules built from YAML recipes by LightningCLI; `shards.py` reads
the WebDataset tars that `data_prep` writes.
"""

from ssamba.data.labelled import LabelledDataModule
from ssamba.data.pretrain import PretrainDataModule, ShardSource

__all__ = ["LabelledDataModule", "PretrainDataModule", "ShardSource"]
