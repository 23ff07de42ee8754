"""User-facing errors: every problem a user can cause (a bad token id, a wrong shape, a corrupt checkpoint,
a NaN in training) raises RefimplError, ONE line naming the problem and the fix; the CLI prints it, exit 2."""


class RefimplError(Exception):
    """A problem with the user's input: the message names the problem and how to fix it."""


def require(condition, message):
    if not condition:
        raise RefimplError(message)
