"""HFEngine: the in-process transformers rollout engine (CPU demo, every CPU test, small GPU runs).

Our own decode loop over the model's forward, not `model.generate`: we need exact per-token
log-probs of the raw logits (before top-k/top-p), a seeded generator that does not touch the
global RNG, explicit positions (transformers 5 derives Qwen2.5-VL's mrope positions only when
given `mm_token_type_ids`, and generate's n-way input expansion does not split InternVL tiles per
prompt), and prefill-once-per-prompt for n samples. Prompts are left-padded into one batch, the
prefill runs once per distinct prompt, its KV cache is repeated n times, and finished rows leave
the batch. Image/video placeholder ids are never sampled (a response holding one could not be
scored: the trainer scatters image embeddings at every placeholder); like top-k/top-p this only
truncates the sampling distribution, `Sample.logprobs` stay those of the full raw distribution.

Families (by model class) and the naming layout of their `state_dict()` (see convert/): each
family's `hf_class` / `hf_layout` (models/registry.py), e.g. Qwen2ForCausalLM "causal_lm",
Qwen2_5_VLForConditionalGeneration "memory", Qwen3VLMoeForConditionalGeneration "memory" (its
experts stacked as transformers holds them), InternVLForConditionalGeneration "native_memory".
"""
from __future__ import annotations

import copy
import itertools
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterable

import torch

from eureka_megatron.models.registry import FAMILIES
from eureka_megatron.rollout.engine import NamedTensors, Prompt, Sample, SamplingParams, StaleWeightsError

# what each family's transformers model is called, and how its state_dict names its tensors
LAYOUTS = {f.hf_class: f.hf_layout for f in FAMILIES}
_CLASSES = {f.hf_model_type: f.hf_class for f in FAMILIES}
# processor outputs that are per token (recomputed here from the padded ids), not per image
_PER_TOKEN = {"input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids", "position_ids"}


class WeightSyncError(ValueError):
    """A bucket does not fit the model (unknown name, wrong shape) or a sync missed parameters."""


def _ids(x) -> list[int]:
    return [] if x is None else [int(x)] if isinstance(x, int) else [int(i) for i in x]


def _hf_config(src):
    """A transformers config from a config object, a config.json dict, or a directory."""
    from transformers import CONFIG_MAPPING, AutoConfig, PretrainedConfig

    if isinstance(src, PretrainedConfig):
        return copy.deepcopy(src)
    if isinstance(src, dict):
        if src.get("model_type") not in _CLASSES:
            _model_class(SimpleNamespace(model_type=src.get("model_type")))  # raises, with a hint
        return CONFIG_MAPPING[src["model_type"]].from_dict(dict(src))
    return AutoConfig.from_pretrained(str(src))


def _model_class(config):
    import transformers

    name = _CLASSES.get(config.model_type)
    if name is None:
        hint = (" (original InternVL checkpoints: convert them to transformers' native InternVL)"
                if config.model_type == "internvl_chat" else "")
        raise ValueError(f"HFEngine: model_type {config.model_type!r} is not supported{hint}; "
                         f"supported: {', '.join(_CLASSES)}")
    return getattr(transformers, name)


def _empty_model(config, dtype: torch.dtype, device, attn_implementation: str | None):
    """The model with uninitialised weights (built on the meta device: no init compute, no copy).

    `to_empty` leaves non-persistent buffers (rotary inv_freq) as garbage and unties tied
    weights; transformers' own initializer recomputes the buffers (parameters are flagged as
    initialised so it skips them), and a NaN/sentinel check proves every such buffer was rewritten.
    """
    cls = _model_class(config)
    kw = {"dtype": dtype}
    if attn_implementation:
        kw["attn_implementation"] = attn_implementation
    with torch.device("meta"):
        model = cls._from_config(config, **kw)
    model.to_empty(device=device)
    for module in model.modules():
        module._is_hf_initialized = False
    for t in itertools.chain(model.parameters(), model.buffers()):
        t._is_hf_initialized = True
    buffers = list(model.named_non_persistent_buffers())
    for _, b in buffers:
        b._is_hf_initialized = False
        b.fill_(float("nan") if b.is_floating_point() else torch.iinfo(b.dtype).min)
    model.initialize_weights()
    for name, b in buffers:
        left = b.isnan().any() if b.is_floating_point() else (b == torch.iinfo(b.dtype).min).any()
        if bool(left):
            raise RuntimeError(f"HFEngine.from_config: transformers did not recompute the "
                               f"non-persistent buffer {name} of {cls.__name__}")
    model.tie_weights()
    return model.eval()


def _filtered(scaled: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """transformers' top-k then top-p masking (at least one token kept)."""
    if 0 < top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = torch.sort(scaled, dim=-1)
        remove = ordered.softmax(-1).cumsum(-1) <= 1 - top_p
        remove[:, -1] = False
        scaled = scaled.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    return scaled


class HFEngine:
    """A `RolloutEngine` around an instantiated transformers model, in this process.

    A model handed in is version 0 (its weights are known); `from_pretrained` too; `from_config`
    starts at None (random memory) until `update_weights`. On CPU `release_memory` only marks the
    engine released (nothing to hand back to a GPU); on CUDA it moves the weights to host memory.
    """

    def __init__(self, model, tokenizer_or_processor=None, *, eos_token_ids=None, pad_token_id=None,
                 max_batch_size: int = 64, suppress_token_ids=None):
        cls = type(model).__name__
        if cls not in LAYOUTS:
            raise ValueError(f"HFEngine: {cls} is not supported; supported: {', '.join(LAYOUTS)}")
        self.weight_layout = LAYOUTS[cls]
        self.model = model.eval()
        self.processor = tokenizer_or_processor
        self.tokenizer = getattr(tokenizer_or_processor, "tokenizer", tokenizer_or_processor)
        self.max_batch_size = max_batch_size
        self._eos_arg, self._pad_arg = eos_token_ids, pad_token_id
        self._suppress_arg = suppress_token_ids
        self._recipe: tuple | None = None  # how restart() rebuilds the model
        self._version: int | None = 0
        self._released = False
        self._poisoned = False
        self._bind()
        self._loaded = {id(p) for p in model.parameters()}  # parameters holding known weights

    # --- construction ---------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype = torch.float32, device="cpu", *,
                        attn_implementation: str | None = None, **kw) -> "HFEngine":
        """Load weights and the processor/tokenizer of `path`; serves version 0."""
        model = cls._load(path, dtype, device, attn_implementation)
        engine = cls(model, load_processor(path), **kw)
        engine._recipe = ("pretrained", str(path), dtype, device, attn_implementation)
        return engine

    @classmethod
    def from_config(cls, hf_config, dtype: torch.dtype = torch.float32, device="cpu", *,
                    tokenizer_or_processor=None, attn_implementation: str | None = None,
                    **kw) -> "HFEngine":
        """Empty weights of the right shapes; the weights come from `update_weights`."""
        config = _hf_config(hf_config)
        model = _empty_model(copy.deepcopy(config), dtype, device, attn_implementation)
        engine = cls(model, tokenizer_or_processor, **kw)
        engine._recipe = ("config", config, dtype, device, attn_implementation)
        engine._version = None
        engine._loaded = set()
        return engine

    @staticmethod
    def _load(path, dtype, device, attn_implementation):
        config = _hf_config(Path(path))
        kw = {"dtype": dtype}
        if attn_implementation:
            kw["attn_implementation"] = attn_implementation
        return _model_class(config).from_pretrained(str(path), **kw).to(device).eval()

    def _bind(self):
        """Derive ids and the family from the (re)built model."""
        model, tok = self.model, self.tokenizer
        cfg = model.config
        gen = getattr(model, "generation_config", None)
        self.eos_token_ids = (_ids(self._eos_arg) if self._eos_arg is not None else  # [] = none
                              _ids(getattr(gen, "eos_token_id", None))
                              or _ids(getattr(tok, "eos_token_id", None)))
        self.mm_token_ids = {i for i in (getattr(cfg, "image_token_id", None),
                                         getattr(cfg, "video_token_id", None)) if i is not None}
        pad = self._pad_arg
        for cand in (getattr(gen, "pad_token_id", None), getattr(tok, "pad_token_id", None),
                     *self.eos_token_ids, 0):
            if pad is None and cand is not None and cand not in self.mm_token_ids:
                pad = cand
        if pad in self.mm_token_ids:
            raise ValueError(f"pad_token_id {pad} is an image/video placeholder id")
        self.pad_token_id = int(pad)
        self.suppress_token_ids = sorted(self.mm_token_ids if self._suppress_arg is None
                                         else _ids(self._suppress_arg))
        # Qwen-VL models: 3-D multimodal rope positions from the model's own get_rope_index
        self.mrope = hasattr(getattr(model, "model", None), "get_rope_index")
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype

    # --- state ----------------------------------------------------------------------------------

    @property
    def weight_version(self) -> int | None:
        return self._version

    def health(self) -> bool:
        return self.model is not None and not self._released and not self._poisoned

    def release_memory(self) -> None:
        if self.device.type == "cuda" and not self._released:
            self.model.to("cpu")
            torch.cuda.empty_cache()
        self._released = True

    def resume_memory(self) -> None:
        if self.device.type == "cuda" and self._released:
            self.model.to(self.device)
        self._released = False

    def restart(self) -> None:
        """Rebuild the model as it was made: from_pretrained reloads (version 0), from_config
        builds empty weights (version None); a model handed in is kept, its version None."""
        kind = self._recipe[0] if self._recipe else None
        if kind is None:
            self.resume_memory()  # the kept model goes back where it served
        else:
            self.model = None  # free the old weights before building the new ones
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        if kind == "pretrained":
            self.model = self._load(*self._recipe[1:])
            self._version = 0
        elif kind == "config":
            _, config, dtype, device, attn = self._recipe
            self.model = _empty_model(copy.deepcopy(config), dtype, device, attn)
            self._version = None
        else:
            self._version = None
        self._released = self._poisoned = False
        self._bind()
        self._loaded = set() if kind == "config" else {id(p) for p in self.model.parameters()}

    # --- weights --------------------------------------------------------------------------------

    def update_weights(self, buckets: Iterable[NamedTensors], version: int, *,
                       partial: bool = False) -> None:
        """Copy HF-named full tensors into the model; serve `version` once every bucket loaded.

        A sync must write every parameter (a tied lm_head counts when the embedding is written);
        `partial=True` only requires that every parameter was written by some sync since the
        model was built (e.g. the LLM alone while the vision tower is frozen).
        """
        self._version = None
        targets = self.model.state_dict(keep_vars=True)
        written = set()
        for bucket in buckets:
            with torch.no_grad():
                for name, tensor in bucket:
                    target = targets.get(name)
                    if target is None:
                        raise WeightSyncError(f"update_weights: {name!r} is not a tensor of "
                                              f"{type(self.model).__name__} (layout {self.weight_layout})")
                    if tuple(tensor.shape) != tuple(target.shape):
                        raise WeightSyncError(f"update_weights: {name}: got shape {tuple(tensor.shape)}, "
                                              f"the model has {tuple(target.shape)}")
                    target.copy_(tensor)
                    written.add(id(target))
        self._loaded |= written
        need = self._loaded if partial else written
        missing = [n for n, p in self.model.named_parameters() if id(p) not in need]
        if missing:
            raise WeightSyncError(f"update_weights: {len(missing)} parameter(s) were not written, "
                                  f"e.g. {', '.join(missing[:5])}")
        for module in self.model.modules():  # Qwen2.5-VL caches mrope deltas between calls
            if getattr(module, "rope_deltas", None) is not None:
                module.rope_deltas = None
        self._version = version

    # --- forward --------------------------------------------------------------------------------

    def _check_ready(self):
        if self.model is None or self._released:
            raise RuntimeError("HFEngine: memory is released; call resume_memory() first")
        if self._version is None:
            raise StaleWeightsError("HFEngine: the weights are not a complete version (an "
                                    "interrupted or missing sync); update_weights first")

    def _positions(self, ids: torch.Tensor, mask: torch.Tensor, mm: dict) -> torch.Tensor:
        """[B, S] positions counting real tokens (left padding), or the Qwen-VLs' [3, B, S] mrope
        from the model's own get_rope_index (Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE)."""
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        if not self.mrope:
            return pos
        if mm.get("image_grid_thw") is None and mm.get("video_grid_thw") is None:
            return pos[None].expand(3, -1, -1)
        cfg = self.model.config
        types = (ids == cfg.image_token_id).int() + 2 * (ids == cfg.video_token_id).int()
        pos3, _ = self.model.model.get_rope_index(
            ids, types, image_grid_thw=mm.get("image_grid_thw"),
            video_grid_thw=mm.get("video_grid_thw"),
            second_per_grid_ts=mm.get("second_per_grid_ts"), attention_mask=mask)
        return pos3

    def _batch(self, prompts: list[Prompt]):
        """Left-padded ids/mask and the prompts' multimodal tensors concatenated in order."""
        if any(len(p.input_ids) == 0 for p in prompts):
            raise ValueError("HFEngine.generate: empty prompt")
        width = max(len(p.input_ids) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p.input_ids):] = torch.tensor(p.input_ids)
            mask[i, width - len(p.input_ids):] = 1
        keys = {k for p in prompts for k, v in p.mm_inputs.items() if v is not None} - _PER_TOKEN
        mm = {k: torch.cat([p.mm_inputs[k] for p in prompts if p.mm_inputs.get(k) is not None])
              for k in keys}
        return ids.to(self.device), mask.to(self.device), self._mm(mm)

    def _mm(self, mm: dict) -> dict:
        """Per-image tensors on the engine's device, floats in its dtype; per-token ones dropped."""
        mm = {k: v.to(self.device) for k, v in mm.items() if k not in _PER_TOKEN and v is not None}
        return {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in mm.items()}

    @torch.no_grad()
    def logits(self, input_ids, attention_mask=None, **mm_inputs) -> torch.Tensor:
        """fp32 logits [B, S, V] of a (left-padded) batch: no cache, no sampling."""
        self._check_ready()
        ids = torch.as_tensor(input_ids, dtype=torch.long, device=self.device)
        ids = ids[None] if ids.ndim == 1 else ids
        mask = (torch.ones_like(ids) if attention_mask is None
                else torch.as_tensor(attention_mask, device=self.device).long())
        mm = self._mm(mm_inputs)
        out = self._run(input_ids=ids, attention_mask=mask, use_cache=False,
                        position_ids=self._positions(ids, mask, mm), **mm)
        return out.logits.float()

    def _run(self, **kw):
        try:
            return self.model(**kw)
        except RuntimeError as e:  # a CUDA fault leaves the context unusable: restart()
            if "CUDA error" in str(e) or "device-side assert" in str(e):
                self._poisoned = True
            raise

    # --- generation -----------------------------------------------------------------------------

    def generate(self, prompts: list[Prompt], n: int, sampling: SamplingParams) -> list[Sample]:
        sampling.validate()
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if sampling.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer: pass tokenizer_or_processor")
        self._check_ready()
        gen = None
        if sampling.seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(sampling.seed)
        per_chunk = max(1, self.max_batch_size // n)
        out: list[Sample] = []
        for start in range(0, len(prompts), per_chunk):
            out += self._generate_chunk(prompts[start:start + per_chunk], start, n, sampling, gen)
        return out

    @torch.no_grad()
    def _generate_chunk(self, prompts, first_index, n, sp: SamplingParams, gen) -> list[Sample]:
        with RoutingRecorder(self.model, sp.return_routed_experts) as routing:
            return self._decode_loop(prompts, first_index, n, sp, gen, routing)

    def _decode_loop(self, prompts, first_index, n, sp: SamplingParams, gen,
                     routing: "RoutingRecorder") -> list[Sample]:
        ids, mask, mm = self._batch(prompts)
        pos = self._positions(ids, mask, mm)
        out = self._run(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                        logits_to_keep=1, **mm)
        experts = routing.prefill(mask, n)  # per sample: [tokens fed so far, layers, k] pieces
        cache = out.past_key_values
        # prefill once per prompt, then n rows per prompt: [p0 x n, p1 x n, ...]
        logits = out.logits[:, -1].float().repeat_interleave(n, 0)
        mask = mask.repeat_interleave(n, 0)
        next_pos = (pos.amax(dim=(0, -1)) if pos.ndim == 3 else pos[:, -1]).repeat_interleave(n, 0) + 1
        if n > 1:
            cache.batch_repeat_interleave(n)
        rows = len(prompts) * n
        stop_ids = set(self.eos_token_ids) | set(sp.stop_token_ids)
        tail = max((len(s) for s in sp.stop), default=0) + 8
        tokens: list[list[int]] = [[] for _ in range(rows)]
        logps: list[list[float]] = [[] for _ in range(rows)]
        reason = ["length"] * rows
        active = torch.arange(rows, device=self.device)  # batch row -> sample index
        temp = sp.temperature if sp.temperature > 0 else 1.0
        suppress = torch.tensor(self.suppress_token_ids, dtype=torch.long, device=self.device)
        for step in range(sp.max_new_tokens):
            scaled = logits / temp
            logp = torch.log_softmax(scaled, dim=-1)
            if self.suppress_token_ids:
                scaled = scaled.index_fill(1, suppress, float("-inf"))
            if sp.temperature == 0:
                tok = scaled.argmax(-1)
            else:
                probs = _filtered(scaled, sp.top_k, sp.top_p).softmax(-1)
                tok = torch.multinomial(probs, 1, generator=gen)[:, 0]
            lp = logp.gather(1, tok[:, None])[:, 0]  # raw distribution, whatever was masked
            keep = []
            for j, (r, t, v) in enumerate(zip(active.tolist(), tok.tolist(), lp.tolist())):
                tokens[r].append(t)
                logps[r].append(v)
                if t in stop_ids or (sp.stop and self._hit_stop(tokens[r][-tail:], sp.stop)):
                    reason[r] = "stop"
                else:
                    keep.append(j)
            if not keep or step == sp.max_new_tokens - 1:
                break
            if len(keep) < len(active):  # finished rows leave the batch and the KV cache
                sel = torch.tensor(keep, device=self.device)
                active, tok, mask, next_pos = active[sel], tok[sel], mask[sel], next_pos[sel]
                cache.batch_select_indices(sel)
            mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
            step_pos = next_pos[:, None]
            if self.mrope:
                step_pos = step_pos[None].expand(3, -1, -1)
            out = self._run(input_ids=tok[:, None], attention_mask=mask, position_ids=step_pos,
                            past_key_values=cache, use_cache=True)
            routing.step(experts, active.tolist())
            cache, logits = out.past_key_values, out.logits[:, -1].float()
            next_pos = next_pos + 1
        return [Sample(prompt_index=first_index + r // n, token_ids=tokens[r], text=self._decode(tokens[r]),
                       logprobs=logps[r], finish_reason=reason[r], weight_version=self._version,
                       routed_experts=torch.cat(experts[r]) if experts else None)
                for r in range(rows)]

    def _hit_stop(self, tail_ids: list[int], stops: list[str]) -> bool:
        """Whether a stop string has appeared; checked every step, so the first hit ends in the
        newest token, and a window of the last tokens suffices."""
        text = self.tokenizer.decode(tail_ids, skip_special_tokens=True)
        return any(s in text for s in stops)

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True) if self.tokenizer else ""


class RoutingRecorder:
    """The experts a MoE model's routers chose, per token, while it generates (for routing
    replay): forward hooks on transformers' top-k routers (`*TopKRouter`, whose outputs are
    (logits, weights, expert ids)); off (no hooks) unless asked."""

    def __init__(self, model, enabled: bool):
        self.routers = []
        if enabled:
            self.routers = [m for m in model.modules() if type(m).__name__.endswith("TopKRouter")]
            if not self.routers:
                raise ValueError(f"return_routed_experts: {type(model).__name__} has no "
                                 "Mixture-of-Experts routers")
        self.calls: list[torch.Tensor] = []
        self.hooks = []

    def __enter__(self) -> "RoutingRecorder":
        self.hooks = [r.register_forward_hook(self._record) for r in self.routers]
        return self

    def __exit__(self, *exc) -> None:
        for h in self.hooks:
            h.remove()

    def _record(self, module, args, output) -> None:
        self.calls.append(output[2].detach().to("cpu", torch.int32))

    def _take(self, rows: int) -> torch.Tensor:
        """The last forward's choices as [rows, tokens per row, layers, k]."""
        layers = torch.stack(self.calls, dim=1)  # [rows * tokens, layers, k]
        self.calls = []
        return layers.view(rows, -1, *layers.shape[1:])

    def prefill(self, mask: torch.Tensor, n: int) -> list[list[torch.Tensor]]:
        """Each sample's prompt routing (left padding dropped), n samples per prompt; [] if off."""
        if not self.routers:
            return []
        chosen, keep = self._take(mask.shape[0]), mask.bool().cpu()
        return [[chosen[p][keep[p]]] for p in range(mask.shape[0]) for _ in range(n)]

    def step(self, experts: list[list[torch.Tensor]], active: list[int]) -> None:
        """One decode step fed a token to each active row (in batch order)."""
        if self.routers:
            chosen = self._take(len(active))
            for j, r in enumerate(active):
                experts[r].append(chosen[j])


def load_processor(path) -> Any:
    """The checkpoint's processor (VLMs) or tokenizer; None when it ships neither. A processor
    that cannot be built here (Qwen2.5-VL's needs torchvision for its video half) falls back to
    the tokenizer: prompts reach the engine already tokenized, only decoding is left to do."""
    from transformers import AutoProcessor, AutoTokenizer

    for loader in (AutoProcessor, AutoTokenizer):
        try:
            return loader.from_pretrained(str(path))
        except (OSError, ValueError, KeyError, TypeError, ImportError):
            pass
    return None
