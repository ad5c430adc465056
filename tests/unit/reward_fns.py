"""Reward functions for the reward pool tests, at module level so spawned workers can import them
as "tests.unit.reward_fns:<name>" (spawn hands the parent's sys.path to each worker).

`behave` misbehaves on marked responses and otherwise returns a score unique to the response,
so a result given to the wrong sample cannot go unnoticed.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

NOT_CALLABLE = 3
time.sleep(float(os.environ.get("REWARD_FNS_IMPORT_DELAY", "0")))  # a slow-to-import worker


def length(response: str, answer: str, meta: dict | None) -> float:
    """A bare number: its score name is the function name, "length"."""
    return float(len(response))


def toy_scores(response: str, answer: str, meta: dict | None) -> dict:
    """Deterministic stand-in for rule_based_scores: exact-match accuracy, tag format."""
    return {"accuracy": float(response.strip() == answer.strip()),
            "format": float(response.startswith("<"))}


def parity_judge(response: str, answer: str, meta: dict | None) -> dict:
    """An eval judge whose verdicts vary across random responses (a random tiny model never
    writes a correct answer, so the real judge would score every response 0)."""
    return {"accuracy": float(len(response) % 2 == 0), "format": float(response[:1] < "m")}


def _sleep_ignoring_alarm(seconds: float) -> None:
    signal.signal(signal.SIGALRM, signal.SIG_IGN)  # what a signal-based timeout cannot stop
    time.sleep(seconds)


def behave(response: str, answer: str, meta: dict | None) -> dict:
    """Marked responses crash / raise / hang; every other one scores len(response) + 1000 * ok."""
    if response == "CRASH":
        os._exit(1)
    if response == "CRASH_ONCE":  # dies the first time it sees this sample's marker file
        marker = Path(meta["marker"])
        if not marker.exists():
            marker.write_text("crashed once")
            os._exit(3)
    if response == "RAISE":
        raise ValueError("boom")
    if response == "SLEEP":
        _sleep_ignoring_alarm(60)
    if response == "SPIN":
        signal.signal(signal.SIGALRM, signal.SIG_IGN)
        pow(9, 9 ** 9)  # minutes of C code that never returns to the interpreter
    return {"unique": float(len(response)) + 1000.0 * (response == answer)}


def bad_return(response: str, answer: str, meta: dict | None):
    return "not a score"


def mv_accuracy(response: str, answer: str, meta: dict | None) -> dict:
    """math-verify with MM-Eureka's extraction configs, for the pathological-answer test."""
    from math_verify import (ExprExtractionConfig, LatexExtractionConfig, StringExtractionConfig,
                             parse, verify)

    gold = parse(f"${answer}$")
    pred = parse(response, [StringExtractionConfig(), LatexExtractionConfig(), ExprExtractionConfig()])
    return {"accuracy": float(verify(pred, gold))}


def logged(response: str, answer: str, meta: dict | None) -> dict:
    """`behave`'s score, and one line per call in the file `meta["log"]` (counts real calls)."""
    with open(meta["log"], "a") as f:
        f.write(f"{response}|{answer}\n")
    return behave(response, answer, meta)
