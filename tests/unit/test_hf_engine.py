"""HFEngine on tiny real transformers models of every family (Qwen2, Qwen3, Qwen3-MoE,
Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE, InternVL).

References are independent of the engine's batching and KV cache: one unpadded sequence through
transformers' own forward (full sequence, no cache) per step / per sample. Prompts differ in
length and, for the VLMs, in image count and size.
"""
import copy

import pytest
import torch

from eureka_megatron.models.registry import family_for
from eureka_megatron.rollout.engine import RolloutEngine, SamplingParams, StaleWeightsError
from eureka_megatron.rollout.hf_engine import HFEngine, WeightSyncError
from tests import rollout_fixtures as F

FAMILIES = ["qwen2", "qwen3", "qwen3_moe", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "internvl"]
MM_IDS = {"qwen2": [], "qwen3": [], "qwen3_moe": [], "qwen2_5_vl": [F.VIDEO, F.IMAGE],
          "qwen3_vl": [F.VIDEO, F.IMAGE], "qwen3_vl_moe": [F.VIDEO, F.IMAGE], "internvl": [F.IMAGE]}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls: intra-op threads only add sync overhead (4x slower on a busy 2-core box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models():
    return {fam: F.tiny_model(fam) for fam in FAMILIES}


def engine_for(model, **kw):
    kw.setdefault("eos_token_ids", [F.EOS])
    return HFEngine(model, F.tiny_tokenizer(), **kw)


def reference_greedy(model, prompt, steps: int, suppress) -> list[int]:
    """Argmax of a full forward over prompt + tokens so far, one step at a time."""
    ids = list(prompt.input_ids)
    for _ in range(steps):
        last = F.full_forward_logits(model, ids, prompt.mm_inputs)[-1]
        last[list(suppress)] = float("-inf")
        ids.append(int(last.argmax()))
        if ids[-1] == F.EOS:
            break
    return ids[len(prompt.input_ids):]


def reference_logprobs(model, prompt, tokens, temperature) -> torch.Tensor:
    logits = F.full_forward_logits(model, list(prompt.input_ids) + tokens, prompt.mm_inputs)
    n = len(prompt.input_ids)
    logp = torch.log_softmax(logits[n - 1:-1] / temperature, dim=-1)
    return logp.gather(1, torch.tensor(tokens)[:, None])[:, 0]


def state_buckets(model, drop=()):
    """The state dict in three buckets, the first holding a single tensor."""
    items = [(k, v.clone()) for k, v in model.state_dict().items() if k not in drop]
    return [items[:1], items[1:6], items[6:]]


# --- generation -------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_full_sequence_argmax(models, family):
    model, prompts = models[family], F.PROMPTS[family]()
    engine = engine_for(model)
    assert isinstance(engine, RolloutEngine) and engine.suppress_token_ids == MM_IDS[family]
    out = engine.generate(prompts, 2, SamplingParams(temperature=0, max_new_tokens=10))
    assert [s.prompt_index for s in out] == [0, 0, 1, 1, 2, 2]
    for i, prompt in enumerate(prompts):
        ref = reference_greedy(model, prompt, 10, MM_IDS[family])
        for s in out[2 * i:2 * i + 2]:
            assert s.token_ids == ref
            assert s.finish_reason == ("stop" if ref[-1] == F.EOS else "length")
            torch.testing.assert_close(torch.tensor(s.logprobs),
                                       reference_logprobs(model, prompt, ref, 1.0), rtol=0, atol=1e-5)
            assert s.text == F.tiny_tokenizer().decode(ref, skip_special_tokens=True)
            assert s.weight_version == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_sampled_logprobs_equal_full_forward(models, family):
    model, prompts = models[family], F.PROMPTS[family]()
    engine = engine_for(model)
    sp = SamplingParams(temperature=0.7, top_k=40, top_p=0.9, max_new_tokens=12, seed=3)
    out = engine.generate(prompts, 3, sp)
    assert [s.prompt_index for s in out] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for s in out:
        prompt = prompts[s.prompt_index]
        assert len(s.logprobs) == len(s.token_ids) and not set(s.token_ids) & set(MM_IDS[family])
        assert s.finish_reason == ("stop" if s.token_ids[-1] == F.EOS else "length")
        assert F.EOS not in s.token_ids[:-1] and (s.finish_reason == "stop" or len(s.token_ids) == 12)
        ref = reference_logprobs(model, prompt, s.token_ids, 0.7)
        torch.testing.assert_close(torch.tensor(s.logprobs), ref, rtol=0, atol=1e-5)
        logits = F.full_forward_logits(model, list(prompt.input_ids) + s.token_ids, prompt.mm_inputs)
        n = len(prompt.input_ids)
        ranks = (logits[n - 1:-1] > logits[n - 1:-1].gather(1, torch.tensor(s.token_ids)[:, None])).sum(-1)
        assert int(ranks.max()) < 40  # top-k honoured
    again = engine.generate(prompts, 3, sp)
    assert [s.token_ids for s in again] == [s.token_ids for s in out]
    assert [s.logprobs for s in again] == [s.logprobs for s in out]
    other = engine.generate(prompts, 3, SamplingParams(**{**sp.__dict__, "seed": 4}))
    assert [s.token_ids for s in other] != [s.token_ids for s in out]
    assert len({tuple(s.token_ids) for s in out[:3]}) > 1  # n samples differ


def test_stop_token_stop_string_and_length(models):
    model, prompt = models["qwen2"], F.text_prompts()[1]
    engine = engine_for(model)
    tok = F.tiny_tokenizer()
    greedy = engine.generate([prompt], 1, SamplingParams(temperature=0, max_new_tokens=12))[0]
    g = greedy.token_ids
    assert len(g) == 12 and greedy.finish_reason == "length" and F.EOS not in g
    k = next(i for i in range(2, 12) if g[i] not in g[:i])

    def run(engine=engine, max_new_tokens=12, **kw):
        return engine.generate([prompt], 1, SamplingParams(temperature=0, max_new_tokens=max_new_tokens,
                                                           **kw))[0]

    s = run(stop_token_ids=[g[k]])
    assert s.token_ids == g[:k + 1] and s.finish_reason == "stop" and s.logprobs == greedy.logprobs[:k + 1]
    s = run(engine=engine_for(model, eos_token_ids=[g[k]]))
    assert s.token_ids == g[:k + 1] and s.finish_reason == "stop"
    text = tok.decode(g, skip_special_tokens=True)
    stop = text[2 * k + 1:2 * k + 3]  # spans the boundary of tokens k and k + 1
    end = next(j for j in range(12) if stop in tok.decode(g[:j + 1], skip_special_tokens=True))
    s = run(stop=["not-there", stop])
    assert s.token_ids == g[:end + 1] and s.finish_reason == "stop" and stop in s.text
    s = run(max_new_tokens=5)
    assert s.token_ids == g[:5] and s.finish_reason == "length"


def test_small_batches_give_the_same_samples(models):
    model, prompts = models["qwen2_5_vl"], F.PROMPTS["qwen2_5_vl"]()
    sp = SamplingParams(temperature=0, max_new_tokens=6)
    big = engine_for(model).generate(prompts, 2, sp)
    small = engine_for(model, max_batch_size=2).generate(prompts, 2, sp)
    assert [s.token_ids for s in small] == [s.token_ids for s in big]
    assert [s.prompt_index for s in small] == [0, 0, 1, 1, 2, 2]
    for p in prompts:  # a processor's per-token outputs ride along; the engine recomputes them
        ids = torch.tensor([p.input_ids])
        p.mm_inputs.update(mm_token_type_ids=(ids == F.IMAGE).int(), attention_mask=torch.ones_like(ids))
    assert [s.token_ids for s in engine_for(model).generate(prompts, 2, sp)] == [s.token_ids for s in big]


def test_refusals(models):
    engine = HFEngine(models["qwen2"])  # no tokenizer
    assert engine.eos_token_ids == [F.EOS] and HFEngine(models["qwen2"], eos_token_ids=[]).eos_token_ids == []
    prompts = F.text_prompts()
    assert engine.generate([], 2, SamplingParams()) == []
    with pytest.raises(ValueError, match="n must be"):
        engine.generate(prompts, 0, SamplingParams())
    with pytest.raises(ValueError, match="tokenizer"):
        engine.generate(prompts, 1, SamplingParams(stop=["x"]))
    with pytest.raises(ValueError, match="temperature"):
        engine.generate(prompts, 1, SamplingParams(temperature=-1))
    assert engine.generate(prompts[:1], 1, SamplingParams(max_new_tokens=3))[0].text == ""
    assert engine.health()
    engine.release_memory()
    assert not engine.health()
    with pytest.raises(RuntimeError, match="released"):
        engine.generate(prompts, 1, SamplingParams())
    engine.resume_memory()
    assert engine.health() and len(engine.generate(prompts, 1, SamplingParams(max_new_tokens=2))) == 3


# --- weights ----------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_sync_into_from_config_engine(models, family):
    source, prompts = models[family], F.PROMPTS[family]()
    engine = HFEngine.from_config(source.config.to_dict(), tokenizer_or_processor=F.tiny_tokenizer(),
                                  eos_token_ids=[F.EOS])
    assert engine.weight_version is None
    with pytest.raises(StaleWeightsError):
        engine.generate(prompts, 1, SamplingParams())
    for name, buf in source.named_non_persistent_buffers():  # rotary inv_freq rebuilt, not garbage
        assert torch.equal(engine.model.get_buffer(name), buf), name
    engine.update_weights(state_buckets(source), version=3)
    assert engine.weight_version == 3
    for p in prompts:
        got = engine.logits(torch.tensor([p.input_ids]), **p.mm_inputs)[0]
        torch.testing.assert_close(got, F.full_forward_logits(source, p.input_ids, p.mm_inputs),
                                   rtol=0, atol=1e-6)
    sp = SamplingParams(temperature=0, max_new_tokens=6)
    synced = engine.generate(prompts, 1, sp)
    assert [s.token_ids for s in synced] == [s.token_ids for s in engine_for(source).generate(prompts, 1, sp)]
    assert {s.weight_version for s in synced} == {3}


@pytest.mark.parametrize("family,tie", [("qwen2", False), ("qwen2", True), ("qwen2_5_vl", False),
                                        ("qwen2_5_vl", True), ("qwen3_vl", True),
                                        ("qwen3_vl_moe", False), ("internvl", False)])
def test_weight_layout_names_are_the_state_dict(family, tie):
    """The converter's mapping in the engine's layout names exactly the model's tensors."""
    model = F.tiny_model(family, **({"tie": tie} if family != "internvl" else {}))
    engine = HFEngine(model)
    hf = model.config.to_dict()
    fam = family_for(hf)
    names = fam.mapping(fam.config_from_hf(hf, None), engine.weight_layout).hf_names()
    expected = set(model.state_dict()) - ({"lm_head.weight"} if tie else set())
    assert names == expected


def test_tied_embeddings_sync_without_lm_head():
    source = F.tiny_model("qwen2", tie=True)
    engine = HFEngine.from_config(source.config, dtype=torch.float32)
    assert engine.model.lm_head.weight is engine.model.model.embed_tokens.weight
    engine.update_weights(state_buckets(source, drop={"lm_head.weight"}), version=1)
    ids = torch.tensor([F.text_prompts()[1].input_ids])
    torch.testing.assert_close(engine.logits(ids)[0], F.full_forward_logits(source, ids[0].tolist(), {}),
                               rtol=0, atol=1e-6)


def test_bf16_engine_casts_synced_tensors(models):
    source = models["qwen2"]
    engine = HFEngine.from_config(source.config, dtype=torch.bfloat16)
    engine.update_weights(state_buckets(source), version=5)
    emb = engine.model.model.embed_tokens.weight
    assert emb.dtype == torch.bfloat16
    assert torch.equal(emb, source.model.embed_tokens.weight.to(torch.bfloat16))
    built = type(source)._from_config(copy.deepcopy(source.config), dtype=torch.bfloat16)
    for name, buf in built.named_non_persistent_buffers():  # same dtype and values as a normal build
        mine = engine.model.get_buffer(name)
        assert buf.dtype == mine.dtype and torch.equal(buf, mine), name


def test_sync_errors_leave_the_version_unset(models):
    source, prompts = models["qwen2"], F.text_prompts()
    engine = HFEngine.from_config(source.config)
    full = state_buckets(source)
    engine.update_weights(full, version=1)
    emb = "model.embed_tokens.weight"

    def refuses(buckets, match):
        with pytest.raises(WeightSyncError, match=match):
            engine.update_weights(buckets, version=2)
        assert engine.weight_version is None
        with pytest.raises(StaleWeightsError):
            engine.generate(prompts, 1, SamplingParams())

    refuses(full[:1] + [[("model.no_such.weight", torch.zeros(2))]], "'model.no_such.weight' is not")
    refuses([[(emb, torch.zeros(3, 64))]], r"model.embed_tokens.weight: got shape \(3, 64\), "
                                           r"the model has \(256, 64\)")
    refuses(full[:2], "were not written, e.g. model.layers")

    def interrupted():
        yield full[0]
        raise ConnectionError("trainer went away")

    engine.update_weights(full, version=2)
    with pytest.raises(ConnectionError):
        engine.update_weights(interrupted(), version=3)
    assert engine.weight_version is None
    with pytest.raises(StaleWeightsError):
        engine.logits(torch.tensor([[1, 2, 3]]))
    engine.update_weights(state_buckets(source), version=4)
    assert engine.weight_version == 4
    engine.update_weights(full[:2], version=5, partial=True)  # the rest was loaded before
    assert engine.weight_version == 5
    assert len(engine.generate(prompts, 1, SamplingParams(max_new_tokens=2))) == 3


def test_partial_sync_needs_everything_loaded_once(models):
    engine = HFEngine.from_config(models["qwen2"].config)
    with pytest.raises(WeightSyncError, match="not written"):
        engine.update_weights(state_buckets(models["qwen2"])[:2], version=1, partial=True)


def test_from_pretrained_and_restart(models, tmp_path):
    source = models["qwen2"]
    source.save_pretrained(tmp_path)
    F.tiny_tokenizer().save_pretrained(tmp_path)
    ids = torch.tensor([F.text_prompts()[1].input_ids])
    ref = F.full_forward_logits(source, ids[0].tolist(), {})
    engine = HFEngine.from_pretrained(tmp_path)
    assert engine.weight_version == 0 and engine.tokenizer is not None and engine.eos_token_ids == [F.EOS]
    torch.testing.assert_close(engine.logits(ids)[0], ref, rtol=0, atol=1e-6)
    stop = engine.generate(F.text_prompts(), 1, SamplingParams(max_new_tokens=4, stop=["a"]))
    assert all(s.finish_reason == "stop" or len(s.token_ids) == 4 for s in stop)
    engine.update_weights([[("model.norm.weight", torch.zeros(64))]], version=7, partial=True)
    old = engine.model
    engine.restart()
    assert engine.model is not old and engine.weight_version == 0 and engine.health()
    torch.testing.assert_close(engine.logits(ids)[0], ref, rtol=0, atol=1e-6)

    empty = HFEngine.from_config(tmp_path)
    empty.update_weights(state_buckets(source), version=1)
    empty.restart()
    assert empty.weight_version is None
    with pytest.raises(StaleWeightsError):
        empty.logits(ids)
    with pytest.raises(WeightSyncError, match="not written"):  # fresh weights: partial is not enough
        empty.update_weights(state_buckets(source)[:2], version=2, partial=True)

    handed = engine_for(source)
    handed.restart()
    assert handed.weight_version is None and handed.model is source


def test_unsupported_models():
    from transformers import LlamaConfig, LlamaForCausalLM

    with pytest.raises(ValueError, match="not supported"):
        HFEngine(LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                              num_hidden_layers=1, num_attention_heads=2)))
    with pytest.raises(ValueError, match="internvl_chat.*native InternVL|native InternVL"):
        from eureka_megatron.rollout.hf_engine import _model_class

        _model_class(type("C", (), {"model_type": "internvl_chat"})())


@pytest.mark.gpu
def test_cuda_sync_generate_release_resume(models):
    source, prompts = models["qwen2_5_vl"], F.PROMPTS["qwen2_5_vl"]()
    engine = HFEngine.from_config(source.config, device="cuda", eos_token_ids=[F.EOS])
    engine.update_weights(state_buckets(source), version=1)
    assert engine.model.lm_head.weight.is_cuda
    sp = SamplingParams(temperature=0.7, top_k=40, top_p=0.9, max_new_tokens=8, seed=0)
    for s in engine.generate(prompts, 2, sp):
        ref = reference_logprobs(source, prompts[s.prompt_index], s.token_ids, 0.7)
        torch.testing.assert_close(torch.tensor(s.logprobs), ref, rtol=0, atol=1e-4)  # TF32 / kernels
    engine.release_memory()
    assert not engine.model.lm_head.weight.is_cuda and not engine.health()
    engine.resume_memory()
    assert engine.model.lm_head.weight.is_cuda and engine.weight_version == 1
    assert len(engine.generate(prompts, 1, sp)) == 3


# --- routing (MoE routing replay) --------------------------------------------------------------

def full_forward_routing(model, ids: list[int]) -> torch.Tensor:
    """[S, layers, k] experts transformers' routers pick for one unpadded sequence (no cache)."""
    routers = [m for m in model.modules() if type(m).__name__.endswith("TopKRouter")]
    picked = []
    hooks = [r.register_forward_hook(lambda m, a, out: picked.append(out[2])) for r in routers]
    try:
        F.full_forward_logits(model, ids, {})
    finally:
        for h in hooks:
            h.remove()
    return torch.stack(picked, dim=1)


def test_moe_engine_reports_the_experts_of_every_fed_token(models):
    """With return_routed_experts every sample carries [prompt + response - 1, layers, k] expert
    ids: the prompt's from the batched, left-padded prefill, then one row per decoded token fed
    back (the last token never is), equal to what one unpadded forward of the sequence picks."""
    model, prompts = models["qwen3_moe"], F.PROMPTS["qwen3_moe"]()
    engine = engine_for(model)
    sp = SamplingParams(temperature=1.0, max_new_tokens=8, seed=5, return_routed_experts=True)
    out = engine.generate(prompts, 2, sp)
    k, layers = model.config.num_experts_per_tok, model.config.num_hidden_layers
    for s in out:
        ids = list(prompts[s.prompt_index].input_ids) + s.token_ids
        assert s.routed_experts.dtype == torch.int32
        assert tuple(s.routed_experts.shape) == (len(ids) - 1, layers, k)
        ref = full_forward_routing(model, ids[:-1])
        assert torch.equal(s.routed_experts.sort(-1).values, ref.sort(-1).values.int())
    plain = engine.generate(prompts, 1, SamplingParams(max_new_tokens=2, seed=5))
    assert all(s.routed_experts is None for s in plain)  # off unless asked
    with pytest.raises(ValueError, match="no Mixture-of-Experts routers"):
        engine_for(models["qwen3"]).generate(prompts, 1, sp)
