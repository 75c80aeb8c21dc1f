"""The result every grader returns: a score and the reason behind it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Grade:
    """A reward with its explanation.

    ``reason`` is "correct" for a full score; otherwise a short tag, a colon, and detail,
    e.g. "wrong_answer: test 3", "timeout: test 0", "no_boxed_answer",
    "grader_error: ...". Tags before the colon are stable; detail is for humans.
    ``grader_error`` alone means the grader could not give a grade (see ``grader_failed``).
    """

    score: float
    reason: str

    @property
    def tag(self) -> str:
        """The stable part of ``reason`` (before the first colon)."""
        return self.reason.split(":", 1)[0]

    @property
    def grader_failed(self) -> bool:
        """The grade is unknown, not wrong: the grader crashed or timed out, its sandbox did not
        start, or the test data is malformed. The score is 0.0 but trainers mask the sample
        (``trainer.steps.shape``). Whatever the candidate's code did is never one of these."""
        return self.tag == GRADER_ERROR


GRADER_ERROR = "grader_error"
CORRECT = Grade(1.0, "correct")


def fail(reason: str) -> Grade:
    """A zero reward for ``reason``."""
    return Grade(0.0, reason)


def grader_error(detail: str) -> Grade:
    """A grade the grader could not give (``Grade.grader_failed``), with the reason why."""
    return Grade(0.0, f"{GRADER_ERROR}: {detail}")
