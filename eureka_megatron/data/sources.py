"""Where a run's rows come from: the configured JSONL, or the embedded synthetic dataset
(materialised once as plain JSONL + PNGs under the run directory, so both paths are the same
loader), and the prompt builder configured for the model family."""
from __future__ import annotations

import json
from pathlib import Path

from eureka_megatron.config import RLConfig
from eureka_megatron.data.chat import R1_SYSTEM_PROMPT, R1_ZERO_SYSTEM_PROMPT
from eureka_megatron.data.dataset import PromptBuilder
from eureka_megatron.data.jsonl import load_rows
from eureka_megatron.data.synthetic import synthetic_dataset, write_jsonl
from eureka_megatron.models.registry import family_named


def _synthetic(cfg: RLConfig, split: str, n: int) -> Path:
    d = cfg.data
    out = Path(cfg.output.dir) / "data" / f"{split}-{n}-{'+'.join(d.synthetic_tasks)}-{d.image_size}"
    if not (out / "data.jsonl").is_file():
        write_jsonl(synthetic_dataset(n, split, seed=cfg.train.seed, tasks=d.synthetic_tasks,
                                      image_size=d.image_size), out)
    return out


def train_rows(cfg: RLConfig):
    src = cfg.data.train or _synthetic(cfg, "train", cfg.data.synthetic_size)
    return load_rows(src, cfg.data.format)  # rows + the rows skipped as bad


def eval_rows(cfg: RLConfig):
    if cfg.eval.interval <= 0:
        return []
    src = cfg.eval.data or _synthetic(cfg, "heldout", cfg.eval.size)
    return load_rows(src, cfg.data.format).rows[:cfg.eval.size]


def system_prompt(cfg: RLConfig) -> str | None:
    sp = cfg.data.system_prompt
    return {"r1": R1_SYSTEM_PROMPT, "r1-zero": R1_ZERO_SYSTEM_PROMPT}.get(sp, sp)


def prompt_builder(cfg: RLConfig, family: str, tokenizer) -> PromptBuilder:
    """The builder for the policy's family, with the image options the checkpoint sets
    (InternVL tiles at its own size)."""
    d = cfg.data
    fam = family_named(family)
    config_file = cfg.model.hf_dir / "config.json"
    extra = fam.image_options_from_hf(json.loads(config_file.read_text())) if config_file.is_file() else {}
    options = dict(min_pixels=d.min_pixels, max_pixels=d.max_pixels, max_tiles=d.max_tiles,
                   use_thumbnail=d.use_thumbnail) | extra
    return PromptBuilder(fam, tokenizer, system_prompt=system_prompt(cfg),
                         max_prompt_length=d.max_prompt_length, **options)
