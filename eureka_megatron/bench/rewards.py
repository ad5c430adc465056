"""`bench rewards`: responses/s of the rule-based reward (math-verify) in the RewardPool with 1, 2
and 4 workers, against the bound: the single-process in-line rate (no pool, no timeouts; measured
in a fresh interpreter, as the pool's workers are) times min(workers, cores).

The batch is a deterministic, MM-Eureka-like mix: 40% correct answers in <think>/<answer> format
(fractions vs decimals, sqrt forms, decimals vs fractions, permuted sets, integers), 20% multiple
choice letters, 20% wrong answers, 10% \\boxed-only answers without tags, 10% unparseable
plain-text gold labels ("clean"); then the same batch with ~1% replaced by the pathological
`9^{9^{9^{9^{9}}}}`, which the reward must refuse quickly or the pool's timeout ends (the
timeouts column says which). The clean pool rows are checked against the in-line scores. The
pathological rows are left out in-line: there nothing would bound them.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from fractions import Fraction

from eureka_megatron.bench.report import LEAD, lead
from eureka_megatron.config import DEFAULT_REWARD
from eureka_megatron.rewards.pool import RewardPool, _named_scores, resolve_function
from eureka_megatron.stats import mean

PATHOLOGICAL = r"<think>Powers of nine, stacked.</think> <answer>$9^{9^{9^{9^{9}}}}$</answer>"
_SENTENCES = [
    "Let me read the figure carefully: the side lengths are {a} and {b}.",
    "By the Pythagorean theorem the diagonal squared is {a}^2 + {b}^2 = {c}.",
    "The shaded region is {a} out of {b} equal parts, so I compare the ratios.",
    "Checking the units: {a} cm times {b} cm gives {c} square centimetres.",
    "Wait, I should double-check the sign; substituting x = {a} gives {c}.",
    "The table shows {a} apples on Monday and {b} on Tuesday, {c} in total.",
    "Hmm, the angle at the top is {a} degrees, so the other two add up to {c}.",
]


def _think(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(4, 12)):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        parts.append(rng.choice(_SENTENCES).format(a=a, b=b, c=a * a + b * b))
    return " ".join(parts)


def _tagged(rng: random.Random, answer: str) -> str:
    return f"<think>{_think(rng)}</think>\n<answer>${answer}$</answer>"


def _math_pair(rng: random.Random, wrong: bool) -> tuple[str, str]:
    """(gold LaTeX, an equivalent -- or, if wrong, a different -- form of it)."""
    kind = rng.choice(["fraction", "sqrt", "decimal", "set", "integer"])
    d = 1 if wrong else 0
    if kind == "fraction":
        q = Fraction(rng.randint(1, 40), rng.choice([2, 4, 5, 8, 20, 25]))
        return rf"\frac{{{q.numerator}}}{{{q.denominator}}}", f"{float(q) + d:g}"
    if kind == "sqrt":
        k, m = rng.randint(2, 9), rng.choice([2, 3, 5, 6, 7])
        return rf"{k}\sqrt{{{m}}}", rf"\sqrt{{{k * k * m + d}}}"
    if kind == "decimal":
        q = Fraction(2 * rng.randint(5, 199) + 1, 4)  # never a whole number
        return f"{float(q):g}", rf"\frac{{{q.numerator + d}}}{{{q.denominator}}}"
    if kind == "set":
        items = rng.sample(range(-9, 20), rng.randint(2, 4))
        shuffled = rng.sample(items, len(items))
        shuffled[0] += d
        return r"\{" + ",".join(map(str, items)) + r"\}", r"\{" + ",".join(map(str, shuffled)) + r"\}"
    n = rng.randint(-50, 500)
    return str(n), str(n + d)


def make_mix(n: int, seed: int = 0, pathological: bool = True) -> tuple[list[str], list[str]]:
    """n (response, gold) pairs in the module docstring's proportions, shuffled by `seed`; with
    `pathological`, the same pairs with ~1% of them replaced by the pathological power."""
    rng = random.Random(seed)
    shares = {"correct": 0.40, "choice": 0.20, "wrong": 0.20, "boxed": 0.10, "bad gold": 0.10}
    kinds = [k for k, share in shares.items() for _ in range(round(share * n))]
    kinds = (kinds + ["correct"] * n)[:n]
    rng.shuffle(kinds)
    responses, answers = [], []
    for kind in kinds:
        if kind == "choice":
            gold = rng.choice("ABCD")
            pick = gold if rng.random() < 0.75 else rng.choice("ABCD")
            response = f"<think>{_think(rng)}</think>\n<answer>{pick}</answer>"
        elif kind == "boxed":
            gold, pred = _math_pair(rng, wrong=False)
            response = f"{_think(rng)} So the answer is $\\boxed{{{pred}}}$."
        elif kind == "bad gold":
            gold = rng.choice(["sqrt(18)", "3 apples", "x=2 or 3 (both)", "see figure", "N/A"])
            response = _tagged(rng, str(rng.randint(0, 20)))
        else:
            gold, pred = _math_pair(rng, wrong=kind == "wrong")
            response = _tagged(rng, pred)
        responses.append(response)
        answers.append(gold)
    if pathological:
        for i in rng.sample(range(n), max(1, round(n / 100))):
            responses[i], answers[i] = PATHOLOGICAL, "1"
    return responses, answers


def _inline(functions: list[str], responses: list[str], answers: list[str]) -> list[dict]:
    """The same functions called in this process, one after another (no pool, no timeouts)."""
    fns = [resolve_function(f) for f in functions]
    out = []
    for r, a in zip(responses, answers):
        scores: dict[str, float] = {}
        for name, fn in fns:
            scores.update(_named_scores(name, fn(r, a, None)))
        out.append(scores)
    return out


def inline_timed(functions: list[str], n: int, repeats: int) -> tuple[float, list[dict]]:
    """(best-of-`repeats` seconds, scores) of `_inline` on the clean mix of n, after a warm-up."""
    _inline(functions, *make_mix(64, seed=1, pathological=False))
    seconds = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        scores = _inline(functions, *make_mix(n, seed=0, pathological=False))
        seconds = min(seconds, time.perf_counter() - t0)
    return seconds, scores


def _inline_fresh(functions: list[str], n: int, repeats: int) -> tuple[float, list[dict]]:
    """`inline_timed` in a fresh interpreter, like each pool worker: in this long-lived process
    (after other benches) the same Python runs measurably slower."""
    code = ("import json, sys\n"
            "from eureka_megatron.bench.rewards import inline_timed\n"
            "print(json.dumps(inline_timed(json.loads(sys.argv[1]), int(sys.argv[2]), "
            "int(sys.argv[3]))))")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(functions), str(n), str(repeats)],
                         check=True, stdout=subprocess.PIPE, text=True).stdout
    seconds, scores = json.loads(out.strip().splitlines()[-1])
    return seconds, scores


def run(quick: bool = False, functions: list[str] | None = None,
        workers: tuple[int, ...] = (1, 2, 4), timeout: float = 5.0) -> tuple[list[dict], list[str]]:
    """Rows for the table: in-line, then each pool size on the clean and the pathological mix."""

    functions = functions or [DEFAULT_REWARD]
    n, repeats = (100, 1) if quick else (400, 3)  # best of `repeats`: other load only slows
    clean = make_mix(n, seed=0, pathological=False)
    mixed = make_mix(n, seed=0, pathological=True)
    n_patho = sum(r == PATHOLOGICAL for r in mixed[0])
    warm = make_mix(64, seed=1, pathological=False)  # math-verify's ANTLR parser warms up

    inline_s, expected = _inline_fresh(functions, n, repeats)
    names = sorted(expected[0])
    cores = os.cpu_count() or 1
    inline_rate = n / inline_s
    rows = [{**lead("in-line reward (no pool), clean mix", f"{n} responses", inline_s,
                    inline_rate, "responses/s", 100.0, "itself (the in-line rate)"),
             "mix": "clean", "workers": "in-line (no pool)", "responses": n,
             "seconds": round(inline_s, 2), "responses/s": round(n / inline_s, 1),
             "mean accuracy": round(mean(e.get("accuracy", 0.0) for e in expected), 3)}]
    for k in workers:
        t0 = time.perf_counter()
        with RewardPool(functions, num_workers=k, timeout=timeout, memoize=False) as pool:
            start_s = time.perf_counter() - t0
            pool.score(*warm)
            for label, batch, reps in (("clean", clean, repeats),
                                       (f"{n_patho} x 9^9^9^9^9", mixed, 1)):
                secs = float("inf")
                for _ in range(reps):
                    t0 = time.perf_counter()
                    res = pool.score(*batch)
                    secs = min(secs, time.perf_counter() - t0)
                # k workers can at best run k in-line scorers on min(k, cores) cores
                bound = inline_rate * min(k, cores)
                row = {**lead(f"reward pool, {k} worker{'s' * (k > 1)}, "
                              + ("clean mix" if label == "clean" else f"mix with {label}"),
                              f"{n} responses", secs, n / secs, "responses/s",
                              100 * n / secs / bound,
                              f"in-line rate x min(workers, {cores} cores) = {bound:.3g}/s"),
                       "mix": label, "workers": k, "responses": n, "seconds": round(secs, 2),
                       "responses/s": round(n / secs, 1), "start-up s": round(start_s, 2),
                       "timeouts": res.counters["reward/timeouts"],
                       "errors": res.counters["reward/errors"],
                       "mean accuracy": round(mean(res.scores.get("accuracy", [0.0])), 3)}
                if label == "clean":
                    got = [{m: res.scores[m][i] for m in names} for i in range(n)]
                    row["equals in-line"] = "yes" if got == [{m: e[m] for m in names}
                                                             for e in expected] else "NO"
                rows.append(row)
    return rows, LEAD + ["start-up s", "timeouts", "errors", "mean accuracy", "equals in-line"]
