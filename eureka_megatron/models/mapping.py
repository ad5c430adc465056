"""The declarative mapping core: rules between HF tensor names and megatron global tensors.

A megatron global tensor is named by its torch_dist checkpoint key plus its layer index (for
`decoder.layers.*` keys) and, for MoE experts, its expert index (megatron's prepend axes: the
`(layer, expert)` offsets of `decoder.layers.mlp.experts.*`), exactly what
`models.init.fill_global_tensors` asks a source for. Each `Rule` ties one such tensor to one or
more HF tensors through a reversible transform:

  copy      one HF tensor, unchanged
  pad_vocab one HF tensor; rows padded with zeros to the padded vocab (HF side: padding removed)
  qkv       HF q, k, v -> megatron's per-KV-group interleaving [q_g; k_g; v_g] for each group g
  fused_qkv one HF tensor [q_all; k_all; v_all] (vision towers) -> the same interleaving
  concat    several HF tensors stacked on dim 0 (e.g. SwiGLU [gate; up] -> linear_fc1)
  ffn_cols  one HF tensor whose dim 1 is the MLP width (linear_fc2.weight)
  head_cols one HF tensor whose dim 1 is heads x head_dim (attention output projections)
  head_rows one HF tensor whose dim 0 is heads x head_dim (full-width q/k norms)
  experts   (per-expert rules) one HF tensor [num_experts, ...] holding every expert of a layer
            (transformers' fused `mlp.experts.gate_up_proj` / `down_proj`); expert e's megatron
            tensor is its row e
  experts_t the same stacked with each expert's matrix transposed ([E, in, out]: Qwen3-VL-MoE's
            on-disk `gate_up_proj` / `down_proj`)

Per-expert rules (`per_expert=True`) exist once per (layer, expert); their HF names take "{e}" when
the checkpoint stores each expert on its own (per-expert `gate_proj` / `up_proj` / `down_proj`),
else they name the one stacked tensor (`experts` / `experts_t`). A stacked HF tensor needs all E
megatron tensors of its layer, so the streams work per group: megatron -> HF asks for the E expert
tensors of one stacked tensor and yields it once (built in place, one expert at a time beside it);
HF -> megatron reads it once and yields its E expert tensors.

Exact padding: where a width does not divide every tensor-parallel size (Qwen2.5-VL's ViT MLP 3420,
InternViT-6B's 25 heads), `Dims.padded_ffn` / `Dims.padded_heads` give the megatron width. MLP
channels and attention heads are padded with zeros in every tensor that touches them (fc1 rows and
biases, fc2 columns; qkv groups, projection columns, norm weights), so they add exactly nothing;
megatron -> HF drops them again. Only MHA towers (num_kv_heads == num_heads) pad heads.

Both directions are pure tensor functions, so HF -> Megatron -> HF is bit-exact by construction
and tested.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Literal

import torch

from eureka_megatron.errors import UserError

Transform = Literal["copy", "pad_vocab", "qkv", "fused_qkv", "concat", "ffn_cols", "head_cols",
                    "head_rows", "experts", "experts_t"]
STACKED = ("experts", "experts_t")  # one HF tensor for all experts of a layer
# (checkpoint key, prepend-axis offsets): ("decoder...", (3,)) for layer 3, (3, 5) for its expert 5
MegatronKey = tuple[str, tuple[int, ...]]


class MappingError(UserError, ValueError):
    """Names that do not map, or shapes that do not fit; the message lists them."""


@dataclass(frozen=True)
class Rule:
    megatron: str             # torch_dist key (layer index implied for per-layer rules)
    hf: tuple[str, ...]       # HF names; "{i}" is replaced by the layer index, "{e}" by the expert's
    transform: Transform = "copy"  # one of the ten above
    per_layer: bool = False
    per_expert: bool = False  # once per (layer, expert); implies per_layer


@dataclass(frozen=True)
class Dims:
    """What the transforms need to know about the model."""

    num_layers: int
    num_heads: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    vocab_size: int = 0
    padded_vocab_size: int = 0
    ffn: int = 0
    padded_ffn: int = 0     # 0: no MLP padding
    padded_heads: int = 0   # 0: no head padding
    num_experts: int = 0    # MoE experts per layer (per-expert rules)

    @property
    def pad_ffn(self) -> int:
        return max(self.padded_ffn - self.ffn, 0) if self.padded_ffn else 0

    @property
    def pad_heads(self) -> int:
        return max(self.padded_heads - self.num_heads, 0) if self.padded_heads else 0


class Mapping:
    """Rules grouped in parts; each part has its model dims and a megatron key prefix (e.g. the
    language model and the vision tower of a VLM). Parts combine with `+`."""

    def __init__(self, rules: Iterable[Rule], dims: Dims, megatron_prefix: str = ""):
        self.parts = [(list(rules), dims, megatron_prefix)]

    def with_prefix(self, megatron_prefix: str) -> "Mapping":
        """The same rules under another megatron key prefix (e.g. a VLM's `language_model.`)."""
        out = Mapping([], self.parts[0][1])
        out.parts = [(rules, dims, megatron_prefix) for rules, dims, _ in self.parts]
        return out

    def __add__(self, other: "Mapping") -> "Mapping":
        out = Mapping([], self.parts[0][1])
        out.parts = self.parts + other.parts
        return out

    # -- enumeration -------------------------------------------------------------------------
    def groups(self) -> Iterable[tuple[Rule, Dims, list[MegatronKey], tuple[str, ...]]]:
        """(rule, dims, megatron keys, HF names): the HF tensors `names` hold exactly the megatron
        tensors `keys` -- one key, except a stacked expert tensor's E keys (expert order)."""
        for rules, dims, prefix in self.parts:
            for rule in rules:
                layers = range(dims.num_layers) if rule.per_layer or rule.per_expert else [None]
                for i in layers:
                    key = prefix + rule.megatron
                    if i is None:
                        yield rule, dims, [(key, ())], rule.hf
                    elif not rule.per_expert:
                        yield rule, dims, [(key, (i,))], tuple(n.format(i=i) for n in rule.hf)
                    elif rule.transform in STACKED:
                        yield (rule, dims, [(key, (i, e)) for e in range(dims.num_experts)],
                               tuple(n.format(i=i) for n in rule.hf))
                    else:
                        for e in range(dims.num_experts):
                            yield rule, dims, [(key, (i, e))], tuple(n.format(i=i, e=e) for n in rule.hf)

    def entries(self) -> Iterable[tuple[Rule, Dims, MegatronKey, tuple[str, ...]]]:
        """(rule, dims, megatron key, the HF names it is made from), one per megatron tensor."""
        for rule, dims, keys, names in self.groups():
            for key in keys:
                yield rule, dims, key, names

    def hf_names(self) -> set[str]:
        return {n for *_, names in self.groups() for n in names}

    # -- HF -> megatron ----------------------------------------------------------------------
    def iter_megatron(self, hf: Callable[[str], torch.Tensor]) -> Iterator[tuple[MegatronKey, torch.Tensor]]:
        """Megatron global tensors one at a time (streaming), reading HF tensors via `hf(name)`
        (a stacked expert tensor once for its E experts). With meta tensors this checks shapes
        without touching any data."""
        for rule, dims, keys, names in self.groups():
            ts = [hf(n) for n in names]
            for key in keys:
                yield key, _checked_to_megatron(rule, dims, key, names, ts)

    def to_megatron(self, hf: Callable[[str], torch.Tensor]) -> dict[MegatronKey, torch.Tensor]:
        """All megatron global tensors, reading HF tensors through `hf(name)`."""
        return dict(self.iter_megatron(hf))

    def source(self, hf: Callable[[str], torch.Tensor],
               expert: Callable[[str, int], tuple[torch.Tensor, int]] | None = None):
        """A `models.init.Source`: each megatron global tensor built on demand from the HF
        tensors it needs, read through `hf(name)` then and dropped after the caller's copy --
        loading holds one tensor at a time, never the model. Stacked expert tensors: with
        `expert(name, e)` (expert e's row of a stacked tensor and how many it stacks, e.g.
        `HFCheckpoint.expert`) only the experts this rank holds are read; without it the last
        two stacked tensors read stay (a layer's gate_up and down, which megatron's experts ask
        for in turn), so each is read once per layer, not once per expert."""
        index = {key: (rule, dims, names) for rule, dims, key, names in self.entries()}
        stacked: dict[str, torch.Tensor] = {}

        def read(name: str, keep: bool) -> torch.Tensor:
            if not keep:
                return hf(name)
            if name not in stacked:
                if len(stacked) >= 2:
                    del stacked[next(iter(stacked))]
                stacked[name] = hf(name)
            return stacked[name]

        def one_expert(rule: Rule, dims: Dims, name: str, e: int) -> torch.Tensor:
            w, count = expert(name, e)
            if count != dims.num_experts:
                raise MappingError(f"{name} stacks {count} experts, the model has "
                                   f"{dims.num_experts}")
            return _expert_to_megatron(rule, w)

        def source(key: str, layer: tuple[int, ...], shape: tuple[int, ...]):
            if (key, layer) not in index:
                raise MappingError(f"the model has {key}{list(layer)}, which the mapping does not "
                                   "produce (wrong family config or layout?)")
            rule, dims, names = index[(key, layer)]
            if rule.transform in STACKED and expert is not None:
                return one_expert(rule, dims, names[0], layer[-1])
            ts = [read(n, rule.transform in STACKED) for n in names]
            return _checked_to_megatron(rule, dims, (key, layer), names, ts)

        return source

    # -- megatron -> HF ----------------------------------------------------------------------
    def iter_hf(self, megatron: Callable[[MegatronKey], torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, full tensor) pairs one megatron tensor at a time (a stacked expert tensor
        after its E experts): the converter's and the weight sync's export stream."""
        for rule, dims, keys, names in self.groups():
            if rule.transform in STACKED:
                yield names[0], _stack_experts(rule, keys, megatron)
            else:
                yield from zip(names, _to_hf(rule, dims, megatron(keys[0]), len(names)))

    def to_hf(self, megatron: dict[MegatronKey, torch.Tensor]) -> dict[str, torch.Tensor]:
        return dict(self.iter_hf(megatron.__getitem__))


def _checked_to_megatron(rule: Rule, dims: Dims, key: MegatronKey, names, ts) -> torch.Tensor:
    try:
        return _to_megatron(rule, dims, ts, key[1])
    except (RuntimeError, IndexError) as e:  # a reshape/cat/index that the shapes do not allow
        shapes = ", ".join(f"{n} {tuple(t.shape)}" for n, t in zip(names, ts))
        raise MappingError(f"{shapes} cannot become {key[0]}{list(key[1])} "
                           f"({rule.transform}): {e}") from None


def _stack_experts(rule: Rule, keys: list[MegatronKey], megatron) -> torch.Tensor:
    """The HF tensor [E, ...] of a layer's experts, filled one expert at a time."""
    out = None
    for e, key in enumerate(keys):
        t = megatron(key)
        if rule.transform == "experts_t":
            t = t.transpose(0, 1)
        if out is None:
            out = torch.empty((len(keys), *t.shape), dtype=t.dtype, device=t.device)
        if out.device.type != "meta":
            out[e].copy_(t)
        del t
    return out


def _interleave(d: Dims, q, k, v) -> torch.Tensor:
    per, hd, g = d.num_heads // d.num_kv_heads, d.head_dim, d.num_kv_heads
    q = q.reshape(g, per * hd, *q.shape[1:])
    k = k.reshape(g, hd, *k.shape[1:])
    v = v.reshape(g, hd, *v.shape[1:])
    return torch.cat([q, k, v], dim=1).reshape(-1, *q.shape[2:])


def _deinterleave(d: Dims, t: torch.Tensor) -> list[torch.Tensor]:
    per, hd, g = d.num_heads // d.num_kv_heads, d.head_dim, d.num_kv_heads
    grouped = t.reshape(g, (per + 2) * hd, *t.shape[1:])
    q, k, v = grouped.split([per * hd, hd, hd], dim=1)
    return [x.reshape(-1, *t.shape[1:]).contiguous() for x in (q, k, v)]


def _pad(t: torch.Tensor, dim: int, extra: int) -> torch.Tensor:
    if not extra:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def _expert_to_megatron(rule: Rule, w: torch.Tensor) -> torch.Tensor:
    """One expert's matrix of a stacked HF tensor as megatron's [out, in]."""
    return w.transpose(0, 1).contiguous() if rule.transform == "experts_t" else w


def _to_megatron(rule: Rule, d: Dims, ts: list[torch.Tensor], offsets: tuple[int, ...] = ()) -> torch.Tensor:
    hd = d.head_dim
    if rule.transform == "copy":
        return ts[0]
    if rule.transform in STACKED:
        (t,) = ts
        if t.shape[0] != d.num_experts:
            raise RuntimeError(f"{t.shape[0]} experts stacked, the model has {d.num_experts}")
        return _expert_to_megatron(rule, t[offsets[-1]])
    if rule.transform == "pad_vocab":
        (w,) = ts
        return _pad(w, 0, d.padded_vocab_size - w.shape[0])
    if rule.transform == "concat":
        return torch.cat([_pad(t, 0, d.pad_ffn) for t in ts])
    if rule.transform == "ffn_cols":
        return _pad(ts[0], 1, d.pad_ffn)
    if rule.transform == "head_cols":
        return _pad(ts[0], 1, d.pad_heads * hd)
    if rule.transform == "head_rows":
        return _pad(ts[0], 0, d.pad_heads * hd)
    if rule.transform == "qkv":
        return _pad(_interleave(d, *ts), 0, d.pad_heads * 3 * hd)
    if rule.transform == "fused_qkv":
        q_rows = d.num_heads * hd
        kv_rows = d.num_kv_heads * hd
        return _pad(_interleave(d, *ts[0].split([q_rows, kv_rows, kv_rows])), 0, d.pad_heads * 3 * hd)
    raise MappingError(f"unknown transform {rule.transform!r}")


def _to_hf(rule: Rule, d: Dims, t: torch.Tensor, n: int) -> list[torch.Tensor]:
    hd = d.head_dim
    if rule.transform == "copy":
        return [t]
    if rule.transform == "pad_vocab":
        return [t[: d.vocab_size]]
    if rule.transform == "concat":
        return [c[: c.shape[0] - d.pad_ffn] for c in t.chunk(n)]
    if rule.transform == "ffn_cols":
        return [t[:, : t.shape[1] - d.pad_ffn]]
    if rule.transform == "head_cols":
        return [t[:, : d.num_heads * hd]]
    if rule.transform == "head_rows":
        return [t[: d.num_heads * hd]]
    real = t[: t.shape[0] - d.pad_heads * 3 * hd]
    if rule.transform == "qkv":
        return _deinterleave(d, real)
    if rule.transform == "fused_qkv":
        return [torch.cat(_deinterleave(d, real))]
    raise MappingError(f"unknown transform {rule.transform!r}")
