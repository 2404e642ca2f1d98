"""The one exception type that means "the user's input is wrong".

The CLI turns it into one line on stderr and exit status 2; anything else is a bug and keeps
its traceback.
"""


class UserError(Exception):
    """Bad input (config, trace, flag, KV block): the message names what and where."""


class RunFailed(Exception):
    """A live run could not finish (an actor died, a call missed its deadline, KV failed its
    checksum): the CLI prints the one-line reason and exits with status 1."""


DEBUG_HINT = "(--debug for the traceback)"
"""Appended to a one-line error that hides a traceback worth seeing (a user's code failed)."""

