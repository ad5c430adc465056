"""The actor's micro-batch layouts (trainer/batches.py), by hand: a packed row's tokens, labels,
boundaries and the map back to one row per sequence; computed tokens of both layouts; DP shares
balanced by tokens."""
import torch

from eureka_megatron.models.packing import as_rows
from eureka_megatron.trainer.batches import (IGNORE, Sequence, collate, computed_tokens, dp_share,
                                             packed, partition)


def test_packed_row_hand_checked():
    seqs = [Sequence([5, 6], [7, 8, 9]), Sequence([5], [4])]
    raw = collate(seqs, pad_id=0)
    out = packed(raw, pad_id=0, width_multiple=4)  # 7 real tokens + a tail of 1
    assert out["input_ids"].tolist() == [[5, 6, 7, 8, 9, 5, 4, 0]]
    assert out["labels"].tolist() == [[IGNORE, 7, 8, 9, IGNORE, 4, IGNORE, IGNORE]]
    assert out["cu_seqlens"].tolist() == [0, 5, 7, 8] and out["max_seqlen"] == 5
    assert out["packed_index"][out["packed_valid"]].tolist() == list(range(7))
    assert out["loss_mask"].tolist() == raw["loss_mask"].tolist()  # the loss side keeps rows
    # a value per packed token, laid out per sequence (zeros at the padded columns)
    rows = as_rows(torch.arange(8.0)[None], out)
    assert rows.tolist() == [[0, 1, 2, 3, 4], [5, 6, 0, 0, 0]]


def test_computed_tokens_of_both_layouts():
    lengths = [10, 3, 7, 2]
    padded = partition(lengths, 14, pack=False)
    assert padded == [[0], [1, 2], [3]]  # 2 x 7 = 14 fits; 3 x 7 does not
    assert computed_tokens(lengths, padded, pack=False) == 10 + 2 * 7 + 2
    assert computed_tokens(lengths, padded, pack=False, width_multiple=4) == 12 + 2 * 8 + 4
    packs = partition(lengths, 14, pack=True)
    assert packs == [[0, 1], [2, 3]]  # first-fit decreasing: 10 + 3, 7 + 2
    assert computed_tokens(lengths, packs, pack=True) == 22
    assert computed_tokens(lengths, packs, pack=True, width_multiple=4) == 16 + 12


def test_dp_share_balances_tokens_longest_first():
    seqs = [Sequence([1] * n, []) for n in (9, 8, 5, 4, 3, 3)]
    shares = [[len(s) for s in dp_share(seqs, r, 2)] for r in range(2)]
    # 9 -> r0, 8 -> r1, 5 -> r1 (8 < 9), 4 -> r0 (9 < 13), 3 -> r0 (13 = 13: lower rank), 3 -> r1
    assert shares == [[9, 4, 3], [8, 5, 3]]
    assert len(dp_share(seqs[:2], 1, 2)) == 1  # as many sequences as ranks: one each
