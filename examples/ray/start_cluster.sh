#!/usr/bin/env bash
# Start one node of a Ray cluster for eureka-megatron. Run it on every node:
#
#   head:     examples/ray/start_cluster.sh head   [--port 6379]
#   workers:  examples/ray/start_cluster.sh worker HEAD_IP:6379
#   stop:     examples/ray/start_cluster.sh stop
#
# Every node needs the same Python environment (this repo installed, same paths) and the model
# checkpoint + data at the same paths (shared filesystem), because trainer ranks and rollout
# engines run as Ray actors on whichever node their bundle lands on.
#
# Environment read here (export before running; Ray actors inherit the raylet's environment, so
# these must be set when `ray start` runs, not only in your shell later):
#   NET_IF             the NIC that carries inter-node traffic (e.g. ib0, eth0, bond0). Sets
#                      NCCL_SOCKET_IFNAME (NCCL's bootstrap + socket transport) and
#                      GLOO_SOCKET_IFNAME (gloo groups: the CPU side of weight sync, rewards).
#                      Without it both pick the first non-loopback interface, which on cloud
#                      nodes is often a docker bridge or a management NIC -> hangs in init.
#   NCCL_IB_HCA        InfiniBand HCAs to use (e.g. mlx5_0,mlx5_1); leave unset on Ethernet.
#   GPUS_PER_NODE      GPUs this node offers to Ray (default: all that nvidia-smi lists).
#   CPUS_PER_NODE      CPUs offered (default: all).
#   RAY_AUTH_MODE      Ray 2.60 uses token auth when RAY_AUTH_MODE=token or ~/.ray/auth_token
#                      exists. Use a token (same RAY_AUTH_TOKEN or ~/.ray/auth_token on every node
#                      and on the machine that runs `ray job submit`) or, on a trusted private
#                      network only, RAY_AUTH_MODE=disabled on every node.
set -euo pipefail

role="${1:-}"
shift || true

if [[ -n "${NET_IF:-}" ]]; then
  export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-$NET_IF}"
  export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-$NET_IF}"
fi
# Fail fast instead of hanging for the default 30 min when a peer dies mid-collective.
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"

resources=()
if [[ -n "${GPUS_PER_NODE:-}" ]]; then resources+=(--num-gpus "$GPUS_PER_NODE"); fi
if [[ -n "${CPUS_PER_NODE:-}" ]]; then resources+=(--num-cpus "$CPUS_PER_NODE"); fi

case "$role" in
  head)
    port=6379
    if [[ "${1:-}" == "--port" ]]; then port="$2"; shift 2; fi
    # The dashboard serves the job API that `ray job submit` talks to (port 8265).
    ray start --head --port "$port" --dashboard-host 0.0.0.0 "${resources[@]}" "$@"
    echo
    echo "head up. On each worker node:  examples/ray/start_cluster.sh worker $(hostname -I | awk '{print $1}'):$port"
    echo "then submit from here:          examples/ray/submit.sh CONFIG.yaml"
    ;;
  worker)
    address="${1:?usage: start_cluster.sh worker HEAD_IP:PORT}"
    shift
    ray start --address "$address" "${resources[@]}" "$@"
    ;;
  stop)
    ray stop
    ;;
  *)
    sed -n '2,26p' "$0"
    exit 2
    ;;
esac
