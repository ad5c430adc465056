"""Rule-based rewards: every rule of the accuracy / format contract, against hand-written
expected values (the right answer to each case, not what the code happens to return)."""
from __future__ import annotations

import importlib
import json
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from eureka_megatron import rewards
from eureka_megatron.rewards import accuracy as acc
from eureka_megatron.rewards import accuracy_reward, format_reward, rule_based_scores


def ans(text: str) -> str:
    return f"<think>reasoning</think>\n<answer>{text}</answer>"


MATH_CASES = [
    # fractions and decimals, both directions
    ("frac-vs-decimal", ans("0.5"), r"\frac{1}{2}", 1.0),
    ("frac-vs-slash", ans("1/2"), r"\frac{1}{2}", 1.0),
    ("decimal-gold-frac-pred", ans(r"\frac{1}{2}"), "0.5", 1.0),
    ("dollar-gold", ans("0.5"), r"$\frac{1}{2}$", 1.0),
    ("decimal-trailing-zero", ans("2.50"), "2.5", 1.0),
    ("decimal-wrong", ans("2.51"), "2.5", 0.0),
    ("integer-vs-float", ans("2.0"), "2", 1.0),
    ("thousands-comma", ans("1,000"), "1000", 1.0),
    ("negative-sign-matters", ans("-3"), "3", 0.0),
    ("pi-numeric", ans("0.785398"), r"\frac{\pi}{4}", 1.0),
    ("pi-too-coarse", ans("0.785"), r"\frac{\pi}{4}", 0.0),
    # percentages: math-verify accepts both readings of 50% (0.5 and 50) -- documented behaviour
    ("percent-gold-decimal-pred", ans("0.5"), r"50\%", 1.0),
    ("percent-gold-number-pred", ans("50"), r"50\%", 1.0),
    ("percent-pred-decimal-gold", ans(r"50\%"), "0.5", 1.0),
    ("percent-wrong", ans(r"40\%"), r"50\%", 0.0),
    # sets, intervals, tuples
    ("set-order", ans(r"\{2,1\}"), r"\{1,2\}", 1.0),
    ("set-missing-element", ans(r"\{1\}"), r"\{1,2\}", 0.0),
    ("interval-open-vs-half-open", ans("(1,2)"), "(1,2]", 0.0),
    ("interval-same", ans("(1,2]"), "(1,2]", 1.0),
    ("interval-infinity", ans(r"$\boxed{(2, \infty)}$"), r"(2,\infty)", 1.0),
    # equations and units
    ("equation-pred", ans("x = 2"), "2", 1.0),
    ("equation-gold", ans("2"), "x = 2", 1.0),
    ("equation-wrong", ans("x = 3"), "2", 0.0),
    ("unit-cm", ans("5 cm"), "5", 1.0),
    ("unit-text-cm", ans(r"5\text{ cm}"), "5", 1.0),
    ("unit-degrees", ans(r"30^\circ"), "30", 1.0),
    ("unit-degrees-braced", ans(r"$30^{\circ}$"), "30", 1.0),
    ("unit-wrong-number", ans("6 cm"), "5", 0.0),
    # radicals
    ("boxed-radical", r"so \boxed{3\sqrt{2}}", r"\sqrt{18}", 1.0),
    ("radical-is-not-its-coefficient", ans(r"$3\sqrt{2}$"), "3", 0.0),
    ("bare-latex-in-prose", ans(r"The answer is 3\sqrt{2}"), r"3\sqrt{2}", 1.0),
    ("bare-latex-in-prose-not-coefficient", ans(r"The answer is 3\sqrt{2}"), "3", 0.0),
    ("frac-in-prose-with-unit", ans(r"the length is \frac{1}{2} cm"), "0.5", 1.0),
    ("last-number-in-prose", ans("There are 5 apples and 3 pears, so 8 fruits."), "8", 1.0),
    ("sqrt-function-call-gold-parses", r"\boxed{3\sqrt{2}}", "sqrt(18)", 1.0),
    ("sqrt-function-call-pred", ans("the answer is sqrt(18)"), r"3\sqrt{2}", 1.0),
    # boxed extraction
    ("nested-boxed-braces", r"thus \boxed{\frac{1}{2}}.", "0.5", 1.0),
    ("boxed-inside-answer-block", ans(r"The answer is $\boxed{2}$"), "2", 1.0),
    ("boxed-beats-later-dollar", ans(r"The answer is $\boxed{2}$, not $3$"), "2", 1.0),
    ("last-boxed-wins", r"first \boxed{1}, finally \boxed{2}", "2", 1.0),
    ("earlier-boxed-loses", r"first \boxed{1}, finally \boxed{2}", "1", 0.0),
    ("unclosed-last-boxed", r"\boxed{2} then \boxed{3", "2", 0.0),
    # answer blocks
    ("last-answer-block-wins", "<answer>1</answer> no, <answer>2</answer>", "2", 1.0),
    ("earlier-answer-block-loses", "<answer>1</answer> no, <answer>2</answer>", "1", 0.0),
    ("answer-block-beats-boxed", r"\boxed{1} <answer>2</answer>", "2", 1.0),
    ("answer-block-beats-boxed-wrong", r"\boxed{1} <answer>2</answer>", "1", 0.0),
    ("multi-line-answer-block", "<think>t</think><answer>\nThe answer\nis $7$\n</answer>", "7", 1.0),
    ("multi-line-display-math", ans("$$\nx=2\n$$"), "2", 1.0),
    ("number-only-in-reasoning", "<think>it is 7</think> so it is 7", "7", 0.0),
    ("unclosed-answer-block", "<think>7</think><answer>7", "7", 0.0),
    ("empty-answer-block", ans("   "), "7", 0.0),
    # wrong answers
    ("wrong-integer", ans("8"), "7", 0.0),
    ("wrong-fraction", ans(r"\frac{1}{3}"), r"\frac{1}{2}", 0.0),
    ("wrong-boxed", r"\boxed{7}", "8", 0.0),
    ("list-is-not-one-element", ans("2, 3"), "2", 0.0),
    ("or-list-is-a-set", ans("x = 2 or x = 3"), r"\{2,3\}", 1.0),
]


@pytest.mark.parametrize("response,gold,expected", [c[1:] for c in MATH_CASES],
                         ids=[c[0] for c in MATH_CASES])
def test_math_answers(response, gold, expected):
    assert accuracy_reward(response, gold) == expected


CHOICE_CASES = [
    ("bare-letter", "B", "B", 1.0),
    ("parenthesised", "(B)", "B", 1.0),
    ("gold-parenthesised", "B", "(B)", 1.0),
    ("gold-with-period-and-spaces", "B", "  B. ", 1.0),
    ("letter-period", "B.", "B", 1.0),
    ("starts-letter-period", "B. 45 degrees", "B", 1.0),
    ("starts-letter-paren", "B) 45 degrees", "B", 1.0),
    ("starts-parenthesised", "(B) 45 degrees", "B", 1.0),
    ("answer-is", "The answer is C", "C", 1.0),
    ("answer-is-other-gold", "The answer is C", "A", 0.0),  # "answer" contains "a": no credit
    ("answer-is-D", "The answer is D.", "D", 1.0),
    ("answer-is-parenthesised", "the answer is (D)", "D", 1.0),
    ("answer-is-boxed", r"The answer is $\boxed{C}$", "C", 1.0),
    ("boxed-letter", r"\boxed{B}", "B", 1.0),
    ("text-letter", r"$\text{(B)}$", "B", 1.0),
    ("two-letters-and", "A and C", "A", 0.0),
    ("two-letters-and-other", "A and C", "C", 0.0),
    ("two-letters-comma", "A, C", "A", 0.0),
    ("two-letters-parenthesised", "(A) and (C)", "A", 0.0),
    ("answer-is-two-letters", "The answer is A or C", "A", 0.0),
    ("wrong-letter", "D", "B", 0.0),
    ("letter-as-article-is-no-choice", "A triangle with sides 3, 4, 5", "A", 0.0),
    ("word-starting-with-letter", "The answer is Apple", "A", 0.0),
    ("letter-J", "J", "J", 1.0),
    ("lowercase-is-no-choice", "b", "B", 0.0),
    ("no-answer-is-phrase", "I think C", "C", 0.0),
]


@pytest.mark.parametrize("answer_text,gold,expected", [c[1:] for c in CHOICE_CASES],
                         ids=[c[0] for c in CHOICE_CASES])
def test_multiple_choice(answer_text, gold, expected):
    assert accuracy_reward(ans(answer_text), gold) == expected


def test_choice_without_answer_block_or_boxed_scores_zero():
    # No <answer> block and no \boxed{}: nothing was declared as the answer.
    assert accuracy_reward("The answer is C", "C") == 0.0


TEXT_CASES = [
    ("case-and-period", "paris.", "Paris", 1.0),
    ("different-word", "London", "Paris", 0.0),
    ("anagram-is-not-equal", "Pairs", "Paris", 0.0),  # math-verify: P*a*r*i*s == P*a*i*r*s
    ("text-command-gold", "red", r"\text{red}", 1.0),
    ("text-command-pred", r"$\text{Red}$", "red", 1.0),
    ("anagram-red", "der", "red", 0.0),
    ("answer-is-prefix", "The answer is Paris.", "Paris", 1.0),
    ("whitespace-collapsed", "No   solution", "no solution", 1.0),
    ("multi-word-wrong", "one solution", "no solution", 0.0),
    ("comma-words", "paris, france", "Paris, France", 1.0),
    ("unicode-words", "红色", "红色", 1.0),
    ("unicode-words-wrong", "蓝色", "红色", 0.0),
    ("number-for-word-gold", "5", "Paris", 0.0),
    ("unparseable-gold-other-text", "banana", "sqrt(18)", 0.0),
    ("unparseable-gold-number", "5", "sqrt(18)", 0.0),
    ("unparseable-python-power-gold", "x**2", "x**2", 1.0),
    ("unparseable-python-power-gold-wrong", "x**3", "x**2", 0.0),
]


@pytest.mark.parametrize("answer_text,gold,expected", [c[1:] for c in TEXT_CASES],
                         ids=[c[0] for c in TEXT_CASES])
def test_text_golds_never_give_free_reward(answer_text, gold, expected):
    assert accuracy_reward(ans(answer_text), gold) == expected


@pytest.mark.parametrize("gold", ["Paris", "sqrt(18)", "red", "x**2", "no solution", "B"])
def test_unrelated_response_never_scores(gold):
    # MM-Eureka bug 1: any gold math-verify could not parse gave 1.0 to every response.
    for response in (ans("42"), ans(r"\frac{1}{2}"), ans("garbage"), "no tags at all", ""):
        assert accuracy_reward(response, gold) == 0.0


@pytest.mark.parametrize("response,gold", [
    (ans("2"), ""), (ans("2"), "   "), ("", "2"), ("   \n", "2"), (None, "2"), (ans("2"), None),
    (ans("2"), ["2"]), (ans("2"), True), (123, "123"),
])
def test_empty_or_invalid_inputs_score_zero(response, gold):
    assert accuracy_reward(response, gold) == 0.0


def test_numeric_gold_is_read_as_text():
    assert accuracy_reward(ans("2"), 2) == 1.0
    assert accuracy_reward(ans("0.5"), 0.5) == 1.0
    assert accuracy_reward(ans("3"), 2) == 0.0


def test_answer_length_cap():
    # "000…01" is the number 1: accepted below the cap, refused above it.
    short = "0" * (acc.MAX_ANSWER_CHARS - 10) + "1"
    long = "0" * (acc.MAX_ANSWER_CHARS + 10) + "1"
    assert accuracy_reward(ans(short), "1") == 1.0
    assert accuracy_reward(ans(long), "1") == 0.0
    assert accuracy_reward(r"\boxed{" + long + "}", "1") == 0.0
    assert accuracy_reward(ans("1"), long) == 0.0


@pytest.mark.parametrize("response,expected", [
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"\boxed {x}", "x"),
    (r"a \boxed{1} b \boxed{\{1,2\}} c", r"\{1,2\}"),
    (r"\boxed{\{1,2}", r"\{1,2"),  # escaped braces do not count
    (r"\boxed{\boxed{2}}", "2"),
    (r"\boxed{2", None),
    ("no box", None),
    ("<answer>\na\nb\n</answer>", "\na\nb\n"),
    ("<answer>1</answer><answer>2</answer>", "2"),
    ("<answer>1<answer>2</answer>", "2"),
    (r"<answer>x</answer> \boxed{y}", "x"),
    (r"</answer> \boxed{y}", "y"),
])
def test_extract_answer(response, expected):
    assert acc.extract_answer(response) == expected


@pytest.mark.parametrize("response", [
    r"\boxed{" * 5000,
    "<answer>" + "(" * 3000 + "</answer>",
    "<answer>" + r"\frac{" * 500 + "</answer>",
    "<answer>$$$$$$</answer>",
    "<answer>\\</answer>",
    "<answer>}{</answer>",
    "<answer>\x00\x01\ud800</answer>",
    "<answer>1/0</answer>",
    "<answer>" + "x" * 100_000 + "</answer>",
    "<answer>" + " ".join(["1"] * 1500) + "</answer>",
])
def test_garbage_never_raises(response):
    for gold in ("1", "A", "Paris"):
        assert accuracy_reward(response, gold) in (0.0, 1.0)


def test_errors_inside_math_verify_score_zero(monkeypatch):
    from math_verify.errors import TimeoutException

    def boom(*args, **kwargs):
        raise RuntimeError("math-verify broke")

    def slow(*args, **kwargs):
        raise TimeoutException("Operation timed out!")

    monkeypatch.setattr(acc, "verify", boom)
    assert accuracy_reward(ans("0.5"), r"\frac{1}{2}") == 0.0
    monkeypatch.setattr(acc, "verify", slow)
    assert accuracy_reward(ans("0.5"), r"\frac{1}{2}") == 0.0
    monkeypatch.setattr(acc, "parse", boom)
    assert accuracy_reward(ans("0.5"), r"\frac{1}{2}") == 0.0


@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit])
def test_interrupts_are_not_swallowed(monkeypatch, exc):
    def interrupt(*args, **kwargs):
        raise exc()

    monkeypatch.setattr(acc, "verify", interrupt)
    with pytest.raises(exc):
        accuracy_reward(ans("0.5"), r"\frac{1}{2}")


def _timeouts_seen(monkeypatch, run):
    """Run `run` with parse/verify spied; return the timeout arguments they received."""
    seen = []
    real_parse, real_verify = acc.parse, acc.verify

    def parse(*args, parsing_timeout, **kwargs):
        seen.append(("parse", parsing_timeout))
        return real_parse(*args, parsing_timeout=parsing_timeout, **kwargs)

    def verify(*args, timeout_seconds, **kwargs):
        seen.append(("verify", timeout_seconds))
        return real_verify(*args, timeout_seconds=timeout_seconds, **kwargs)

    monkeypatch.setattr(acc, "parse", parse)
    monkeypatch.setattr(acc, "verify", verify)
    run()
    return seen


def test_timeouts_in_main_thread(monkeypatch):
    result = []
    seen = _timeouts_seen(monkeypatch, lambda: result.append(accuracy_reward(ans("0.5"), "1/2")))
    assert result == [1.0]
    assert ("parse", acc.PARSE_TIMEOUT_S) in seen and ("verify", acc.VERIFY_TIMEOUT_S) in seen
    assert all(t is not None for _, t in seen)


def test_no_signal_timeouts_outside_main_thread(monkeypatch):
    # With timeouts, math-verify raises in a thread (signal.alarm); that must not become a 0.
    result = []

    def in_thread():
        t = threading.Thread(target=lambda: result.append(accuracy_reward(ans("0.5"), "1/2")))
        t.start()
        t.join(60)

    seen = _timeouts_seen(monkeypatch, in_thread)
    assert result == [1.0]
    assert seen and all(t is None for _, t in seen)


_PATHOLOGICAL_SCRIPT = textwrap.dedent(r"""
    import json, threading, time
    from eureka_megatron.rewards import accuracy_reward
    response = "<think>t</think><answer>$9^{9^{9^{9^{9}}}}$</answer>"
    out = {}
    t0 = time.perf_counter()
    out["main"] = accuracy_reward(response, "5")
    out["main_s"] = time.perf_counter() - t0
    def run():
        t1 = time.perf_counter()
        out["thread"] = accuracy_reward(r"\boxed{9^{9^{9^{9^{9}}}}}", "5")
        out["thread_s"] = time.perf_counter() - t1
    th = threading.Thread(target=run); th.start(); th.join()
    print(json.dumps(out))
""")


def test_pathological_power_tower_returns_zero_quickly():
    # A subprocess with a hard timeout, so a regression cannot hang the test run.
    proc = subprocess.run([sys.executable, "-c", _PATHOLOGICAL_SCRIPT], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"9^9^9^9^9: main thread {out['main_s']:.3f} s, other thread {out['thread_s']:.3f} s")
    assert out["main"] == 0.0 and out["thread"] == 0.0
    # Unguarded, sympy computes 9^(9^9) for minutes in a thread (no signal timeouts there).
    assert out["main_s"] < 10 and out["thread_s"] < 10


@pytest.mark.parametrize("response,gold,expected", [
    (ans("2^{-9^{9}}"), "0", 0.0),
    (ans("(10^{9})!"), "5", 0.0),
    (ans(r"\sqrt{9^{9^{9}}}"), "3", 0.0),
    (ans("5"), "9^{9^{9}}", 0.0),
    (ans("2^{100}"), "1267650600228229401496703205376", 1.0),
    (ans("2^{10000}"), "2^{10000}", 1.0),
    (ans("5!"), "120", 1.0),
])
def test_huge_numbers_are_refused_but_big_ones_are_fine(response, gold, expected):
    assert accuracy_reward(response, gold) == expected


FORMAT_CASES = [
    ("valid", "<think>reason</think><answer>2</answer>", 1.0),
    ("valid-whitespace-between", "<think>reason</think>\n\n <answer>2</answer>", 1.0),
    ("valid-surrounding-whitespace", "  \n<think>reason</think><answer>2</answer>\n ", 1.0),
    ("valid-multi-line", "<think>line 1\nline 2\n</think>\n<answer>\nx = 2\n</answer>", 1.0),
    ("missing-think", "<answer>2</answer>", 0.0),
    ("missing-answer", "<think>reason</think>", 0.0),
    ("missing-close-answer", "<think>reason</think><answer>2", 0.0),
    ("missing-open-think", "reason</think><answer>2</answer>", 0.0),
    ("duplicated-think", "<think>a</think><think>b</think><answer>2</answer>", 0.0),
    ("duplicated-answer", "<think>a</think><answer>1</answer><answer>2</answer>", 0.0),
    ("nested-think", "<think>a<think>b</think></think><answer>2</answer>", 0.0),
    ("empty-think", "<think></think><answer>2</answer>", 0.0),
    ("whitespace-think", "<think> \n </think><answer>2</answer>", 0.0),
    ("empty-answer", "<think>a</think><answer></answer>", 0.0),
    ("whitespace-answer", "<think>a</think><answer> \n\t</answer>", 0.0),
    ("text-before", "Sure! <think>a</think><answer>2</answer>", 0.0),
    ("text-after", "<think>a</think><answer>2</answer> Hope this helps.", 0.0),
    ("text-between", "<think>a</think> so <answer>2</answer>", 0.0),
    ("answer-before-think", "<answer>2</answer><think>a</think>", 0.0),
    ("empty", "", 0.0),
    ("not-a-string", None, 0.0),
]


@pytest.mark.parametrize("response,expected", [c[1:] for c in FORMAT_CASES],
                         ids=[c[0] for c in FORMAT_CASES])
def test_format_reward(response, expected):
    assert format_reward(response) == expected


def test_rule_based_scores_is_the_reward_seam():
    module_name, _, fn_name = "eureka_megatron.rewards:rule_based_scores".partition(":")
    fn = getattr(importlib.import_module(module_name), fn_name)
    assert fn is rule_based_scores
    assert fn("<think>t</think><answer>0.5</answer>", r"\frac{1}{2}", {"id": 1}) == \
        {"accuracy": 1.0, "format": 1.0}
    assert fn(r"text \boxed{0.5}", r"\frac{1}{2}") == {"accuracy": 1.0, "format": 0.0}
    assert fn("<think>t</think><answer>7</answer>", "8", None) == {"accuracy": 0.0, "format": 1.0}


def test_package_exports():
    for name in ("accuracy_reward", "format_reward", "rule_based_scores", "is_reflective",
                 "reflection_metrics", "DEFAULT_REFLECTION_PHRASES"):
        assert hasattr(rewards, name), name


# --- math-verify's own regression cases (../shared/data, real model outputs) -------------------

REGRESSION_CASES = (Path(__file__).resolve().parents[3] / "shared" / "data"
                    / "math_verify_regression_cases.jsonl")


@pytest.mark.skipif(not REGRESSION_CASES.is_file(), reason=f"{REGRESSION_CASES} is absent")
def test_agrees_with_math_verify_regression_cases():
    rows = [json.loads(line) for line in REGRESSION_CASES.read_text().splitlines() if line.strip()]
    assert len(rows) == 118
    wrong = [(r["source"], r["gold"][:60], r["pred"][-80:]) for r in rows
             if accuracy_reward(f"<think>Working it out.</think><answer>{r['pred']}</answer>",
                                r["gold"]) != r["expected"]]
    assert len(wrong) <= 1, wrong


@pytest.mark.parametrize("answer,gold,expected", [
    # a response that ran on into the next chat turn keeps its answer
    ("Therefore the probability is 2/3. <|im_start|>user", "$2/3$", 1.0),
    ("Therefore the probability is 2/3. <|im_start|>user", "$3/4$", 0.0),
    ("<|im_end|>", "1", 0.0),  # nothing but special tokens: no answer
    # several boxed parts are one answer (a set), as math-verify reads them
    (r"so \[ \boxed{-2} \quad \text{and} \quad \boxed{1}. \]", r"$\boxed{1,-2}$", 1.0),
    (r"so \[ \boxed{-2} \quad \text{and} \quad \boxed{3}. \]", r"$\boxed{1,-2}$", 0.0),
    # equations sympy cannot read (±): the same LaTeX matches, other LaTeX does not
    (r"$$\boxed{x = \frac{1}{2}, x = \frac{-1 \pm \sqrt{13}}{4}}$$",
     r"$$x = \frac{1}{2}, x = \frac{-1 \pm \sqrt{13}}{4}$$", 1.0),
    (r"$$\boxed{x = \frac{1}{3}, x = \frac{-1 \pm \sqrt{13}}{4}}$$",
     r"$$x = \frac{1}{2}, x = \frac{-1 \pm \sqrt{13}}{4}$$", 0.0),
    # powers with small irrational exponents are not 100k-digit numbers
    (r"$\boxed{10^{\frac{\sqrt{13} - 5}{6}}} \quad \text{and} \quad \boxed{10^{-\frac{5 + \sqrt{13}}{6}}}$",
     r"$x_{1}=10^{\frac{-5+\sqrt{13}}{6}},\quadx_{2}=10^{\frac{-5-\sqrt{13}}{6}}$", 1.0),
])
def test_answers_math_verify_reads(answer, gold, expected):
    assert accuracy_reward(ans(answer), gold) == expected


def test_long_derivations_and_worked_solution_golds():
    work = "Let $x$ be the number of apples. " * 300  # ~10k characters of working
    assert len(work) > 4000
    assert accuracy_reward(ans(work + r"so there are \boxed{143} apples."), "$143$") == 1.0
    assert accuracy_reward(ans(work + r"so there are \boxed{142} apples."), "$143$") == 0.0
    gold = work + r"Hence the answer is $\boxed{20\%}$."
    assert accuracy_reward(ans(r"\boxed{20\%}"), gold) == 1.0
    assert accuracy_reward(ans(r"\boxed{25\%}"), gold) == 0.0


# --- MM-Eureka-Zero's reward ------------------------------------------------------------------

LONG_THINK = "Count the apples in the picture one by one, then check the count again. " * 5


@pytest.mark.parametrize("response,gold,accuracy,fmt", [
    (f"<think>{LONG_THINK}</think><answer>So it is \\boxed{{12}}.</answer>", "12", 1.0, 1.0),
    (f"<think>{LONG_THINK}</think><answer>So it is \\boxed{{13}}.</answer>", "12", 0.0, 1.0),
    # the think part is under 300 characters: no format reward, accuracy still counts
    ("<think>Count them.</think><answer>\\boxed{12}</answer>", "12", 1.0, 0.0),
    # the last \boxed{} of the whole response is the answer, inside the tags or not
    (f"<think>{LONG_THINK} maybe \\boxed{{11}}</think><answer>\\boxed{{\\frac{{24}}{{2}}}}</answer>",
     "12", 1.0, 1.0),
    (f"<think>{LONG_THINK}</think><answer>12</answer>", "12", 0.0, 1.0),  # no \boxed{}: 0
    # anchored: text after </answer> or a second think block fails the format
    (f"<think>{LONG_THINK}</think><answer>\\boxed{{12}}</answer> extra", "12", 1.0, 0.0),
])
def test_zero_scores(response, gold, accuracy, fmt):
    assert len(LONG_THINK) >= rewards.ZERO_MIN_THINK_CHARS
    assert rewards.zero_scores(response, gold) == {"accuracy": accuracy, "format": fmt}
