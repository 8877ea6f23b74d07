"""The one exception family for bad input (the CLI prints its one-line message and exits with code 2), and the
interruption of long work by a signal. Both live here, apart from the runtime, so the CLI imports without PyAV."""

import signal


class UserError(Exception):
    """Something the user gave is wrong; the message says what and how to fix it, in one line."""


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; completed clips are kept."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
