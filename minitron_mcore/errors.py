"""User-facing errors.

A :class:`MinitronError` is a mistake the user can fix (a bad config value, a missing or corrupt
checkpoint, an impossible target).  The CLI prints its message as one line, with the fix, and exits
non-zero without a traceback; anything else is a bug and keeps its traceback.
"""


class MinitronError(Exception):
    """An error caused by the user's input; the message names the fix."""

    exit_code = 2


def require(condition: bool, message: str) -> None:
    """Raise :class:`MinitronError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise MinitronError(message)
