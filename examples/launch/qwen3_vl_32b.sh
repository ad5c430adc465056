#!/usr/bin/env bash
# Qwen3-VL-32B-Instruct with the MM-Eureka-Qwen-32B stage-1 recipe (examples/qwen3_vl_32b.yaml, which
# holds the per-GPU memory arithmetic): 6 nodes x 8 H100 80GB, disaggregated -- actor TP8 x PP2 x
# DP2 on 4 nodes (32 GPUs), 4 SGLang engines of TP4 on the other 2 nodes (16 GPUs).
#
#   # every node (same environment and paths; NET_IF = the inter-node NIC):
#   NET_IF=ib0 examples/ray/start_cluster.sh head                 # on the head
#   NET_IF=ib0 examples/ray/start_cluster.sh worker HEAD_IP:6379  # on the 5 others
#   # then on the head, from anywhere in the checkout:
#   MODEL=/shared/ckpt/Qwen3-VL-32B-Instruct DATA=/shared/data/mmk12/train.jsonl \
#     RUN_DIR=/shared/runs/qwen3_vl_32b [EVAL_DATA=...] \
#     examples/launch/qwen3_vl_32b.sh [key=value ...] [--resume]
#   # stage 2 (Geo3k + KL 1e-3), from stage 1's HF export:
#   MODEL=/shared/runs/qwen3_vl_32b/hf_final DATA=/shared/data/geo3k.jsonl \
#     RUN_DIR=/shared/runs/qwen3_vl_32b_stage2 examples/launch/qwen3_vl_32b.sh algo.kl_coef=0.001
#
# The script checks the paths, dry-runs the config here (model, layout and the 48-GPU plan), then
# submits with examples/ray/submit.sh (`eureka-megatron train ... cluster.launcher=ray
# cluster.address=auto`). If the cluster has fewer than 48 free GPUs the placement group times out
# with what is missing. No conversion step: `train` loads the HF checkpoint itself.
# Environment variables: examples/launch/common.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
run_recipe examples/qwen3_vl_32b.yaml submit "$@"
