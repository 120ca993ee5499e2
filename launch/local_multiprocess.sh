#!/usr/bin/env bash
# Start N jaxtune training processes on THIS machine, on CPU, joined by jax.distributed with gloo
# collectives: the multi-host code path (per-process data slices, cross-process collectives,
# process-0-only logs, orbax multi-host checkpoints) without a cluster. For testing and debugging.
#
#   launch/local_multiprocess.sh NUM_PROCESSES DEVICES_PER_PROCESS -- TRAIN_FLAGS...
#   launch/local_multiprocess.sh 2 4 -- --config=configs/tiny.py --config.model.path=/tmp/tiny-llama \
#       --config.data.train=train.jsonl --config.mesh.shape=2,2,2 --workdir=/tmp/tiny-2proc
#
# Each process gets DEVICES_PER_PROCESS simulated CPU devices (XLA_FLAGS), so the job has
# NUM_PROCESSES x DEVICES_PER_PROCESS devices; config.mesh.shape must use all of them, with the
# batch axes (data x fsdp) a multiple of NUM_PROCESSES. Process 0 writes the logs and metrics;
# every process's output also goes to WORKDIR_LOGS (default /tmp/jaxtune-local-<pid>/process_<i>.log).
set -euo pipefail

usage="usage: launch/local_multiprocess.sh NUM_PROCESSES DEVICES_PER_PROCESS -- TRAIN_FLAGS..."
[[ $# -ge 3 && "$1" =~ ^[0-9]+$ && "$2" =~ ^[0-9]+$ && "$3" == "--" ]] || { echo "$usage" >&2; exit 2; }
NUM_PROCESSES=$1
DEVICES_PER_PROCESS=$2
shift 3
PYTHON=${PYTHON:-python}
PORT=${PORT:-$($PYTHON -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
LOGS=${WORKDIR_LOGS:-/tmp/jaxtune-local-$$}
mkdir -p "$LOGS"

pids=()
for ((i = 0; i < NUM_PROCESSES; i++)); do
  # These three variables are what jaxtune.distributed.maybe_initialize() reads.
  JAX_COORDINATOR_ADDRESS="127.0.0.1:$PORT" JAX_NUM_PROCESSES="$NUM_PROCESSES" JAX_PROCESS_ID="$i" \
  JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$DEVICES_PER_PROCESS" \
    "$PYTHON" -m jaxtune.train "$@" >"$LOGS/process_$i.log" 2>&1 &
  pids+=($!)
done
# Kill only the processes started here if this script is interrupted.
trap 'kill "${pids[@]}" 2>/dev/null || true' INT TERM

status=0
for ((i = 0; i < NUM_PROCESSES; i++)); do
  if ! wait "${pids[$i]}"; then
    status=1
    echo "process $i failed; its output: $LOGS/process_$i.log" >&2
  fi
done
tail -n 20 "$LOGS/process_0.log"
exit $status
