#!/usr/bin/env bash
# Run training on every host of a Cloud TPU pod slice: one process per host, each with all of
# its chips; jax discovers the pod topology itself (agentgym-jax --distributed).
# Usage: TPU=my-v5p-64 ZONE=us-east5-a launch/tpu_pod.sh --config configs/babyai_scaling_inter.yaml model.path=/data/Qwen2.5-7B-Instruct
# Set-up: the repo at REPO_DIR on every host (e.g. `gcloud ... scp --worker=all`); the first
# run installs it with the TPU extra into a venv there. Plan the run first: agentgym-jax plan.
set -euo pipefail
: "${TPU:?TPU name}" "${ZONE:?zone}"
repo=${REPO_DIR:-~/agentgym-jax}
args=$(printf ' %q' "$@")  # keep arguments with spaces intact through ssh
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command \
  "set -e; cd $repo; test -d .venv || python3 -m venv .venv; . .venv/bin/activate; \
   pip install -q -e '.[tpu]'; agentgym-jax --distributed train$args"
