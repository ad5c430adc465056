#!/usr/bin/env python
"""megatron torch_dist -> HF: `python tools/convert/megatron_to_hf.py --megatron DIR --out DIR`.

The same command as `eureka-megatron convert megatron-to-hf`; see `--help`.
"""
import sys

from eureka_megatron.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", "megatron-to-hf", *sys.argv[1:]]))
