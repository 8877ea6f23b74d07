"""The one exception family for bad input: the CLI prints its one-line message and exits with code 2."""


class UserError(Exception):
    """Something the user gave is wrong; the message says what and how to fix it, in one line."""
