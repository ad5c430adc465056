"""`eureka-megatron`: the command line.

Every command validates its inputs (config, layout, checkpoint) in this process before any rank
starts, then runs its ranks: under torchrun the current process is one rank; otherwise `--nproc`
(or `parallel.nproc`) ranks are spawned on this machine.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from eureka_megatron import __version__

EPILOG = """\
examples:
  eureka-megatron demo                                           # the CPU RL demo (< 10 min)
  eureka-megatron train examples/demo_cpu.yaml model.hf=DIR --dry-run
  eureka-megatron train-lm examples/tiny_lm.yaml                 # tiny LLM, 1 CPU rank
  eureka-megatron train-lm examples/tiny_lm.yaml parallel.tensor_parallel=2 parallel.nproc=2
  eureka-megatron train-lm examples/tiny_lm.yaml --dry-run       # validate + print the layout
  eureka-megatron train-lm CFG.yaml checkpoint.load=runs/lm      # resume (any TP/PP layout)
  torchrun --nproc-per-node 8 -m eureka_megatron.cli train-lm CFG.yaml parallel.tensor_parallel=8
  eureka-megatron convert hf-to-megatron --hf Qwen2.5-VL-7B-Instruct --out ckpt/qwen25vl7b
  eureka-megatron forward --megatron ckpt/qwen25vl7b --inputs in.pt --out out.pt --tp 2 --pp 2
  eureka-megatron forward --megatron runs/x/step_00000100 --inputs in.pt --out e.pt --tp 2 --engine hf
  eureka-megatron convert megatron-to-hf --megatron runs/x/step_00000100 --out hf_out
  eureka-megatron eval --model runs/demo/hf_final --data heldout.jsonl --samples 8   # accuracy, pass@8
  eureka-megatron bench all --quick                              # every benchmark table, CPU sizes
  eureka-megatron bench lm-step --quick
  eureka-megatron bench rewards --quick                          # reward pool responses/s
  eureka-megatron bench sync                                     # Megatron -> engine weight sync GB/s

Config keys are dotted paths into the YAML (model.*, parallel.*, optim.*, train.*,
checkpoint.*, algo.*, rewards.*); values are parsed as YAML. See README.md for every key.
"""


TRAIN_EPILOG = """\
examples:
  eureka-megatron demo --out runs/demo                           # the CPU demo (< 10 min)
  eureka-megatron train examples/qwen2_5_vl_7b.yaml --dry-run    # validate + print the layout
  eureka-megatron train CFG.yaml model.hf=ckpt/Qwen2.5-VL-7B-Instruct parallel.nproc=8 \\
      parallel.tensor_parallel=4 rollout.engine=sglang
  eureka-megatron train CFG.yaml --resume                        # continue a killed run
  eureka-megatron train CFG.yaml cluster.launcher=ray cluster.address=auto   # on a Ray cluster

Sections: model, parallel, optim, train, rollout, algo, rewards, data, eval, warmup,
checkpoint, cluster, output (README.md lists every key).
"""


CONVERT_EPILOG = """\
examples:
  eureka-megatron convert hf-to-megatron --hf Qwen/Qwen2.5-VL-7B-Instruct --out ckpt/vl7b
  eureka-megatron convert hf-to-megatron --hf InternVL2_5-38B --out ckpt/ivl38b --dtype bf16
  eureka-megatron convert megatron-to-hf --megatron ckpt/vl7b --out vl7b_hf
  eureka-megatron convert megatron-to-hf --megatron runs/rl/step_00000200 --hf-config ckpt/vl7b/hf --out rl_hf

Supported model_type values: qwen2, qwen2_5_vl, internvl_chat (original InternVL format, Qwen2 or
InternLM2 LLM), internvl (transformers-native InternVL). Layouts read: hub on-disk names,
transformers >= 4.52 in-memory names, internvl_chat, HF-native InternVL.
"""


def _load(args) -> "Config":  # noqa: F821 -- imported lazily to keep --help fast
    from eureka_megatron.config import load_config
    from eureka_megatron.runtime.launcher import under_torchrun

    overrides = list(args.overrides)
    if under_torchrun():
        overrides.append(f"parallel.nproc={os.environ['WORLD_SIZE']}")
    elif args.nproc is not None:
        overrides.append(f"parallel.nproc={args.nproc}")
    return load_config(args.config, overrides)


def cmd_train_lm(args) -> int:
    from eureka_megatron.config import to_dict
    from eureka_megatron.trainer import checkpoint as ckpt

    cfg = _load(args)
    say = print if os.environ.get("RANK", "0") == "0" else (lambda *a, **k: None)
    p = cfg.parallel
    ckpt.check_run_dir(cfg.checkpoint.dir, cfg.checkpoint.load)
    if cfg.checkpoint.load:
        step_dir = ckpt.resolve_checkpoint(cfg.checkpoint.load)
        say(f"resuming from {step_dir}")
    say(f"layout: {p.describe()}; micro-batches per step: {cfg.num_microbatches}; "
          f"model: {cfg.model.num_parameters() / 1e6:.2f}M parameters "
          f"(vocab {cfg.model.vocab_size} padded to {cfg.model.padded_vocab_size})")
    if args.dry_run:
        say(json.dumps(to_dict(cfg), indent=2))
        return 0
    from eureka_megatron.runtime.launcher import launch
    from eureka_megatron.trainer.lm_run import run_lm

    history = launch(run_lm, p.nproc, cfg, progress=True)[0]
    if history:
        last = history[-1]
        say(f"done: step {last['step']} loss {last['loss']:.4f} "
              f"(first {history[0]['loss']:.4f})" +
              (f"; checkpoints in {cfg.checkpoint.dir}" if cfg.checkpoint.dir else ""))
    return 0


def _launch_rl(cfg, say) -> list[dict]:
    """Run the RL loop on the configured launcher: spawned local ranks, or a Ray placement group."""
    from eureka_megatron.trainer.loop import run_rl

    if cfg.cluster.launcher == "ray":
        from eureka_megatron.runtime.placement import launch_on_ray, plan_layout, ray_init

        use_gpus = _has_gpu()
        ray_init(cfg.cluster.address)
        # The HF engine lives inside rank 0's process; only SGLang servers need GPUs of their own.
        engines = cfg.rollout.engines if cfg.rollout.engine == "sglang" else 0
        layout = plan_layout(actor_world=cfg.parallel.nproc, engines=engines,
                             gpus_per_engine=cfg.rollout.gpus_per_engine,
                             colocate=cfg.cluster.colocate and engines > 0, use_gpus=use_gpus,
                             gpus_per_node=cfg.cluster.gpus_per_node)
        return launch_on_ray(run_rl, cfg.parallel.nproc, cfg, layout=layout)[0]
    from eureka_megatron.runtime.launcher import launch

    return launch(run_rl, cfg.parallel.nproc, cfg, timeout=7 * 24 * 3600.0)[0]


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _rl_summary(history: list[dict], cfg, say) -> None:
    evals = [h for h in history if h.get("eval/accuracy") is not None]
    if evals:
        best = max(evals, key=lambda h: h["eval/accuracy"])
        hit = next((h["step"] for h in evals if h["eval/accuracy"] >= 0.9), None)
        say(f"held-out greedy accuracy: {evals[0]['eval/accuracy']:.3f} (step {evals[0]['step']}) "
            f"-> {evals[-1]['eval/accuracy']:.3f} (step {evals[-1]['step']}); best "
            f"{best['eval/accuracy']:.3f} (step {best['step']})"
            + (f"; >= 0.9 first at step {hit}" if hit is not None else ""))
    say(f"run directory: {cfg.output.dir} (metrics.jsonl, tensorboard/, *.png, summary.md, "
        f"checkpoints in {cfg.checkpoint_dir})")


def cmd_train(args) -> int:
    from eureka_megatron.rl_config import load_rl_config
    from eureka_megatron.runtime.launcher import under_torchrun
    from eureka_megatron.trainer import checkpoint as ckpt
    from eureka_megatron.trainer.loop import describe

    overrides = list(args.overrides)
    if under_torchrun():
        overrides.append(f"parallel.nproc={os.environ['WORLD_SIZE']}")
    cfg = load_rl_config(args.config, overrides)
    say = print if os.environ.get("RANK", "0") == "0" else (lambda *a, **k: None)
    if args.resume and not cfg.checkpoint.load:
        if (cfg.checkpoint_dir / ckpt.LATEST).is_file():
            cfg.checkpoint.load = str(cfg.checkpoint_dir)
        else:
            say(f"--resume: no checkpoint in {cfg.checkpoint_dir} yet; starting fresh")
    if not (Path(cfg.model.hf) / "config.json").is_file():
        raise FileNotFoundError(f"model.hf={cfg.model.hf}: no config.json there (an HF "
                                "checkpoint directory is expected)")
    ckpt.check_run_dir(cfg.checkpoint_dir, cfg.checkpoint.load)
    if cfg.checkpoint.load:
        say(f"resuming from {ckpt.resolve_checkpoint(cfg.checkpoint.load)}")
    say(describe(cfg))
    if args.dry_run:
        return 0
    _rl_summary(_launch_rl(cfg, say), cfg, say)
    return 0


def cmd_demo(args) -> int:
    from eureka_megatron.trainer import checkpoint as ckpt
    from eureka_megatron.trainer.demo import demo_config, write_tiny_checkpoint
    from eureka_megatron.trainer.loop import describe

    out = Path(args.out)
    overrides = list(args.overrides)
    cfg = demo_config(out, overrides)
    if (cfg.checkpoint_dir / ckpt.LATEST).is_file():
        if not args.resume:
            raise FileExistsError(f"{out} already holds a demo run; pass --resume to continue it "
                                  "or choose another --out")
        cfg.checkpoint.load = str(cfg.checkpoint_dir)
    write_tiny_checkpoint(out / "tiny_init")
    print(f"demo: tiny Qwen2.5-VL ({_params(out / 'tiny_init') / 1e6:.2f}M parameters, in-repo "
          f"tokenizer), counting circles on 2-core-sized budgets; output in {out}")
    print(describe(cfg))
    history = _launch_rl(cfg, print)
    _rl_summary(history, cfg, print)
    return 0


def _params(hf_dir: Path) -> int:
    from eureka_megatron.convert.hf_io import HFCheckpoint

    ck = HFCheckpoint(hf_dir)
    n = 0
    for name in ck.names:
        size = 1
        for d in ck.shape(name):
            size *= d
        n += size
    return n


def cmd_convert(args) -> int:
    from eureka_megatron.convert.run import hf_to_megatron, megatron_to_hf

    if args.direction == "hf-to-megatron":
        info = hf_to_megatron(args.hf, args.out, dtype=args.dtype, force=args.force,
                              progress=not args.quiet)
        print(f"wrote {args.out}: {info['family']} ({info['layout']} layout), "
              f"{info['hf_tensors']} HF tensors -> {info['tensors']} megatron tensors, "
              f"{info['bytes'] / 2**30:.2f} GiB {info['dtype']}, {info['seconds']:.1f}s")
    else:
        info = megatron_to_hf(args.megatron, args.out, dtype=args.dtype, layout=args.layout,
                              hf_config_dir=args.hf_config, force=args.force,
                              progress=not args.quiet)
        print(f"wrote {args.out}: {info['family']} ({info['layout']} layout), "
              f"{info['tensors']} tensors, {info['bytes'] / 2**30:.2f} GiB, {info['seconds']:.1f}s")
    return 0


EVAL_EPILOG = """\
examples:
  eureka-megatron eval --model runs/demo/hf_final --data runs/demo/data/heldout-*/data.jsonl
  eureka-megatron eval --model ckpt/Qwen2.5-VL-7B-Instruct --data mmk12_test.jsonl \\
      --engine sglang --tp 2 --samples 8 --max-new-tokens 4096 --out evals/qwen7b-mmk12
  eureka-megatron eval --model runs/rl/checkpoints --hf-config ckpt/Qwen2.5-VL-7B-Instruct \\
      --data mathvista.jsonl mathverse.jsonl            # newest training step; one source per file

Output: OUT/results.json (overall + by_source), OUT/results.md (the table printed here) and
OUT/samples.jsonl (every response with its scores). The breakdown uses the rows' source, data_source,
dataset, category, subject or task field (--group-by picks another), else one row per --data file.
"""


def cmd_eval(args) -> int:
    from eureka_megatron.evaluate import markdown, run_eval

    out = args.out or Path("runs/eval") / f"{Path(args.model).name}__{Path(args.data[0]).stem}"
    results = run_eval(args.model, args.data, out, engine=args.engine, samples=args.samples,
                       temperature=args.temperature, top_p=args.top_p,
                       max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                       system_prompt=None if args.system_prompt == "none" else args.system_prompt,
                       group_by=args.group_by, limit=args.limit, judge=args.judge,
                       hf_config=args.hf_config, sglang_url=args.sglang_url, tp=args.tp,
                       max_prompt_length=args.max_prompt_length, workers=args.workers,
                       seed=args.seed, progress=not args.quiet)
    print(markdown(results))
    skipped = f", {results['skipped_rows']} row(s) skipped" if results["skipped_rows"] else ""
    print(f"\n{results['overall']['n']} prompts in {results['seconds']:.1f}s{skipped}; "
          f"wrote {out}/results.json, results.md, samples.jsonl")
    return 0


BENCH_EPILOG = """\
examples:
  eureka-megatron bench all --quick --out bench.json             # every table, CPU sizes
  eureka-megatron bench step                                     # one RL step: tokens/s, MFU, split
  eureka-megatron bench kernels --out bench.json                 # real shapes when a GPU is present
  eureka-megatron bench demo --seeds 1234,1,2,3,4 --runs runs/bench-demo   # the demo per seed
"""


def cmd_forward(args) -> int:
    from eureka_megatron.convert.forward import run_forward

    logits = run_forward(args.megatron, args.inputs, args.out, tp=args.tp, pp=args.pp,
                         hf_config_dir=args.hf_config, engine=args.engine)
    via = f", synced into the {args.engine} engine" if args.engine else ""
    print(f"wrote {args.out}: logits {list(logits.shape)} float32 (TP{args.tp} x PP{args.pp}{via})")
    return 0


def cmd_bench(args) -> int:
    from eureka_megatron.bench import run_bench

    options = {}
    if args.what == "demo":
        options = {"seeds": args.seeds, "out_dir": args.runs, "overrides": args.overrides}
    elif args.seeds or args.runs or args.overrides:
        raise ValueError("--seeds, --runs and key=value overrides are options of `bench demo`")
    return run_bench(args.what, quick=args.quick, out=args.out, **options)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eureka-megatron",
        description="Rule-based RL for vision-language reasoning on Megatron-core "
                    "(runs on GPU clusters and, with tiny models, on one CPU).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser(
        "train-lm", help="train the Qwen2.5-family LLM on synthetic token patterns (TP/PP/DP)",
        description="Train the megatron LLM with the real pipeline schedules, distributed "
                    "optimizer and atomic torch_dist checkpoints. Checks the whole megatron "
                    "stack on a machine in seconds.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    t.add_argument("config", nargs="?", help="YAML config (default: built-in tiny model)")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    t.add_argument("--nproc", type=int, help="ranks to spawn on this machine (= parallel.nproc)")
    t.add_argument("--dry-run", action="store_true",
                   help="validate the config and print the resolved layout; train nothing")
    t.set_defaults(func=cmd_train_lm)

    r = sub.add_parser(
        "train", help="RL-train a VLM (GRPO family, rule-based rewards) from an HF checkpoint",
        description="The MM-Eureka-style RL loop on megatron: rollout (HF engine on CPU, SGLang "
                    "on GPU) -> rule-based rewards -> online filter -> advantages -> train -> "
                    "weight sync -> metrics -> checkpoint. Writes OUTPUT.DIR/metrics.jsonl, "
                    "tensorboard/, PNG plots, summary.md and checkpoints; a killed run resumes "
                    "with --resume (or checkpoint.load=DIR).",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=TRAIN_EPILOG)
    r.add_argument("config", nargs="?", help="YAML config (see examples/)")
    r.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    r.add_argument("--dry-run", action="store_true",
                   help="load and validate the config, print the resolved layout, train nothing")
    r.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in the run's checkpoint directory")
    r.set_defaults(func=cmd_train)

    d = sub.add_parser(
        "demo", help="the CPU demo: a tiny Qwen2.5-VL learns to count with GRPO (<10 min, 2 cores)",
        description="Writes a random tiny Qwen2.5-VL and the in-repo tokenizer, teaches only the "
                    "answer format (stage 0, random answers), then runs GRPO through the real "
                    "megatron actor, HF engine, weight sync and reward pool. Held-out greedy "
                    "accuracy (eval/accuracy in metrics.jsonl) starts near chance (0.2) and "
                    "rises. Config: examples/demo_cpu.yaml.")
    d.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    d.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the demo config")
    d.add_argument("--resume", action="store_true", help="continue a killed demo in --out")
    d.set_defaults(func=cmd_demo)

    c = sub.add_parser(
        "convert", help="HF <-> megatron torch_dist checkpoints (Qwen2.5, Qwen2.5-VL, InternVL)",
        description="Convert checkpoints, streaming one tensor at a time. Every HF tensor must "
                    "map and every megatron tensor must be produced with the shape the config "
                    "implies, or nothing is written. The megatron side loads at any TP/PP; "
                    "converting back writes the source's naming layout with its config, "
                    "tokenizer and processor files.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=CONVERT_EPILOG)
    csub = c.add_subparsers(dest="direction", metavar="DIRECTION", required=True)
    h2m = csub.add_parser("hf-to-megatron", help="HF safetensors dir -> torch_dist dir")
    h2m.add_argument("--hf", required=True, type=Path, help="HF checkpoint directory")
    m2h = csub.add_parser("megatron-to-hf", help="torch_dist dir (converted or trained) -> HF dir")
    m2h.add_argument("--megatron", required=True, type=Path,
                     help="a converted dir or a training step_* dir")
    m2h.add_argument("--hf-config", type=Path, default=None,
                     help="dir with config.json + tokenizer files (default: MEGATRON/hf)")
    m2h.add_argument("--layout", default=None,
                     help="HF naming to write (default: the source's, from conversion.json)")
    for sp in (h2m, m2h):
        sp.add_argument("--out", required=True, type=Path, help="output directory (created)")
        sp.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                        help="cast floating-point tensors (default: keep the source's)")
        sp.add_argument("--force", action="store_true", help="replace a non-empty --out")
        sp.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=cmd_convert)

    f = sub.add_parser(
        "forward", help="logits of a megatron checkpoint at a chosen TP/PP (check a conversion)",
        description="Load a megatron checkpoint with megatron's dist_checkpointing at TP x PP "
                    "(spawning TP*PP ranks on this machine) and run one batch. IN.pt is the dict "
                    "an HF processor returns, saved with torch.save (input_ids, optional "
                    "attention_mask; Qwen2.5-VL pixel_values + image_grid_thw; InternVL "
                    "pixel_values [tiles,3,H,W]). OUT.pt is {'logits': [B,S,vocab] float32}, "
                    "vocab padding removed.")
    f.add_argument("--megatron", required=True, type=Path, help="converted dir or step_* / run dir")
    f.add_argument("--inputs", required=True, type=Path, help="IN.pt")
    f.add_argument("--out", required=True, type=Path, help="OUT.pt")
    f.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    f.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    f.add_argument("--hf-config", type=Path, default=None,
                   help="dir with config.json (default: MEGATRON/hf)")
    f.add_argument("--engine", choices=["hf"], default=None,
                   help="sync the loaded weights into this rollout engine and return ITS logits "
                        "(checks that an engine runs exactly the trained weights)")
    f.set_defaults(func=cmd_forward)

    e = sub.add_parser(
        "eval", help="greedy accuracy and pass@k of an HF or megatron checkpoint on JSONL sets",
        description="Generate with a rollout engine (greedy, plus --samples draws at "
                    "--temperature) and grade every response with the rule-based judge the "
                    "rewards use. Reports greedy accuracy and format rate, pass@1 and pass@k "
                    "(unbiased estimator), response length and the share cut at "
                    "--max-new-tokens, overall and per source. Rows in any training format "
                    "(MM-Eureka qwen/internvl, plain); bad rows are skipped and counted.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EVAL_EPILOG)
    e.add_argument("--model", required=True, type=Path,
                   help="HF checkpoint dir, or megatron: converted dir, step_* dir or run dir")
    e.add_argument("--data", required=True, nargs="+", type=Path, metavar="FILE.jsonl",
                   help="one or more JSONL files (several: one source each)")
    e.add_argument("--engine", choices=["hf", "sglang"], default="hf",
                   help="hf: transformers in this process (CPU or one GPU); sglang: launch a "
                        "server (--tp GPUs) or use --sglang-url")
    e.add_argument("--samples", type=int, default=1, metavar="K",
                   help="K >= 2 also draws K samples per prompt and reports pass@1 and pass@K")
    e.add_argument("--temperature", type=float, default=1.0, help="for the K samples (default 1.0)")
    e.add_argument("--top-p", type=float, default=1.0, help="for the K samples (default 1.0)")
    e.add_argument("--max-new-tokens", type=int, default=1024, help="per response (default 1024)")
    e.add_argument("--out", type=Path, default=None,
                   help="output dir (default: runs/eval/MODEL__DATA)")
    e.add_argument("--hf-config", type=Path, default=None,
                   help="megatron checkpoints: dir with config.json + tokenizer (default: MODEL/hf)")
    e.add_argument("--group-by", default=None, metavar="FIELD",
                   help="row field for the per-source breakdown (default: auto)")
    e.add_argument("--system-prompt", default="r1",
                   help="'r1' (MM-Eureka's reasoning prompt, the default), 'none', or the text")
    e.add_argument("--judge", default="eureka_megatron.rewards:rule_based_scores",
                   metavar="MODULE:FUNCTION",
                   help="reward function returning {'accuracy': 0|1, 'format': 0|1}")
    e.add_argument("--limit", type=int, default=None, help="evaluate only the first N usable rows")
    e.add_argument("--batch-size", type=int, default=32, help="prompts per generate call")
    e.add_argument("--max-prompt-length", type=int, default=8192, help="longer prompts are skipped")
    e.add_argument("--sglang-url", default=None, help="a running SGLang server serving MODEL")
    e.add_argument("--tp", type=int, default=1, help="GPUs of a launched SGLang server")
    e.add_argument("--workers", type=int, default=2, help="judge worker processes")
    e.add_argument("--seed", type=int, default=0, help="sampling seed")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_eval)

    b = sub.add_parser(
        "bench", help="benchmarks that print markdown tables and write JSON",
        description="Each benchmark prints a markdown table (what, size, time, throughput, % of "
                    "the relevant hardware bound: measured matmul peak, memory-copy bandwidth or "
                    "in-line scoring) and, with --out, merges its rows into a JSON file. Without "
                    "a GPU the sizes are CPU-sized; --quick makes them smaller still.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=BENCH_EPILOG)
    b.add_argument("what", choices=["kernels", "step", "sync", "rollout", "convert", "rewards",
                                    "lm-step", "demo", "all"],
                   help="kernels: fused log-prob kernel; step: one RL step (tokens/s, MFU, time "
                        "split); sync: Megatron -> engine weights; rollout: engine generation; "
                        "convert: HF <-> megatron; rewards: reward pool; lm-step: megatron LLM "
                        "train step at TP/PP; demo: the CPU demo once per seed (time to 0.5 / 0.9 "
                        "held-out accuracy, final/best, step split; ~5 min a seed); all: every "
                        "one but demo")
    b.add_argument("--quick", action="store_true",
                   help="CPU-friendly sizes (`bench all --quick` < 4 min on 2 cores)")
    b.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    b.add_argument("--seeds", type=lambda s: tuple(int(x) for x in s.split(",")), default=None,
                   help="bench demo: comma-separated train.seed values (default 1234,1,2,3,4; "
                        "--quick: the first, 60 steps)")
    b.add_argument("--runs", type=Path, default=None,
                   help="bench demo: directory for the runs (default: a new temporary one)")
    b.add_argument("overrides", nargs="*", metavar="key=value",
                   help="bench demo: overrides of the demo config, e.g. train.steps=300")
    b.set_defaults(func=cmd_bench)
    return parser


def _split_config_arg(args) -> None:
    """`train-lm a=b` (no YAML file): the first positional is an override, not a file."""
    if getattr(args, "config", None) and "=" in args.config and not Path(args.config).exists():
        args.overrides = [args.config, *args.overrides]
        args.config = None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # `bench demo --seeds 1,2 train.steps=300`: overrides after the options
        if getattr(args, "command", None) == "bench" and all(
                "=" in x and not x.startswith("-") for x in extra):
            args.overrides = list(args.overrides) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not args.command:
        parser.print_help()
        return 0
    _split_config_arg(args)
    from eureka_megatron.config import ConfigError
    from eureka_megatron.runtime.launcher import RankError
    from eureka_megatron.convert.hf_io import HFCheckpointError
    from eureka_megatron.convert.mapping import MappingError
    from eureka_megatron.trainer.checkpoint import CheckpointError

    try:
        return args.func(args)
    except (ConfigError, CheckpointError, MappingError, HFCheckpointError, FileExistsError,
            FileNotFoundError, ValueError) as e:
        print(f"eureka-megatron: error: {e}", file=sys.stderr)
        return 2
    except RankError as e:
        print(f"eureka-megatron: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
