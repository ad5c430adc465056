"""Shared test setup: markers, and skipping GPU/SGLang tests where they cannot run."""
import importlib.util
import os

import pytest
import torch

# Without a GPU the Triton kernels run in the interpreter, which must be chosen before triton is
# first imported -- and transformers' image processors import it. Set here, before any test module
# is collected, so the kernel tests do not depend on collection order.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    no_sglang = pytest.mark.skip(reason="needs sglang installed")
    have_sglang = importlib.util.find_spec("sglang") is not None
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        if "sglang" in item.keywords and not have_sglang:
            item.add_marker(no_sglang)
