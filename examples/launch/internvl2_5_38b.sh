#!/usr/bin/env bash
# InternVL2.5-38B with the MM-Eureka-Zero-38B recipe (examples/internvl2_5_38b.yaml, which holds the
# per-GPU memory arithmetic): 4 nodes x 8 H100 80GB, colocated -- actor TP8 x PP2 x DP2 on all 32
# GPUs and 4 SGLang engines of TP8 (one per node) on the same GPUs.
#
#   # every node (same environment and paths; NET_IF = the inter-node NIC):
#   NET_IF=ib0 examples/ray/start_cluster.sh head                 # on the head
#   NET_IF=ib0 examples/ray/start_cluster.sh worker HEAD_IP:6379  # on the 3 others
#   # then on the head, from anywhere in the checkout:
#   MODEL=/shared/ckpt/InternVL2_5-38B DATA=/shared/data/k12_filtered.jsonl \
#     RUN_DIR=/shared/runs/internvl2_5_38b [EVAL_DATA=...] \
#     examples/launch/internvl2_5_38b.sh [key=value ...] [--resume]
#
# The script checks the paths, dry-runs the config here (model, layout and the 32-GPU plan), then
# submits with examples/ray/submit.sh (`eureka-megatron train ... cluster.launcher=ray
# cluster.address=auto`). No conversion step: `train` loads the HF checkpoint (internvl_chat
# format, with its tokenizer_config.json) itself.
# Environment variables: examples/launch/common.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
run_recipe examples/internvl2_5_38b.yaml submit "$@"
