"""User-facing errors.

A :class:`MinitronError` is a mistake the user can fix (a bad config value, a missing or corrupt
checkpoint, an impossible target).  The CLI prints its message as one line, with the fix, and exits
non-zero without a traceback; anything else is a bug and keeps its traceback.
"""

import errno


class MinitronError(Exception):
    """An error caused by the user's input; the message names the fix."""

    exit_code = 2


class BadValue(MinitronError, ValueError):
    """A value outside what a key allows, raised where library code (not only the CLI) takes
    it: one error line for the CLI, a ``ValueError`` for a Python caller."""


def require(condition: bool, message: str, error: type = MinitronError) -> None:
    """Raise ``error`` (a :class:`MinitronError`) with ``message`` unless ``condition`` holds."""
    if not condition:
        raise error(message)


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, at most ``limit`` characters ('' if empty):
    what an error line quotes of a library's error."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else ""


# What the user can do about an OSError of the filesystem (a full disk, a read-only mount);
# any other OSError is a bug or an unexpected system state and keeps its traceback.
_STORAGE_FIXES = {
    errno.ENOSPC: "free space there or choose another save=",
    errno.EDQUOT: "free space within your quota or choose another save=",
    errno.EROFS: "choose a save= on a writable filesystem",
    errno.EACCES: "check the permissions of that path or choose another save=",
    errno.EPERM: "check the permissions (and immutable flags) of that path or choose another save=",
}


def storage_error(e: OSError) -> MinitronError:
    """A full disk or a read-only output as one error line (partial outputs are removed by the
    writers, which write to temporary paths and swap them in only when complete). Any other
    OSError is re-raised as it is."""
    if e.errno not in _STORAGE_FIXES:
        raise e
    what = (e.strerror or str(e)).lower() + (f": {e.filename}" if e.filename else "")
    return MinitronError(f"{what}; {_STORAGE_FIXES[e.errno]}")
