"""Errors that the command line reports as one line with exit code 2."""


class UsageError(Exception):
    """Input a command cannot use (a bad flag value, a subset that does not exist, ...)."""
