"""Math answers as strings: find the final answer, then normalise it (no sympy here).

Extraction follows DeepScaleR: the answer is the content of the last ``\\boxed{...}`` (or
``\\fbox{...}``, nested braces allowed, also ``\\boxed 5``) in the text after the last
``</think>``; a response that opens ``<think>`` and never closes it has no answer (it was
cut off while thinking).

Normalisation is in the spirit of Hendrycks et al.'s MATH normaliser, written for this
project: it removes presentation only (spacing, ``\\left``, ``\\dfrac``, degrees, units,
``\\text``, thousands separators, a leading ``x =``), never mathematical content, so two
answers with equal normal forms are equal. Everything else is left to ``math_equiv``.
"""

from __future__ import annotations

import re

_BOX_CMDS = ("\\boxed", "\\fbox")
# Spacing and sizing commands that never carry meaning ("\\!" joins, the others space).
_NOISE = re.compile(r"(?<!\\)\\[,;: ]|\\(?:displaystyle|left|right|big|Big|bigg|Bigg)(?![a-zA-Z])|~")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ|°|\\degree")
_TEXT_NAMES = "text|textnormal|textbf|textit|textrm|textsf|texttt|mathrm|mathbf|mathit|mbox|operatorname"
_TEXT_CMD = re.compile(rf"\\(?:{_TEXT_NAMES})\s*\{{([^{{}}]*)\}}")
# Units stripped after a number. Single letters (m, g) only inside \text{}: bare "2m" may be
# 2 times m. Inside \text{} any run of words after a number is a unit ("17 \text{ apples}").
_BARE_UNITS = (
    "square units|sq units|units?|cm\\^?2|cm|mm|km|meters?|metres?|inch(?:es)?|in|"
    "feet|foot|ft|yards?|miles?|mph|degrees?|cents?|dollars?|hours?|hrs?|minutes?|mins?|"
    "seconds?|secs?|days?|weeks?|years?|pounds?|lbs?|kg|grams?|liters?|litres?|ml|"
    "people|students?|ways?"
)
_TEXT_UNITS = _BARE_UNITS + "|m\\^?2|m|g"
_TRAILING_UNIT = re.compile(rf"^(.*?\d\}}?)\s*(?:{_BARE_UNITS})\.?$", re.IGNORECASE)
# A plain number: sign, digits, separators, decimal point, simple fractions and roots.
_NUMBER = r"[-+]?(?:\d+/\d+|\d[\d,]*(?:\.\d*)?|\.\d+|\\[dt]?frac\{\d+\}\{\d+\}|\d*\\sqrt\{\d+\})"
_NUMBER_TEXT_UNIT = re.compile(
    rf"^\s*({_NUMBER})\s*\\(?:{_TEXT_NAMES})\s*\{{\s*[a-zA-Z][a-zA-Z .'-]*\}}\s*(?:\^\{{?[23]\}}?)?\.?\s*$")
_NUMBER_BARE_WORDS = re.compile(rf"^\s*({_NUMBER})\s+([a-zA-Z]{{3,}}(?:[ -][a-zA-Z]{{3,}})*)\.?\s*$")
_PERCENT_WORD = re.compile(
    r"(\d|\})\s*(?:\\(?:text|textnormal|mbox|mathrm)\s*\{\s*)?(?:percent(?:age)?|pct)\.?\s*\}?",
    re.IGNORECASE)
_LIST_AND = re.compile(r"\s*(?:\\quad)?\s*\\(?:text|textnormal|mbox)\s*\{\s*and\s*\}\s*(?:\\quad)?\s*")
# "1,000" (no space) is one number; "1, 000" is a list of two.
_THOUSANDS = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_SIMPLE_LHS = re.compile(r"^[a-zA-Z](?:_\{?[a-zA-Z0-9]+\}?)?(?:\([a-zA-Z]\))?$")
_MATH_NAMES = frozenset(
    "sin cos tan cot sec csc log exp lim max min mod gcd lcm det deg sqrt frac".split())
_CHOICE = re.compile(r"^\(?([A-Ea-e])\)?[.:]?$")


def final_answer(response: str) -> str | None:
    """The boxed final answer of a model response, or None (format error)."""
    if "</think>" in response:
        response = response.rsplit("</think>", 1)[1]
    elif "<think>" in response:
        return None
    return last_boxed(response)


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed``/``\\fbox`` in ``text``; None if absent or unclosed."""
    start = max(text.rfind(cmd) for cmd in _BOX_CMDS)
    if start < 0:
        return None
    rest = text[start:]
    rest = rest[len("\\boxed"):] if rest.startswith("\\boxed") else rest[len("\\fbox"):]
    if rest.startswith(" ") and not rest.lstrip().startswith("{"):
        # "\boxed 5": the argument runs to the next '$' or end of line.
        return rest.strip().split("$")[0].split("\n")[0].strip() or None
    rest = rest.lstrip()
    if not rest.startswith("{"):
        return None
    depth = 0
    for i, ch in enumerate(rest):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return rest[1:i].strip()
    return None


def ground_truth_answer(gt: str) -> str:
    """A dataset answer, unboxed when it was stored as ``\\boxed{...}``."""
    boxed = last_boxed(gt) if "\\boxed" in gt or "\\fbox" in gt else None
    return boxed if boxed is not None else gt.strip()


def _fix_fracs(s: str) -> str:
    # \frac12 -> \frac{1}{2}, \frac1{x} -> \frac{1}{x}, \sqrt2 -> \sqrt{2}
    s = re.sub(r"\\frac\s*(\d)\s*(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\s*(\d)\s*\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\frac\s*\{([^{}]*)\}\s*(\d)", r"\\frac{\1}{\2}", s)
    return re.sub(r"\\sqrt\s*([0-9a-zA-Z])", r"\\sqrt{\1}", s)


def _unwrap_text(s: str) -> str:
    prev = None
    while prev != s:
        prev, s = s, _TEXT_CMD.sub(r"\1", s)
    return s


def _strip_units(s: str) -> str:
    """Drop a unit after a number: any ``\\text{words}`` or bare words of 3+ letters after a
    plain number, or a listed unit after any expression ending in a digit."""
    m = _NUMBER_TEXT_UNIT.match(s)
    if m:
        return m.group(1)
    if re.search(r"\d", s):
        s = re.sub(r"\s*\\(?:" + _TEXT_NAMES + r")\s*\{\s*(?:" + _TEXT_UNITS + r")\s*\}\s*$", "",
                   s, flags=re.IGNORECASE)
    s = _unwrap_text(s).strip()
    m = _NUMBER_BARE_WORDS.match(s)
    if m and not set(re.split(r"[ -]", m.group(2).lower())) & _MATH_NAMES:
        return m.group(1)
    m = _TRAILING_UNIT.match(s)
    return m.group(1) if m else s


def has_percent(answer: str) -> bool:
    """The answer is written as a percentage ("30\\%", "30%", "30 percent")."""
    return "%" in answer or bool(_PERCENT_WORD.search(answer))


def normalize(answer: str) -> str:
    """Presentation-free form of an answer string (see module docstring)."""
    s = answer.strip().replace("\n", " ")
    s = re.sub(r"\\[dtc]frac", r"\\frac", s)
    s = re.sub(r"\\(begin|end)\{bmatrix\}", r"\\\1{pmatrix}", s)
    s = s.replace("\\varnothing", "\\emptyset").replace("\\{\\}", "\\emptyset")
    s = re.sub(r"(\d),\\!\s*(?=\d{3}(?!\d))", r"\1,", s)  # "11,\! 111": LaTeX thousands
    s = s.replace("\\!", "")
    s = _NOISE.sub(" ", s)
    s = _DEGREES.sub("", s)
    s = _LIST_AND.sub(", ", s)  # "6 \\text{ and } 8" lists two answers, like "6, 8"
    s = _PERCENT_WORD.sub(r"\1", s)
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
    s = _strip_units(s.strip())
    s = s.replace("{,}", ",").strip().rstrip(".").strip()
    s = re.sub(r"(?<!\\)\\+$", "", s).strip()  # a lone trailing backslash ("185\\") is noise
    if "=" in s and s.count("=") == 1:
        lhs, rhs = (p.strip() for p in s.split("="))
        if _SIMPLE_LHS.match(lhs) and rhs:
            s = rhs
    s = _fix_fracs(s)
    one_number = _THOUSANDS.match(s) is not None  # before spaces go: "1, 234" is a list
    s = re.sub(r"\s+", "", s)
    if one_number:
        s = s.replace(",", "")
    # "0.5" and ".5", "2.0" and "2", "1/2" and "\\frac{1}{2}"
    s = re.sub(r"(?<![\d.])\.(\d)", r"0.\1", s)
    s = re.sub(r"^(-?\d+)\.0+$", r"\1", s)
    s = re.sub(r"^(-?\d+\.\d*?)0+$", r"\1", s)
    s = re.sub(r"^(-?)0+(\d)", r"\1\2", s)
    s = re.sub(r"^(-?)(\d+)/(\d+)$", r"\1\\frac{\2}{\3}", s)
    return s


def choice_letter(s: str) -> str | None:
    """The multiple-choice letter a normalised answer names ("(B)", "B.", "b"), else None."""
    m = _CHOICE.match(s)
    return m.group(1).upper() if m else None
