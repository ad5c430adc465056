#!/usr/bin/env bash
# Qwen3-VL-235B-A22B-Instruct with the MM-Eureka stage-1 recipe and routing replay
# (examples/qwen3_vl_235b_a22b.yaml, which holds the per-GPU memory arithmetic): 20 nodes x 8 H100
# 80GB, disaggregated -- actor TP4 x PP4 x DP8 with the experts over EP16 on 16 nodes (128 GPUs),
# 4 SGLang engines of TP8 on the other 4 nodes (32 GPUs), started with
# --enable-return-routed-experts.
#
#   # every node (same environment and paths; NET_IF = the inter-node NIC):
#   NET_IF=ib0 examples/ray/start_cluster.sh head                 # on the head
#   NET_IF=ib0 examples/ray/start_cluster.sh worker HEAD_IP:6379  # on the 19 others
#   # then on the head, from anywhere in the checkout:
#   MODEL=/shared/ckpt/Qwen3-VL-235B-A22B-Instruct DATA=/shared/data/mmk12/train.jsonl \
#     RUN_DIR=/shared/runs/qwen3_vl_235b_a22b [EVAL_DATA=...] \
#     examples/launch/qwen3_vl_235b_a22b.sh [key=value ...] [--resume]
#
# The script checks the paths, dry-runs the config here (model, layout and the 160-GPU plan), then
# submits with examples/ray/submit.sh (`eureka-megatron train ... cluster.launcher=ray
# cluster.address=auto`). If the cluster has fewer than 160 free GPUs the placement group times
# out with what is missing. No conversion step: `train` loads the HF checkpoint itself.
# Environment variables: examples/launch/common.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
run_recipe examples/qwen3_vl_235b_a22b.yaml submit "$@"
