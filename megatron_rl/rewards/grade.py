"""The result every grader returns: a score and the reason behind it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Grade:
    """A reward with its explanation.

    ``reason`` is "correct" for a full score; otherwise a short tag, a colon, and detail,
    e.g. "wrong_answer: test 3", "timeout: test 0", "no_boxed_answer",
    "grader_error: ...". Tags before the colon are stable; detail is for humans.
    """

    score: float
    reason: str

    @property
    def tag(self) -> str:
        """The stable part of ``reason`` (before the first colon)."""
        return self.reason.split(":", 1)[0]


CORRECT = Grade(1.0, "correct")


def fail(reason: str) -> Grade:
    """A zero reward for ``reason``."""
    return Grade(0.0, reason)
