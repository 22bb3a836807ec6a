#!/usr/bin/env bash
# Run training on every host of a Cloud TPU pod slice. Each host runs the same command; jax
# discovers the pod topology itself (agentgym-jax --distributed).
# Usage: TPU=my-v5p-64 ZONE=us-east5-a launch/tpu_pod.sh --config configs/babyai_scaling_inter.yaml model.path=/data/Qwen2.5-7B-Instruct
set -euo pipefail
: "${TPU:?TPU name}" "${ZONE:?zone}"
repo=${REPO_DIR:-~/agentgym-jax}
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command \
  "cd $repo && pip install -q -e '.[tpu]' && agentgym-jax --distributed train $*"
