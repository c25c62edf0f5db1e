"""The one exception type that means "the user gave us something we cannot use"."""


class LmforgeError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits with code 2."""
