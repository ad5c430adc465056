"""Triton kernels and their torch references, installed as `eureka_megatron.kernels`.

The source lives in the top-level `kernels/` directory (a top-level import name `kernels` would
collide with another PyPI package).
"""
