"""Where a run's rows come from: the configured JSONL, or the embedded synthetic dataset
(materialised once as plain JSONL + PNGs under the run directory, so both paths are the same
loader), and the prompt builder configured for the model family."""
from __future__ import annotations

import json
from pathlib import Path

from eureka_megatron.config import ConfigError, RLConfig
from eureka_megatron.data.chat import R1_SYSTEM_PROMPT, R1_ZERO_SYSTEM_PROMPT
from eureka_megatron.data.dataset import PromptBuilder
from eureka_megatron.data.jsonl import load_rows
from eureka_megatron.data.synthetic import synthetic_dataset, write_jsonl
from eureka_megatron.models.images import preprocessor_config
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


def image_options(cfg: RLConfig, family: str) -> dict:
    """The `ImageOptions` of a run: the run's tiling switches, then what the checkpoint sets
    (`Family.image_options_from_hf` on model.hf's config.json and preprocessor_config.json:
    InternVL's tile size, Qwen3-VL's patch geometry, the Qwen families' pixel range), then data.min_pixels / max_pixels where the run sets them
    (null: the checkpoint's range, else ImageOptions' Qwen2.5-VL default). The engines
    preprocess with the checkpoint's processor config, so its range keeps the trainer's image
    token counts equal to theirs; with SGLang engines, the options follow its processor's own
    rules, and what it cannot follow is refused (`Family.sglang_image_options`)."""
    d = cfg.data
    fam = family_named(family)
    config_file = cfg.model.hf_dir / "config.json"
    hf_config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    checkpoint = (fam.image_options_from_hf(hf_config, preprocessor_config(cfg.model.hf_dir))
                  if hf_config else {})
    run = {k: v for k, v in (("min_pixels", d.min_pixels), ("max_pixels", d.max_pixels))
           if v is not None}
    options = dict(max_tiles=d.max_tiles, use_thumbnail=d.use_thumbnail) | checkpoint | run
    lo, hi = options.get("min_pixels"), options.get("max_pixels")
    if lo is not None and hi is not None and lo > hi:
        raise ConfigError(f"the image pixel range is empty: min_pixels {lo} > max_pixels {hi} "
                          f"(data.min_pixels={d.min_pixels}, data.max_pixels={d.max_pixels}, the "
                          f"checkpoint's {checkpoint.get('min_pixels')}..{checkpoint.get('max_pixels')}):"
                          " set both data.min_pixels and data.max_pixels")
    if cfg.rollout.engine == "sglang":
        options = fam.sglang_image_options(options, hf_config)
    return options


def prompt_builder(cfg: RLConfig, family: str, tokenizer) -> PromptBuilder:
    """The builder for the policy's family, with the run's image options (`image_options`)."""
    return PromptBuilder(family_named(family), tokenizer, system_prompt=system_prompt(cfg),
                         max_prompt_length=cfg.data.max_prompt_length,
                         **image_options(cfg, family))
