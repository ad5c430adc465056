"""`eureka-megatron eval`: the responses are the model's own (checked against transformers'
generate and against the SGLang server's output), the scores are the judge's (re-scored here in
process), pass@k matches a brute-force count over subsets, megatron checkpoints evaluate to the
same responses as their HF source, and bad input fails with a message naming it."""
from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch

from eureka_megatron.cli import main
from eureka_megatron.evaluate import load_eval_config, pass_at_k, run_eval
from tests.unit import reward_fns

JUDGE = "tests.unit.reward_fns:parity_judge"
K = 3
NEW = 12


def evaluate(model, data, out, **options) -> dict:
    """`eureka-megatron eval` as the CLI calls it: a typed, validated EvalRunConfig."""
    plain = {k: str(v) if isinstance(v, Path) else v for k, v in options.items()}
    return run_eval(load_eval_config({"model": str(model), "data": [str(d) for d in data],
                                      "out": str(out), **plain}))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from eureka_megatron.data.synthetic import synthetic_dataset, write_jsonl
    from eureka_megatron.trainer.demo import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("eval")
    hf = write_tiny_checkpoint(root / "tiny")
    write_jsonl(synthetic_dataset(8, "heldout", seed=0, tasks=("count_circles", "read_digit"),
                                  image_size=56), root / "data")
    results = evaluate(hf, [root / "data" / "data.jsonl"], root / "out_hf", samples=K,
                       max_new_tokens=NEW, batch_size=3, judge=JUDGE, system_prompt=None,
                       progress=False, seed=1)
    return root, hf, results


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def test_pass_at_k_matches_counting_subsets():
    for n, c in [(5, 0), (5, 1), (5, 3), (6, 6), (4, 2)]:
        outcomes = [1] * c + [0] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(outcomes, k))
            brute = sum(any(s) for s in subsets) / len(subsets)
            assert math.isclose(pass_at_k(n, c, k), brute, rel_tol=1e-12)
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


def test_greedy_responses_are_transformers_generate(setup):
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from eureka_megatron.data.dataset import PromptBuilder
    from eureka_megatron.data.jsonl import load_rows

    root, hf, _ = setup
    tok = AutoTokenizer.from_pretrained(str(hf))
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(hf), dtype=torch.float32).eval()
    builder = PromptBuilder("qwen2_5_vl", tok, system_prompt=None, max_prompt_length=8192)
    records = _records(root / "out_hf")
    rows = load_rows(root / "data" / "data.jsonl").rows
    assert [r["id"] for r in records] == [r.id for r in rows]
    for row, rec in list(zip(rows, records))[:3]:
        p = builder.build(row).prompt
        ids = torch.tensor([p.input_ids])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 pixel_values=p.mm_inputs["pixel_values"],
                                 image_grid_thw=p.mm_inputs["image_grid_thw"],
                                 max_new_tokens=NEW, do_sample=False)
        assert rec["greedy"]["text"] == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        assert rec["greedy"]["tokens"] == out.shape[1] - ids.shape[1]


def test_scores_and_breakdown_recomputed_independently(setup):
    root, _, results = setup
    records = _records(root / "out_hf")
    assert results["samples"] == K and results["model_format"] == "hf"
    assert set(results["by_source"]) == {"count_circles", "read_digit"}  # the rows' task field
    for rec in records:
        assert len(rec["sampled"]) == K
        for s in [rec["greedy"], *rec["sampled"]]:
            want = reward_fns.parity_judge(s["text"], rec["answer"], None)
            assert (s["accuracy"], s["format"]) == (want["accuracy"], want["format"])
    for name, group in [("all", records)] + [(g, [r for r in records if r["group"] == g])
                                             for g in results["by_source"]]:
        got = results["overall"] if name == "all" else results["by_source"][name]
        assert got["n"] == len(group)
        assert math.isclose(got["greedy_accuracy"],
                            sum(r["greedy"]["accuracy"] for r in group) / len(group))
        any_correct = sum(any(s["accuracy"] for s in r["sampled"]) for r in group) / len(group)
        assert math.isclose(got[f"pass@{K}"], any_correct)
        mean_correct = sum(s["accuracy"] for r in group for s in r["sampled"]) / (K * len(group))
        assert math.isclose(got["pass@1"], mean_correct)
    o = results["overall"]
    assert 0 < o["pass@1"] < o[f"pass@{K}"]  # the parity judge makes the outcomes vary
    assert sum(s["n"] for s in results["by_source"].values()) == o["n"] == 8
    md = (root / "out_hf" / "results.md").read_text()
    assert "| count_circles | 4 |" in md and f"pass@{K}" in md and "**all**" in md
    assert json.loads((root / "out_hf" / "results.json").read_text())["overall"] == o


def test_megatron_checkpoint_evaluates_to_the_same_responses(setup):
    from eureka_megatron.convert.run import hf_to_megatron

    root, hf, results = setup
    hf_to_megatron(hf, root / "meg", progress=False)
    meg = evaluate(root / "meg", [root / "data" / "data.jsonl"], root / "out_meg", samples=1,
                   max_new_tokens=NEW, judge=JUDGE, system_prompt=None, progress=False)
    assert meg["model_format"] == "megatron"
    assert [r["greedy"] for r in _records(root / "out_meg")] == \
        [r["greedy"] for r in _records(root / "out_hf")]
    assert meg["overall"]["greedy_accuracy"] == results["overall"]["greedy_accuracy"]
    assert "pass@1" not in meg["overall"]  # no samples drawn
    assert not any(p.name.startswith(".eval-") for p in (root / "out_meg").iterdir())

    # a training checkpoint has no HF side files: they come from --hf-config, and the HF naming
    # layout is read from that checkpoint's own weights
    import shutil

    from eureka_megatron.evaluate import EvalError

    shutil.rmtree(root / "meg" / "hf")
    (root / "meg" / "conversion.json").unlink()
    with pytest.raises(EvalError, match="--hf-config"):
        evaluate(root / "meg", [root / "data" / "data.jsonl"], root / "out_meg2", judge=JUDGE,
                 progress=False)
    evaluate(root / "meg", [root / "data" / "data.jsonl"], root / "out_meg2", hf_config=hf,
             max_new_tokens=NEW, judge=JUDGE, system_prompt=None, progress=False, limit=2)
    assert [r["greedy"] for r in _records(root / "out_meg2")] == \
        [r["greedy"] for r in _records(root / "out_hf")][:2]


def test_sglang_engine_responses_are_the_servers(setup):
    from eureka_megatron.data.jsonl import load_rows
    from eureka_megatron.rollout.sglang.prompts import sglang_prompt_text
    from tests.unit.fake_sglang_server import VOCAB, FakeSGLangServer, fake_generate

    root, hf, _ = setup
    server = FakeSGLangServer().start()
    try:
        evaluate(hf, [root / "data" / "data.jsonl"], root / "out_sg", engine="sglang",
                 sglang_url=server.url, samples=2, max_new_tokens=NEW, judge=JUDGE,
                 system_prompt=None, progress=False, limit=4)
        weights = server.weights
    finally:
        server.stop()
    from transformers import AutoTokenizer

    from eureka_megatron.data.dataset import PromptBuilder

    builder = PromptBuilder("qwen2_5_vl", AutoTokenizer.from_pretrained(str(hf)), system_prompt=None,
                            max_prompt_length=8192)
    records = _records(root / "out_sg")
    assert len(records) == 4
    for row, rec in zip(load_rows(root / "data" / "data.jsonl").rows, records):
        prompt = builder.build(row).prompt
        if prompt.images:  # sent as text with one placeholder per image; the fake reads chars
            text, _ = sglang_prompt_text(prompt.text, "qwen2_5_vl")
            ids = [ord(c) % VOCAB for c in text]
        else:
            ids = prompt.input_ids
        want = fake_generate(weights, ids, {"temperature": 0.0, "max_new_tokens": NEW})
        assert rec["greedy"]["text"] == want["text"]


@pytest.mark.parametrize("args, message", [
    (["--data", "{root}/missing.jsonl"], "missing.jsonl"),
    (["--data", "{root}/data/data.jsonl", "--samples", "0"], "--samples"),
    (["--data", "{root}/data/data.jsonl", "--group-by", "colour"], "--group-by colour"),
    (["--data", "{root}/data/data.jsonl", "--judge", "no_such_module:f"], "no_such_module"),
    (["--data", "{root}/data/data.jsonl", "--model", "{root}/data"], "neither an HF checkpoint"),
])
def test_bad_input_is_named(setup, capsys, args, message):
    root, hf, _ = setup
    args = [a.format(root=root) for a in args]
    model = [] if "--model" in args else ["--model", str(hf)]
    code = main(["eval", *model, *args, "--out", str(root / "bad"), "--quiet"])
    assert code == 2
    assert message in capsys.readouterr().err
