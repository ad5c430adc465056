"""eureka-megatron: rule-based RL for vision-language reasoning on Megatron-core.

torch is deliberately unpinned here (>=2.6): CPU machines pin the local CPU wheel through
`tools/install.sh`, GPU clusters keep the CUDA torch of their container.
"""
import sys

from setuptools import find_packages, setup

install_requires = [
    "torch>=2.6",
    "megatron-core>=0.16,<0.17",
    "transformers>=5.17",
    "safetensors",
    "numpy",
    # megatron's dist_checkpointing writer calls psutil in a forked worker and hangs without it.
    "psutil",
    "pillow",
    "ray",
    "math-verify",
    # math-verify's LaTeX parser; named directly because older pips drop its `antlr4_13_2` extra.
    "antlr4-python3-runtime==4.13.2",
    "sympy",
    "tensorboard",
    "matplotlib",  # the run report's PNG plots (the demo promises them)
    "pyyaml",
    "requests",  # the SGLang client (ray installs it too)
    "tqdm",
    "packaging",
]
if sys.platform.startswith("linux"):
    install_requires.append("triton")

setup(
    name="eureka-megatron",
    version="0.1.0",
    description="Rule-based RL (GRPO family) for vision-language reasoning on Megatron-core",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["eureka_megatron", "eureka_megatron.*"]) + ["eureka_megatron.kernels"],
    package_dir={"eureka_megatron.kernels": "kernels"},
    package_data={"eureka_megatron.trainer": ["demo_cpu.yaml"]},  # `demo` reads it installed too
    install_requires=install_requires,
    extras_require={
        # NVIDIA apex is a from-source CUDA build (see README); the PyPI package "apex" is unrelated.
        "gpu": ["transformer-engine[pytorch]", "nvidia-dali-cuda120", "sglang"],
        "test": ["pytest>=8", "pytest-timeout", "pytest-xdist>=3.8"],
    },
    entry_points={"console_scripts": ["eureka-megatron=eureka_megatron.cli:main"]},
)
