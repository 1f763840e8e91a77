"""What stops a command: bad user input (`UserInputError`: the command prints its message as one
line and exits 2) and a signal (`Interrupted`: one line, exit 130 for SIGINT, 143 for SIGTERM)."""

import contextlib
import os
import re
import signal
from collections.abc import Iterator


class UserInputError(Exception):
    """Something the user supplied (data, paths, config values) cannot be used as it is."""

    exit_code = 2


def find_user_error(error: BaseException | None) -> UserInputError | None:
    """The UserInputError behind `error`, if any (Hydra's instantiate and DataLoader workers wrap exceptions)."""
    while error is not None:
        if isinstance(error, UserInputError):
            return error
        error = error.__cause__ or error.__context__
    return None


_EXCEPTION_PREFIX = re.compile(r"^(\w+\.)*\w*(Error|Exception): ")


def one_line(message: str) -> str:
    """The last line of a message, without an exception class name before it (DataLoader workers
    re-raise an error as a traceback ending in `module.ClassName: message`)."""
    lines = message.strip().splitlines()
    return _EXCEPTION_PREFIX.sub("", lines[-1]) if lines else message


class Interrupted(BaseException):
    """SIGINT or SIGTERM reached the command: the run stops where it is and keeps what it had.

    A BaseException, like KeyboardInterrupt, so that no `except Exception` swallows it; unlike
    KeyboardInterrupt, Lightning passes it through (it turns a KeyboardInterrupt into exit 1).
    """

    def __init__(self, signal_number: int, signal_name: str) -> None:
        super().__init__(f"interrupted by {signal_name}")
        self.signal_name = signal_name
        self.exit_code = 128 + signal_number  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Inside, SIGINT and SIGTERM raise `Interrupted` in this (the command's) process; a forked child
    (a data loader worker) goes as it would have gone. The earlier handlers come back after it (the
    commands also run inside other programs: the Python API, the tests). For the commands' entry points."""
    main_process = os.getpid()
    previous = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}

    def handler(signal_number: int, frame: object) -> None:
        if os.getpid() != main_process:
            signal.signal(signal_number, signal.SIG_DFL)
            os.kill(os.getpid(), signal_number)
            return
        raise Interrupted(signal_number, signal.Signals(signal_number).name)

    for number in previous:
        signal.signal(number, handler)
    try:
        yield
    finally:
        for number, earlier in previous.items():
            signal.signal(number, earlier)
