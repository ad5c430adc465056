"""Shared test setup: markers, and skipping GPU/SGLang tests where they cannot run."""
import importlib.util

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    no_sglang = pytest.mark.skip(reason="needs sglang installed")
    have_sglang = importlib.util.find_spec("sglang") is not None
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        if "sglang" in item.keywords and not have_sglang:
            item.add_marker(no_sglang)
