"""The one error type for bad user input: the CLI prints its message as one line and exits 2."""


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


def one_line(message: str) -> str:
    """The last line of a message (DataLoader workers prepend a traceback)."""
    lines = message.strip().splitlines()
    return lines[-1] if lines else message
