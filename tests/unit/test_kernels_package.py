"""The source tree's top-level `kernels/` (installed as `eureka_megatron.kernels`) never shadows the
PyPI package `kernels` that transformers imports, even with the tree on sys.path."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_eureka_kernels_import_from_the_tree():
    from eureka_megatron.kernels import logprob

    assert Path(logprob.__file__).parent == ROOT / "kernels"


def test_top_level_kernels_is_the_pypi_package_from_the_repository_root():
    code = ("import kernels, importlib.metadata as m; print(kernels.__file__); "
            "print(m.version('kernels'))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers not installed")
    try:
        import importlib.metadata as m

        m.version("kernels")
    except m.PackageNotFoundError:
        assert r.returncode != 0 and "eureka_megatron's kernels" in r.stderr
        return
    assert r.returncode == 0, r.stderr
    assert not r.stdout.startswith(str(ROOT / "kernels")), r.stdout
    # transformers' own import of it (its image processors pull in hub kernels) works here too
    r = subprocess.run([sys.executable, "-c", "import transformers.activations"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
