"""The one exception type that means "the user's input is wrong".

The CLI turns it into one line on stderr and exit status 2; anything else is a bug and keeps
its traceback.
"""


class UserError(Exception):
    """Bad input (config, trace, flag, KV block): the message names what and where."""
