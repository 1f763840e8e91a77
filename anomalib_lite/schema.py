"""The config's typed schema: read off the signatures of the classes the config instantiates.

Every config node with a `_target_` (the method and its torch model, the dataset, the coreset
sampler, the trainer, callbacks, loggers) is checked against its target's constructor before
anything is built: each setting must be one the constructor takes and of its annotated type,
and within the bounds declared next to the annotation (`Annotated[int, Range(low=1)]`). So the
schema lives where the parameter is declared, and a new method's yaml is checked by its own
signature. A setting that fails gives one line naming it and the allowed values.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

from anomalib_lite.errors import UserInputError


@dataclass(frozen=True)
class Range:
    """Bounds of a number (or of each number of a list): low <= x <= high, or < with `open`."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def holds(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'above' if self.low_open else 'at least'} {self.low:g}"
        return f"{'below' if self.high_open else 'at most'} {self.high:g}"


@dataclass(frozen=True)
class NonEmpty:
    """A list that must hold at least one element."""


# The bounds used across the package.
Positive = Range(low=1)
NonNegative = Range(low=0)
Fraction = Range(low=0, high=1, low_open=True, high_open=True)
PositiveInt = Annotated[int, Positive]
NonNegativeInt = Annotated[int, NonNegative]
Size = Annotated[Union[int, Sequence[int]], Positive]  # noqa: UP007 - Annotated needs a runtime union here
Levels = Annotated[Sequence[int], NonEmpty(), NonNegative]


def _describe(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        base = _describe(args[0])
        bounds = [m.describe() for m in args[1:] if isinstance(m, Range)]
        nonempty = any(isinstance(m, NonEmpty) for m in args[1:])
        return " ".join([("a non-empty " + base.removeprefix("a ")) if nonempty else base, *bounds])
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin in (list, tuple, Sequence) or annotation in (list, tuple):
        inner = args[0] if args else Any
        return f"a list of {_describe(inner).removeprefix('a ').removeprefix('an ')}s" if inner is not Any else "a list"
    names = {
        type(None): "null", bool: "true or false", int: "an integer", float: "a number", str: "a string",
        Path: "a path",
    }
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _matches(value: Any, annotation: Any) -> bool:
    """Whether `value` (plain or OmegaConf) fits `annotation`, bounds included."""
    if annotation is Any or annotation is inspect.Parameter.empty:
        return True
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        if not _matches(value, args[0]):
            return False
        numbers = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]
        for meta in args[1:]:
            if isinstance(meta, NonEmpty) and isinstance(value, (list, tuple, ListConfig)) and not value:
                return False
            if isinstance(meta, Range) and any(
                isinstance(n, (int, float)) and not isinstance(n, bool) and not meta.holds(n) for n in numbers
            ):
                return False
        return True
    if origin in (Union, types.UnionType):
        return any(_matches(value, option) for option in args)
    if origin is Literal:
        return value in args
    if annotation is type(None) or annotation is None:
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if annotation is Path:
        return isinstance(value, (str, Path))
    if origin in (list, tuple, Sequence) or annotation in (list, tuple):
        if not isinstance(value, (list, tuple, ListConfig)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args))
        return not args or all(_matches(v, args[0]) for v in value)
    if origin in (dict, Mapping) or annotation in (dict, Mapping):
        return isinstance(value, (dict, DictConfig))
    if origin is Callable or annotation is Callable:
        return isinstance(value, (dict, DictConfig)) or callable(value)
    return True  # a class the config cannot hold: nothing to check


def _signature_parameters(function: Callable) -> tuple[dict[str, tuple[Any, bool]], bool]:
    """name -> (annotation, has a default), and whether the function takes **kwargs."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return {}, True
    try:
        hints = typing.get_type_hints(function, include_extras=True)
    except Exception:  # noqa: BLE001 - a hint that cannot be evaluated here is not checked
        hints = {}
    parameters, takes_kwargs = {}, False
    for name, parameter in signature.parameters.items():
        if name == "self" or parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            continue
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            takes_kwargs = True
            continue
        parameters[name] = (hints.get(name, Any), parameter.default is not inspect.Parameter.empty)
    return parameters, takes_kwargs


def target_parameters(target: Any) -> tuple[dict[str, tuple[Any, bool]], bool]:
    """Every setting a target accepts, following **kwargs through the class hierarchy (and, for
    methods, into `build_model` and the torch model they build)."""
    if not inspect.isclass(target):
        return _signature_parameters(target)
    # The constructors **kwargs pass through: the target's, then its bases' from this package or the
    # target's own (a third-party base such as LightningModule takes *args/**kwargs for its own use).
    home = target.__module__.split(".")[0]
    functions = [
        klass.__init__ for i, klass in enumerate(target.__mro__)
        if "__init__" in vars(klass) and klass is not object
        and (i == 0 or klass.__module__.split(".")[0] in (home, "anomalib_lite"))
    ]
    if "build_model" in dir(target):
        functions.append(target.build_model)
    if getattr(target, "model_class", None) is not None:
        functions.append(target.model_class.__init__)
    parameters: dict[str, tuple[Any, bool]] = {}
    takes_kwargs = True
    for function in functions:
        found, more = _signature_parameters(function)
        for name, (annotation, has_default) in found.items():
            parameters.setdefault(name, (annotation, has_default))
        takes_kwargs = more
        if not more:
            break
    return parameters, takes_kwargs


def check_arguments(target: Any, arguments: Mapping[str, Any], path: str) -> None:
    """Check keyword `arguments` given to `target` (a class or function) in Python exactly as the
    config's settings are checked (`check_node`), nested `_target_` specs included."""
    try:
        node = OmegaConf.create(dict(arguments))
        _check_settings(target, node, path, frozenset(), f"{target.__module__}.{target.__qualname__}")
    except UserInputError:
        raise
    except Exception:  # noqa: BLE001 - values a config cannot hold (or "${" in a string): one by one
        parameters, _ = target_parameters(target)
        for key, value in arguments.items():
            if key in parameters and not _matches(value, parameters[key][0]):
                raise UserInputError(f"{path}.{key}={_show(value)}: must be {_describe(parameters[key][0])}") from None


# Keys of optimiser/scheduler specs that the method reads itself (TrainedModule.build_scheduler).
SPEC_KEYS = frozenset({"interval"})


def check_node(node: DictConfig, path: str, extra_keys: frozenset[str] = frozenset()) -> None:
    """Check a `_target_` node (and the `_target_` nodes inside it) against its target's signature.

    `extra_keys` are settings its consumer reads besides the target's own."""
    try:
        target = get_object(str(node._target_))
    except Exception:  # noqa: BLE001 - Hydra names an unknown target itself, when it is instantiated
        return
    _check_settings(target, node, path, extra_keys, str(node._target_))


def _check_settings(target: Any, node: DictConfig, path: str, extra_keys: frozenset[str], target_name: str) -> None:
    parameters, takes_kwargs = target_parameters(target)
    for key in node:
        key = str(key)
        if key.startswith("_") or key in extra_keys:
            continue
        setting = f"{path}.{key}"
        if OmegaConf.is_missing(node, key):
            raise UserInputError(f"{setting} is required (set {setting}=...)")
        value = node[key]
        if key not in parameters:
            if not takes_kwargs:
                known = ", ".join(sorted(p for p in parameters if p not in ("backbone",)))
                raise UserInputError(f"{setting} is not a setting of {target_name} (its settings: {known})")
            continue
        if isinstance(value, DictConfig) and "_target_" in value:
            check_node(value, setting)
            continue
        if isinstance(value, DictConfig):  # e.g. optimizers: {name: {_target_: ...}}
            for name in value:
                child = value[name]
                if isinstance(child, DictConfig) and "_target_" in child:
                    check_node(child, f"{setting}.{name}", SPEC_KEYS)
        annotation = parameters[key][0]
        if not _matches(value, annotation):
            raise UserInputError(f"{setting}={_show(value)}: must be {_describe(annotation)}")


def _show(value: Any) -> str:
    if isinstance(value, (DictConfig, ListConfig)):
        return str(OmegaConf.to_container(value))
    return repr(value) if isinstance(value, str) else str(value)
