"""Two real processes (gloo on CPU), set up as Lightning DDP sets up its ranks.

What DDP needs from the data: training loaders that step the same number of times on
every rank (else the gradient all-reduce hangs) even when shards do not divide by
ranks x workers, and evaluation that reads every clip exactly once over all ranks.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_datamodules import chunk, fsdd_clips, ids_of, write_shard_folder

from ssamba.data import LabelledDataModule, PretrainDataModule
from ssamba.features import FeatureConfig

WORLD = 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _steps_in_lockstep(loader) -> list[str]:
    """Iterate like DDP training: one all-reduce per batch (hangs if ranks differ)."""
    ids = []
    for batch in loader:
        dist.all_reduce(torch.ones(1))
        ids.extend(batch["id"])
    return ids


def _rank_main(rank: int, port: int, pretrain_dir: str, labelled_dir: str, out: str) -> None:
    # what Lightning's DDP launcher exports before init_process_group
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
    )
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        pretrain = PretrainDataModule(
            sources=[{"shards": pretrain_dir}],
            val={"shards": pretrain_dir},
            batch_size=3,
            steps_per_epoch=4,
            num_workers=2,
            shuffle_buffer=4,
            features=FeatureConfig(target_length=16),
        )
        pretrain.setup("fit")
        labelled = LabelledDataModule(
            labelled_dir,
            batch_size=4,
            num_workers=2,
            features=FeatureConfig(target_length=16),
            test_filter={"speaker": "theo"},
        )
        labelled.setup("fit")
        labelled.setup("test")
        result = {
            "stream_epochs": [_steps_in_lockstep(pretrain.train_dataloader()) for _ in range(2)],
            "stream_val": ids_of(pretrain.val_dataloader()),
            "train_epochs": [_steps_in_lockstep(labelled.train_dataloader()) for _ in range(2)],
            "test": ids_of(labelled.test_dataloader()),
            "lengths": [len(pretrain.train_dataloader()), len(labelled.test_dataloader())],
        }
        pretrain.teardown("fit")
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_ranks_step_together_and_evaluate_disjoint_complete_shares(tmp_path, fsdd_dir):
    fsdd16 = fsdd_clips(fsdd_dir, ["jackson", "theo"], [0, 1, 5])  # 60 clips, 30 per speaker
    # 5 uneven shards for 2 ranks x 2 workers: no even split exists
    pretrain_dir = write_shard_folder(
        tmp_path / "pre", {"train": chunk(fsdd16, [14, 13, 12, 11, 10])}
    )
    labelled_dir = write_shard_folder(tmp_path / "lab", {"train": chunk(fsdd16, [25, 20, 15])})
    mp.spawn(
        _rank_main,
        args=(_free_port(), str(pretrain_dir), str(labelled_dir), str(tmp_path)),
        nprocs=WORLD,
    )
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    every_clip = sorted(c.key for c in fsdd16)

    # streaming pretraining: exactly steps_per_epoch batches of 3 on each rank, every epoch
    for rank in ranks:
        assert [len(epoch) for epoch in rank["stream_epochs"]] == [12, 12]
    streams = [set(r["stream_epochs"][0] + r["stream_epochs"][1]) for r in ranks]
    assert streams[0] != streams[1], "ranks must draw different clips (own seeds)"

    # finite validation: disjoint shares that together hold every clip once
    val = [r["stream_val"] for r in ranks]
    assert not set(val[0]) & set(val[1])
    assert sorted(val[0] + val[1]) == every_clip

    # labelled training: 30 jackson clips, batch 4, 2 ranks -> 3 batches each, disjoint
    for epoch in range(2):
        shares = [r["train_epochs"][epoch] for r in ranks]
        assert [len(s) for s in shares] == [12, 12]
        assert not set(shares[0]) & set(shares[1])
    assert ranks[0]["train_epochs"][0] != ranks[0]["train_epochs"][1], "reshuffled per epoch"

    # labelled test (speaker theo): 30 clips in 8 batches, 4 per rank, no padding
    tests = [r["test"] for r in ranks]
    assert sorted(tests[0] + tests[1]) == sorted(k for k in every_clip if "_theo_" in k)
    assert [r["lengths"] for r in ranks] == [[4, 4], [4, 4]]
