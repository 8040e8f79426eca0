"""Graceful stops. The first SIGINT (Ctrl-C) or SIGTERM (what a cluster scheduler sends before it kills a
job) asks the training loop to stop after the current step and save; a second one acts at once."""

import signal
import sys
from contextlib import contextmanager
from typing import Iterator

received: list[int] = []  # signals received in this process; a sweep's later jobs see them too


def requested() -> int | None:
    """The first stop signal received, if any (checked by the loop after every step)."""
    return received[0] if received else None


@contextmanager
def caught() -> Iterator[None]:
    """While inside, the first SIGINT or SIGTERM is recorded instead of ending the process."""

    def handler(signum: int, frame) -> None:
        received.append(signum)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second one: KeyboardInterrupt at once
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        sys.stderr.write(f"\n{signal.Signals(signum).name}: stopping after this step and saving "
                         "(Ctrl-C again to quit at once)\n")

    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    if not received:
        for s in previous:
            signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)

