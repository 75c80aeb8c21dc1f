"""User-facing errors.

Every error a user can cause (a config typo, malformed data, wrong parallel sizes, a missing
checkpoint, a dead server) is raised as a ``UserError`` subclass whose message is one
paragraph saying what is wrong and what to change. The CLI prints that paragraph alone, no
traceback, and exits with status 2. Bugs stay ordinary exceptions with full tracebacks.
"""


class UserError(Exception):
    """An error caused by the user's input; its message says what to change."""

    exit_code = 2


class ConfigError(UserError):
    """A recipe, an override or a parallel layout that cannot work."""


class CheckpointError(UserError):
    """A checkpoint that is missing, incomplete, corrupt or of the wrong model."""


class DataError(UserError):
    """Input data (parquet, JSONL) that is malformed or does not fit the model."""


class RolloutError(UserError):
    """A rollout server that cannot be started, reached, or that answers malformed replies."""
