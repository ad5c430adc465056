"""The memory plan `train --dry-run` prints: per GPU, what the config as given will hold.

Parameters come from the model itself, not from formulas: the family builds its megatron model
once on the meta device (TP1, PP1, nothing allocated), and every parameter is placed by what
megatron does with it -- split over TP by the layer class that owns it (column/row-parallel
linears, the vocab-parallel embedding), on the PP stage its layer belongs to (megatron's own
layer split), trainable or frozen (the family's `trainable`). Gradient and optimizer bytes then
follow megatron's buffer layout exactly: one fp32 grad buffer per chunk holding the trainable
parameters with each start aligned to 64 elements and the end padded to lcm(DP, 128), the
distributed optimizer's DP shard of it (fp32 main copy when the weights are bf16, Adam m and v).
`tests/dist/test_memory_plan.py` checks those numbers against a built model at TP1, TP2, PP2 and
TP2xPP2.

Activations are a formula per token per layer (what autograd keeps for the backward pass),
written from what megatron's layers save: checked on CPU (local spec, unfused attention) against
the bytes a forward actually leaves for the backward; on GPU (Transformer Engine, flash
attention) it is the same structure without the [S x S] attention probabilities -- an estimate.
"""
from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import astuple, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Literal

import torch

from eureka_megatron.config import ParallelConfig
from eureka_megatron.errors import ConfigError
from eureka_megatron.models.llm import building, transformer_config
from eureka_megatron.models.registry import family_for
from eureka_megatron.runtime import cpu_compat

if TYPE_CHECKING:
    from eureka_megatron.config import RLConfig
    from eureka_megatron.models.llm_config import LLMConfig

GB = 1e9
Attention = Literal["unfused", "flash"]  # megatron's local DotProductAttention | TE's fused kernels
# Not computed, assumed (stated in the plan): CUDA context + NCCL buffers + kernel workspaces;
# a released SGLang engine's context and CUDA graphs; SGLang's working memory beside its pool.
FRAMEWORK_GB = 3.0
RELEASED_ENGINE_GB = 2.0
ENGINE_WORKSPACE_GB = 4.0
SGLANG_DEFAULT_MEM_FRACTION = 0.88


class MemoryPlanError(ConfigError):
    """A plan that does not fit the device; the message is the plan's verdict line."""


@dataclass(frozen=True)
class ParamEntry:
    """One megatron parameter of the whole model (TP1, PP1 shapes)."""

    name: str
    numel: int
    tp_split: bool          # divided over the TP ranks (else replicated on each)
    layer: int | None       # the LLM decoder layer it belongs to; None: not a layer
    last: bool              # lives on the last PP stage (final norm, output layer)
    trainable: bool
    expert: bool = False    # a MoE expert's weight: split over EP (and ETP, not TP), reduced over EDP


# --- the parameter inventory (a meta build) ---------------------------------------------------

@contextmanager
def _single_process_megatron() -> Iterator[None]:
    """megatron's parallel state for one process (TP1, PP1), torn down after, unless the caller
    already has one."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        yield
        return
    own_group = not torch.distributed.is_initialized()
    if own_group:
        torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0,
                                             world_size=1)
    try:
        ps.initialize_model_parallel(1, 1)
        yield
    finally:
        ps.destroy_model_parallel()
        if own_group:
            torch.distributed.destroy_process_group()


def inventory(family, model_cfg) -> list[ParamEntry]:
    """Every parameter of the model, with how megatron places it (see the module docstring)."""
    cpu_compat.activate()
    with _single_process_megatron(), torch.device("meta"), building(initialize=False, meta=True):
        (chunk,) = family.build_chunks(model_cfg, ParallelConfig())
    return _entries(chunk)


def _entries(chunk) -> list[ParamEntry]:
    from megatron.core.tensor_parallel import (ColumnParallelLinear, RowParallelLinear,
                                               VocabParallelEmbedding)

    gpt = getattr(chunk, "language_model", chunk)
    gpt_names = {id(p): n for n, p in gpt.named_parameters()}
    out = []
    for mname, module in chunk.named_modules():
        mode = getattr(module, "parallel_mode", None)  # Transformer Engine's linears
        for pname, p in module.named_parameters(recurse=False):
            if isinstance(module, (ColumnParallelLinear, VocabParallelEmbedding)) or mode == "column":
                split = pname in ("weight", "bias")
            elif isinstance(module, RowParallelLinear) or mode == "row":
                split = pname == "weight"
            else:  # our own sharded modules mark their weights as megatron does
                split = getattr(p, "tensor_model_parallel", False)
            layer, last = None, False
            local = gpt_names.get(id(p))
            if local is not None:
                parts = local.split(".")
                if parts[:2] == ["decoder", "layers"]:
                    layer = int(parts[2])
                last = parts[0] == "output_layer" or parts[:2] == ["decoder", "final_layernorm"]
            out.append(ParamEntry(f"{mname}.{pname}" if mname else pname, p.numel(), split, layer,
                                  last, p.requires_grad,
                                  expert=getattr(module, "is_expert", False)))  # megatron's mark
    return out


# --- per-rank parameters, gradients, optimizer state ------------------------------------------

def stage_layers(text_cfg: LLMConfig, par: ParallelConfig) -> list[list[list[int]]]:
    """For each PP rank, the LLM decoder layers of each of its chunks (megatron's own split)."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    tcfg = transformer_config(text_cfg, par)
    out = []
    for p in range(par.pipeline_parallel):
        chunks = []
        for v in range(par.virtual_pipeline or 1):
            vp = v if par.virtual_pipeline else None
            first = get_transformer_layer_offset(tcfg, vp_stage=vp, pp_rank=p)
            chunks.append(list(range(first, first + get_num_layers_to_build(tcfg, vp, p))))
        out.append(chunks)
    return out


@dataclass
class StageParams:
    """What one rank of a PP stage holds for its weights (element counts, per TP rank)."""

    trainable: int = 0       # parameters with gradients
    frozen: int = 0          # parameters without (frozen towers)
    buffer: int = 0          # the DDP param/grad buffers: trainable + megatron's padding
    optimizer: int = 0       # elements of this DP rank's optimizer shard (the largest DP rank)


def _pad(n: int, to: int) -> int:
    return -(-n // to) * to


def _buffer_layout(numels: list[tuple[int, bool]], dp: int, distributed: bool) -> tuple[int, list[tuple[int, int]]]:
    """megatron's `_ParamAndGradBuffer` layout for one chunk: (padded size, each parameter's
    [start, end)). `numels` in registration order, with the shared-embedding flag."""
    start, ranges, in_bucket = 0, [], 0
    for numel, shared in reversed(numels):  # megatron lays parameters out in reverse
        if distributed:
            start = _pad(start, 64)
        if shared and distributed and in_bucket:  # the shared embedding gets its own bucket
            start = _pad(start, math.lcm(dp, 128))
            in_bucket = 0
        ranges.append((start, start + numel))
        in_bucket += 1
        start += numel
        if shared and distributed:
            start = _pad(start, math.lcm(dp, 128))
            in_bucket = 0
    end = _pad(start, math.lcm(dp, 128)) if distributed and in_bucket else start
    return end, ranges


def stage_params(entries: list[ParamEntry], layers: list[list[int]], stage: int,
                 par: ParallelConfig, tied: bool, distributed_optimizer: bool) -> StageParams:
    """One rank of PP stage `stage` (per TP rank; the optimizer shard of the fullest DP rank).
    MoE experts are megatron's second set of buffers: 1/EP of the experts per rank, each split
    over ETP, their grads reduced and optimizer state sharded over the expert DP group."""
    dense = _stage_params([e for e in entries if not e.expert], layers, stage, par, tied,
                          distributed_optimizer, par.tensor_parallel, 1, par.dp)
    if not any(e.expert for e in entries):
        return dense
    experts = _stage_params([e for e in entries if e.expert], layers, stage, par, False,
                            distributed_optimizer, par.etp, par.expert_parallel, par.expert_dp)
    return StageParams(*(a + b for a, b in zip(astuple(dense), astuple(experts))))


def _stage_params(entries: list[ParamEntry], layers: list[list[int]], stage: int,
                  par: ParallelConfig, tied: bool, distributed_optimizer: bool, tp: int,
                  ep: int, dp: int) -> StageParams:
    """`stage_params` for one set of buffers: split over `tp` (and `ep`), sharded over `dp`."""
    pp = par.pipeline_parallel
    out = StageParams()
    shard = [0] * dp
    for v, chunk_layers in enumerate(layers):
        first_chunk = stage == 0 and v == 0
        last_chunk = stage == pp - 1 and v == len(layers) - 1
        mine = set(chunk_layers)
        numels = []
        for e in entries:
            here = (e.layer in mine if e.layer is not None
                    else (last_chunk if e.last else first_chunk))
            if not here:
                continue
            n = (e.numel // tp if e.tp_split else e.numel) // ep
            shared = tied and pp > 1 and e.name.endswith("embedding.word_embeddings.weight")
            if e.trainable:
                out.trainable += n
                numels.append((n, shared))
            else:
                out.frozen += n
        if tied and pp > 1 and last_chunk:  # the last stage's copy of the tied embedding
            emb = next(e for e in entries if e.name.endswith("embedding.word_embeddings.weight"))
            out.trainable += emb.numel // tp
            numels.append((emb.numel // tp, True))
        size, ranges = _buffer_layout(numels, dp, distributed_optimizer)
        out.buffer += size
        for r in range(dp):
            lo, hi = (r * size // dp, (r + 1) * size // dp) if distributed_optimizer else (0, size)
            shard[r] += sum(max(0, min(b, hi) - max(a, lo)) for a, b in ranges)
    out.optimizer = max(shard)
    return out


# --- activations ------------------------------------------------------------------------------

def layer_activation_elements(text_cfg: LLMConfig, tp: int, seq_len: int, recompute: str,
                              attention: Attention, elem: int, sp: bool = False) -> float:
    """Elements (of the activation dtype) one LLM layer keeps per token for the backward pass.

    Local spec (CPU, measured): each RMSNorm keeps its input, the normalised input and 1/rms
    (2h + 1) and each first linear its input (h), rope its cos/sin for q and k (4d), the unfused
    attention q, the KV heads expanded to every query head (k, v), the probabilities [S x S] per
    head and the causal mask (S bytes), the projection its input; the SwiGLU MLP 5f (fc1 output,
    silu(gate), up, fc2 input). Selective recompute keeps only the attention's inputs (q, k and
    the qkv output v views). Full recompute keeps the layer's input (h). TP divides everything
    but the norms and the replicated linear inputs -- those too under sequence parallelism
    (`sp`: each rank keeps its slice of the sequence; the linears gather it again backward).
    A MoE layer (an estimate, not measured): the router's fp32 logits and probabilities (2E)
    and, for each of the k copies of a token sent to an expert, the permuted input and the
    unpermuted output (2h) and the expert's SwiGLU (5 f_expert); with balanced routing a rank's
    experts receive as many token copies as its own tokens send. Under sequence parallelism a TP
    rank routes only its slice of the sequence (1/TP); an expert split over ETP ranks gathers
    their tokens and computes 1/ETP of each, which leaves the same 1/TP."""
    h, d = text_cfg.hidden_size, text_cfg.kv_channels
    nq, nkv, f = text_cfg.num_attention_heads, text_cfg.num_key_value_heads, text_cfg.intermediate_size
    seq_split = tp if sp else 1
    if recompute == "full":
        return h / seq_split
    qkv_out = (nq + 2 * nkv) * d / tp
    if attention == "flash" or recompute == "selective":
        attn = nq * d / tp + nkv * d / tp + qkv_out  # q, k after rope; v, a view of qkv's output
        attn += 2 * nq / tp if attention == "flash" else 0  # TE keeps the fp32 log-sum-exp
    else:
        attn = 3 * nq * d / tp + nq / tp * seq_len + seq_len / elem  # q, k, v; probs; bool mask
    norms = (2 * (2 * h + 1) + 2 * h) / seq_split  # two norms, the qkv and fc1 inputs
    mlp = 5 * f / tp
    if text_cfg.is_moe:
        k, fe = text_cfg.num_experts_per_tok, text_cfg.expert_ffn
        mlp = (2 * text_cfg.num_experts * 4 / elem + k * (2 * h + 5 * fe)) / seq_split
    return norms + 4 * d + attn + nq * d / tp + mlp


def stage_activation_bytes(text_cfg: LLMConfig, par: ParallelConfig, n_layers: int, stage: int,
                           tokens: int, seq_len: int, recompute: str, attention: Attention,
                           elem: int, micro_batches: int) -> float:
    """Bytes of activations one rank of PP stage `stage` holds at its peak: 1F1B keeps up to
    PP - stage micro-batches in flight, each with `tokens` tokens over its `n_layers` layers."""
    per_token = n_layers * layer_activation_elements(text_cfg, par.tensor_parallel, seq_len,
                                                     recompute, attention, elem,
                                                     par.sequence_parallel)
    pp = par.pipeline_parallel
    if stage == 0:
        per_token += 2  # token ids (int64)
        per_token += text_cfg.kv_channels if recompute == "full" else 0  # rope frequencies
    if stage == pp - 1:
        seq_split = par.tensor_parallel if par.sequence_parallel else 1
        per_token += (2 * text_cfg.hidden_size + 1) / seq_split  # the final norm
        per_token += text_cfg.hidden_size + 5  # log-probs: the (gathered) hidden states, labels
    in_flight = max(1, min(pp - stage, micro_batches))
    return in_flight * per_token * tokens * elem


# --- the plan ---------------------------------------------------------------------------------

@dataclass
class Line:
    label: str
    gb: float
    note: str = ""


@dataclass
class StagePlan:
    stage: int
    layers: int
    training: list[Line] = field(default_factory=list)
    rollout: list[Line] = field(default_factory=list)

    @property
    def training_gb(self) -> float:
        return sum(x.gb for x in self.training)

    @property
    def rollout_gb(self) -> float:
        return sum(x.gb for x in self.rollout)


@dataclass
class MemoryPlan:
    device_gb: float
    stages: list[StagePlan]
    engine_gpu: list[Line]   # disaggregated engines' own GPUs (empty when colocated or HF engine)
    notes: list[str]

    @property
    def peak_gb(self) -> float:
        peaks = [max(s.training_gb, s.rollout_gb) for s in self.stages]
        return max(peaks + [sum(x.gb for x in self.engine_gpu)])

    @property
    def fits(self) -> bool:
        return self.peak_gb <= self.device_gb


def plan_memory(cfg: RLConfig, hf_config: dict | None = None) -> MemoryPlan:
    """The plan for `cfg` as given (its model's config.json unless `hf_config`)."""
    path = cfg.model.hf_dir / "config.json"
    hf = hf_config if hf_config is not None else json.loads(Path(path).read_text())
    family = family_for(hf, str(path))
    mcfg = family.trainable(family.config_from_hf(hf, cfg.model.hf_dir), cfg.model)
    text = getattr(mcfg, "text", mcfg)
    par = cfg.parallel
    entries = inventory(family, mcfg)
    layers = stage_layers(text, par)
    tp, pp = par.tensor_parallel, par.pipeline_parallel
    dp = par.nproc // (tp * pp)
    elem = 2 if par.bf16 else 4
    attention: Attention = "flash" if cfg.rollout.engine == "sglang" else "unfused"
    seq_len = cfg.data.max_prompt_length + cfg.rollout.max_new_tokens
    tokens = max(cfg.train.micro_batch_tokens, seq_len)
    seqs = cfg.train.rollout_batch_size * cfg.rollout.n_samples // max(cfg.train.mini_batches, 1)
    micro = max(1, seqs // dp)  # at most one micro-batch per sequence of the DP share
    opt_bytes = 12 if par.bf16 else 8  # (fp32 main copy +) Adam m, v; fp32 weights are their own main copy
    need_reference = cfg.algo.kl_coef > 0
    engine = _engine_lines(cfg, entries, text) if cfg.rollout.engine == "sglang" else []
    stages = []
    for s in range(pp):
        w = stage_params(entries, layers[s], s, par, text.tie_word_embeddings,
                         cfg.optim.distributed_optimizer)
        n_layers = sum(len(c) for c in layers[s])
        sp = StagePlan(s, n_layers)
        weights_elems = w.buffer if cfg.optim.distributed_optimizer else w.trainable
        sp.training += [
            Line("weights", weights_elems * elem / GB,
                 f"{w.trainable / 1e9:.3f}B trainable params x {elem} B"),
            Line("gradients", w.buffer * 4 / GB, "fp32 grad buffer"),
            Line("optimizer", w.optimizer * opt_bytes / GB,
                 f"{'fp32 main + ' if par.bf16 else ''}Adam m, v: {opt_bytes} B"
                 + (f" x 1/DP{dp} shard" if cfg.optim.distributed_optimizer else "")),
        ]
        if w.frozen:
            sp.training.append(Line("frozen weights", w.frozen * elem / GB,
                                    f"{w.frozen / 1e9:.3f}B params, no grads"))
        # a packed row attends over its whole length under the unfused attention's mask
        row = tokens if cfg.train.sequence_packing else seq_len
        act = stage_activation_bytes(text, par, n_layers, s, tokens, row, cfg.train.recompute,
                                     attention, elem, micro)
        in_flight = max(1, min(pp - s, micro))
        sp.training.append(Line("activations", act / GB,
                                f"{in_flight} x {tokens} tokens, recompute {cfg.train.recompute}, "
                                f"{attention} attention"
                                + (", sequence parallel" if par.sequence_parallel else "")))
        ref_gb = (w.trainable + w.frozen) * elem / GB if need_reference else 0.0
        if need_reference:
            resident = not _gpu(cfg)
            sp.training.append(Line("reference model", ref_gb if resident else 0.0,
                                    "resident" if resident else
                                    f"{ref_gb:.2f} on the host; on the GPU only for its pass"))
        if _gpu(cfg):
            sp.training.append(Line("CUDA context, NCCL, workspaces", FRAMEWORK_GB, "assumed"))
        if cfg.cluster.colocate and engine:
            sp.training.append(Line("released SGLang engine", RELEASED_ENGINE_GB, "assumed"))
            resident = sum(x.gb for x in sp.training[:3]) + (w.frozen * elem / GB)
            sp.rollout = [Line("actor weights, grads, optimizer", resident, "stay resident"),
                          Line("CUDA context, NCCL", 1.0, "assumed")] + engine
        stages.append(sp)
    active = (f", {text.num_active_parameters() / 1e9:.2f}B of the LLM's active per token "
              f"({text.num_experts_per_tok} of {text.num_experts} experts)" if text.is_moe else "")
    notes = [f"{hf.get('model_type')}: {sum(e.numel for e in entries) / 1e9:.2f}B parameters "
             f"({sum(e.numel for e in entries if e.trainable) / 1e9:.2f}B trainable{active})",
             f"largest micro-batch: {tokens} tokens, sequences <= {seq_len} "
             f"({cfg.data.max_prompt_length} prompt + {cfg.rollout.max_new_tokens} response)"
             + (", packed" if cfg.train.sequence_packing else ", padded rows")]
    return MemoryPlan(cfg.cluster.gpu_memory_gb, stages,
                      [] if cfg.cluster.colocate else engine, notes)


def _gpu(cfg: RLConfig) -> bool:
    return cfg.rollout.engine == "sglang" or cfg.parallel.bf16


def _engine_lines(cfg: RLConfig, entries: list[ParamEntry], text: LLMConfig) -> list[Line]:
    """One SGLang engine GPU: its static pool (weights + KV cache, mem_fraction_static of the
    GPU) and working memory; the note says how many tokens the engine's KV cache holds."""
    r = cfg.rollout
    frac = r.mem_fraction_static or SGLANG_DEFAULT_MEM_FRACTION
    weights = sum(e.numel for e in entries) * 2 / r.gpus_per_engine / GB  # bf16, TP-sharded
    kv = max(frac * cfg.cluster.gpu_memory_gb - weights, 0.0)
    per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * text.kv_channels * 2
    tokens = kv * GB * r.gpus_per_engine / per_token
    demand = cfg.train.rollout_batch_size * r.n_samples * (cfg.data.max_prompt_length + r.max_new_tokens)
    return [Line("SGLang weights", weights, f"bf16 / TP{r.gpus_per_engine}"),
            Line("SGLang KV cache pool", kv,
                 f"mem_fraction_static {frac} x {cfg.cluster.gpu_memory_gb:g} GB - weights: "
                 f"{tokens / 1e3:,.0f}K tokens of {per_token:,} B per engine, x{r.engines} = "
                 f"{tokens * r.engines / demand:.0%} of the step's worst case"),
            Line("SGLang workspace", ENGINE_WORKSPACE_GB, "assumed")]


def format_plan(plan: MemoryPlan) -> str:
    """The table `train --dry-run` prints (GB = 1e9 bytes)."""
    out = [f"memory per GPU (GB = 1e9 B) against {plan.device_gb:g} GB:"]
    out += [f"  {n}" for n in plan.notes]
    for s in plan.stages:
        head = f"  PP stage {s.stage} ({s.layers} layers)" if len(plan.stages) > 1 else "  actor rank"
        out.append(f"{head}, training phase:")
        out += [f"    {x.label:<34}{x.gb:8.2f}   {x.note}" for x in s.training]
        out.append(f"    {'total':<34}{s.training_gb:8.2f}")
        if s.rollout:
            out.append(f"{head}, rollout phase (colocated engine):")
            out += [f"    {x.label:<34}{x.gb:8.2f}   {x.note}" for x in s.rollout]
            out.append(f"    {'total':<34}{s.rollout_gb:8.2f}")
    if plan.engine_gpu:
        out.append("  SGLang engine GPU (disaggregated):")
        out += [f"    {x.label:<34}{x.gb:8.2f}   {x.note}" for x in plan.engine_gpu]
        out.append(f"    {'total':<34}{sum(x.gb for x in plan.engine_gpu):8.2f}")
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    out.append(f"  peak {plan.peak_gb:.2f} GB of {plan.device_gb:g} GB: {verdict} "
               f"({plan.device_gb - plan.peak_gb:+.2f} GB headroom)")
    return "\n".join(out)


def check_plan(cfg: RLConfig, ignore: bool = False, report=print) -> MemoryPlan:
    """Print the plan; refuse one that does not fit the device unless `ignore`."""
    plan = plan_memory(cfg)
    report(format_plan(plan))
    if not plan.fits and not ignore:
        raise MemoryPlanError(
            f"the memory plan needs {plan.peak_gb:.2f} GB on a {plan.device_gb:g} GB GPU "
            "(cluster.gpu_memory_gb): lower train.micro_batch_tokens, set train.recompute, raise "
            "parallel.tensor_parallel / pipeline_parallel or lower rollout.mem_fraction_static; "
            "or pass --ignore-memory to go on")
    return plan
