#!/usr/bin/env bash
# Submit an eureka-megatron training run to a running Ray cluster (see start_cluster.sh).
#
#   examples/ray/submit.sh CONFIG.yaml [key=value ...]
#
# Run it from the repository root on a machine that reaches the head's job API
# (RAY_ADDRESS, default http://127.0.0.1:8265: run it on the head, or port-forward 8265).
# `--working-dir .` ships this checkout to every node for the job (code only: keep checkpoints,
# data and runs/ on a shared filesystem; .gitignore'd paths are not uploaded). Inside the job the
# entrypoint joins the cluster with cluster.address=auto; trainer ranks and rollout engines are
# then placed as the config's cluster.* / rollout.* keys say (examples/ray/README.md).
#
# Examples:
#   # 2 nodes x 8 GPUs, colocated: 16 trainer ranks, 4 SGLang engines of TP4 on the same GPUs
#   examples/ray/submit.sh my_qwen2_5_vl_7b.yaml parallel.nproc=16 cluster.colocate=true \
#       rollout.engines=4 rollout.gpus_per_engine=4
#   # 1 node: trainer on 4 GPUs, 2 disaggregated TP2 engines on the other 4
#   examples/ray/submit.sh my_qwen2_5_vl_7b.yaml parallel.nproc=4 cluster.colocate=false \
#       rollout.engines=2 rollout.gpus_per_engine=2
set -euo pipefail

config="${1:?usage: submit.sh CONFIG.yaml [key=value ...]}"
shift

export RAY_ADDRESS="${RAY_ADDRESS:-http://127.0.0.1:8265}"

# Environment for every actor of this job (merged over what the raylets were started with).
# The NIC names must match start_cluster.sh's NET_IF; leave them out to inherit the raylet's.
env_vars='"TOKENIZERS_PARALLELISM": "false"'
if [[ -n "${NET_IF:-}" ]]; then
  env_vars+=", \"NCCL_SOCKET_IFNAME\": \"$NET_IF\", \"GLOO_SOCKET_IFNAME\": \"$NET_IF\""
fi
runtime_env="{\"env_vars\": {$env_vars}, \"excludes\": [\"runs/\", \".venv/\", \"*.pt\", \"*.safetensors\"]}"

exec ray job submit \
  --working-dir . \
  --runtime-env-json "$runtime_env" \
  -- eureka-megatron train "$config" \
     cluster.launcher=ray cluster.address=auto cluster.gpus_per_node="${GPUS_PER_NODE:-8}" "$@"
