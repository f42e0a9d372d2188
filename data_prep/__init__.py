"""Corpus preparation: one module per corpus writes a manifest, one writer makes shards.

    prepare_<corpus>(src_dir, out_dir) -> out_dir/manifest.jsonl (+ labels.csv)
        (`manifest` takes a user's own CSV / JSONL clip list as src, see clip_list.py)
    shard.write_shards(manifest, out_dir, ...) -> WebDataset tars per split,
        index.json, rejects.jsonl, stats.json

Splits: corpora with an official split name it (`train`, `valid`, `test`, AudioSet's
`balanced_train` / `unbalanced_train` / `eval`, LibriSpeech subset names). Corpora
evaluated by cross-validation (ESC-50, UrbanSound8K, IEMOCAP) use split `all` and
carry `fold` in every sample's json.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from data_prep.audioset import prepare_audioset
from data_prep.clip_list import prepare_manifest
from data_prep.esc50 import prepare_esc50
from data_prep.folder import prepare_folder, prepare_unlabelled
from data_prep.fsdd import prepare_fsdd
from data_prep.gm_drums import prepare_gm_drums
from data_prep.iemocap import prepare_iemocap
from data_prep.librispeech import prepare_librispeech
from data_prep.speechcommands import (
    prepare_speechcommands,
    prepare_speechcommands_ks1,
    prepare_speechcommands_v1,
)
from data_prep.urbansound8k import prepare_urbansound8k
from data_prep.voxceleb1 import prepare_voxceleb1

# corpus name (the CLI's --corpus) -> prepare function
CORPORA: dict[str, Callable[[Path, Path], Path]] = {
    "audioset": prepare_audioset,
    "librispeech": prepare_librispeech,
    "esc50": prepare_esc50,
    "speechcommands_v1": prepare_speechcommands_v1,
    "speechcommands_v2": prepare_speechcommands,
    "speechcommands_ks1": prepare_speechcommands_ks1,
    "voxceleb1": prepare_voxceleb1,
    "iemocap": prepare_iemocap,
    "urbansound8k": prepare_urbansound8k,
    "fsdd": prepare_fsdd,
    "gm-drums": prepare_gm_drums,  # hits rendered by `render-gm-drums`
    "folder": prepare_folder,
    "unlabelled": prepare_unlabelled,
    "manifest": prepare_manifest,  # a user's own CSV / JSONL list of clips
}


def prepare(corpus: str, src_dir: Path, out_dir: Path) -> Path:
    """Run the recipe of `corpus`; returns the manifest path."""
    if corpus not in CORPORA:
        raise ValueError(f"unknown corpus {corpus!r}; known: {', '.join(CORPORA)}")
    return CORPORA[corpus](Path(src_dir), Path(out_dir))
