"""The one error type for bad user input: the CLI prints its message as one line and exits 2."""


class UserInputError(Exception):
    """Something the user supplied (data, paths, config values) cannot be used as it is."""

    exit_code = 2
