"""Helpers for flaghost targeting rules written in Python (componentize-py).

`errors_as_err` turns any exception a rule raises into the contract's
`err(string)`, so flaghost reports the rule's own message ("KeyError:
'country'") instead of a bare trap. Without it an uncaught exception still
reaches flaghost's log, with its traceback, but as a trap.
"""

import functools

from componentize_py_types import Err


def errors_as_err(function):
    """Wraps `function` so that an exception it raises becomes `Err(text)`."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except Err:
            raise
        except Exception as e:  # every failure becomes the rule's own error
            raise Err(f"{type(e).__name__}: {e}") from e

    return wrapper
