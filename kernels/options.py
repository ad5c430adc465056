"""The kernels' option names as `Literal` types, torch-free: the config loader checks YAML values
against them, so the names a config accepts are exactly the ones the kernels implement."""
from __future__ import annotations

from typing import Literal, get_args

Agg = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
KLType = Literal["k1", "k2", "k3"]
Backend = Literal["triton", "torch"]

AGGS: tuple[str, ...] = get_args(Agg)
KL_TYPES: tuple[str, ...] = get_args(KLType)
BACKENDS: tuple[str, ...] = get_args(Backend)
