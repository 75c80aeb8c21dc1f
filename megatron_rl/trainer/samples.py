"""``ScoredSample``: one generated response after grading, as every trainer rank sees it.

The rollout contract (``rollout.types.Sample``) ends at the client; the trainer keeps what
the loss and the metrics need, in plain Python types so the list can be broadcast from
rank 0 to every rank (``torch.distributed.broadcast_object_list``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_rl.rewards.grade import GRADER_ERROR


@dataclass
class ScoredSample:
    uid: int
    """Row id of the problem in the dataset (``data.Problem.uid``)."""
    group: int
    """Index of the problem within this step (samples of one prompt share it)."""
    sample_index: int
    """Which of the group's n samples this is."""
    prompt_ids: list[int]
    response_ids: list[int]
    rollout_logprobs: list[float]
    """The engine's log-probs of ``response_ids`` (under the sampling temperature)."""
    finish_reason: str
    """stop, length or abort (aborted samples never reach the trainer; see ``generate``)."""
    data_source: str
    score: float = 0.0
    """The grader's score (before shaping)."""
    reward: float = 0.0
    """The reward the advantages use (score plus shaping such as the overlong penalty)."""
    grade_tag: str = ""
    """The grader's reason; ``grader_error*`` means the grade is unknown (a lost sandbox driver
    after the candidate started is the candidate's 0.0, not a grader failure)."""
    trainable: bool = True
    """False when the sample is masked out of the loss (grader failure, overlong filter)."""
    weight_version: str | None = None
    """The server's weight version when the sample finished."""
    token_versions: list[str] | None = None
    """Per response token, its weight version (a partial rollout spans syncs); None when the
    server does not report it (then every token has ``weight_version``)."""
    extra: dict = field(default_factory=dict)

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)

    @property
    def grader_failed(self) -> bool:
        return self.grade_tag.startswith(GRADER_ERROR)
