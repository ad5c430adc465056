"""Sequence packing: first-fit-decreasing bins (hand-computed and invariants), cu_seqlens, the
block-causal mask against an element-wise reference, and the point of it all -- a packed row
gives every sequence exactly its unpacked mrope positions and its unpacked logits through a
real transformers model."""
from __future__ import annotations

import random

import pytest
import torch

from eureka_megatron.models.packing import (cu_seqlens, pack_rows, pack_sequences,
                                          packed_causal_mask, packed_position_ids)
from eureka_megatron.models.qwen2_5_vl.model import mrope_position_ids


def test_pack_sequences_hand_computed():
    # sorted 8(i2) 7(i4) 5(i0) 3(i1) 2(i3): 8 opens bin A (room 2), 7 bin B (room 3), 5 bin C,
    # 3 fits B exactly, 2 fits A exactly
    assert pack_sequences([5, 3, 8, 2, 7], 10) == [[2, 3], [1, 4], [0]]
    assert pack_sequences([4, 4, 4], 12) == [[0, 1, 2]]
    assert pack_sequences([3, 20, 3], 10) == [[1], [0, 2]]  # too long: a bin of its own
    assert pack_sequences([], 10) == []
    with pytest.raises(ValueError):
        pack_sequences([3, 0], 10)
    with pytest.raises(ValueError):
        pack_sequences([3], 0)


def test_pack_sequences_invariants():
    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.randint(1, 60) for _ in range(rng.randint(1, 40))]
        cap = rng.randint(20, 100)
        bins = pack_sequences(lengths, cap)
        assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
        totals = [sum(lengths[i] for i in b) for b in bins]
        assert all(t <= cap or len(b) == 1 for t, b in zip(totals, bins))
        # first fit: the first item of a later bin did not fit in any earlier one, so every
        # pair of bins holds more than cap together (at most one bin is half empty)
        assert all(totals[j] + totals[k] > cap for k in range(len(bins)) for j in range(k))
        if sum(lengths) <= cap:
            assert len(bins) == 1


def test_cu_seqlens_and_positions():
    cu = cu_seqlens([3, 1, 4])
    assert cu.dtype == torch.long and cu.tolist() == [0, 3, 4, 8]
    assert packed_position_ids(cu, 10).tolist() == [0, 1, 2, 0, 0, 1, 2, 3, 0, 0]


def test_packed_causal_mask_elementwise():
    lengths, total = [3, 1, 4], 11  # 3 padding positions
    cu = cu_seqlens(lengths)
    mask = packed_causal_mask(cu, total)
    assert mask.dtype == torch.bool and mask.shape == (1, 1, total, total)
    seg = [s for s, n in enumerate(lengths) for _ in range(n)] + [None] * (total - sum(lengths))
    for i in range(total):
        for j in range(total):
            if seg[i] is None:
                allowed = i == j  # padding sees only itself
            else:
                allowed = seg[j] == seg[i] and j <= i
            assert bool(mask[0, 0, i, j]) == (not allowed), (i, j)
    with pytest.raises(ValueError):
        packed_causal_mask(torch.tensor([0, 5, 3]), 6)
    with pytest.raises(ValueError):
        packed_causal_mask(cu, 7)


def test_pack_rows_layout():
    seqs = [[1, 2, 3], [4], [5, 6, 7, 8], [9, 9]]
    bins = pack_sequences([len(s) for s in seqs], 6)
    assert bins == [[2, 3], [0, 1]]  # 4+2 and 3+1
    ids, cus = pack_rows(seqs, bins, pad_id=-1, pad_to_multiple=4)
    assert ids.shape == (2, 8) and ids.dtype == torch.long  # widest bin 6, rounded up to 8
    assert ids[0].tolist() == [5, 6, 7, 8, 9, 9, -1, -1] and cus[0].tolist() == [0, 4, 6]
    for row, b, cu in zip(ids, bins, cus):
        flat = [t for i in b for t in seqs[i]]
        assert row[:len(flat)].tolist() == flat and (row[len(flat):] == -1).all()
        assert cu.tolist() == cu_seqlens([len(seqs[i]) for i in b]).tolist()
    with pytest.raises(ValueError, match="exactly once"):
        pack_rows(seqs, [[0, 1], [2]])


IMG, MERGE = 99, 2


def _mrope_case():
    """Three sequences with 0, 1 and 2 images (grids in merged tokens 2x2, 1x3 and 2x1)."""
    gen = torch.Generator().manual_seed(0)
    text = lambda n: torch.randint(1, 90, (n,), generator=gen).tolist()  # noqa: E731
    grids = [[(1, 4, 4)], [(1, 2, 6), (1, 4, 2)]]
    seqs = [text(5),
            text(2) + [IMG] * 4 + text(3),
            text(1) + [IMG] * 3 + text(2) + [IMG] * 2 + text(4)]
    return seqs, [[], *grids]


def test_packed_mrope_positions_equal_per_sequence():
    seqs, grids = _mrope_case()
    bins = [[2, 0, 1]]  # an order that is not the sorted one: images are consumed in row order
    ids, (cu,) = pack_rows(seqs, bins, pad_to_multiple=8)
    row_grids = torch.tensor([g for i in bins[0] for g in grids[i]])
    packed = mrope_position_ids(ids, row_grids, IMG, MERGE, cu_seqlens=cu)
    for k, i in enumerate(bins[0]):
        alone = mrope_position_ids(torch.tensor([seqs[i]]),
                                   torch.tensor(grids[i]) if grids[i] else None, IMG, MERGE)
        a, b = cu[k].item(), cu[k + 1].item()
        assert torch.equal(packed[:, 0, a:b], alone[:, 0]), i
    # sanity: the image sequence's positions are not plain arange (so the test means something)
    assert not torch.equal(packed[0, 0, :len(seqs[2])], torch.arange(len(seqs[2])))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_logits_equal_unpacked(attn):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).eval()
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 97, (n,), generator=gen).tolist() for n in (7, 3, 12, 5, 9)]
    bins = pack_sequences([len(s) for s in seqs], 20)
    assert any(len(b) > 1 for b in bins)
    ids, cus = pack_rows(seqs, bins, pad_to_multiple=8)
    S = ids.shape[1]
    with torch.no_grad():
        for row, b, cu in zip(ids, bins, cus):
            masked = packed_causal_mask(cu, S)
            mask = torch.zeros(1, 1, S, S).masked_fill(masked, torch.finfo(torch.float32).min)
            out = model(input_ids=row[None], attention_mask=mask,
                        position_ids=packed_position_ids(cu, S)[None], use_cache=False).logits[0]
            assert torch.isfinite(out).all()  # padding rows too: each sees itself
            for k, i in enumerate(b):
                alone = model(input_ids=torch.tensor([seqs[i]]), use_cache=False).logits[0]
                torch.testing.assert_close(out[cu[k]:cu[k + 1]], alone, rtol=0, atol=1e-5)
