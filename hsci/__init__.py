"""hsci: config-driven deep-learning experiments."""

import time

__version__ = "0.1.0"
STARTED = time.time()  # about when the process started: startup_s in summary.json counts from here


class UserError(Exception):
    """A problem the user can fix: the message names it and says how, in one line."""


def user_error(e: BaseException | None) -> UserError | None:
    """The UserError behind `e`, if any: Hydra's instantiate wraps what a builder raises, and a DataLoader
    worker's error comes back with its traceback in the message."""
    while e is not None and not isinstance(e, UserError):
        e = e.__cause__
    if e is not None and "Traceback" in str(e):
        return UserError(str(e).strip().splitlines()[-1].removeprefix("hsci.UserError: "))
    return e
