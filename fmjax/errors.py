"""The errors fmjax raises for problems a user can fix.

Every one derives from `FmjaxError`, and its message is one line that names the file or
setting at fault and the fix. The command line prints that line and exits with code 2
(`--debug` shows the traceback instead).
"""
from __future__ import annotations

__all__ = ["ConfigError", "DataError", "FmjaxError", "RunError", "ScoreRuleError", "TrainError", "first_line"]


class FmjaxError(Exception):
    """Base of fmjax's user-facing errors."""


class ConfigError(FmjaxError, ValueError):
    """A bad config field, override, preset or method name."""


class ScoreRuleError(ConfigError):
    """A scoring rule that cannot work: an unknown or out-of-range aggregation, time weight
    or image-score rule, or a memory budget below one network call."""


class DataError(FmjaxError, ValueError):
    """Input data that cannot be read as asked (a missing folder, a bad image or mask)."""


class RunError(FmjaxError, RuntimeError):
    """A run folder that cannot be used (missing, incomplete, damaged, from another config)."""


class TrainError(FmjaxError, RuntimeError):
    """Training cannot go on (NaN loss, a checkpoint from another config, ...)."""


def first_line(err: BaseException) -> str:
    """The first non-empty line of an error's message (its type name if it has none)."""
    return next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
