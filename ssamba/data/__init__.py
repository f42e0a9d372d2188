"""Reading shards into batches: `PretrainDataModule` (endless weighted streams for
pretraining) and `LabelledDataModule` (splits, folds and predicates for fine-tuning).

Both are LightningDataModules built from YAML recipes by LightningCLI; `shards.py` reads
the WebDataset tars whose layout `shard_format.py` defines. The DataModules load on first
use, so the shard writer (which only needs `shard_format`) does not pay for Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "LabelledDataModule": "ssamba.data.labelled",
    "PretrainDataModule": "ssamba.data.pretrain",
    "ShardSource": "ssamba.data.pretrain",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'ssamba.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
