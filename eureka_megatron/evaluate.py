"""`eureka-megatron eval`: greedy accuracy and pass@k of a checkpoint on JSONL prompt sets.

Graded by the rule-based judge the RL rewards use (math-verify accuracy + format; `--judge`
swaps in any `module:function` with the reward seam), so the number compared across checkpoints
is the one the policy was trained for, offline and reproducible -- MM-Eureka's own evaluation
needs a GPT-4o extractor. Rows come in any format the trainer reads; results are broken down by
source (a `source`/`data_source`/`dataset`/`category`/`subject`/`task` field of the rows, or
the file when several are given). Megatron checkpoints (converted dirs, training step or run
dirs) are converted to HF in a temporary directory first, with the converter's own checks.

Writes OUT/results.json, OUT/results.md and OUT/samples.jsonl (every response with its scores).
"""
from __future__ import annotations

import datetime
import json
import logging
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from eureka_megatron.atomic import write_text_atomic
from eureka_megatron.config import DEFAULT_REWARD, from_dict
from eureka_megatron.data.chat import R1_SYSTEM_PROMPT
from eureka_megatron.data.jsonl import load_rows
from eureka_megatron.errors import InputNotFoundError, UserError
from eureka_megatron.models.images import preprocessor_config
from eureka_megatron.rewards.pool import RewardPool, resolve_function

logger = logging.getLogger(__name__)

SOURCE_FIELDS = ("source", "data_source", "dataset", "category", "subject", "task")
ENGINES = ("hf", "sglang")


class EvalError(UserError, ValueError):
    """Unusable eval input: a model dir that is neither HF nor megatron, no usable row, ..."""


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k)
    (Chen et al. 2021), the chance that k samples drawn without replacement hold a correct one."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


# --- the model -----------------------------------------------------------------------------------


def model_format(path: Path) -> str:
    """"hf" (config.json + safetensors) or "megatron" (torch_dist step/run/converted dir)."""
    from eureka_megatron.trainer.checkpoint import LATEST

    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return "hf"
    if (path / LATEST).is_file() or (path / ".metadata").is_file():
        return "megatron"
    if not path.exists():
        raise InputNotFoundError(f"--model {path}: does not exist")
    raise EvalError(f"--model {path}: neither an HF checkpoint (config.json + *.safetensors) nor a "
                    "megatron torch_dist checkpoint (a converted dir, a step_* dir or a run dir)")


def hf_model_dir(path: Path, hf_config: Path | None, scratch: Path, progress: bool) -> Path:
    """The HF directory to serve: `path` itself, or its megatron weights converted under
    `scratch` (the HF side files come from PATH/hf or --hf-config)."""
    from eureka_megatron.convert.run import megatron_to_hf
    from eureka_megatron.trainer.checkpoint import resolve_checkpoint

    if model_format(path) == "hf":
        return path
    step_dir = resolve_checkpoint(path)
    if hf_config is None and not (step_dir / "hf" / "config.json").is_file():
        raise EvalError(f"--model {path}: a megatron checkpoint without its HF side files; pass "
                        "--hf-config DIR (the HF checkpoint it was trained from: config.json and "
                        "tokenizer)")
    out = scratch / "hf"
    info = megatron_to_hf(step_dir, out, hf_config_dir=hf_config, progress=progress)
    logger.info("converted %s to HF (%s, %.1fs)", step_dir, info["layout"], info["seconds"])
    return out


# --- the prompts ---------------------------------------------------------------------------------


@dataclass
class EvalItem:
    item: object       # data.dataset.PromptItem
    group: str         # the source it is reported under


def group_of(row, field_name: str | None, file_label: str | None) -> str:
    if field_name:
        value = row.meta.get(field_name)
        return str(value) if value is not None else "(none)"
    return file_label or "all"


def source_field(rows, requested: str | None) -> str | None:
    """The row field the breakdown uses: --group-by, else the first of SOURCE_FIELDS present."""
    if requested:
        if not any(requested in r.meta for r in rows):
            raise EvalError(f"--group-by {requested}: no row has a {requested!r} field "
                            f"(fields: {', '.join(sorted({k for r in rows for k in r.meta})) or 'none'})")
        return requested
    return next((f for f in SOURCE_FIELDS if any(f in r.meta for r in rows)), None)


def load_items(data: list[Path], hf_dir: Path, *, system_prompt: str | None, group_by: str | None,
               max_prompt_length: int, limit: int | None,
               engine: str = "hf") -> tuple[list[EvalItem], list[str]]:
    """Built prompts with their report group, and the reasons of the rows skipped; images
    preprocessed as `engine` will (SGLang: its own tiling rules)."""
    from transformers import AutoTokenizer

    from eureka_megatron.data.dataset import PromptBuilder
    from eureka_megatron.models.registry import FAMILIES, family_for

    config = json.loads((hf_dir / "config.json").read_text())
    family = family_for(config, str(hf_dir / "config.json"))
    if not family.is_vlm:
        vlms = ", ".join(f.name for f in FAMILIES if f.is_vlm)
        raise EvalError(f"{hf_dir}: eval serves the VLM families ({vlms}); "
                        f"this checkpoint is {config.get('model_type')!r}")
    options = family.image_options_from_hf(config, preprocessor_config(hf_dir))
    if engine == "sglang":
        options = family.sglang_image_options(options, config)
    builder = PromptBuilder(family, AutoTokenizer.from_pretrained(str(hf_dir)),
                            system_prompt=system_prompt, max_prompt_length=max_prompt_length,
                            **options)
    loaded = [(path, load_rows(path)) for path in data]
    rows = [r for _, lr in loaded for r in lr.rows]
    skipped = [f"{s.source}: {s.reason}" for _, lr in loaded for s in lr.skipped]
    field_name = source_field(rows, group_by)
    labels = {str(p): Path(p).stem for p in data} if len(data) > 1 else {}
    items = []
    for path, lr in loaded:
        for row in lr.rows:
            if limit is not None and len(items) >= limit:
                break
            try:
                items.append(EvalItem(builder.build(row), group_of(row, field_name, labels.get(str(path)))))
            except ValueError as e:  # DataError: corrupt image, prompt too long
                skipped.append(str(e))
    if not items:
        raise EvalError(f"no usable row in {', '.join(map(str, data))}"
                        + (f" ({len(skipped)} skipped; first: {skipped[0]})" if skipped else ""))
    return items, skipped


# --- generation and grading ----------------------------------------------------------------------


@dataclass
class Record:
    """One prompt's responses and scores (a line of samples.jsonl)."""
    id: str
    row: str
    group: str
    answer: str
    greedy: dict = field(default_factory=dict)       # text, accuracy, format, tokens, finish
    sampled: list[dict] = field(default_factory=list)


def _graded(samples, scored) -> list[dict]:
    acc = scored.scores.get("accuracy")
    fmt = scored.scores.get("format")
    if acc is None:
        raise EvalError("the judge returned no 'accuracy' score (a reward function returning "
                        "{'accuracy': 0|1, ...} is expected)")
    return [{"text": s.text, "accuracy": float(acc[i]),
             "format": float(fmt[i]) if fmt is not None else None,
             "tokens": len(s.token_ids), "finish": s.finish_reason}
            for i, s in enumerate(samples)]


def generate_and_grade(engine, pool, items: list[EvalItem], *, samples: int, temperature: float,
                       top_p: float, max_new_tokens: int, batch_size: int, seed: int,
                       progress: bool) -> list[Record]:
    from eureka_megatron.rollout.engine import SamplingParams

    greedy = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens).validate()
    records: list[Record] = []
    bar = tqdm(total=len(items), desc="eval", unit="prompt", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        prompts = [e.item.prompt for e in chunk]
        outs = engine.generate(prompts, 1, greedy)
        sampled = []
        if samples > 1:
            params = SamplingParams(temperature=temperature, top_p=top_p,
                                    max_new_tokens=max_new_tokens, seed=seed + start).validate()
            sampled = engine.generate(prompts, samples, params)
        every = list(outs) + list(sampled)
        reps = samples if sampled else 0
        answers = [e.item.answer for e in chunk]
        metas = [e.item.meta for e in chunk]
        scored = pool.score([s.text for s in every],
                            answers + [a for a in answers for _ in range(reps)],
                            metas + [m for m in metas for _ in range(reps)])
        graded = _graded(every, scored)
        for i, e in enumerate(chunk):
            records.append(Record(id=e.item.row_id, row=e.item.source, group=e.group,
                                  answer=e.item.answer, greedy=graded[i],
                                  sampled=graded[len(chunk) + i * samples:len(chunk) + (i + 1) * samples]
                                  if sampled else []))
        bar.update(len(chunk))
        bar.set_postfix(acc=f"{sum(r.greedy['accuracy'] for r in records) / len(records):.3f}")
    bar.close()
    return records


def summarize(records: list[Record], samples: int) -> dict:
    """Greedy accuracy/format, pass@1 and pass@k (unbiased, from `samples` draws), response length."""

    def mean(xs):
        xs = [x for x in xs if x is not None]
        return sum(xs) / len(xs) if xs else None

    out = {"n": len(records),
           "greedy_accuracy": mean(r.greedy["accuracy"] for r in records),
           "greedy_format": mean(r.greedy["format"] for r in records),
           "greedy_tokens": mean(r.greedy["tokens"] for r in records),
           "greedy_truncated": mean(float(r.greedy["finish"] == "length") for r in records)}
    if samples > 1:
        correct = [sum(s["accuracy"] > 0.5 for s in r.sampled) for r in records]
        out["pass@1"] = mean(pass_at_k(samples, c, 1) for c in correct)
        out[f"pass@{samples}"] = mean(pass_at_k(samples, c, samples) for c in correct)
        out["sampled_format"] = mean(s["format"] for r in records for s in r.sampled)
    return out


def breakdown(records: list[Record], samples: int) -> dict:
    groups: dict[str, list[Record]] = {}
    for r in records:
        groups.setdefault(r.group, []).append(r)
    return {g: summarize(rs, samples) for g, rs in sorted(groups.items())}


def markdown(results: dict) -> str:
    k = results["samples"]
    cols = ["source", "n", "greedy acc", "format"] + (["pass@1", f"pass@{k}"] if k > 1 else []) \
        + ["tokens", "truncated"]
    keys = ["n", "greedy_accuracy", "greedy_format"] + (["pass@1", f"pass@{k}"] if k > 1 else []) \
        + ["greedy_tokens", "greedy_truncated"]

    def fmt(v):
        if v is None:
            return "-"
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    rows = list(results["by_source"].items()) if len(results["by_source"]) > 1 else []
    for name, s in rows + [("**all**", results["overall"])]:
        lines.append("| " + " | ".join([name] + [fmt(s.get(c)) for c in keys]) + " |")
    return "\n".join(lines)


# --- the command ---------------------------------------------------------------------------------


@dataclass
class EvalRunConfig:
    """Everything `eureka-megatron eval` takes; the field names are the CLI's flags."""
    model: str
    data: list[str]
    out: str | None = None           # default: runs/eval/MODEL__DATA
    engine: str = "hf"
    samples: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 1024
    batch_size: int = 32
    system_prompt: str | None = "r1"  # "r1", None (no system prompt) or the text
    group_by: str | None = None
    limit: int | None = None
    judge: str = DEFAULT_REWARD
    hf_config: str | None = None
    sglang_url: str | None = None
    tp: int = 1
    max_prompt_length: int = 8192
    workers: int = 2
    seed: int = 0
    progress: bool = True

    def validate(self) -> "EvalRunConfig":
        if self.engine not in ENGINES:
            raise EvalError(f"--engine {self.engine!r}: expected one of {', '.join(ENGINES)}")
        if not self.data:
            raise EvalError("--data: give at least one JSONL file")
        for name in ("samples", "batch_size", "max_new_tokens", "tp", "max_prompt_length",
                     "workers"):
            if getattr(self, name) < 1:
                raise EvalError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.limit is not None and self.limit < 1:
            raise EvalError(f"--limit must be >= 1, got {self.limit}")
        if self.samples > 1 and not self.temperature > 0:
            raise EvalError(f"--samples {self.samples} needs --temperature > 0 (pass@k of "
                            "identical greedy samples is the greedy accuracy)")
        if not 0 < self.top_p <= 1:
            raise EvalError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.out is None:
            self.out = str(Path("runs/eval") / f"{Path(self.model).name}__{Path(self.data[0]).stem}")
        return self


def load_eval_config(values: dict) -> EvalRunConfig:
    """Typed and validated like a training config: unknown keys and wrong types name the key."""
    return from_dict(EvalRunConfig, values, "eval").validate()


def run_eval(cfg: EvalRunConfig) -> dict:
    """Evaluate `cfg.model` on `cfg.data`; writes OUT/results.{json,md} and OUT/samples.jsonl."""
    from eureka_megatron.rollout.factory import build_engine

    cfg.validate()
    resolve_function(cfg.judge)  # a typo fails before the model loads
    data = [Path(p) for p in cfg.data]
    for p in data:
        if not (p.is_file() or (p / "data.jsonl").is_file()):
            raise InputNotFoundError(f"--data {p}: no such JSONL file")
    model, out = Path(cfg.model), Path(cfg.out)
    fmt = model_format(model)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix=".eval-", dir=out))
    eng = pool = None
    try:
        hf_dir = hf_model_dir(model, Path(cfg.hf_config) if cfg.hf_config else None, scratch,
                              cfg.progress)
        sp = R1_SYSTEM_PROMPT if cfg.system_prompt == "r1" else cfg.system_prompt
        items, skipped = load_items(data, hf_dir, system_prompt=sp, group_by=cfg.group_by,
                                    engine=cfg.engine,
                                    max_prompt_length=cfg.max_prompt_length, limit=cfg.limit)
        for reason in skipped[:10]:
            logger.warning("skipped %s", reason)
        # a --judge of the user's may be stochastic: only the rule-based one is memoized
        pool = RewardPool([cfg.judge], num_workers=cfg.workers, memoize=cfg.judge == DEFAULT_REWARD)
        # bf16 on a GPU, fp32 on the CPU: eval has no trainer whose numerics to match
        eng = build_engine(cfg.engine, hf_dir, dtype="auto", sglang_url=cfg.sglang_url,
                           launch={"tp": cfg.tp})
        records = generate_and_grade(eng, pool, items, samples=cfg.samples,
                                     temperature=cfg.temperature, top_p=cfg.top_p,
                                     max_new_tokens=cfg.max_new_tokens,
                                     batch_size=cfg.batch_size, seed=cfg.seed,
                                     progress=cfg.progress)
    finally:
        if pool is not None:
            pool.close()
        if eng is not None and hasattr(eng, "shutdown") and not cfg.sglang_url:
            eng.shutdown()
        shutil.rmtree(scratch, ignore_errors=True)
    results = {
        "model": str(model), "model_format": fmt, "data": [str(p) for p in data],
        "engine": cfg.engine, "judge": cfg.judge, "samples": cfg.samples,
        "temperature": cfg.temperature if cfg.samples > 1 else 0.0, "top_p": cfg.top_p,
        "max_new_tokens": cfg.max_new_tokens, "system_prompt": cfg.system_prompt,
        "seed": cfg.seed,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - t0, 2), "skipped_rows": len(skipped),
        "overall": summarize(records, cfg.samples),
        "by_source": breakdown(records, cfg.samples),
    }
    write_text_atomic(out / "samples.jsonl",
                      "".join(json.dumps(r.__dict__) + "\n" for r in records))
    write_text_atomic(out / "results.json", json.dumps(results, indent=1))
    write_text_atomic(out / "results.md", f"{model} on {', '.join(map(str, data))} ({cfg.engine} "
                      f"engine, {cfg.samples} sample(s), max {cfg.max_new_tokens} new tokens)\n\n"
                      f"{markdown(results)}\n")
    return results
