"""Is a predicted math answer equivalent to the reference? Strings first, then symbols.

Order of checks, cheapest and strictest first:

1. equal normal forms (``math_extract.normalize``);
2. multiple choice: a reference that is a letter A-E only matches the same letter;
3. word answers ("Evelyn", "no", "odd"): compared as lowercase words, never symbolically
   (math-verify reads "Evelyn" as a product of symbols, which an anagram would equal);
4. sympy on simple expressions this module converts itself: integers exactly, other
   numbers to 1e-12 relative (so 3.14 is not pi), expressions by ``simplify``;
5. math-verify, which covers sets, intervals, tuples, matrices, equations and numbers to
   6 significant digits; its own timeouts use ``signal.alarm``, so callers pass
   ``timeout_s=None`` off the main thread (``math.grade_math`` does).

Every step may be slow on hostile input; ``megatron_rl.rewards.math`` runs this in a worker
process it can kill.
"""

from __future__ import annotations

import re

from megatron_rl.rewards.math_extract import choice_letter, has_percent, normalize

_MATH_WORDS = frozenset(
    "sin cos tan cot sec csc arcsin arccos arctan sinh cosh tanh log ln exp lim max min "
    "mod gcd lcm det deg sqrt frac pi infty inf sup cdot times".split()
)
_SYMPY_CHARS = re.compile(r"^[0-9a-zA-Z+\-*/().]+$")
_SYMPY_NAMES = frozenset("sqrt pi oo log sin cos tan exp".split())
_LATEX_TO_SYMPY = (
    (r"\\sqrt\[([^\[\]{}]+)\]\{([^{}]*)\}", r"((\2)**(1/(\1)))"),
    (r"\\sqrt\{([^{}]*)\}", r"sqrt(\1)"),
    (r"\\frac\{([^{}]*)\}\{([^{}]*)\}", r"((\1)/(\2))"),
)


def is_choice_reference(gt_norm: str) -> bool:
    """A reference answer that is an upper-case option letter, e.g. "B" or "(C)"."""
    return bool(re.fullmatch(r"\(?[A-E]\)?", gt_norm))


def is_word_answer(norm: str) -> bool:
    """Holds a word of 3+ letters (or "no") that is not a maths function name."""
    bare = re.sub(r"\\(?:begin|end)\{[a-zA-Z*]+\}", " ", norm)
    bare = re.sub(r"\\[a-zA-Z]+", " ", bare)
    words = [w.lower() for w in re.findall(r"[a-zA-Z]{2,}", bare)]
    return any((len(w) >= 3 and w not in _MATH_WORDS) or w == "no" for w in words)


def _word_key(s: str) -> str:
    """Case and spacing do not matter in a word answer; signs, decimal points, slashes and
    every other character do ("-2 points" is not "2 points", "1.5 laps" is not "15 laps")."""
    s = re.sub(r"\\(?:text|textnormal|mathrm|mbox)\s*\{([^{}]*)\}", r"\1", s)
    return re.sub(r"\s+", "", s.lower()).rstrip(".")


def to_sympy_text(norm: str) -> str | None:
    """A normalised answer as a sympy expression string, or None if outside the subset."""
    if any(c in norm for c in ",=<>|[]") or "\\begin" in norm or "\\pm" in norm:
        return None
    s = norm.replace("\\pi", "pi").replace("\\infty", "oo").replace("\\cdot", "*")
    s = s.replace("\\times", "*").replace("\\ln", "log").replace("\\log", "log")
    for _ in range(8):  # innermost first; nesting deeper than this stays unconverted
        prev = s
        for pat, rep in _LATEX_TO_SYMPY:
            s = re.sub(pat, rep, s)
        if s == prev:
            break
    s = s.replace("{", "(").replace("}", ")").replace("^", "**")
    if not _SYMPY_CHARS.match(s.replace("**", "*")) or len(s) > 120:
        return None
    names = set(re.findall(r"[a-zA-Z]{2,}", s))
    if not names <= _SYMPY_NAMES:
        return None  # multi-letter names other than known functions: leave to math-verify
    if re.search(r"\*\*\(?\d{4,}", s) or re.search(r"\d{40,}", s):
        return None  # huge powers could take unbounded time and memory
    return s


def _has_huge_power(expr: object) -> bool:
    """Towers (2^{2^{100}}) and big exponents: evaluating them hangs in C code."""
    import sympy

    for p in sympy.preorder_traversal(expr):
        if isinstance(p, sympy.Pow):
            if p.exp.has(sympy.Pow) or (p.exp.is_Number and abs(p.exp) > 10_000):
                return True
    return False


def sympy_compare(pred_norm: str, gt_norm: str) -> bool | None:
    """Symbolic verdict on two simple expressions: True/False when sympy can decide, None
    when either is outside the subset or undecided (then math-verify gets to say).

    Two integers are decided exactly: math-verify compares numbers to 6 significant
    digits, which would equal 2^100 and 2^100 + 1. Other numbers must agree to 1e-12
    relative, so 3.14 is not pi; two numbers that do not are unequal (False, not None)."""
    a_txt, b_txt = to_sympy_text(pred_norm), to_sympy_text(gt_norm)
    if a_txt is None or b_txt is None:
        return None
    import sympy
    from sympy.parsing.sympy_parser import (
        implicit_multiplication_application,
        parse_expr,
        standard_transformations,
    )

    # Only whitelisted names and operator characters reach parse_expr (it evaluates text).
    transforms = standard_transformations + (implicit_multiplication_application,)
    try:
        for txt in (a_txt, b_txt):
            if _has_huge_power(parse_expr(txt, transformations=transforms, evaluate=False)):
                return None
        a = parse_expr(a_txt, transformations=transforms, evaluate=True)
        b = parse_expr(b_txt, transformations=transforms, evaluate=True)
        if a.is_Integer and b.is_Integer:
            return bool(a == b)
        if any(x.has(sympy.oo, sympy.zoo, sympy.nan) for x in (a, b)):
            return True if a == b else None  # oo vs -oo: the difference says nothing
        diff = a - b
        if not diff.free_symbols:  # two numbers: decided here, never by rounding later
            value = complex(sympy.N(diff, 30))
            scale = max(1.0, abs(complex(sympy.N(b, 30))))
            return bool(abs(value) <= 1e-12 * scale)
        if sympy.simplify(diff) == 0:
            return True
        # Different variables on each side ("2m" and "2"): unequal, not a unit to drop.
        # Only single-letter variables and no function names (implicit multiplication reads
        # "log2" as l*o*g*2): then other variables on one side mean unequal.
        if a.free_symbols != b.free_symbols and not re.search(r"[a-zA-Z]{2}", a_txt + b_txt):
            return False
        return None  # leave it to math-verify
    except Exception:  # sympy raises many types on odd input: no verdict
        return None


def math_verify_equal(pred: str, gt: str, timeout_s: int | None) -> bool:
    """math-verify's verdict on two answer strings (``timeout_s`` None: no signal alarm)."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    configs = [LatexExtractionConfig(), ExprExtractionConfig()]
    gold = parse("\\boxed{" + gt + "}", extraction_config=configs, parsing_timeout=timeout_s)
    target = parse("\\boxed{" + pred + "}", extraction_config=configs, parsing_timeout=timeout_s)
    if not gold or not target:
        return False
    return bool(verify(gold, target, timeout_seconds=timeout_s))


def _top_level_commas(norm: str) -> int:
    depth = count = 0
    for ch in norm:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            count += 1
    return count


def _percent_compare(p: str, g: str, p_pct: bool, g_pct: bool) -> bool | None:
    """A percentage equals its number or its hundredth ("30\\%" is 30 and 0.3), strictly."""
    verdicts = [sympy_compare(p, g)]
    if p_pct and not g_pct:
        verdicts.append(sympy_compare(f"({p})/100", g))
    if g_pct and not p_pct:
        verdicts.append(sympy_compare(p, f"({g})/100"))
    if any(verdicts):
        return True
    return None if None in verdicts else False


def is_equivalent(pred: str, gt: str, *, timeout_s: int | None = 5) -> bool:
    """True when answer ``pred`` equals reference ``gt`` (both unboxed answer strings)."""
    p, g = normalize(pred), normalize(gt)
    if not p:
        return False
    if p == g:
        return True
    if is_choice_reference(g):
        return choice_letter(p) == choice_letter(g)
    if is_word_answer(g) or is_word_answer(p):
        return _word_key(p) == _word_key(g)
    if _top_level_commas(p) != _top_level_commas(g) and "\\begin" not in p + g:
        return False  # "1, 234" is a list of two, never the number 1234
    p_pct, g_pct = has_percent(pred), has_percent(gt)
    verdict = _percent_compare(p, g, p_pct, g_pct) if p_pct or g_pct else sympy_compare(p, g)
    if verdict is not None:
        return verdict
    if math_verify_equal(pred, gt, timeout_s):
        return True
    return (p, g) != (pred, gt) and math_verify_equal(p, g, timeout_s)
