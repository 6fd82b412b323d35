"""The errors fmjax raises for problems a user can fix.

Every one derives from `FmjaxError`, and its message is one line that names the file or
setting at fault and the fix. The command line prints that line and exits with code 2
(`--debug` shows the traceback instead). An OSError becomes one line too (`describe`):
the path, the cause and, for the usual causes, what to do.
"""
from __future__ import annotations

import errno
import warnings

__all__ = ["ConfigError", "DataError", "FmjaxError", "FmjaxWarning", "LaunchError", "OutputError", "RunError",
           "ScoreRuleError", "TrainError", "describe", "first_line", "warn"]


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


class LaunchError(FmjaxError, RuntimeError):
    """The program cannot start as asked (devices, a multi-host start-up)."""


class OutputError(FmjaxError, RuntimeError):
    """An output folder that cannot be written as asked (it holds files fmjax did not write)."""


class FmjaxWarning(UserWarning):
    """Something fmjax did that a user should know of (the command line prints it as one line)."""


def warn(message: str) -> None:
    warnings.warn(message, FmjaxWarning, stacklevel=2)


_HINTS = {errno.ENOSPC: "free some space there or write elsewhere",
          getattr(errno, "EDQUOT", errno.ENOSPC): "free some space there or write elsewhere",
          errno.EACCES: "choose a place you may write to", errno.EPERM: "choose a place you may write to",
          errno.EROFS: "the file system is read-only: write elsewhere"}


def first_line(err: BaseException) -> str:
    """The first non-empty line of an error's message (its type name if it has none)."""
    return next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)


def describe(err: BaseException) -> str:
    """One line for a user: an OSError as 'PATH: cause (what to do)', anything else as
    the first line of its message."""
    if isinstance(err, OSError) and err.strerror:
        where = f"{err.filename}: " if err.filename is not None else ""
        hint = _HINTS.get(err.errno)
        return f"{where}{err.strerror}" + (f" ({hint})" if hint else "")
    return first_line(err)
