"""The source tree's top-level `kernels/` (installed as `eureka_megatron.kernels`) never shadows the
PyPI package `kernels` that transformers imports, even with the tree on sys.path."""
import importlib.metadata
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _from_root(code: str) -> subprocess.CompletedProcess:
    """`python -c` in the repository root: the tree's `kernels/` comes first on sys.path."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)


def test_eureka_kernels_import_from_the_tree():
    from eureka_megatron.kernels import logprob

    assert Path(logprob.__file__).parent == ROOT / "kernels"


def test_top_level_kernels_is_the_pypi_package_from_the_repository_root():
    r = _from_root("import kernels; print(kernels.__file__)")
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:  # not installed: a clear ImportError
        assert r.returncode != 0 and "eureka_megatron's kernels" in r.stderr
        return
    assert r.returncode == 0, r.stderr
    assert not r.stdout.startswith(str(ROOT / "kernels")), r.stdout
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers not installed")
    r = _from_root("import transformers.activations")  # imports the hub kernels integration
    assert r.returncode == 0, r.stderr[-2000:]
