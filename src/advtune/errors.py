"""The one error type advtune raises for bad input. Its message says what is wrong and how to fix it."""


class AdvtuneError(Exception):
    """A problem the user can fix: bad argument, missing/corrupt file, incompatible checkpoint.

    The CLI prints it as a single line (no traceback) and exits with status 2.
    """
