"""User-facing errors.

Every problem a user can cause (a bad token id, a wrong shape, a corrupt checkpoint, a NaN during
training) raises `RefimplError` with ONE line that names the problem and the fix. The CLI prints
that line and exits with status 2; it never shows a traceback for these.
"""


class RefimplError(Exception):
    """A problem with the user's input: the message names the problem and how to fix it."""


def require(condition, message):
    """Raise RefimplError(message) unless condition holds."""
    if not condition:
        raise RefimplError(message)
