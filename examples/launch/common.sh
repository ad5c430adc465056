# Shared by the recipe launchers in this directory (sourced by them, not run on its own).
#
# Environment (paths may be relative to where you run the script; they are made absolute):
#   MODEL      HF checkpoint directory: config.json, *.safetensors, tokenizer files (required).
#              `train` reads it directly (model.hf) -- there is no conversion step.
#   DATA       training JSONL file or directory: MM-Eureka Qwen `message` rows, InternVL rows or
#              plain rows (required).
#   EVAL_DATA  held-out JSONL (optional; without it the periodic held-out eval is off).
#   RUN_DIR    run directory: metrics, TensorBoard, checkpoints, HF exports. MODE=submit: required,
#              on a filesystem every node mounts (ranks on every node write checkpoint shards).
#              MODE=local: default runs/<recipe> in this checkout.
#   MODE       local: run here (the CLI starts a private Ray instance on this node's GPUs);
#              submit: examples/ray/submit.sh to a running Ray cluster (examples/ray/start_cluster.sh).
#   DRY_RUN=1  only validate the config, model and layout and print the plan.
#   EUREKA_MEGATRON  the command to run (default: eureka-megatron, else python -m eureka_megatron.cli).
# Arguments after the script name are passed on: key=value overrides, --resume.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

die() {
  echo "$(basename "$0"): error: $*" >&2
  exit 2
}

abs_path() {
  case "$1" in
    /*) printf '%s\n' "$1" ;;
    *) printf '%s\n' "$PWD/$1" ;;
  esac
}

cli_command() {
  if [[ -n "${EUREKA_MEGATRON:-}" ]]; then
    read -r -a EM <<< "$EUREKA_MEGATRON"
  elif command -v eureka-megatron > /dev/null 2>&1; then
    EM=(eureka-megatron)
  else
    EM=("${PYTHON:-python}" -m eureka_megatron.cli)
  fi
}

# run_recipe CONFIG DEFAULT_MODE [key=value ...] [--resume]
run_recipe() {
  local config="$1" default_mode="$2"
  shift 2
  local name mode
  name="$(basename "$config" .yaml)"
  mode="${MODE:-$default_mode}"

  [[ -n "${MODEL:-}" ]] || die "MODEL is not set: export MODEL=/path/to/the HF checkpoint directory (config.json, *.safetensors, tokenizer files)"
  MODEL="$(abs_path "$MODEL")"
  [[ -f "$MODEL/config.json" ]] || die "MODEL=$MODEL has no config.json: point it at an HF checkpoint directory"
  [[ -n "${DATA:-}" ]] || die "DATA is not set: export DATA=/path/to/train.jsonl (a JSONL file or a directory of them)"
  DATA="$(abs_path "$DATA")"
  [[ -e "$DATA" ]] || die "DATA=$DATA does not exist"

  local args=("model.hf=$MODEL" "data.train=$DATA")
  if [[ -n "${EVAL_DATA:-}" ]]; then
    EVAL_DATA="$(abs_path "$EVAL_DATA")"
    [[ -e "$EVAL_DATA" ]] || die "EVAL_DATA=$EVAL_DATA does not exist"
    args+=("eval.data=$EVAL_DATA")
  else
    echo "note: EVAL_DATA is not set: the periodic held-out eval is off (eval.interval=0)" >&2
    args+=("eval.interval=0")
  fi

  case "$mode" in
    local) RUN_DIR="$(abs_path "${RUN_DIR:-$REPO/runs/$name}")" ;;
    submit)
      [[ -n "${RUN_DIR:-}" ]] || die "RUN_DIR is not set: export RUN_DIR=/shared/runs/$name, a directory every node of the cluster mounts"
      RUN_DIR="$(abs_path "$RUN_DIR")"
      ;;
    *) die "MODE=$mode: expected local (run on this node) or submit (a running Ray cluster)" ;;
  esac
  args+=("output.dir=$RUN_DIR")

  cli_command
  cd "$REPO"  # submit.sh ships the checkout (--working-dir .); the config path is relative to it
  echo "== dry run: config, model and GPU layout, checked before anything starts"
  "${EM[@]}" train "$config" "${args[@]}" "$@" --dry-run
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    return 0
  fi
  echo "== training ($mode): $RUN_DIR"
  if [[ "$mode" == local ]]; then
    exec "${EM[@]}" train "$config" "${args[@]}" "$@"
  fi
  exec "$REPO/examples/ray/submit.sh" "$config" "${args[@]}" "$@"
}
