"""The cluster recipes through the performance model (bench/perf_model.py): each recipe YAML's
layout and batch, its model counted from the memory planner's meta-device build of the hub
config.json (no weights), and the tables `eureka-megatron bench perf-model` prints."""
from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

from eureka_megatron.bench.convert import (INTERNVL2_5_38B, QWEN2_5_VL_7B, QWEN2_5_VL_32B,
                                           QWEN3_VL_32B, QWEN3_VL_235B_A22B, write_config_dir)
from eureka_megatron.bench.perf_model import (Assumptions, ModelShape, Prediction, Recipe,
                                              parse_assumptions, predict)
from eureka_megatron.bench.report import LEAD, lead, markdown_table, write_json
from eureka_megatron.config import RLConfig, load_rl_config
from eureka_megatron.errors import ConfigError
from eureka_megatron.models.registry import family_for
from eureka_megatron.runtime.layout import plan_layout
from eureka_megatron.trainer.memory_plan import inventory, stage_layers, stage_params

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
# The cluster recipes and their models' hub config.json (no weights needed).
RECIPES = {"qwen2_5_vl_7b": QWEN2_5_VL_7B, "qwen2_5_vl_32b": QWEN2_5_VL_32B,
           "internvl2_5_38b": INTERNVL2_5_38B, "qwen3_vl_32b": QWEN3_VL_32B,
           "qwen3_vl_235b_a22b": QWEN3_VL_235B_A22B}
# Assumed mean image tokens per MMK12 / K-12 prompt: a ~480 x 490 px diagram at 28 x 28 px a
# Qwen2.5-VL token (cap 640), at 32 x 32 px a Qwen3-VL token (480 x 480: 15 x 15); InternVL 3
# tiles of 256 (cap 7).
FAMILY_IMAGE_TOKENS = {"qwen2_5_vl": 300.0, "qwen3_vl": 225.0, "qwen3_vl_moe": 225.0,
                       "internvl_chat": 768.0}


def model_shape(cfg: RLConfig, hub: dict) -> tuple[ModelShape, list, object]:
    """The shape of the recipe's model, counted from its meta-device build; that build's
    parameter inventory (for the per-rank buffers) and the LLM's config."""
    family = family_for(hub, str(cfg.model.hf_dir / "config.json"))
    mcfg = family.trainable(family.config_from_hf(hub, cfg.model.hf_dir), cfg.model)
    text = getattr(mcfg, "text", mcfg)
    entries = inventory(family, mcfg)
    vlm = hasattr(mcfg, "text")
    llm = [e for e in entries if not vlm or e.name.startswith("language_model.")]
    other = [e for e in entries if vlm and not e.name.startswith("language_model.")]
    projector = [e for e in other if "projection" in e.name]
    vision = hasattr(mcfg, "vision")
    merge = (mcfg.shuffle_factor**2 if hasattr(mcfg, "shuffle_factor")
             else mcfg.vision.spatial_merge_size**2 if vision else 0)
    shape = ModelShape(
        name=hub.get("model_type", "?"),
        params=sum(e.numel for e in entries),
        llm_matmul=active_matmul(llm, text),
        vision=sum(e.numel for e in other) - sum(e.numel for e in projector),
        projector=sum(e.numel for e in projector),
        vision_trainable=any(e.trainable for e in other),
        layers=text.num_hidden_layers, heads=text.num_attention_heads,
        kv_heads=text.num_key_value_heads, head_dim=text.kv_channels,
        vit_tokens_per_image_token=merge,
        image_tokens=FAMILY_IMAGE_TOKENS.get(hub.get("model_type"), 0.0) if vision else 0.0,
        expert_params=sum(e.numel for e in llm if e.expert),
        expert_share=text.num_experts_per_tok / text.num_experts if text.is_moe else 0.0)
    return shape, entries, text


def active_matmul(llm: list, text) -> int:
    """LLM parameters one token multiplies: all but the input embedding, and of a MoE layer's
    experts only the k it is routed to (k / E of them; the router counts whole)."""
    dense = sum(e.numel for e in llm
                if not e.expert and not e.name.endswith("embedding.word_embeddings.weight"))
    experts = sum(e.numel for e in llm if e.expert)
    return dense + (experts * text.num_experts_per_tok // text.num_experts if text.is_moe else 0)


def stage_exports(entries: list, layers: list[list[list[int]]]) -> list[tuple[int, int]]:
    """Per PP stage, (parameters its sender exports, of which TP-split), TP1 shapes: its decoder
    layers, the embedding and the vision tower on the first stage, the final norm and output layer
    on the last (a tied embedding is exported once, from the first)."""
    out = []
    for stage, chunks in enumerate(layers):
        mine = {layer for chunk in chunks for layer in chunk}
        here = [e for e in entries if (e.layer in mine if e.layer is not None
                                       else stage == (len(layers) - 1 if e.last else 0))]
        out.append((sum(e.numel for e in here), sum(e.numel for e in here if e.tp_split)))
    return out


def weight_transport(cfg: RLConfig) -> str:
    """rollout.weight_transport as trainer/engines.py resolves it on a GPU: auto -> tensors for
    colocated engines, the per-stage broadcast for engines on GPUs of their own."""
    t = cfg.rollout.weight_transport
    return t if t != "auto" else ("tensor" if cfg.cluster.colocate else "distributed")


def recipe_from_config(cfg: RLConfig, name: str, entries: list, text) -> Recipe:
    par, ro, t, c = cfg.parallel, cfg.rollout, cfg.train, cfg.cluster
    if ro.engine != "sglang":
        raise ConfigError(f"{name}: rollout.engine={ro.engine}; the performance model is of GPU "
                          "recipes with SGLang engines (rollout.engine=sglang)")
    layers = stage_layers(text, par)
    stages = [stage_params(entries, layers[s], s, par, text.tie_word_embeddings,
                           cfg.optim.distributed_optimizer) for s in range(par.pipeline_parallel)]
    fullest = max(stages, key=lambda w: w.buffer)
    exports = stage_exports(entries, layers)
    layout = plan_layout(actor_world=par.nproc, engines=ro.engines, gpus_per_engine=ro.gpus_per_engine,
                         colocate=c.colocate, use_gpus=True, gpus_per_node=c.gpus_per_node)
    tp, dp = par.tensor_parallel, par.dp
    kl_in_reward = cfg.algo.kl_in == "reward" and cfg.algo.kl_coef > 0
    return Recipe(
        name=name, tp=tp, pp=par.pipeline_parallel, dp=dp, gpus_per_node=c.gpus_per_node,
        colocated=c.colocate, engines=ro.engines, gpus_per_engine=ro.gpus_per_engine,
        transport=weight_transport(cfg),
        # rollout/factory.py: under the Ray launcher the engines are actors, unless given by URL
        ray_engines=c.launcher == "ray" and not ro.sglang_url,
        engine_nodes=tuple(b[0] // c.gpus_per_node for b in layout.engine_bundles),
        stage_params=tuple(n for n, _ in exports), stage_sharded=tuple(k for _, k in exports),
        prompts=t.rollout_batch_size, samples=ro.n_samples, mini_batches=t.mini_batches,
        epochs=t.epochs, micro_batch_tokens=t.micro_batch_tokens, max_new_tokens=ro.max_new_tokens,
        online_filter=cfg.algo.online_filter, max_filter_rounds=ro.max_filter_rounds,
        old_logprobs=t.mini_batches * t.epochs > 1 or kl_in_reward,
        ref_logprobs=cfg.algo.kl_coef > 0, recompute=t.recompute,
        off_policy=t.mode == "off-policy", reward_workers=cfg.rewards.num_workers,
        grad_buffer=fullest.buffer, optimizer_shard=fullest.optimizer)


def load_recipe(path: Path, overrides: list[str]) -> tuple[ModelShape, Recipe]:
    """A recipe YAML with its model's config.json: model.hf's, else (a cluster recipe of
    examples/) its model's hub config, written to a temporary directory: no weights needed."""
    hub = None if any(o.startswith("model.hf=") for o in overrides) else RECIPES.get(path.stem)
    with tempfile.TemporaryDirectory() as tmp:
        extra = [f"model.hf={write_config_dir(Path(tmp) / 'hf', hub)}"] if hub else []
        cfg = load_rl_config(str(path), [*overrides, *extra])
        config_json = cfg.model.hf_dir / "config.json"
        if not config_json.is_file():
            raise ConfigError(f"{path}: no {config_json}; give model.hf=DIR, a directory with the "
                              "model's config.json (no weights needed)")
        shape, entries, text = model_shape(cfg, json.loads(config_json.read_text()))
        return shape, recipe_from_config(cfg, path.stem, entries, text)


# --- the command ------------------------------------------------------------------------------

COLUMNS = [*LEAD, "GPUs", "layout", "generation", "rewards", "old log-probs", "ref log-probs",
           "train", "optimizer + DP grads", "weight sync", "dominant"]
PHASE_COLUMNS = ["recipe", "phase", "seconds", "% of step", "bound", "how"]
MACHINE = "paper (H100 SXM assumptions, nothing measured)"


def rows_for(p: Prediction, a: Assumptions) -> tuple[dict, list[dict]]:
    r, s = p.recipe, p.shape
    all_flops = sum(ph.flops for ph in p.phases)
    kind = ("colocated" if r.colocated
            else f"disaggregated (+{r.engines * r.gpus_per_engine} engine GPUs)")
    if r.off_policy and not r.colocated:
        kind += ", off-policy: rollout overlaps training"
    dominant = max(p.phases, key=lambda ph: ph.seconds)
    row = lead(f"{r.name} (on paper)",
               f"{r.prompts} x {r.samples}; tokens: prompt {p.prompt:.0f}, response {p.response:.0f} "
               f"(longest {p.longest})", p.step_seconds, p.tokens_per_s_per_gpu, "tokens/s/GPU",
               100 * all_flops / (p.step_seconds * r.gpus * a.peak_tflops * 1e12),
               f"model FLOPs of the step vs {a.peak_tflops:g} TFLOP/s x GPUs")
    row |= {"GPUs": r.gpus,
            "layout": f"TP{r.tp} PP{r.pp} DP{r.dp}, {r.engines} x TP{r.gpus_per_engine} SGLang, {kind}",
            **{ph.name: ph.seconds for ph in p.phases},
            "dominant": f"{dominant.name} {dominant.seconds / p.step_seconds:.0%}",
            "params": s.params}
    phases = [{"recipe": r.name, "phase": ph.name, "seconds": ph.seconds,
               "% of step": 100 * ph.seconds / p.step_seconds, "bound": ph.bound, "how": ph.detail}
              for ph in p.phases]
    row["phases"] = phases
    return row, phases


def assumptions_table(a: Assumptions) -> str:
    lines = ["| assumption | value | source |", "|---|---|---|"]
    for f in dataclasses.fields(a):
        v = getattr(a, f.name)
        shown = "by recipe / family" if v is None else f"{v:g}"
        lines.append(f"| {f.name} | {shown} | {f.metadata['source']} |")
    return "\n".join(lines)


def run(args: list[str], mfu: float | None = None, out: Path | None = None) -> int:
    """Print the prediction for each recipe YAML in `args` (default: the cluster recipes in
    examples/). Other items: `section.key=value` overrides every recipe's config, `name=value`
    an assumption."""
    paths = [Path(x) for x in args if "=" not in x]
    overrides = [x for x in args if "=" in x and "." in x.partition("=")[0]]
    a = parse_assumptions([x for x in args if "=" in x and "." not in x.partition("=")[0]])
    if mfu is not None:
        a = parse_assumptions([f"mfu={mfu}"], a)
    if not paths:
        if not EXAMPLES.is_dir():
            raise ConfigError("no examples/ next to the package: name the recipe YAMLs")
        paths = [EXAMPLES / f"{n}.yaml" for n in RECIPES]
    rows, phases = [], []
    for path in paths:
        if not path.is_file():
            raise ConfigError(f"{path}: no such recipe file")
        row, ph = rows_for(predict(*load_recipe(path, overrides), a), a)
        rows.append(row)
        phases += ph
    print(f"\n### perf-model on {MACHINE}\n")
    print(markdown_table(rows, COLUMNS))
    print("\nWhere the time goes (seconds per step):\n")
    print(markdown_table(phases, PHASE_COLUMNS))
    print("\nAssumptions (override with NAME=VALUE):\n")
    print(assumptions_table(a), flush=True)
    for row in rows:
        row["assumptions"] = dataclasses.asdict(a)
    write_json(out, "perf-model", MACHINE, rows)
    return 0
