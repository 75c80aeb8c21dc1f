r"""Peer graders' public test cases, written as our own data (issue 10, item 7).

Each suite is (response, ground truth, expected score, what) with the peer file it comes
from in ``SOURCES``; ``LEFT_OUT`` lists the peer cases not adopted and why (our semantics
differ on purpose, or the case tests something we do not do, e.g. free-text extraction).
Peers compare bare answers; we grade a response's last ``\boxed{}``, so a bare peer answer
is adopted boxed (``X(...)``). Suites in ``THINK_REQUIRED`` are graded with
``require_think_close=True`` (the peer requires ``</think>``). The Math-Verify suite is in
``math_peer_cases_math_verify``.
"""

from __future__ import annotations

from math_peer_cases_math_verify import MATH_VERIFY_CASES, MATH_VERIFY_LEFT_OUT

Case = tuple[str, "str | list[str]", float, str]


def X(ans: str) -> str:
    """A bare peer answer as a response: boxed, no think block."""
    return f"The answer is \\boxed{{{ans}}}."


def both_ways(pairs: list[tuple[str, str]], expected: float, what: str) -> list[Case]:
    """Symmetric peer checks (NeMo-Skills asserts both orders): one case per direction."""
    return [c for a, b in pairs for c in ((X(a), b, expected, f"{what}: {a} | {b}"),
                                          (X(b), a, expected, f"{what}: {b} | {a}"))]


SOURCES = {
    "hendrycks_math": "hendrycks/math modeling/math_equivalence_test.py@5f3bf91d",
    "nemo_skills": "NVIDIA/NeMo-Skills tests/test_math_equal.py@583b90a2",
    "rllm_deepscaler": "rllm-org/rllm tests/rewards/test_math_reward.py@f21f1457, "
                       "tests/rewards/test_math_utils.py@76121ffe",
    "trl": "huggingface/trl tests/test_rewards.py@e776045b (accuracy_reward, "
           "reasoning_accuracy_reward)",
    "areal": "inclusionAI/AReaL areal/tests/test_math_verify_reward.py (gsm8k / geometry3k "
             "reward, math-verify worker)",
    "slime": "cklxx/slime tests/test_math_reward_utils.py@5827e3c1 (grade_answer_verl)",
    "math_verify": "huggingface/Math-Verify tests/{test_all,test_boxed,test_strict,"
                   "test_numina_cases,test_open_thoughts}.py@5d148cfa",
}

HENDRYCKS: list[Case] = [
    (X("\\tfrac{1}{2} + \\frac1{72}"), "\\\\frac{1}{2} + 2/3", 0.0, "fractions"),
    (X("10, 4, 2"), "4, 12, 2", 0.0, "order2"),
    (X("\\tfrac{1}{2} +\\! \\frac1{72}"), "\\dfrac{1}{2} +\\frac{1}{72}", 1.0, "dfrac"),
    (X("10\\text{ units}"), "10 ", 1.0, "units"),
    (X("10\\text{ units}"), "100 ", 0.0, "units2"),
    (X("10"), "\\$10", 1.0, "dollars"),
    (X("\\left(x-2\\right)\\left(x+2\\right)"), "(x-2)(x+2)", 1.0, "parentheses"),
    (X("0.1"), ".1", 1.0, "decimals2"),
    (X("10\\%"), "10", 1.0, "percentage"),
    (X("10\\sqrt{3} + \\sqrt4"), "10\\sqrt3 + \\sqrt{4}", 1.0, "sqrt"),
    (X("\\frac34i"), "\\frac{3}{4}i", 1.0, "frac"),
    (X("\\tfrac83"), "\\frac{8}{3}", 1.0, "tfrac"),
    (X("5x - 7y + 11z + 4 = 0"), "x + y - z + 2 = 0", 0.0, "expression"),
    (X("1/2"), "\\frac{1}{2}", 1.0, "half"),
]

NEMO_SKILLS: list[Case] = [
    *both_ways([
        ("5", "5"), ("5", "5.0"), ("1/2", "0.5"), ("\\frac{1}{2}", "0.5"),
        ("x^2+2x+1", "x^2 + 2*x + 1"), ("x^2+2x+1", "x^2 + 2*x - (-1)"),
        ("y = x^2+2x+1", "2x+ 1+x^2"), ("odd", "\\text{odd}"), ("E", "\\mathrm{E}"),
        ("A", "\\textbf{A}"), ("f'", "f'"), ("185", "185\\"), ("185\\", "185\\"),
        (".185", "0.185"), ("\\frac {1}{2}", "0.5"), ("17\\text{ any text}", "17"),
        ("\\$10", "10"), ("10%", "10"), ("10\\%", "10"), ("2.5", "\\frac{5}{2}"),
        ("\\frac{1}{3}", "\\dfrac{1}{3}"), ("(r+5)(r+5)", "(r+5)^2"),
        ("\\begin{pmatrix}0&0&0\\\\0&1&0\\\\0&0&1\\end{pmatrix}",
         "\\begin{bmatrix} 0 & 0 & 0 \\\\ 0 & 1 & 0 \\\\ 0 & 0 & 1 \\end{bmatrix}"),
    ], 1.0, "correct"),
    *both_ways([
        ("5", "5.001"), ("x^2+2x+1", "x^3+2x+1"), ("odd", "\\text{oddd}"),
        ("E", "\\mathrm{E}*2"), ("\\sqrt{67},-\\sqrt{85}", "\\sqrt{67}"),
    ], 0.0, "incorrect"),
]

_R = "<think>...</think>\nThe answer is \\boxed{%s}."
RLLM: list[Case] = [
    ("<think>2 + 2 = 4</think>\nThe answer is \\boxed{4}.", "4", 1.0, "correct simple"),
    ("<think>The answer could be written as a fraction or decimal</think>\nThe answer is "
     "\\boxed{0.5}.", ["0.5", "1/2", "one half"], 1.0, "multiple ground truths"),
    ("<think>2 + 2 = 5</think>\nThe answer is \\boxed{5}.", "4", 0.0, "incorrect"),
    ("The answer is 4.", "4", 0.0, "format error: no delimiter"),
    ("<think>2 + 2 = 4</think>\nThe answer is 4.", "4", 0.0, "format error: no box"),
    ("<think>Let me solve this quadratic equation</think>\nThe answer is \\boxed{x = 2, x = -3}.",
     "x = 2, x = -3", 1.0, "complex expression"),
    (_R % "24", "\\boxed{24}", 1.0, "boxed ground truth"),
    (_R % "3.14159", "3.14159", 1.0, "numerical equal"),
    (_R % "\\frac{1}{2}", "1/2", 1.0, "fraction equivalence"),
    (_R % "42", ["\\boxed{}", ""], 0.0, "empty ground truth list"),
    (_R % "", "", 0.0, "empty answer, empty string"),
    (_R % "", [""], 0.0, "empty answer, empty list item"),
    (_R % "", "\\boxed{}", 0.0, "empty answer, empty boxed"),
    (_R % "", ["\\boxed{}", ""], 0.0, "empty answer, empty boxed and string"),
    (_R % " ", [" "], 0.0, "blank answer, blank string"),
    ("<think>...</think>\n<|begin_of_box|><|end_of_box|>", [""], 0.0, "empty box tokens"),
    (_R % "42", ["\\boxed"], 0.0, "unterminated boxed ground truth"),
    (_R % "", ["", "42"], 0.0, "empty answer, mixed ground truths"),
    (_R % "42", ["", "42"], 1.0, "real answer, mixed ground truths"),
    (_R % "", ["7"], 0.0, "empty answer, valid ground truth"),
    (_R % "42", ["7"], 0.0, "wrong answer"),
    (_R % "0", "0", 1.0, "zero ground truth"),
    (_R % "0", ["0"], 1.0, "zero in list"),
    (_R % "0", "\\boxed{0}", 1.0, "zero boxed ground truth"),
    ("<think>5 + 5 = 10</think>\nThe answer is \\boxed{10}.", "10", 1.0, "custom config correct"),
    ("<think>5 + 5 = 11</think>\nThe answer is \\boxed{11}.", "10", 0.0, "custom config wrong"),
    ("The answer is 10.", "10", 0.0, "custom config format error"),
    (_R % " ", "  ", 0.0, "utils: whitespace vs whitespace"),
    (_R % "", "42", 0.0, "utils: empty given"),
    (_R % "42", "", 0.0, "utils: empty ground truth"),
    (_R % "42", "42", 1.0, "utils: real answer"),
]

TRL_ACCURACY: list[Case] = [
    ("\\boxed{\\frac{63}{400}}", "\\frac{63}{400}", 1.0, "accuracy correct latex"),
    ("\\boxed{\\frac{63}{400}}", "63/400", 1.0, "accuracy correct slash"),
    ("\\boxed{\\frac{64}{400}}", "\\frac{63}{400}", 0.0, "accuracy wrong"),
    ("\\boxed{3}", "6", 0.0, "accuracy wrong, gold without latex"),
    ("\\boxed{\\frac{1}{3}}", "\\frac{1}{3}", 1.0, "accuracy in worker thread"),
]
TRL_REASONING: list[Case] = [
    ("<think> Reasoning content </think> \\boxed{\\frac{63}{400}}", "\\frac{63}{400}", 1.0,
     "reasoning correct"),
    ("Reasoning content </think> \\boxed{\\frac{63}{400}}", "\\frac{63}{400}", 1.0,
     "reasoning correct, opening tag in the prompt"),
    ("<think> Reasoning content </think> \\boxed{\\frac{64}{400}}", "\\frac{63}{400}", 0.0,
     "reasoning wrong"),
    ("<think> My answer is \\boxed{42} </think> Some other text.", "\\boxed{42}", 0.0,
     "answer only in reasoning"),
    ("<think> The answer is \\boxed{42} </think> Here's a wrong answer: \\boxed{43}.",
     "\\boxed{42}", 0.0, "right in reasoning, wrong after"),
    ("<think> Incomplete reasoning without closing tag", "\\frac{63}{400}", 0.0,
     "incomplete reasoning"),
    ("Correct answer \\frac{63}{400} but completely missing reasoning content",
     "\\frac{63}{400}", 0.0, "missing reasoning"),
]

# AReaL's completions are free text read by math-verify; we adopt the final value boxed.
AREAL: list[Case] = [
    (X("4"), "4", 1.0, "gsm8k exact"), (X("0.5"), "1/2", 1.0, "gsm8k symbolic"),
    ("Step 1: 2+2=4. \\boxed{4}", "4", 1.0, "gsm8k boxed"), (X("5"), "4", 0.0, "gsm8k wrong"),
    ("", "4", 0.0, "gsm8k empty"), (X("!!!invalid!!!"), "4", 0.0, "gsm8k malformed"),
    (X("8"), "2^3", 1.0, "gsm8k exponents"), (X("\\sqrt{16}"), "4", 1.0, "gsm8k sqrt"),
    (X("\\frac{5}{6}"), "5/6", 1.0, "gsm8k fraction"), (X("-15"), "-15", 1.0, "gsm8k negative"),
    (X("x = 3"), "3", 1.0, "gsm8k equation"), (X("42"), "42", 1.0, "gsm8k multiline"),
    (X("10^3"), "1000", 1.0, "gsm8k power"), (X("999999999999999"), "999999999999999", 1.0,
                                               "gsm8k large"),
    (X("0.0000001"), "0.0000001", 1.0, "gsm8k small decimal"), (X("4"), "12/3", 1.0,
                                                                "gsm8k division"),
    (X("4"), "3/12", 0.0, "gsm8k division order"), (X("3+2"), "5", 1.0, "gsm8k commutativity"),
    (X("x = 4"), "4", 1.0, "gsm8k equation 2"), (X("1 \\times 10^3"), "1000", 1.0,
                                                 "gsm8k scientific latex"),
    (X("\\frac{\\frac{1}{2}}{\\frac{3}{4}}"), "2/3", 1.0, "gsm8k fraction chain"),
    (X("\\binom{5}{2}"), "10", 1.0, "gsm8k binomial"),
    (X("\\sin\\left(\\frac{\\pi}{2}\\right)"), "1", 1.0, "gsm8k trig"),
    (X("\\log_2(8)"), "3", 1.0, "gsm8k log base"), (X("\\left| 3 - 5 \\right|"), "2", 1.0,
                                                    "gsm8k absolute value"),
    (X("90"), "90", 1.0, "geometry3k bracket"), (X("5.0"), "5", 1.0, "geometry3k 5.0"),
    (X("60"), "90", 0.0, "geometry3k wrong"), (X("90 degrees"), "90", 1.0, "geometry3k degrees"),
    (X("1/2"), "0.5", 1.0, "geometry3k fraction"), (X(" 90 "), "90", 1.0, "geometry3k spaces"),
    (X("45 degrees"), "45", 1.0, "geometry3k angle units"), (X("-3"), "-3", 1.0,
                                                             "geometry3k negative"),
    (X("\\sqrt{4}"), "2", 1.0, "geometry3k sqrt"), (X("10^4"), "10000", 1.0, "geometry3k power"),
    ("First try \\boxed{30}, second try \\boxed{45}.", "45", 1.0, "geometry3k last wins"),
    (X("\\sqrt{\\sqrt{16}}"), "2", 1.0, "geometry3k nested sqrt"), (X("5"), "5", 1.0,
                                                                    "geometry3k pythagoras"),
    (X("0.0667"), "None", 0.0, "worker: None answer"),
    (X("0.067"), "0.066793", 0.0, "worker: three decimals"),
    (X("2.232"), "2.23", 0.0, "worker: extra precision"),
    (X("2.23"), "2.232", 0.0, "worker: less precision"),
    ("Area equals \\boxed{10^4} square units", "10000", 1.0, "worker: text around latex power"),
    ("Result: \\boxed{(1/2)^{2} + \\sqrt{9}}", "0.25 + 3", 1.0, "worker: nested expression"),
    ("The final answer is \\boxed{12}.", "12", 1.0, "worker: in a thread"),
]

SLIME: list[Case] = [
    ("Reasoning steps...\nAnswer: \\boxed{25}", "25", 1.0, "boxed answer"),
    ("Answer: \\boxed{0}", "0", 1.0, "zero ground truth"),
]

SUITES: dict[str, list[Case]] = {
    "hendrycks_math": HENDRYCKS, "nemo_skills": NEMO_SKILLS, "rllm_deepscaler": RLLM,
    "trl": TRL_ACCURACY + TRL_REASONING, "areal": AREAL, "slime": SLIME,
    "math_verify": MATH_VERIFY_CASES,
}
# Graded with require_think_close=True: the peer's reward requires "</think>".
THINK_REQUIRED = {"rllm_deepscaler": {c[3] for c in RLLM},
                  "trl": {c[3] for c in TRL_REASONING}}

LEFT_OUT: dict[str, list[tuple[str, str]]] = {
    "hendrycks_math": [
        ("10, 4, -2 != 4, 10, -2", "a bare comma list (all solutions) is compared as a set, "
         "as Math-Verify and NeMo-Skills do; Hendrycks' string normaliser compares in order. "
         "Tuples in parentheses and intervals stay ordered"),
        ("0.1, 4, 2 != 4, .1, 2", "as for '10, 4, -2': a bare list is unordered here"),
    ],
    "nemo_skills": [
        ("918\\frac{1}{2} == 918.5", "mixed number: we read 918\\frac{1}{2} as a product (459); "
         "a digit run next to a fraction is ambiguous, so it pays nothing either way"),
        ("\\frac{\\sqrt{3}}{3} == \\frac{\\sqrt{3}}{3} \\approx 0.577", "answer with an "
         "'\\approx' tail: we do not cut text after \\approx"),
        ("C == C. x = 42", "choice letter followed by more text: we score it 0 (our trap "
         "'choice with extra value')"),
        ("0 != None", "None is not an answer string"),
    ],
    "rllm_deepscaler": [
        ("ground_truth None", "None is not an answer string (our API takes str or list[str])"),
        ("wrong problem type / toolcall bonus / ORM", "reward-config features, not grading"),
    ],
    "trl": [
        ("'Answer is forty two.' -> None", "TRL skips (None) an unparsable reference; we "
         "return 0.0 and the trainer sees a wrong answer"),
        ("'forty two' reference -> None", "TRL skips (None) an unparsable reference; we "
         "return 0.0"),
        ("custom reasoning delimiters", "we support only <think>...</think>"),
    ],
    "areal": [
        ("answer=None", "None is not an answer string"),
        ("0.0666668 vs 0.066666793 == 1", "math-verify 6-digit rounding; we compare numbers "
         "to 1e-12 (issue 10 item 6)"),
        ("2/3 vs 'answer is 0.6666667' == 1", "rounding, as above"),
        ("\\sqrt{2} vs 'the answer is sqrt(2)' == 0", "AReaL marks this expectation as a "
         "known bad case; sqrt(2) is the square root of 2"),
        ("free-text completions with no number ('The answer is 90 degrees.' fallback etc.)",
         "adopted boxed (the value only); text extraction itself is not adopted"),
        ("tests asserting only 'reward is a float' (1/3 decimal, pi, matrix, summation, "
         "quadratic formula, ...)", "no expected verdict to agree with"),
        ("e^{i\\pi} = -1, \\lim ... = 1, 17 \\bmod 5 = 2, vmatrix = 3",
         "the completion is an equation whose value is on the right; adopted values only "
         "where the boxed value is the peer's answer"),
    ],
    "slime": [
        ("'Answer: 25' (no box)", "we grade only a \\boxed{} answer (DeepScaleR)"),
        ("'25' (no box)", "we grade only a \\boxed{} answer (DeepScaleR)"),
    ],
    "math_verify": MATH_VERIFY_LEFT_OUT,
}
