"""`bench perf-model`: a recipe's RL step time ON PAPER, predicted from FLOPs and bytes, not measured:
so a user sees where a step's time goes before renting a cluster.

Per phase of one step (trainer/loop.py): generation (prefill compute-bound; decode step by step,
each step the slower of reading weights + KV cache from HBM and its FLOPs), rewards (CPU pool),
old / ref log-probs (2N per token + attention at an MFU), training (6N + attention + recompute),
optimizer (Adam over the shard, DP collectives) and the weight sync, by the path the recipe's
engines really take (`weight_sync`): the per-stage broadcast of 2026-12-06 for engines on GPUs of
their own, tensors for colocated engines (through Ray's object store when they live in Ray actors).
The model's numbers come in as a `ModelShape` (bench/perf_recipes.py counts them from the memory
planner's meta-device build) and the recipe's as a `Recipe`; every other number is a named
`Assumptions` field (NAME=VALUE).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from eureka_megatron.errors import ConfigError
from eureka_megatron.trainer.collect import prompts_to_sample

ADAM_BYTES = 30  # per element: read the fp32 grad, read + write fp32 main, m, v; write the bf16 weight


def _assumed(value: float | None, source: str):
    return field(default=value, metadata={"source": source})


@dataclass(frozen=True)
class Assumptions:
    """Every number the model does not read from the recipe or the model; NAME=VALUE overrides.
    Each field's source is printed beside its value."""

    peak_tflops: float = _assumed(989.0, "H100 SXM datasheet, bf16 dense, per GPU")
    hbm_tb_s: float = _assumed(3.35, "H100 SXM datasheet, per GPU")
    nvlink_gb_s: float = _assumed(450.0, "NVLink 4, one direction per GPU (900 GB/s both)")
    ib_gb_s: float = _assumed(50.0, "one 400 Gb/s InfiniBand NIC per GPU")
    mfu: float = _assumed(0.40, "log-prob and training passes; assumed (verl: Qwen3-30B-A3B "
                                "0.40 on 8 GPUs, rl-systems.md 6)")
    engine_mfu: float = _assumed(0.50, "SGLang prefill and a decode step's compute roof; assumed")
    hbm_efficiency: float = _assumed(0.60, "share of HBM bandwidth decode and Adam reach; assumed")
    collective_efficiency: float = _assumed(0.80, "NCCL inside the trainer (DP collectives; the "
                                                  "sync's TP all-gather and sends to rank 0), share "
                                                  "of the link; assumed")
    sync_efficiency: float = _assumed(0.165, "weight sync into the engines (NCCL broadcast, CUDA-IPC "
                                             "reads), share of the link: verl's checkpoint engine "
                                             "(NCCL broadcast of buckets), 8.25 GB/s on 400 Gb IB "
                                             "(rl-systems.md 2)")
    sync_parallel_stages: float = _assumed(1.0, "PP stages whose broadcasts an engine receives at "
                                                "once: 1, SGLangEngine.receive_weights serves the "
                                                "stages' groups one after the other")
    host_copy_gb_s: float = _assumed(4.0, "one side of a bucket's hop through Ray's object store "
                                          "(torch pickles a CUDA tensor by value: pageable D2H or "
                                          "H2D plus ~3 host memcpys); assumed")
    ray_object_gb_s: float = _assumed(2.0, "Ray's object manager between nodes (gRPC over TCP, not "
                                           "RDMA), every pull out of rank 0's node together; "
                                           "assumed")
    prompt_text_tokens: float = _assumed(200.0, "system prompt + question, mean; assumed")
    image_tokens: float | None = _assumed(None, "mean image tokens a prompt; assumed, by family: "
                                                "Qwen2.5-VL 300 (cap 640), Qwen3-VL 225, InternVL 768 (3 tiles; "
                                                "cap 7 x 256)")
    mean_response_tokens: float = _assumed(800.0, "assumed (MM-Eureka published only curves)")
    longest_response_tokens: float | None = _assumed(None, "per round; assumed: one response of "
                                                           "each round reaches max_new_tokens")
    filter_keep_rate: float = _assumed(0.6, "share of groups the online filter keeps; assumed "
                                            "(recipes without the filter keep all)")
    reward_ms: float = _assumed(8.0, "CPU time to score a response: bench rewards (BENCHMARKS.md)")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is None and f.name in ("image_tokens", "longest_response_tokens"):
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ConfigError(f"perf-model assumption {f.name}={v!r} must be a number > 0")
            if f.name.endswith(("mfu", "efficiency", "keep_rate")) and v > 1:
                raise ConfigError(f"perf-model assumption {f.name}={v} is a share: it must be <= 1")


def parse_assumptions(items: list[str], base: Assumptions | None = None) -> Assumptions:
    """NAME=VALUE strings over `base`; an unknown name or a value that is not a number > 0 is a
    ConfigError naming it (a typo must not silently keep the default)."""
    known = {f.name for f in dataclasses.fields(Assumptions)}
    values = {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep:
            raise ConfigError(f"perf-model assumption {item!r}: expected NAME=VALUE")
        if name not in known:
            raise ConfigError(f"unknown perf-model assumption {name!r}; known: "
                              f"{', '.join(sorted(known))}")
        try:
            values[name] = float(text)
        except ValueError:
            raise ConfigError(f"perf-model assumption {name}={text!r} is not a number") from None
    return dataclasses.replace(base or Assumptions(), **values)


@dataclass(frozen=True)
class ModelShape:
    """What the arithmetic needs of the model (parameter counts from the meta build)."""

    name: str
    params: int                  # every parameter (the sync sends Recipe.stage_params: the same sum)
    llm_matmul: int              # LLM parameters a token multiplies: all but the input embedding,
                                 # of a MoE's experts the k routed to (active parameters)
    vision: int                  # the tower: runs on vit_tokens_per_image_token x the image tokens
    projector: int               # vision -> LLM projector: runs on the LLM's image tokens
    vision_trainable: bool
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vit_tokens_per_image_token: int
    image_tokens: float          # the family's assumed mean (perf_recipes.FAMILY_IMAGE_TOKENS)
    expert_params: int = 0       # MoE: every expert's parameters (0: a dense model)
    expert_share: float = 0.0    # MoE: k / E, the share of the experts a token is routed to

    def decode_weight_bytes(self, tokens: float) -> float:
        """bf16 bytes of LLM weights one decode step reads for `tokens` running sequences: the
        dense part once, and every expert some token is routed to -- with uniform routing
        1 - (1 - k/E)^tokens of them (a batch of hundreds touches nearly all)."""
        dense = self.llm_matmul - self.expert_params * self.expert_share
        touched = 1 - (1 - self.expert_share) ** tokens if self.expert_params else 0.0
        return 2 * (dense + self.expert_params * touched)

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * 2  # K and V, bf16

    def attention_flops(self, mean_sq_len: float) -> float:
        """Forward FLOPs of causal attention (QK^T and AV, half the square) per sequence."""
        return 2 * self.layers * self.heads * self.head_dim * mean_sq_len


@dataclass(frozen=True)
class Recipe:
    """The recipe's layout and batch (trainer/loop.py's step), as plain numbers."""

    name: str
    tp: int
    pp: int
    dp: int
    gpus_per_node: int
    colocated: bool
    engines: int
    gpus_per_engine: int
    transport: str               # the engines' weight_transport on a GPU: "tensor" / "distributed"
    ray_engines: bool            # engines live in Ray actors (cluster.launcher ray)
    engine_nodes: tuple[int, ...]   # each engine's node (plan_layout's GPUs, gpus_per_node a node)
    stage_params: tuple[int, ...]   # parameters each PP stage exports (TP1 shapes)
    stage_sharded: tuple[int, ...]  # ... of which TP-split (its TP group all-gathers them)
    prompts: int                 # per step, after the online filter
    samples: int
    mini_batches: int
    epochs: int
    micro_batch_tokens: int
    max_new_tokens: int
    online_filter: bool
    max_filter_rounds: int
    old_logprobs: bool           # the actor recomputes old log-probs (Actor.logprobs' rule)
    ref_logprobs: bool           # a KL term needs the reference's
    recompute: str
    off_policy: bool
    reward_workers: int
    grad_buffer: int             # elements of the fullest PP stage's grad buffer, per rank
    optimizer_shard: int         # elements of that rank's optimizer shard

    @property
    def actor_gpus(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def gpus(self) -> int:
        return self.actor_gpus + (0 if self.colocated else self.engines * self.gpus_per_engine)

    def stage_node(self, stage: int) -> int:
        """The node of the stage's sender, TP 0 / DP 0 (megatron's rank order: TP, DP, then PP)."""
        return stage * self.tp * self.dp // self.gpus_per_node

    @property
    def engines_on_first_node(self) -> int:
        return sum(n == 0 for n in self.engine_nodes)


@dataclass
class Phase:
    name: str
    seconds: float
    bound: str                   # what limits it: compute / HBM / link / CPU
    detail: str
    flops: float = 0.0


@dataclass
class Prediction:
    recipe: Recipe
    shape: ModelShape
    phases: list[Phase]
    step_seconds: float
    prompt: float                # mean tokens: text + image
    response: float              # mean tokens
    longest: int                 # the longest response of a round

    @property
    def tokens(self) -> float:
        """Prompt + response tokens trained per step (verl's and NeMo-RL's tokens/s/GPU count)."""
        return self.recipe.prompts * self.recipe.samples * (self.prompt + self.response)

    @property
    def tokens_per_s_per_gpu(self) -> float:
        return self.tokens / self.step_seconds / self.recipe.gpus


# --- the arithmetic ---------------------------------------------------------------------------

def response_shape(mean: float, longest: float) -> float:
    """The exponent k of the response-length law P(len > t) = (1 - t/longest)^k, whose mean is
    longest / (k + 1): most responses near the mean, a tail running to the longest."""
    if mean > longest:
        raise ConfigError(f"perf-model: mean_response_tokens={mean:g} exceeds the longest "
                          f"response {longest:g} (rollout.max_new_tokens or longest_response_tokens)")
    return longest / mean - 1


def mean_square_length(prompt: float, mean: float, longest: float) -> float:
    """E[(prompt + response)^2] under that law (response / longest ~ Beta(1, k))."""
    k = response_shape(mean, longest)
    second = 2 * longest**2 / ((k + 1) * (k + 2))
    return prompt**2 + 2 * prompt * mean + second


def filter_rounds(r: Recipe, a: Assumptions) -> list[float]:
    """Prompts sampled in each round: the collector's own rule at the expected keep rate."""
    if not r.online_filter:
        return [float(r.prompts)]
    rounds, kept, generated = [], 0.0, 0.0
    while kept < r.prompts - 1e-9 and len(rounds) < r.max_filter_rounds:
        n = prompts_to_sample(r.prompts, kept, generated, len(rounds))
        rounds.append(float(n))
        generated += n
        kept += n * a.filter_keep_rate
    return rounds


def vision_flops(s: ModelShape, prompts: float, image_tokens: float, passes: float = 1.0) -> float:
    """Forward FLOPs of the vision tower + projector over `prompts` prompts' images."""
    return 2 * prompts * passes * image_tokens * (s.vision * s.vit_tokens_per_image_token + s.projector)


def decode_seconds(s: ModelShape, batch: float, prompt: float, mean: float, longest: int,
                   gpus: int, a: Assumptions) -> tuple[float, float, float]:
    """(seconds, share of steps HBM-bound, KV bytes read) for one engine decoding `batch`
    sequences: step t reads the weights once and each running sequence's prompt + t cached
    tokens; its FLOPs are 2N + attention per running sequence; the slower of the two wins."""
    k = response_shape(mean, longest)
    hbm = gpus * a.hbm_tb_s * 1e12 * a.hbm_efficiency
    compute = gpus * a.peak_tflops * 1e12 * a.engine_mfu
    seconds = kv_total = 0.0
    memory_bound = 0
    for t in range(longest):
        running = batch * (1 - t / longest) ** k
        kv = running * (prompt + t) * s.kv_bytes_per_token
        flops = running * (2 * s.llm_matmul + 4 * s.layers * s.heads * s.head_dim * (prompt + t))
        mem_t, flop_t = (s.decode_weight_bytes(running) + kv) / hbm, flops / compute
        memory_bound += mem_t >= flop_t
        seconds += max(mem_t, flop_t)
        kv_total += kv
    return seconds, memory_bound / longest, kv_total


def generation(s: ModelShape, r: Recipe, a: Assumptions, prompt: float, image: float,
               longest: int) -> Phase:
    """Each filter round, the busiest engine: prefill (tower included) at engine_mfu, then the
    decode; the rounds run one after another (the collector samples, scores, then refills)."""
    g = r.gpus_per_engine
    compute = g * a.peak_tflops * 1e12 * a.engine_mfu
    seconds = flops = kv = 0.0
    shares = []
    rounds = filter_rounds(r, a)
    for p in rounds:
        per_engine = math.ceil(p / r.engines)
        prefill = 2 * s.llm_matmul * prompt + s.attention_flops(prompt**2) + vision_flops(s, 1, image)
        dec, share, kv_round = decode_seconds(s, per_engine * r.samples, prompt,
                                              a.mean_response_tokens, longest, g, a)
        seconds += per_engine * prefill / compute + dec
        flops += p * (prefill + r.samples * a.mean_response_tokens * 2 * s.llm_matmul)
        shares.append(share)
        kv += kv_round
    detail = f"{len(rounds)} online-filter rounds: " if r.online_filter else "no online filter: "
    detail += (f"{' + '.join(f'{p:.0f}' for p in rounds)} prompts x {r.samples}; each decodes "
               f"{longest} steps reading up to "
               f"{s.decode_weight_bytes(per_engine * r.samples) / g / 1e9:.1f} GB of weights per GPU; "
               f"KV reads {kv / 1e12:.1f} TB per engine")
    bound = (f"HBM ({min(shares):.0%} of decode steps)" if min(shares) >= 0.5
             else f"compute ({1 - max(shares):.0%} of decode steps)")
    return Phase("generation", seconds, bound, detail, flops)


def forward_flops(s: ModelShape, r: Recipe, a: Assumptions, prompt: float, image: float,
                  longest: int, sequences: float) -> tuple[float, float, float]:
    """(LLM matmul, LLM attention, vision) forward FLOPs over `sequences` trained sequences; the
    tower runs once per group per micro-batch the group spans (rows share their prompt's images)."""
    length = prompt + a.mean_response_tokens
    llm = 2 * s.llm_matmul * sequences * length
    attn = sequences * s.attention_flops(mean_square_length(prompt, a.mean_response_tokens, longest))
    spans = min(r.samples, math.ceil(r.samples * length / r.micro_batch_tokens))
    return llm, attn, vision_flops(s, sequences / r.samples, image, spans)


def bubble(r: Recipe, sequences: float, length: float) -> tuple[float, int]:
    """(1F1B pipeline factor (m + PP - 1) / m, m) for `sequences` packed into micro-batches."""
    m = max(1, math.ceil(sequences / r.dp * length / r.micro_batch_tokens))
    return (m + r.pp - 1) / m, m


def logprob_pass(s: ModelShape, r: Recipe, a: Assumptions, prompt: float, image: float,
                 longest: int, name: str) -> Phase:
    seqs = r.prompts * r.samples
    llm, attn, vis = forward_flops(s, r, a, prompt, image, longest, seqs)
    factor, m = bubble(r, seqs, prompt + a.mean_response_tokens)
    flops = llm + attn + vis
    seconds = flops / (r.actor_gpus * a.peak_tflops * 1e12 * a.mfu) * factor
    return Phase(name, seconds, f"compute (MFU {a.mfu:g})",
                 f"{flops / 1e15:.0f} PFLOP forward (2N/token + attention + tower), "
                 f"{m} micro-batches per DP rank, PP bubble x{factor:.2f}", flops)


def training(s: ModelShape, r: Recipe, a: Assumptions, prompt: float, image: float,
             longest: int) -> Phase:
    """6N per token (forward, input and weight gradients) + attention forward and backward (3x),
    the recompute's extra forward; the frozen tower forward only."""
    seqs = r.prompts * r.samples
    llm, attn, vis = forward_flops(s, r, a, prompt, image, longest, seqs)
    flops = 3 * llm + 3 * attn + (3 * vis if s.vision_trainable else vis)
    if r.recompute == "full":
        flops += llm + attn
    elif r.recompute == "selective":
        flops += attn
    flops *= r.epochs
    factor, m = bubble(r, seqs / r.mini_batches, prompt + a.mean_response_tokens)
    seconds = flops / (r.actor_gpus * a.peak_tflops * 1e12 * a.mfu) * factor
    return Phase("train", seconds, f"compute (MFU {a.mfu:g})",
                 f"{flops / 1e15:.0f} PFLOP (6N/token + attention, recompute {r.recompute}), "
                 f"{r.mini_batches * r.epochs} mini-batches of {m} micro-batches per DP rank, "
                 f"PP bubble x{factor:.2f}", flops)


def optimizer(r: Recipe, a: Assumptions) -> Phase:
    """Per optimizer step: Adam over the rank's shard (HBM), the fp32 gradient reduce-scatter and
    the bf16 parameter all-gather over DP (NVLink when the DP group fits a node, else IB)."""
    steps = r.mini_batches * r.epochs
    adam = r.optimizer_shard * ADAM_BYTES / (a.hbm_tb_s * 1e12 * a.hbm_efficiency)
    nvlink = r.tp * r.dp <= r.gpus_per_node
    link = (a.nvlink_gb_s if nvlink else a.ib_gb_s) * 1e9 * a.collective_efficiency
    comm = r.grad_buffer * (4 + 2) * (r.dp - 1) / r.dp / link
    return Phase("optimizer + DP grads", steps * (adam + comm),
                 f"{'NVLink' if nvlink else 'IB'} + HBM",
                 f"{steps} steps x (Adam {adam * 1e3:.0f} ms + DP collectives {comm * 1e3:.0f} ms)")


def sync_terms(s: ModelShape, r: Recipe, a: Assumptions) -> dict[str, tuple[float, str]]:
    """The weight sync's parts as {name: (seconds, link)}, by the path the engines take
    (rollout/weight_sync.py); bf16, 2 bytes a parameter. A part waits for the one before it: each
    sender exports a bucket, then sends it, then exports the next, and the engine loads one
    update at a time.

    - transport "distributed" (weight_broadcast.py): each PP stage's sender (TP 0 / DP 0) gets its
      stage's tensors by a TP all-gather (NVLink), then broadcasts every bucket once into its group
      eureka-pp{stage}, which holds every engine's ranks: a pipelined broadcast costs about
      bytes / the slowest link (IB when an engine is on another node), not engines x bytes. The
      engine serves the stages' groups one after the other (`sync_parallel_stages` of them at once).
    - transport "tensor": rank 0 gets every tensor (its TP group's all-gather; other stages' whole
      tensors sent to it). Engines in Ray actors (ray_engine.RemoteEngine.update_weights): each
      bucket is pickled once per engine on rank 0 (torch pickles a CUDA tensor by value: a copy
      to the host), Ray's object store carries it to the engines on other nodes, and each actor
      rebuilds it on its own GPU and hands its server CUDA-IPC handles on that node. Engines in
      rank 0's process (launched locally) read rank 0's buffers by CUDA-IPC over NVLink.
    """
    if len(r.stage_params) != r.pp or len(r.stage_sharded) != r.pp:
        raise ConfigError(f"perf-model: {r.name}: stage_params / stage_sharded need one entry per "
                          f"PP stage ({r.pp})")
    if r.transport not in ("tensor", "distributed"):
        raise ConfigError(f"perf-model: {r.name}: transport {r.transport!r}")

    def link(same_node: bool) -> tuple[float, str]:
        return ((a.nvlink_gb_s, "NVLink") if same_node else (a.ib_gb_s, "IB"))

    tp_gb_s, tp_link = link(r.tp <= r.gpus_per_node)
    gather = [2 * n * (1 - 1 / r.tp) / (tp_gb_s * 1e9 * a.collective_efficiency)
              for n in r.stage_sharded]
    w = 2 * sum(r.stage_params)
    if r.transport == "distributed":
        bcast, links = [], set()
        for stage, n in enumerate(r.stage_params):
            gb_s, name = link(all(e == r.stage_node(stage) for e in r.engine_nodes))
            bcast.append(2 * n / (gb_s * 1e9 * a.sync_efficiency))
            links.add(name)
        per_stage = [g + b for g, b in zip(gather, bcast)]
        total = max(max(per_stage), sum(per_stage) / min(a.sync_parallel_stages, r.pp))
        scale = total / sum(per_stage) if sum(per_stage) else 0.0
        return {"TP all-gather": (sum(gather) * scale, tp_link),
                "broadcast": (sum(bcast) * scale, "IB" if "IB" in links else "NVLink")}
    terms = {"TP all-gather": (sum(gather), tp_link)}
    for stage in range(1, r.pp):  # the other stages' tensors, sent whole to rank 0
        gb_s, name = link(r.stage_node(stage) == 0)
        key = f"stages to rank 0 ({name})"
        t = terms.get(key, (0.0, name))[0]
        terms[key] = (t + 2 * r.stage_params[stage] / (gb_s * 1e9 * a.collective_efficiency), name)
    ipc = a.nvlink_gb_s * 1e9 * a.sync_efficiency
    if r.ray_engines:
        remote = r.engines - r.engines_on_first_node
        terms["pickled on rank 0"] = (r.engines * w / (a.host_copy_gb_s * 1e9), "host copies")
        if remote:
            terms["Ray object store"] = (remote * w / (a.ray_object_gb_s * 1e9), "Ray (TCP)")
        terms["unpickled in the actor"] = (w / (a.host_copy_gb_s * 1e9), "host copies")
        terms["CUDA-IPC load"] = (w / ipc, "NVLink")
    else:
        terms["CUDA-IPC load"] = (r.engines * w / ipc, "NVLink")
    return terms


def weight_sync(s: ModelShape, r: Recipe, a: Assumptions) -> Phase:
    """The sum of `sync_terms`; bound by the largest part's link."""
    terms = sync_terms(s, r, a)
    w = 2 * sum(r.stage_params)
    seconds = sum(t for t, _ in terms.values())
    _, bound = max(terms.values(), key=lambda term: term[0])
    remote = r.engines - r.engines_on_first_node
    if r.transport == "distributed":
        how = (f"per-stage broadcast: {r.pp} sender(s) (TP0/DP0 of each stage), each stage's "
               f"buckets broadcast once to all {r.engines} engines")
    elif r.ray_engines:
        how = (f"tensors through Ray: rank 0 gets them all, pickles each bucket for each of "
               f"{r.engines} engines, {remote} on other nodes by Ray's object store; each actor "
               f"loads its server by CUDA-IPC on its node")
    else:
        how = f"tensors: rank 0 gets them all, {r.engines} engines read them by CUDA-IPC"
    parts = ", ".join(f"{name} {t:.3g} s" for name, (t, _) in terms.items() if t)
    return Phase("weight sync", seconds, bound,
                 f"{w / 1e9:.1f} GB of bf16 weights; {how} ({parts})")


def rewards(r: Recipe, a: Assumptions) -> Phase:
    responses = sum(filter_rounds(r, a)) * r.samples
    return Phase("rewards", responses * a.reward_ms / 1e3 / r.reward_workers, "CPU",
                 f"{responses:.0f} responses x {a.reward_ms:g} ms / {r.reward_workers} workers")


def predict(s: ModelShape, r: Recipe, a: Assumptions) -> Prediction:
    """One step's phases and time. On-policy (or colocated: trainer and engines share the GPUs)
    the phases run one after another; off-policy and disaggregated, rollout overlaps training."""
    prompt = a.prompt_text_tokens + (s.image_tokens if a.image_tokens is None else a.image_tokens)
    image = prompt - a.prompt_text_tokens
    longest = int(a.longest_response_tokens or r.max_new_tokens)
    phases = [generation(s, r, a, prompt, image, longest), rewards(r, a)]
    if r.old_logprobs:
        phases.append(logprob_pass(s, r, a, prompt, image, longest, "old log-probs"))
    if r.ref_logprobs:
        phases.append(logprob_pass(s, r, a, prompt, image, longest, "ref log-probs"))
    phases += [training(s, r, a, prompt, image, longest), optimizer(r, a), weight_sync(s, r, a)]
    secs = {p.name: p.seconds for p in phases}
    rollout = secs["generation"] + secs["rewards"]
    learn = sum(secs.values()) - rollout - secs["weight sync"]
    overlap = r.off_policy and not r.colocated
    step = (max(rollout, learn) if overlap else rollout + learn) + secs["weight sync"]
    return Prediction(r, s, phases, step, prompt, a.mean_response_tokens, longest)
