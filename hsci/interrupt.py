"""Graceful stops. The first SIGINT (Ctrl-C), SIGTERM (what a cluster scheduler sends before it kills a job)
or SIGHUP (a closed terminal, a dropped SSH session) asks the training loop to stop after the current step
and save; a second one acts at once. The process then exits with 128 + the signal's number."""

import os
import signal
import sys
from contextlib import contextmanager
from typing import Iterator

STOPS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
received: list[int] = []  # signals received in this process; a sweep's later jobs see them too


def preemption() -> signal.Signals | None:
    """The signal a cluster job that submitit runs gets before it is preempted or runs out of time (SIGUSR2
    unless submitit was told otherwise), or None outside submitit."""
    if "SUBMITIT_EXECUTOR" not in os.environ:  # set by submitit in every job it runs
        return None
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"))


def requested() -> int | None:
    """The first stop signal received, if any (checked by the loop after every step)."""
    return received[0] if received else None


def exit_code() -> int:
    """128 + the stop signal's number, as a shell reports a process that signal ended (130 for Ctrl-C)."""
    return 128 + received[0]


def at_once(signum: int, frame) -> None:
    """Ctrl-C that stops at once: KeyboardInterrupt. Where it lands, Python may turn it into another error (inside
    an import, a class being made: "Error calling __set_name__"), so it is recorded too, for `stopped_at_once` to
    tell; and a library may catch that error and carry on. A further Ctrl-C is ignored once hsci has taken the stop
    up (`taken_up`), so none cuts it short, and stops at once again if it has not."""
    signal.signal(signal.SIGINT, _again)
    quit_now.append(signum)
    raise KeyboardInterrupt


def _again(signum: int, frame) -> None:
    if not taken:  # the first one was lost where it landed: this one stops
        quit_now.append(signum)
        raise KeyboardInterrupt


quit_now: list[int] = []  # Ctrl-Cs that stopped this process at once
taken: list[bool] = []  # whether hsci has taken such a stop up (reported it, or is recording it)


def taken_up() -> None:
    """hsci is acting on a Ctrl-C that stopped it at once: further ones are ignored."""
    taken.append(True)


def stopped_at_once() -> bool:
    """Whether a Ctrl-C stopped this process at once (`at_once`): what went wrong after it is its doing. Asked
    where hsci reports the stop: the stop is taken up."""
    if quit_now:
        taken_up()
    return bool(quit_now)


@contextmanager
def caught(again_at_once: bool = True, stops: tuple[int, ...] = STOPS, quiet: bool = False) -> Iterator[None]:
    """While inside, the first stop signal is recorded instead of ending the process. A second one acts at once,
    unless `again_at_once` is false: a rank of a run on several devices hears a Ctrl-C from the terminal and
    again from its launcher, and leaves quitting at once to the launcher (which kills it past its timeout).
    `quiet`: the signal is not announced on stderr (hsci's launcher announces it for its ranks, and stops them
    with one when another rank failed)."""

    def handler(signum: int, frame) -> None:
        if received and not again_at_once:
            return
        received.append(signum)
        if again_at_once:
            signal.signal(signal.SIGINT, at_once)  # a second one: KeyboardInterrupt at once
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGHUP, signal.SIG_DFL)
        if not quiet:
            sys.stderr.write(f"\n{signal.Signals(signum).name}: stopping after this step and saving"
                             + (" (Ctrl-C again to quit at once)\n" if again_at_once else "\n"))

    previous = {s: signal.getsignal(s) for s in stops}
    if not received:
        for s in previous:
            signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)

