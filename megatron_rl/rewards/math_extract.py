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
# Spacing and sizing commands that never carry meaning.
_NOISE = re.compile(r"(?<!\\)\\[,;:! ]|\\(?:displaystyle|left|right|big|Big|bigg|Bigg)(?![a-zA-Z])|~")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ|°|\\degree")
_TEXT_CMD = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_UNIT_WORDS = (
    "square units|sq units|units?|cm\\^?2|cm|mm|km|m\\^?2|m|meters?|metres?|inch(?:es)?|in|"
    "feet|foot|ft|yards?|miles?|mph|degrees?|cents?|dollars?|hours?|hrs?|minutes?|mins?|"
    "seconds?|secs?|days?|weeks?|years?|pounds?|lbs?|kg|grams?|g|liters?|litres?|ml|"
    "people|students?|ways?"
)
_TRAILING_UNIT = re.compile(rf"^(.*?\d\}}?)\s*(?:\\,)?\s*(?:{_UNIT_WORDS})\.?$", re.IGNORECASE)
_THOUSANDS = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_SIMPLE_LHS = re.compile(r"^[a-zA-Z](?:_\{?[a-zA-Z0-9]+\}?)?(?:\([a-zA-Z]\))?$")
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


def normalize(answer: str) -> str:
    """Presentation-free form of an answer string (see module docstring)."""
    s = answer.strip().replace("\n", " ")
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = re.sub(r"\\(begin|end)\{bmatrix\}", r"\\\1{pmatrix}", s)
    s = s.replace("\\varnothing", "\\emptyset").replace("\\{\\}", "\\emptyset")
    s = _NOISE.sub(" ", s)
    s = _DEGREES.sub("", s)
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
    # Units after a number: "10 \text{ cm}" and "10 cm" both become "10".
    s = re.sub(r"\s*\\(?:text|mbox|mathrm)\s*\{\s*(?:" + _UNIT_WORDS + r")\s*\}\s*$", "",
               s, flags=re.IGNORECASE) if re.search(r"\d", s) else s
    s = _unwrap_text(s).strip()
    m = _TRAILING_UNIT.match(s)
    if m:
        s = m.group(1)
    s = s.replace("{,}", ",").strip().rstrip(".").strip()
    if "=" in s and s.count("=") == 1:
        lhs, rhs = (p.strip() for p in s.split("="))
        if _SIMPLE_LHS.match(lhs) and rhs:
            s = rhs
    s = _fix_fracs(s)
    s = re.sub(r"\s+", "", s)
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    # "0.5" and ".5", "2.0" and "2", "1/2" and "\frac{1}{2}"
    s = re.sub(r"(?<![\d.])\.(\d)", r"0.\1", s)
    s = re.sub(r"^(-?\d+)\.0+$", r"\1", s)
    s = re.sub(r"^(-?)0+(\d)", r"\1\2", s)
    s = re.sub(r"^(-?)(\d+)/(\d+)$", r"\1\\frac{\2}{\3}", s)
    return s


def choice_letter(s: str) -> str | None:
    """The multiple-choice letter a normalised answer names ("(B)", "B.", "b"), else None."""
    m = _CHOICE.match(s)
    return m.group(1).upper() if m else None
