#!/usr/bin/env bash
# jaxtune on a Cloud TPU pod slice (several TPU VM hosts): the same command runs on every worker;
# JAXTUNE_DISTRIBUTED=auto makes jaxtune call jax.distributed.initialize() with no arguments, and
# JAX finds the coordinator, process count and process id from the TPU VM metadata.
#
#   launch/tpu_pod.sh TPU_NAME ZONE configs/lora_llama.py /mnt/shared/runs/lora-v5p [--config.KEY=VALUE ...]
#
# Adapt:
# - code: every worker needs the same checkout at REPO_DIR. Step 1 copies this directory to all
#   workers (skip it with COPY=0 if your image or a shared disk already has it); step 2 installs.
# - workdir: a filesystem path every host can write and read back (NFS/Filestore, or a gcsfuse
#   mount of a bucket); orbax writes each host's shards of the checkpoints, process 0 the metrics.
# - mesh: it must use all chips of the slice (e.g. v5p-32: 16 chips on 4 hosts) and split the
#   batch over a multiple of the host count: --config.mesh.shape=1,-1,1 (FSDP) is a good default;
#   --config.mesh.shape=1,4,4 keeps the tensor axis within each host's 4 chips.
# - add --project=... and --tunnel-through-iap / --internal-ip if your network needs them.
set -euo pipefail

TPU_NAME=${1:?usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.KEY=VALUE ...]}
ZONE=${2:?zone, e.g. us-east5-a}
CONFIG=${3:?config file, e.g. configs/lora_llama.py}
WORKDIR=${4:?workdir on storage shared by all hosts, e.g. /mnt/shared/runs/lora}
shift 4
EXTRA_FLAGS=$(printf ' %q' "$@")

REPO_DIR=${REPO_DIR:-jaxtune}   # relative to each worker's home directory
SETUP=${SETUP:-"cd $REPO_DIR && python3 -m venv .venv && .venv/bin/pip install -q -U 'jax[tpu]' -e ."}

# 1. Same code on every worker (this checkout, without its .venv and runs).
if [[ "${COPY:-1}" == 1 ]]; then
  tar --exclude=.venv --exclude=runs --exclude=.git -czf /tmp/jaxtune-src.tgz -C "$(dirname "$0")/.." .
  gcloud compute tpus tpu-vm scp /tmp/jaxtune-src.tgz "$TPU_NAME": --zone="$ZONE" --worker=all
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all \
    --command="mkdir -p $REPO_DIR && tar -xzf jaxtune-src.tgz -C $REPO_DIR"
fi

# 2. Same environment on every worker.
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="$SETUP"

# 3. Start training on every worker at once; all must run, or the others wait at initialization.
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="\
  cd $REPO_DIR && JAXTUNE_DISTRIBUTED=auto .venv/bin/python -m jaxtune.train \
  --config=$CONFIG --workdir=$WORKDIR$EXTRA_FLAGS"
