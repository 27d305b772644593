"""The one error type advtune raises for bad input. Its message says what is wrong and how to fix it."""


class AdvtuneError(ValueError):
    """A problem the user can fix: bad argument, missing/corrupt file, incompatible checkpoint.

    A ValueError, as Python's own bad-argument errors are (`except ValueError` around a call catches it). The CLI
    prints it as a single line (no traceback) and exits with status 2. Inside advtune, a `try` that turns a
    ValueError from a parser into an AdvtuneError of its own re-raises an AdvtuneError first (its message is
    already the precise one).
    """
