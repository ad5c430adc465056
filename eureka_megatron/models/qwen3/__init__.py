"""Qwen3 dense text models (Qwen3ForCausalLM): Qwen2's decoder without the qkv bias, with
per-head q/k RMSNorm and a head_dim of its own. The LLM of Qwen3-VL and InternVL3.5."""
from __future__ import annotations

from eureka_megatron.models.qwen2 import causal_lm_family

FAMILY = causal_lm_family("qwen3", "Qwen3ForCausalLM")
