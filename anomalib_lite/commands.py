"""What the installed commands (predict, export) share: the exit-status contract, the trusted
packages option and their log format."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from anomalib_lite.errors import Interrupted, UserInputError, find_user_error, one_line, stop_on_signals


def add_trust_package(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trust-package", action="append", default=[], metavar="NAME",
        help="a package of your own whose method classes the checkpoint may name (anomalib_lite's always may)",
    )


def parse_and_run(
    parser: argparse.ArgumentParser, argv: list[str] | None, body: Callable[[argparse.Namespace], int], interrupted_note: str = ""
) -> int:
    """Parse `argv`, set the log format, and return `command_main`'s status for `body(args)`."""
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    return command_main(parser.prog, lambda: body(args), interrupted_note)


def command_main(prog: str, body: Callable[[], int], interrupted_note: str = "") -> int:
    """A command's exit status: `body()` with SIGINT/SIGTERM stopping it as `Interrupted`; a mistake
    of the user's (a `UserInputError` anywhere in the chain) is one line on stderr and exit 2.
    `interrupted_note` says what an interruption left undone."""
    try:
        with stop_on_signals():
            return body()
    except Interrupted as interrupted:
        print(f"{prog}: error: {interrupted}{interrupted_note}", file=sys.stderr, flush=True)
        return interrupted.exit_code
    except Exception as error:
        user_error = find_user_error(error)
        if user_error is None:
            raise
        print(f"{prog}: error: {one_line(str(user_error))}", file=sys.stderr, flush=True)
        return UserInputError.exit_code
