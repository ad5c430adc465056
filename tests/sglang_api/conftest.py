"""The `sglang_api` tier: our client against SGLang 0.5.23's real server code, on a CPU.

Runs only in the venv made by tools/install-sglang-api.sh (SGLang's Python code, CPU torch):
    .venv-sglang/bin/python -m pytest -q tests/sglang_api -p no:cacheprovider
In any other venv (no sglang) every test here is skipped.

SGLang's server modules import a few GPU-only or native packages at module level. Before anything
imports sglang, they are stubbed in sys.modules, and `importlib.util.find_spec` keeps answering
"absent" for them, because SGLang and transformers probe with find_spec to pick code paths:
- torchvision: imported by sglang.srt.multimodal.internvl_utils (a config module on every import
  path) and qwen_vl.py (used there only for video). Stub submodules transforms, transforms.functional,
  transforms.v2(.functional), io; any attribute is a placeholder class; InterpolationMode is an Enum.
- tvm_ffi: sglang.kernels' JIT wrappers subclass `tvm_ffi.Object` at import; placeholder classes.
- xgrammar: `from xgrammar import StructuralTag` (function-call detectors, OpenAI protocol); the
  names are placeholder pydantic models so the OpenAI protocol's pydantic schemas still build.
- uvloop: `asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())` at import -> asyncio's default.
- setproctitle, sentencepiece, soundfile: empty modules (imported, never called on these paths).
Also, with the repository root on sys.path (pytest), find_spec("kernels") would find this tree's
kernels/ (eureka_megatron.kernels' source), which refuses a top-level import when Hugging Face's
`kernels` is not installed; transformers probes that name at import, so find_spec("kernels") answers
for the installed package only, as kernels/__init__.py intends.
"""
from __future__ import annotations

import asyncio
import enum
import importlib.machinery
import importlib.util
import os
import sys
import types
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
STUBBED = ("torchvision", "tvm_ffi", "sentencepiece", "uvloop", "setproctitle", "xgrammar",
           "soundfile")
SUBMODULES = {"torchvision": ("transforms", "transforms.functional", "transforms.v2",
                              "transforms.v2.functional", "io"),
              "xgrammar": ("structural_tag",)}
# Probed before the stubs exist, so a stub never answers for SGLang itself.
SGLANG_AVAILABLE = importlib.util.find_spec("sglang") is not None
SKIP_REASON = ("sglang is not installed in this venv: the sglang_api tier runs in .venv-sglang "
               "(bash tools/install-sglang-api.sh)")
_real_find_spec = importlib.util.find_spec


def _find_spec(name, package=None):
    """importlib.util.find_spec, answering None ("not installed") for the stubbed packages."""
    if name.split(".")[0] in STUBBED:
        return None
    if name == "kernels":
        path = [p for p in sys.path if Path(p or os.curdir).resolve() != REPO]
        return importlib.machinery.PathFinder.find_spec("kernels", path)
    return _real_find_spec(name, package)


class InterpolationMode(enum.Enum):
    """torchvision.transforms.InterpolationMode's members (referenced at import time only)."""
    NEAREST = "nearest"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"


def _placeholder_classes(module_name: str):
    cache: dict[str, type] = {}

    def __getattr__(attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        if attr not in cache:
            cache[attr] = type(attr, (), {"__module__": module_name,
                                          "__init__": lambda self, *a, **k: None})
        return cache[attr]
    return __getattr__


def _placeholder_models(module_name: str):
    import pydantic

    cache: dict[str, type] = {}

    def __getattr__(attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        if attr not in cache:
            cache[attr] = type(attr, (pydantic.BaseModel,), {
                "__module__": module_name, "model_config": pydantic.ConfigDict(extra="allow")})
        return cache[attr]
    return __getattr__


def install_gpu_import_stubs() -> None:
    """Put the stubs in sys.modules (idempotent); see the module docstring for each one."""
    if importlib.util.find_spec is _find_spec:
        return
    for top in STUBBED:
        for name in (top, *(f"{top}.{sub}" for sub in SUBMODULES.get(top, ()))):
            module = types.ModuleType(name)
            module.__path__ = []  # a package, so `import torchvision.transforms` resolves
            if top in ("torchvision", "tvm_ffi"):
                module.__getattr__ = _placeholder_classes(name)
            elif top == "xgrammar":
                module.__getattr__ = _placeholder_models(name)
            sys.modules[name] = module
            parent, _, child = name.rpartition(".")
            if parent:
                setattr(sys.modules[parent], child, module)
    sys.modules["torchvision.transforms"].InterpolationMode = InterpolationMode
    sys.modules["torchvision.transforms.functional"].InterpolationMode = InterpolationMode
    sys.modules["uvloop"].EventLoopPolicy = asyncio.DefaultEventLoopPolicy
    sys.modules["uvloop"].install = lambda: None
    sys.modules["setproctitle"].setproctitle = lambda *a, **k: None
    importlib.util.find_spec = _find_spec


if SGLANG_AVAILABLE:
    install_gpu_import_stubs()


def pytest_collection_modifyitems(config, items):
    """Every test under tests/sglang_api is `sglang_api`; all skip where sglang is absent."""
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.sglang_api)
            if not SGLANG_AVAILABLE:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def qwen_vl_dir(tmp_path_factory) -> str:
    """A complete tiny Qwen2.5-VL HF checkpoint (tokenizer, chat template, image processor)."""
    from eureka_megatron.trainer.demo import write_tiny_checkpoint

    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("sglang_api") / "qwen2_5_vl"))


@pytest.fixture(scope="session")
def internvl_dir(tmp_path_factory) -> str:
    """A tiny InternVL checkpoint in the original InternVLChatModel layout SGLang's processor reads."""
    from tests.sglang_api.sglang_app import write_internvl_checkpoint

    return str(write_internvl_checkpoint(tmp_path_factory.mktemp("sglang_api") / "internvl"))
