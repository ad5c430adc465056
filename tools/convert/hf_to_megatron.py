#!/usr/bin/env python
"""HF -> megatron torch_dist: `python tools/convert/hf_to_megatron.py --hf DIR --out DIR [--dtype bf16]`.

The same command as `eureka-megatron convert hf-to-megatron`; see `--help`.
"""
import sys

from eureka_megatron.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", "hf-to-megatron", *sys.argv[1:]]))
