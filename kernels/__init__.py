"""Triton kernels and their torch references, installed as `eureka_megatron.kernels`.

The source lives in the top-level `kernels/` directory (a top-level import name `kernels` would
collide with another PyPI package). Where the source tree itself is on `sys.path` (`python -m`
or pytest from the repository root), `import kernels` finds this directory first; it then hands
over to the PyPI package of that name (transformers imports Hugging Face's `kernels`), so the
tree never shadows it.
"""
if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _tree = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _tree]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _path)
    if _spec is None:
        raise ModuleNotFoundError("No module named 'kernels' (this directory is eureka_megatron's "
                                  "kernels, imported as eureka_megatron.kernels)", name="kernels")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module  # the import statement returns this module
    _spec.loader.exec_module(_module)
