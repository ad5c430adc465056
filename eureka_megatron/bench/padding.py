"""Padding efficiency of the actor's micro-batches: real tokens / computed tokens, padded rows
against packed rows, on a synthetic batch with MM-Eureka-like lengths (`bench step` prints it).

The lengths: 128 prompts x 8 responses (the 7B recipe's step). Prompts are text plus image
tokens, log-normal between 300 and 3,000 tokens; responses are long-tailed, log-normal with a
median of ~400 tokens, cut to 50..4,096 (`max_new_tokens`); the 8 responses of a prompt share
its length. The batch goes through the actor's own planning -- `dp_share` over DP 4, the 8
mini-batches of whole groups, `partition` at micro_batch_tokens 8192 -- so the figures are the
trainer's, not a model of it. Seeded: the same numbers every run.
"""
from __future__ import annotations

import random

from eureka_megatron.bench.report import lead
from eureka_megatron.trainer.batches import (Sequence, computed_tokens, dp_share,
                                             mini_batch_groups, partition)

PROMPTS, SAMPLES, DP, MINI_BATCHES, BUDGET = 128, 8, 4, 8, 8192
PROMPT_RANGE, RESPONSE_RANGE = (300, 3000), (50, 4096)


def synthetic_lengths(seed: int = 0) -> list[tuple[int, int, int]]:
    """(group, prompt tokens, response tokens) of every sequence of one step."""
    rng = random.Random(seed)
    out = []
    for g in range(PROMPTS):
        prompt = int(min(max(rng.lognormvariate(6.6, 0.55), PROMPT_RANGE[0]), PROMPT_RANGE[1]))
        for _ in range(SAMPLES):
            resp = rng.lognormvariate(6.0, 0.9)  # e^6 ~ 400 tokens
            out.append((g, prompt, int(min(max(resp, RESPONSE_RANGE[0]), RESPONSE_RANGE[1]))))
    return out


def efficiency(lengths: list[tuple[int, int, int]], pack: bool, dp: int = DP,
               mini_batches: int = MINI_BATCHES, budget: int = BUDGET) -> dict:
    """Real and computed tokens and micro-batches of one step planned as the actor plans it
    (`Actor.plan`: mini-batches of whole groups, DP shares, then micro-batches)."""
    seqs = [Sequence([0] * p, [0] * r, group=g) for g, p, r in lengths]
    real = computed = micro = busiest = 0
    for mini in mini_batch_groups(seqs, mini_batches):
        rank_computed = []
        for r in range(dp):
            share = [len(s) for s in dp_share(mini, r, dp)]
            parts = partition(share, budget, pack)
            rank_computed.append(computed_tokens(share, parts, pack))
            real += sum(share)
            micro += len(parts)
        computed += sum(rank_computed)
        busiest += max(rank_computed)  # the step waits for the busiest DP rank
    return {"real": real, "computed": computed, "micro_batches": micro, "busiest": busiest}


def padding_rows() -> list[dict]:
    """Bench rows: padded and packed micro-batches of the synthetic step."""
    lengths = synthetic_lengths()
    mean_p = sum(p for _, p, _ in lengths) / len(lengths)
    mean_r = sum(r for _, _, r in lengths) / len(lengths)
    size = (f"{PROMPTS} prompts x {SAMPLES}, prompt mean {mean_p:.0f} tokens, response mean "
            f"{mean_r:.0f} (max {max(r for _, _, r in lengths)}); DP {DP}, {MINI_BATCHES} "
            f"mini-batches, micro_batch_tokens {BUDGET}")
    rows = []
    for pack in (False, True):
        e = efficiency(lengths, pack)
        rows.append({**lead(f"padding efficiency, {'packed' if pack else 'padded'} micro-batches",
                            size, None, 100 * e["real"] / e["computed"], "% real tokens", None,
                            "real / computed tokens"),
                     "micro-batches": e["micro_batches"], "computed tokens": e["computed"],
                     "real tokens": e["real"], "busiest DP rank tokens": e["busiest"]})
    return rows
