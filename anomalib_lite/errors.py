"""The one error type for bad user input: the CLI prints its message as one line and exits 2."""

import re


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
