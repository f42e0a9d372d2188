"""`ssamba pretrain` over several processes, launched the ways users launch it.

- Lightning DDP on CPU: `--trainer.strategy=ddp --trainer.devices=2` (gloo);
- two "nodes" on loopback: one process per node, NODE_RANK 0 and 1, as a cluster runs it;
- `recipes/launch/torchrun.sh` with two local processes;
- `recipes/launch/slurm.sbatch`'s command line (a stand-in `srun` runs it once).

What each rank trained on is read from `BatchLog` (`<run>/batches/rank<r>.jsonl`, one
line per step): every rank must run the same steps, on its own batches.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_pretrain import (
    RECIPE,
    REPO,
    failure_report,
    finish,
    load_ckpt,
    read_records,
    recipe_args,
    run_pretrain,
)

LAUNCH = REPO / "recipes" / "launch"
WORLD = 2
STEPS = 8


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def distributed_args(shards: Path, out: Path, *extra: str) -> list[str]:
    # 70 validation clips in batches of 32: rank 0 validates 2 batches, rank 1 one
    return recipe_args(
        shards,
        out,
        f"--trainer.max_steps={STEPS}",
        f"--trainer.val_check_interval={STEPS}",
        "--trainer.accelerator=cpu",
        "--data.val_max_clips=70",
        "--model.image_every_n_steps=0",
        "--trainer.callbacks+=ssamba.tasks.callbacks.BatchLog",
        *extra,
    )


def check_lockstep_on_different_clips(run: Path) -> None:
    """Both ranks ran steps 0..STEPS-1, knew the world size, and at every step trained
    on batches of their own; rank 0 exported the encoder and saved the checkpoints."""
    records = [read_records(run / "batches" / f"rank{rank}.jsonl") for rank in range(WORLD)]
    for rank, rank_records in enumerate(records):
        assert [r["step"] for r in rank_records] == list(range(STEPS))
        assert {(r["rank"], r["world"]) for r in rank_records} == {(rank, WORLD)}
    for first, second in zip(*records, strict=True):
        assert first["ids"] != second["ids"]
        shared = set(first["ids"]) & set(second["ids"])
        assert len(shared) < len(first["ids"]) / 2, f"step {first['step']}: {sorted(shared)}"
    assert load_ckpt(run / "checkpoints" / "last.ckpt")["global_step"] == STEPS
    assert (run / "encoder.pt").is_file()


@pytest.mark.slow
def test_two_cpu_processes_with_lightning_ddp(fsdd_shards, tmp_path):
    args = distributed_args(
        fsdd_shards, tmp_path, "--trainer.strategy=ddp", f"--trainer.devices={WORLD}"
    )
    code, err = finish(run_pretrain(args, stderr=subprocess.PIPE))

    assert code == 0, failure_report(err)
    assert "distributed_backend=gloo" in err and "Starting with 2 processes" in err
    check_lockstep_on_different_clips(tmp_path / "fsdd_tiny_cpu" / "version_0")


@pytest.mark.slow
def test_two_nodes_on_loopback_one_process_each(fsdd_shards, tmp_path):
    args = distributed_args(
        fsdd_shards,
        tmp_path,
        "--trainer.strategy=ddp",
        "--trainer.devices=1",
        f"--trainer.num_nodes={WORLD}",
    )
    port = str(free_port())
    nodes = []
    for node in range(WORLD):
        env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": str(WORLD)}
        env["NODE_RANK"] = str(node)
        nodes.append(run_pretrain(args, stderr=subprocess.PIPE, extra_env=env))
    results = [finish(process) for process in nodes]

    for node, (code, err) in enumerate(results):
        assert code == 0, f"node {node}: {failure_report(err)}"
        assert f"GLOBAL_RANK: {node}, MEMBER: {node + 1}/{WORLD}" in err
    check_lockstep_on_different_clips(tmp_path / "fsdd_tiny_cpu" / "version_0")


def run_script(
    script: str, args: list[str], env: dict[str, str], extra_bin: Path | None = None
) -> subprocess.CompletedProcess:
    """`bash recipes/launch/<script> args`, with this environment's commands (and
    `extra_bin`) first on PATH."""
    path = [str(extra_bin)] if extra_bin else []
    path += [str(Path(sys.executable).parent), os.environ["PATH"]]
    return subprocess.run(
        ["bash", str(LAUNCH / script), *args],
        cwd=REPO,
        env={**os.environ, "PATH": os.pathsep.join(path), **env},
        capture_output=True,
        text=True,
    )


@pytest.mark.slow
def test_torchrun_script_runs_two_local_processes(fsdd_shards, tmp_path):
    env = {
        "NNODES": "1",
        "NPROC_PER_NODE": str(WORLD),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "RUN_ID": "test",
        "OMP_NUM_THREADS": "1",
    }
    options = distributed_args(fsdd_shards, tmp_path)[2:]  # without --config RECIPE
    result = run_script("torchrun.sh", [str(RECIPE), *options], env)

    assert result.returncode == 0, failure_report(result.stderr)
    check_lockstep_on_different_clips(tmp_path / "fsdd_tiny_cpu" / "version_0")


@pytest.mark.parametrize("script", ["torchrun.sh", "slurm.sbatch"])
def test_launch_scripts_are_valid_bash(script):
    subprocess.run(["bash", "-n", str(LAUNCH / script)], check=True)


def test_slurm_script_asks_for_requeue_and_passes_the_allocation_to_lightning(tmp_path):
    text = (LAUNCH / "slurm.sbatch").read_text()
    assert "#SBATCH --signal=SIGUSR1@90" in text and "#SBATCH --requeue" in text
    # run the script as SLURM would on a 2-node x 4-GPU allocation; a stand-in `srun`
    # runs its command once, and --print_config shows what every task would get
    (tmp_path / "srun").write_text('#!/bin/sh\nexec "$@"\n')
    (tmp_path / "srun").chmod(0o755)
    env = {"SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "4", "SLURM_JOB_ID": "4242"}
    recipe = "recipes/pretrain/asli_tiny.yaml"
    result = run_script("slurm.sbatch", [recipe, "--print_config"], env, extra_bin=tmp_path)

    assert result.returncode == 0, failure_report(result.stderr)
    config = yaml.safe_load(result.stdout)["trainer"]
    assert config["strategy"] == "ddp" and config["num_nodes"] == 2
    assert int(config["devices"]) == 4
    # a requeued job (same id) finds its hpc checkpoint and logs into the same folder
    assert config["default_root_dir"] == "runs/slurm/4242"
    assert config["logger"]["init_args"]["version"] == "slurm-4242"
