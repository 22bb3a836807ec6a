#!/usr/bin/env bash
# N JAX processes on this machine over loopback: see local_multiprocess.py (options, signals).
# Usage: launch/local_multiprocess.sh NPROC --config configs/tiny_cpu.yaml [k=v ...]
exec python3 "$(dirname "$0")/local_multiprocess.py" "$@"
