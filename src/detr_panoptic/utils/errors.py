"""The project's user-facing error type.

Raise ``UserInputError`` (a ``ValueError``) or ``FileNotFoundError`` for bad input: the CLI prints the
message as one line and exits non-zero, without a traceback unless ``--debug`` is given.
"""


class UserInputError(ValueError):
    """Bad input from the user: a file, a config value or an argument. The message says which."""
