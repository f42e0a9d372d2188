#!/usr/bin/env bash
# Pretraining on one or more nodes with torchrun (PyTorch's elastic launcher), one process
# per GPU. Start this script once on every node, with the same settings everywhere:
#
#   NNODES=2 NPROC_PER_NODE=8 MASTER_ADDR=node-a.cluster MASTER_PORT=29500 RUN_ID=asli-base \
#       recipes/launch/torchrun.sh recipes/pretrain/asli_base.yaml [ssamba pretrain options]
#
# What to set (environment):
#   NNODES          nodes taking part (default 1)
#   NPROC_PER_NODE  processes per node = GPUs per node (default 1); on CPU, processes
#   MASTER_ADDR     a host every node can reach; the rendezvous (c10d store) runs there.
#                   Use the first node's address; 127.0.0.1 for a single node.
#   MASTER_PORT     a free TCP port on MASTER_ADDR (default 29500)
#   RUN_ID          any name shared by the nodes of this run, unique among concurrent runs
#   MAX_RESTARTS    how often torchrun restarts the workers after a failure (default 0);
#                   each restart resumes from the newest last.ckpt (`--ckpt_path last`)
#   TORCHRUN        the launcher command (default: torchrun from the active environment)
# Node ranks are assigned by the rendezvous; no NODE_RANK needed. Lightning sees
# torchrun's RANK / LOCAL_RANK / WORLD_SIZE and creates no processes of its own.
#
# data.batch_size in the recipe is per process: the global batch is
# batch_size x NPROC_PER_NODE x NNODES. The run folder (trainer.logger save_dir) must be
# on a filesystem all nodes share, so that every rank resumes from the same checkpoint.
set -euo pipefail

RECIPE=${1:?usage: torchrun.sh RECIPE.yaml [ssamba pretrain options]}
shift
NNODES=${NNODES:-1}
NPROC_PER_NODE=${NPROC_PER_NODE:-1}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
RUN_ID=${RUN_ID:-ssamba-pretrain}
MAX_RESTARTS=${MAX_RESTARTS:-0}
TORCHRUN=${TORCHRUN:-torchrun}

exec $TORCHRUN \
    --nnodes="$NNODES" \
    --nproc-per-node="$NPROC_PER_NODE" \
    --rdzv-backend=c10d \
    --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" \
    --rdzv-id="$RUN_ID" \
    --max-restarts="$MAX_RESTARTS" \
    --no-python \
    ssamba pretrain --config "$RECIPE" \
    --trainer.strategy=ddp \
    --trainer.num_nodes="$NNODES" \
    --trainer.devices="$NPROC_PER_NODE" \
    --ckpt_path=last \
    "$@"
