#!/usr/bin/env bash
# Multi-process JAX on one machine (CPU, gloo collectives): exercises the multi-host code path
# without a cluster. Usage: launch/local_multiprocess.sh NPROC --config configs/tiny_cpu.yaml [k=v ...]
set -euo pipefail
n=${1:?number of processes}; shift
port=${PORT:-12355}
pids=()
for i in $(seq 0 $((n - 1))); do
  JAX_PLATFORMS=cpu JAX_COORDINATOR_ADDRESS=127.0.0.1:$port JAX_NUM_PROCESSES=$n JAX_PROCESS_ID=$i \
    agentgym-jax --distributed train "$@" &
  pids+=($!)
done
trap 'kill "${pids[@]}" 2>/dev/null' INT TERM
wait "${pids[@]}"
