"""Reading a torch file someone else wrote (a checkpoint, published weights): data only, never code.

`torch.load(weights_only=True)` unpickles tensors and plain containers and nothing else, so a
crafted file cannot run anything while it is read. A file that asks for more is refused in one
line naming what it asked for.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

from anomalib_lite.errors import UserInputError, one_line

_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def load_data_only(path: str | Path, what: str, mmap: bool = False) -> Any:
    """The contents of the torch file `path`, read as data only; `what` names it in the error lines."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        wanted = _UNSUPPORTED_GLOBAL.search(str(error))
        raise UserInputError(
            f"refused to load {what} {path}: it needs code to be read ({wanted.group(1) if wanted else 'a pickled object'}); "
            "files are read as data only"
        ) from None
    except Exception as error:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise UserInputError(f"cannot read {what} {path}: {one_line(str(error)) or type(error).__name__}") from None
