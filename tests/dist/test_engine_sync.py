"""Megatron -> HF engine weight sync, end to end on gloo ranks.

A tiny random HF checkpoint is loaded into our megatron model at TP2 x PP2 (and TP2, EP2); the weights
are synced into an HF engine built from the config alone (empty weights). The engine must then
compute transformers' logits on the original checkpoint (fp32, 1e-5), and the log-probs it
reports for sequences it sampled must equal the trainer's (fused kernel through the pipeline)
within 1e-5. A sync broken by an engine failure is survived: the engine serves nothing until a
restart and a complete re-sync, and its version says so.
"""
import pytest
import torch

from eureka_megatron.config import ParallelConfig
from eureka_megatron.models.registry import FAMILIES
from eureka_megatron.rollout.engine import Prompt, SamplingParams
from eureka_megatron.runtime.launcher import launch

FAMILY = {f.name: f for f in FAMILIES}


class FlakyEngine:
    """Wraps an engine; the first `update_weights` dies after `fail_after` buckets."""

    def __init__(self, engine, fail_after):
        self.engine, self.fail_after, self.restarts, self.failures = engine, fail_after, 0, 0
        self.weight_layout = engine.weight_layout

    def update_weights(self, buckets, version):
        if self.failures == 0:
            def failing():
                for i, bucket in enumerate(buckets):
                    if i == self.fail_after:
                        self.failures += 1
                        raise ConnectionError("engine died mid-sync")
                    yield bucket
            return self.engine.update_weights(failing(), version)
        return self.engine.update_weights(buckets, version)

    def restart(self):
        self.restarts += 1
        self.engine.restart()

    def __getattr__(self, name):
        return getattr(self.engine, name)


def sequences_batch(prompt, samples, pad_id):
    """Prompt + each sample, right-padded; labels are the next tokens of the generated part."""
    rows = [list(prompt.input_ids) + s.token_ids for s in samples]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    engine_lp = torch.zeros(len(rows), width)
    p = len(prompt.input_ids)
    for i, (r, s) in enumerate(zip(rows, samples)):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
        labels[i, p - 1:len(r) - 1] = torch.tensor(s.token_ids)
        engine_lp[i, p - 1:len(r) - 1] = torch.tensor(s.logprobs)
    return ids, mask, labels, engine_lp


def sync_rank(family_name, cfg, par, tensors, hf_config, logits_inputs, prompt, fail_after, layout):
    from eureka_megatron.models.forward import forward_token_logprobs
    from eureka_megatron.models.init import fill_global_tensors
    from eureka_megatron.algo.mismatch import mismatch_sums
    from eureka_megatron.rollout.hf_engine import HFEngine
    from eureka_megatron.rollout.weight_sync import sync_with_restart
    from eureka_megatron.runtime.distributed import init_distributed

    init_distributed(par)
    fam = FAMILY[family_name]
    chunks = fam.build_chunks(cfg, par)
    fill_global_tensors(chunks, lambda key, layer, shape: tensors[(key, layer)])
    for c in chunks:
        c.eval()
    rank0 = torch.distributed.get_rank() == 0
    engine = None
    if rank0:
        engine = HFEngine.from_config(hf_config, dtype=torch.float32, device="cpu")
        if fail_after is not None:
            engine = FlakyEngine(engine, fail_after)
    result = sync_with_restart(chunks, fam.mapping(cfg, layout), engine, version=7,
                               bucket_bytes=64 << 10)  # 64 KiB: the embedding is bigger
    out = {"ok": result.ok, "attempts": result.attempts}
    payload = [None]
    if rank0:
        out["version"] = engine.weight_version
        out["logits"] = engine.logits(**logits_inputs)
        samples = engine.generate([prompt], 3, SamplingParams(temperature=0.8, top_k=50,
                                                               max_new_tokens=6, seed=0))
        out["samples"] = samples
        payload = [sequences_batch(prompt, samples, pad_id=0)]
        if fail_after is not None:
            out["restarts"], out["failures"] = engine.restarts, engine.failures
    torch.distributed.broadcast_object_list(payload, src=0)
    ids, mask, labels, engine_lp = payload[0]
    rows = len(ids)  # every row carries its own copy of the prompt's images
    inputs = {"input_ids": ids, "attention_mask": mask,
              **{k: torch.cat([v] * rows) for k, v in prompt.mm_inputs.items()}}
    mb = fam.prepare(cfg, inputs)
    mb["labels"] = labels
    (trainer_lp,) = forward_token_logprobs(chunks, [mb], lambda c, b: fam.call(cfg, c, b),
                                           vocab_size=getattr(cfg, "text", cfg).vocab_size,
                                           temperature=0.8, backend="torch")
    if rank0:
        # the per-step mismatch metrics, as the loop logs them (d = trainer - engine)
        sums = mismatch_sums(trainer_lp, engine_lp, (labels >= 0).float(), cap=2.0)
        out["agreement"] = {"rollout/logprob_abs_diff_max":
                            float(sums["rollout_logprob_abs_diff_max"])}
        out["generated"] = int((labels >= 0).sum())
    return out


def qwen2_5_vl_case():
    from tests.dist import test_qwen2_5_vl as q

    cfg = q.our_config()
    hf = q.hf_model(cfg)
    input_ids, pixels = q.batch()
    kw = dict(pixel_values=pixels, image_grid_thw=q.GRIDS)
    with torch.no_grad():
        ref = hf(input_ids=input_ids, mm_token_type_ids=(input_ids == q.IMAGE).int(), **kw).logits
    n0 = int(q.GRIDS[0].prod())
    prompt = Prompt(input_ids=input_ids[0, :12].tolist(),
                    mm_inputs={"pixel_values": pixels[:n0], "image_grid_thw": q.GRIDS[:1]})
    return "qwen2_5_vl", cfg, hf, dict(input_ids=input_ids, **kw), ref, prompt, "memory"


def internvl_case():
    from tests.dist import test_internvl as iv

    cfg = iv.our_config("vit6b")
    hf = iv.hf_model(cfg)
    input_ids, pixels, _ = iv.batch()
    ref, _ = iv.reference(hf, input_ids, pixels)
    prompt = Prompt(input_ids=input_ids[0, :10].tolist(), mm_inputs={"pixel_values": pixels[:1]})
    return "internvl", cfg, hf, dict(input_ids=input_ids, pixel_values=pixels), ref, prompt, \
        "native_memory"


def qwen3_vl_case():
    from tests.dist import test_qwen3_vl as q

    input_ids, pixels = q.batch()
    ref = q.hf_logits(input_ids, pixels, q.GRIDS)
    n0 = int(q.GRIDS[0].prod())
    prompt = Prompt(input_ids=input_ids[0, :12].tolist(),  # its image (4 tokens) and text
                    mm_inputs={"pixel_values": pixels[:n0], "image_grid_thw": q.GRIDS[:1]})
    inputs = dict(input_ids=input_ids, pixel_values=pixels, image_grid_thw=q.GRIDS)
    return "qwen3_vl", q.our_config(), q.hf_model(), inputs, ref, prompt, "memory"


def qwen3_vl_moe_case():
    from tests.dist import test_qwen3_vl as q
    from tests.dist import test_qwen3_vl_moe as m

    input_ids, pixels, ref = m.reference()
    n0 = int(q.GRIDS[0].prod())
    prompt = Prompt(input_ids=input_ids[0, :12].tolist(),
                    mm_inputs={"pixel_values": pixels[:n0], "image_grid_thw": q.GRIDS[:1]})
    inputs = dict(input_ids=input_ids, pixel_values=pixels, image_grid_thw=q.GRIDS)
    return "qwen3_vl_moe", m.our_config(), m.hf_model(), inputs, ref, prompt, "memory"


CASES = {  # (case, TP, PP, engine fails after this many buckets[, EP])
    "qwen2_5_vl_tp2_pp2": (qwen2_5_vl_case, 2, 2, None),
    "qwen2_5_vl_tp2_engine_dies_mid_sync": (qwen2_5_vl_case, 2, 1, 3),
    "internvl_tp2_pp2": (internvl_case, 2, 2, None),
    "internvl_tp2": (internvl_case, 2, 1, None),
    "qwen3_vl_tp2_pp2": (qwen3_vl_case, 2, 2, None),  # DeepStack's layers and the tower on stage 0
    "qwen3_vl_moe_ep2": (qwen3_vl_moe_case, 1, 1, None, 2),  # each rank holds half the experts
}


@pytest.mark.parametrize("case", list(CASES))
def test_engine_after_sync_runs_the_trained_weights(case):
    make, tp, pp, fail_after, *ep = CASES[case]
    ep = ep[0] if ep else 1
    family, cfg, hf, logits_inputs, ref, prompt, layout = make()
    tensors = FAMILY[family].mapping(cfg, layout).to_megatron(hf.state_dict().__getitem__)
    par = ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp, nproc=tp * pp * ep,
                         expert_parallel=ep)
    results = launch(sync_rank, par.nproc, family, cfg, par, tensors, hf.config.to_dict(),
                     logits_inputs, prompt, fail_after, layout)
    assert all(r["ok"] for r in results)
    out = results[0]
    assert out["version"] == 7
    rel = float((out["logits"] - ref.float()).abs().max() / ref.float().abs().max())
    assert rel < 1e-5, rel
    assert out["generated"] >= 3 and all(s.weight_version == 7 for s in out["samples"])
    assert out["agreement"]["rollout/logprob_abs_diff_max"] < 1e-5, out["agreement"]
    if fail_after is not None:  # one failure, one restart, a second complete sync
        assert (out["failures"], out["restarts"], out["attempts"]) == (1, 1, 2)
        assert all(r["attempts"] == 2 for r in results)
