"""User-facing errors.

Every problem a user can fix (a bad layout, a missing shard, a prompt that is
too long) is raised as a `DistInferError` subclass whose message names the
problem *and* the fix. The CLI prints these without a traceback and exits
with `exit_code`; anything else is a bug and keeps its traceback.
"""


class DistInferError(Exception):
    exit_code = 2


class LayoutError(DistInferError):
    """A TP/PP layout that cannot work for this model or this launch."""


class CheckpointError(DistInferError):
    """A source checkpoint or a partitioned checkpoint that is unusable."""


class EngineError(DistInferError):
    """An engine directory that cannot be loaded by this launch."""


class RequestError(DistInferError):
    """A prompt or sampling setting that the engine cannot serve."""


class LaunchError(DistInferError):
    """The process was started in a way that cannot run this job."""


class RankLostError(DistInferError):
    """A peer rank died or was cut off while the job ran (not a user error: exit code 1)."""

    exit_code = 1
