#!/usr/bin/env bash
# Qwen2.5-VL-7B with the MM-Eureka-Qwen-7B recipe (examples/qwen2_5_vl_7b.yaml, which holds the
# per-GPU memory arithmetic): 1 node x 8 H100 80GB, colocated -- actor TP2 x PP1 x DP4 and 4 SGLang
# engines of TP2 on the same 8 GPUs.
#
#   MODEL=/ckpt/Qwen2.5-VL-7B-Instruct DATA=/data/mmk12/train.jsonl \
#     [EVAL_DATA=/data/mmk12/test.jsonl] [RUN_DIR=runs/qwen2_5_vl_7b] \
#     examples/launch/qwen2_5_vl_7b.sh [key=value ...] [--resume]
#
# Runs on this node by default (MODE=local: the CLI starts a private Ray instance and places the
# 8 trainer ranks and 4 engines on the node's 8 GPUs). MODE=submit RUN_DIR=/shared/... sends the
# same run to a Ray cluster started with examples/ray/start_cluster.sh. DRY_RUN=1 only checks.
# No conversion step: `train` loads the HF checkpoint itself and exports HF checkpoints.
# Environment variables: examples/launch/common.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
run_recipe examples/qwen2_5_vl_7b.yaml local "$@"
