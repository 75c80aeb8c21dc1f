"""Code reward: the three test formats end to end, extraction, and output comparison."""

from __future__ import annotations

import json

import pytest

from megatron_rl.errors import DataError
from megatron_rl.rewards.code import compute_score, extract_code, grade_code
from megatron_rl.rewards.code_tests import parse_tests, stdout_matches, values_match

STDIO_TESTS = {"inputs": ["1 2\n", "10 -3\n", "0 0\n"], "outputs": ["3\n", "7", "0"]}
STDIO_OK = "<think>sum</think>\n```python\na, b = map(int, input().split())\nprint(a + b)\n```"
STDIO_WRONG_ON_SECOND = "```python\na, b = map(int, input().split())\nprint(abs(a) + abs(b))\n```"

CALL_TESTS = {"fn_name": "twoSum", "inputs": ["[2, 7, 11, 15]\n9", "[3, 2, 4]\n6"],
              "outputs": ["[0, 1]", "[1, 2]"]}
CALL_OK = """```python
class Solution:
    def twoSum(self, nums, target):
        seen = {}
        for i, x in enumerate(nums):
            if target - x in seen:
                return [seen[target - x], i]
            seen[x] = i
```"""

ASSERT_TESTS = {"test_code": "def check(candidate):\n    assert candidate([1, 2, 3]) == 6\n"
                             "    assert candidate([]) == 0\n", "entry_point": "total"}
ASSERT_OK = "```python\ndef total(xs):\n    return sum(xs)\n```"
KODCODE_TESTS = {"test_code": ["from solution import total\n\ndef test_basic():\n"
                               "    assert total([4]) == 4\n",
                               "from solution import total\n\ndef test_neg():\n"
                               "    assert total([-1, 1]) == 0\n"]}


def test_stdio_correct(sandbox_setup):
    grade = grade_code(STDIO_OK, STDIO_TESTS, timeout_s=3, backend=sandbox_setup.backend)
    assert grade.score == 1.0, grade.reason


def test_stdio_one_failing_test_scores_zero_and_stops_there(sandbox_setup):
    grade = grade_code(STDIO_WRONG_ON_SECOND, STDIO_TESTS, timeout_s=3,
                       backend=sandbox_setup.backend)
    assert grade.score == 0.0
    assert grade.reason == "wrong_answer: test 1"


def test_call_based_correct_and_wrong(sandbox_setup):
    assert grade_code(CALL_OK, CALL_TESTS, timeout_s=3, backend=sandbox_setup.backend).score == 1.0
    wrong = dict(CALL_TESTS, outputs=["[0, 1]", "[2, 1]"])
    grade = grade_code(CALL_OK, wrong, timeout_s=3, backend=sandbox_setup.backend)
    assert grade.reason == "wrong_answer: test 1"


def test_assert_based_humaneval_and_kodcode(sandbox_setup):
    b = sandbox_setup.backend
    assert grade_code(ASSERT_OK, ASSERT_TESTS, timeout_s=3, backend=b).score == 1.0
    assert grade_code(ASSERT_OK, KODCODE_TESTS, timeout_s=3, backend=b).score == 1.0
    bad = "```python\ndef total(xs):\n    return sum(xs) + (len(xs) == 0)\n```"
    grade = grade_code(bad, ASSERT_TESTS, timeout_s=3, backend=b)
    assert grade.score == 0.0 and "AssertionError" in grade.reason


def test_exit_before_asserts_is_not_a_pass(sandbox_setup):
    sneaky = "```python\nimport sys\ndef total(xs):\n    return 0\nsys.exit(0)\n```"
    grade = grade_code(sneaky, ASSERT_TESTS, timeout_s=3, backend=sandbox_setup.backend)
    assert grade.score == 0.0


def test_compute_score_public_signature():
    assert compute_score(STDIO_OK, json.dumps(STDIO_TESTS)) == 1.0
    assert compute_score("no code here", STDIO_TESTS) == 0.0


def test_program_reads_fd0_and_exit_code_ignored(sandbox_setup):
    prog = "```python\nimport sys\ndata = open(0).read().split()\nprint(sum(map(int, data)))\nsys.exit(3)\n```"
    grade = grade_code(prog, {"inputs": ["1 2 3"], "outputs": ["6"]}, timeout_s=3,
                       backend=sandbox_setup.backend)
    assert grade.score == 1.0, grade.reason


def test_syntax_error_scores_zero(sandbox_setup):
    grade = grade_code("```python\ndef f(:\n```", STDIO_TESTS, timeout_s=3,
                       backend=sandbox_setup.backend)
    assert grade.score == 0.0 and "SyntaxError" in grade.reason


def test_extract_code_takes_last_python_block():
    text = ("<think>```python\nprint('draft')\n```</think>\n```cpp\nint main(){}\n```\n"
            "```python\nprint(1)\n```\nand\n```py\nprint(2)\n```\n```text\nnot code\n```")
    assert extract_code(text) == "print(2)\n"
    assert extract_code("<think>```python\nprint(1)\n```</think> nothing") is None
    assert extract_code("```\nprint(3)\n```") == "print(3)\n"
    assert extract_code("```python\n\n```") is None


@pytest.mark.parametrize("got,expected,same", [
    ("3\n", "3", True),
    ("1 2 3   \n\n", "1 2 3", True),
    ("1  2\t3\n", "1 2 3", True),
    ("0.50\n", "0.5", True),
    ("0.3333333333\n", "0.333333333", False),  # exact unless the dataset sets float_tol
    ("0.3334\n", "0.3333", False),
    ("1000000000000000001", "1000000000000000000", False),
    ("YES", "yes", False),
    ("1\n2", "1 2", False),
    ("1e3", "1000", False),  # an integer answer takes only that integer
    ("nan", "nan", True),
    ("inf", "1e400", False),
    ("", "", True),
    ("1\r\n2\r\n", "1\n2", True),
])
def test_stdout_matches(got, expected, same):
    assert stdout_matches(got, expected) is same


@pytest.mark.parametrize("got,expected,same", [
    ([0, 1], [0, 1], True),
    ([0, 1], [[0, 1]], False),  # TACO's wrapping only with taco_style
    ([1, 0], [0, 1], False),
    (0.1 + 0.2, 0.3, False),  # exact unless the dataset sets float_tol
    (1, True, False),
    ("a", "a", True),
    ({"a": [1]}, {"a": [1.0]}, True),
    (None, None, True),
])
def test_values_match(got, expected, same):
    assert values_match(got, expected) is same


def test_parse_tests_formats_and_errors():
    assert parse_tests(STDIO_TESTS).mode == "stdio"
    spec = parse_tests(CALL_TESTS)
    assert spec.mode == "call" and spec.inputs[0] == [[2, 7, 11, 15], 9]
    assert spec.expected[1] == [1, 2]
    taco = parse_tests({"fn_name": "f", "inputs": [[1, 2]], "outputs": [[3]]})
    assert taco.inputs == [[1, 2]] and taco.expected == [[3]]
    assert len(parse_tests(KODCODE_TESTS)) == 2
    for bad in ({"inputs": ["1"]}, {"inputs": [], "outputs": []}, "{not json", [1, 2],
                {"test_code": []}, {"fn_name": "f", "inputs": ["{bad"], "outputs": ["1"]}):
        with pytest.raises(DataError):
            parse_tests(bad)
