"""Accuracy reward: does the response's final answer equal the gold answer?

Three gold kinds, decided from the gold alone so that no gold can give a free reward:
a multiple-choice letter (compared with the letter the response chose), plain words
(compared as normalised text), and everything else (compared with math-verify).
"""
from __future__ import annotations

import math
import re
import threading

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
from math_verify.errors import TimeoutException
from sympy import Basic, MatrixBase
from sympy.functions.combinatorial.factorials import (
    FallingFactorial,
    RisingFactorial,
    binomial,
    factorial,
    factorial2,
    subfactorial,
)
from sympy.functions.special.gamma_functions import gamma

# An extracted answer longer than this is not an answer. Long ones are: golds that are whole
# worked solutions, <answer> blocks holding a whole derivation (math-verify takes their final
# answer, working from the end: 110k characters parse in ~10 ms). Above any response we generate.
MAX_ANSWER_CHARS = 100_000
# Exact numbers with more digits than this make verify() compute for minutes (9^{9^9} has
# 370M digits), with no timeout at all outside the main thread; no real answer is that big.
MAX_DIGITS = 100_000
# math-verify's own signal.alarm timeouts (whole seconds); only usable in the main thread.
PARSE_TIMEOUT_S = 2
VERIFY_TIMEOUT_S = 2

# Latex first, boxed with top priority: inside an answer block, a \boxed{} is the final
# answer even if other $...$ follow it. Expr catches plain numbers / "1/2" / "18**0.5" in
# prose. No StringExtractionConfig: it reads any stray "a"/"b" in prose as a choice
# (MM-Eureka put it first); letters are handled by _chosen_letter instead.
_EXTRACTION = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())

_BOXED_START = re.compile(r"\\boxed\s*\{")
_MATH_DELIMITER = re.compile(r"\$|\\\(|\\\[|\\boxed")
# Words outside LaTeX commands mean prose; latex2sympy reads sqrt(..) but no other word.
_TEXT_NAMES = "text|textbf|textit|textrm|mathrm|mathbf|mathit|operatorname|mbox"
_TEXT_COMMAND = re.compile(rf"\\(?:{_TEXT_NAMES})\s*\{{([^{{}}]*)\}}")
_PROSE_WORD = re.compile(r"(?<![\\A-Za-z])(?!sqrt(?![A-Za-z]))[A-Za-z]{2,}")
_WORD_OR_TEXT_COMMAND = re.compile(rf"(?P<cmd>{_TEXT_COMMAND.pattern})|{_PROSE_WORD.pattern}")
_WORDS_ONLY = re.compile(r"[^\W\d_]+(?:[\s'\-,;/&]+[^\W\d_]+)*")
_TWO_LETTER_RUN = re.compile(r"[^\W\d_]{2,}")
_UNWRAP = re.compile(rf"\\(?:boxed|{_TEXT_NAMES})\s*\{{([^{{}}]*)\}}")
_ANSWER_PREFIX = re.compile(r"^(?:the\s+)?(?:final\s+)?answer\s*(?:is\s*:?|:)\s*")

_GOLD_LETTER = re.compile(r"\(?([A-J])\)?\.?")
_LETTER = r"\(?([A-J])\)?(?![A-Za-z0-9])"
_LETTER_LIST = re.compile(rf"{_LETTER}(?:\s*(?:,|and|or|&|/|;|\+)\s*{_LETTER})*")
_LETTER_IN_LIST = re.compile(_LETTER)
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*:?\s*", re.IGNORECASE)
# Chat-template special tokens (<|im_start|>, <|endoftext|>): a response that ran into the next
# turn keeps its answer; the tokens are never part of one.
_SPECIAL_TOKEN = re.compile(r"<\|[^|<>\s]{1,64}\|>")


def accuracy_reward(response: str, answer: str) -> float:
    """1.0 if the response's final answer matches the gold answer, else 0.0; never raises."""
    try:
        return 1.0 if _is_correct(response, answer) else 0.0
    except (Exception, TimeoutException):  # TimeoutException is a BaseException
        return 0.0


def _is_correct(response, answer) -> bool:
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(response, str) or not isinstance(answer, str):
        return False
    gold = answer.strip()
    if not gold or len(gold) > MAX_ANSWER_CHARS:
        return False
    pred = extract_answer(response)
    if pred is None or len(pred) > MAX_ANSWER_CHARS:
        return False
    pred = _SPECIAL_TOKEN.sub(" ", pred)
    if not pred.strip():
        return False

    gold_letter = _gold_letter(gold)
    if gold_letter is not None:
        return _chosen_letter(pred) == gold_letter
    if _is_words(gold):
        return _normalize_text(pred) == _normalize_text(gold)
    gold_parsed = _parse_math(gold)
    if not gold_parsed:  # math-verify cannot read the gold: the same text, never a free pass
        return _normalize_text(pred) == _normalize_text(gold) or _same_extracted_text(gold, pred)
    pred_parsed = _parse_math(pred)
    if not pred_parsed:
        return False
    timeout_s = VERIFY_TIMEOUT_S if _in_main_thread() else None
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout_s))


def extract_answer(response: str) -> str | None:
    """The final answer: the last <answer>...</answer> block, else the last \\boxed{...}."""
    close = response.rfind("</answer>")
    if close != -1:
        open_ = response.rfind("<answer>", 0, close)
        if open_ != -1:
            return response[open_ + len("<answer>"):close]
    return last_boxed(response)


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}, braces balanced (\\{ and \\} do not count)."""
    starts = list(_BOXED_START.finditer(text))
    if not starts:
        return None
    begin = starts[-1].end()
    depth, i, end = 1, begin, min(len(text), begin + MAX_ANSWER_CHARS + 1)
    while i < end:
        ch = text[i]
        if ch == "\\":
            i += 2  # skip the escaped char, so \{ \} \\ never change the depth
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[begin:i]
        i += 1
    return None  # unclosed (truncated generation) or absurdly long


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _parse_math(text: str) -> list:
    """math-verify parse of an answer; [] unless it yields a sympy object of sane size.

    math-verify reads LaTeX only inside $...$ / \\boxed{} (parse("\\sqrt{18}") is []), so bare
    math is wrapped in $...$; in prose only the runs between words are (a wrapped word
    becomes a product of symbols), with the raw text as a fallback.
    """
    text = text.strip()
    if _MATH_DELIMITER.search(text):
        candidates = (text,)
    elif _PROSE_WORD.search(_TEXT_COMMAND.sub(" ", text)):
        candidates = (_wrap_math_runs(text), text)
    else:
        candidates = (_dollars(text),)
    timeout_s = PARSE_TIMEOUT_S if _in_main_thread() else None
    for candidate in candidates:
        parsed = parse(candidate, extraction_config=_EXTRACTION, parsing_timeout=timeout_s)
        exprs = [p for p in parsed if isinstance(p, (Basic, MatrixBase))]
        if exprs:
            if any(_digits_bound(e) > MAX_DIGITS for e in exprs):
                return []
            return parsed
    return []


def _same_extracted_text(gold: str, pred: str) -> bool:
    """Both answers hold the same LaTeX that sympy cannot read (a list of equations with "±"):
    math-verify's extracted strings, compared with whitespace ignored, as its verify does."""
    timeout_s = PARSE_TIMEOUT_S if _in_main_thread() else None
    texts = []
    for text in (gold, pred):
        parsed = parse(text, extraction_config=_EXTRACTION, parsing_timeout=timeout_s)
        strings = [p for p in parsed if isinstance(p, str)]
        if not strings:
            return False
        texts.append(re.sub(r"\s+", "", strings[-1]))
    return bool(texts[0]) and texts[0] == texts[1]


def _dollars(text: str) -> str:
    return "$" + re.sub(r"\s+", " ", text.strip()) + "$"  # inline $...$ cannot span lines


def _wrap_math_runs(text: str) -> str:
    """Put $...$ around the math between the words of a prose answer.

    "The answer is 3\\sqrt{2}" parsed as is gives 3 (a wrong answer scoring against gold 3);
    wrapped whole, every letter becomes a symbol. Units in \\text{} stay with their number.
    """
    pieces, last = [], 0
    for m in _WORD_OR_TEXT_COMMAND.finditer(text):
        if m.group("cmd"):
            continue
        pieces += [_wrap_run(text[last:m.start()]), m.group()]
        last = m.end()
    pieces.append(_wrap_run(text[last:]))
    return "".join(pieces)


def _wrap_run(run: str) -> str:
    m = re.fullmatch(r"(\s*)(.*?)([\s.,;:!?]*)", run, re.DOTALL)
    lead, core, tail = m.groups()
    if not re.search(r"[\d\\]", core):
        return run
    return lead + _dollars(core) + tail


_FACTORIALS = (factorial, factorial2, subfactorial, gamma, binomial, RisingFactorial, FallingFactorial)


def _digits_bound(expr) -> float:
    """Rough upper bound on the decimal digits of any exact number sympy may build from expr.

    Cheap and unevaluated (the parsed tree keeps 9**(9**9) as a power), so a tower is
    rejected before verify() starts computing it.
    """
    if getattr(expr, "is_Rational", False):
        return max(_int_digits(expr.p), _int_digits(expr.q))
    if getattr(expr, "is_Float", False):
        _, _, exp2, bits = expr._mpf_ if expr._mpf_[1] else (0, 0, 0, 0)
        return abs(exp2 + bits) * 0.30103
    if getattr(expr, "is_NumberSymbol", False):
        return 1.0
    args = getattr(expr, "args", ())
    if not isinstance(args, tuple) or not args:
        return 0.0
    if getattr(expr, "is_Pow", False):
        base, exponent = _digits_bound(args[0]), _digits_bound(args[1])
        if exponent > 300:
            return math.inf
        size = _magnitude(args[1])  # digits(a^b) <= digits(a) * |b|
        scale = 10.0 ** exponent if size is None else max(size, 1.0)
        return max(base * scale, base, exponent)
    if isinstance(expr, _FACTORIALS):
        n = max(_digits_bound(a) for a in args)
        if n > 300:
            return math.inf
        return 10.0 ** n * max(n, 1.0)
    return sum(_digits_bound(a) for a in args if isinstance(a, (Basic, MatrixBase)))


def _magnitude(expr) -> float | None:
    """|expr| for a number of few digits (cheap to evaluate), else None (symbols, or unknown)."""
    if getattr(expr, "free_symbols", None) or not getattr(expr, "is_number", False):
        return None
    try:
        return abs(complex(expr.evalf(15)))
    except (TypeError, ValueError, OverflowError):
        return None


def _int_digits(n: int) -> float:
    return abs(int(n)).bit_length() * 0.30103


def _gold_letter(gold: str) -> str | None:
    """The option letter if the gold is a multiple-choice answer (B, (B), B.)."""
    m = _GOLD_LETTER.fullmatch(_strip_markup(gold))
    return m.group(1) if m else None


def _chosen_letter(pred: str) -> str | None:
    """The single option letter the answer chose, or None (none, or several: "A and C").

    Only whole-answer forms count ("B", "(B)", "B. 45", "(B) 45", "... answer is B"),
    never a letter appearing somewhere in the text (MM-Eureka's substring bug).
    """
    text = _strip_markup(pred)
    letters: list[str] | None = None
    m = _LETTER_LIST.match(text)
    if m:
        rest = text[m.end():]
        if re.fullmatch(r"\s*[.:]?\s*", rest) or re.match(r"[.:)]", rest) or m.group(0).endswith(")"):
            letters = _LETTER_IN_LIST.findall(m.group(0))
    if letters is None:
        last = None
        for last in _ANSWER_IS.finditer(text):
            pass
        if last is not None:
            m = _LETTER_LIST.match(text, last.end())
            if m:
                letters = _LETTER_IN_LIST.findall(m.group(0))
    if letters and len(set(letters)) == 1:
        return letters[0]
    return None


def _strip_markup(text: str) -> str:
    """Unwrap \\boxed{x}, \\text{x}, ...; drop $, \\( \\), markdown bold; collapse spaces."""
    for _ in range(4):
        unwrapped = _UNWRAP.sub(r"\1", text)
        if unwrapped == text:
            break
        text = unwrapped
    text = re.sub(r"\$|\\\(|\\\)|\\\[|\\\]|\*\*", " ", text)
    text = re.sub(r"\\[ ,;!]|~", " ", text)
    return re.sub(r"\s+", " ", text).strip()


def _is_words(gold: str) -> bool:
    """True for word answers ("red", "Paris", "\\text{No solution}").

    math-verify would read them as products of symbols, so "Paris" would equal "Pairs"
    and "red" would contain Euler's e; single letters stay math (variables).
    """
    text = _strip_markup(gold).rstrip(".")
    return bool(_WORDS_ONLY.fullmatch(text)) and bool(_TWO_LETTER_RUN.search(text))


def _normalize_text(text: str) -> str:
    text = _strip_markup(text).casefold()
    text = _ANSWER_PREFIX.sub("", text)
    text = text.strip().strip("\"'`").strip()
    text = re.sub(r"[.!。]+$", "", text).strip()
    return re.sub(r"\s+", " ", text)
