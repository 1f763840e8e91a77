"""The house's layout, checked on the source: which package may import which, no framework seam
found by attribute name, no function too long to read. Each rule is the README's architecture
paragraph; a change that breaks one fails here with the file and the line."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import anomalib_lite

PACKAGE = Path(anomalib_lite.__file__).parent
METHODS = sorted(p.name for p in (PACKAGE / "models").iterdir() if (p / "lightning_model.py").is_file())
MAX_FUNCTION_LINES = 80
# Longer on purpose, each said so in its docstring: greedy k-center's hot loop.
LONG_FUNCTIONS = {("models/components/coreset.py", "greedy_coreset")}


def _sources(folder: str = "") -> list[Path]:
    root = PACKAGE / folder
    return sorted(root.rglob("*.py")) if root.is_dir() else [root]


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in the file, those inside functions included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append((node.lineno, node.module))
    return found


def _under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes)


def _offences(folder: str, forbidden: tuple[str, ...], allowed: tuple[str, ...] = ()) -> list[str]:
    return [
        f"{path.relative_to(PACKAGE)}:{line} imports {module}"
        for path in _sources(folder) for line, module in _imports(path)
        if _under(module, forbidden) and not _under(module, allowed)
    ]


ABOVE_DATA = ("anomalib_lite.models", "anomalib_lite.engine", "anomalib_lite.callbacks", "anomalib_lite.train",
              "anomalib_lite.predict", "anomalib_lite.cli", "anomalib_lite.visualization")
ABOVE_ENGINE = ("anomalib_lite.callbacks", "anomalib_lite.train", "anomalib_lite.predict", "anomalib_lite.cli",
                "anomalib_lite.collect")
METHOD_PACKAGES = tuple(f"anomalib_lite.models.{method}" for method in METHODS)


@pytest.mark.parametrize(("folder", "forbidden", "allowed"), [
    ("data", ABOVE_DATA, ()),
    ("models/components", ("lightning", "pytorch_lightning", *ABOVE_DATA), ("anomalib_lite.models.components",)),
    ("engine", (*ABOVE_ENGINE, *METHOD_PACKAGES, "anomalib_lite.visualization"), ()),
    ("callbacks", ("anomalib_lite.train", "anomalib_lite.predict", "anomalib_lite.cli", *METHOD_PACKAGES), ()),
    ("visualization.py", ("anomalib_lite",), ()),
    ("metrics.py", ("lightning", *ABOVE_DATA, "anomalib_lite.data"), ()),
], ids=["data", "components", "engine", "callbacks", "visualization", "metrics"])
def test_each_layer_imports_only_what_lies_below_it(folder: str, forbidden: tuple[str, ...], allowed: tuple[str, ...]) -> None:
    assert _offences(folder, forbidden, allowed) == []


@pytest.mark.parametrize("method", METHODS)
def test_no_method_imports_another(method: str) -> None:
    others = tuple(f"anomalib_lite.models.{other}" for other in METHODS if other != method)
    assert _offences(f"models/{method}", others) == []


@pytest.mark.parametrize("part", ["engine", "callbacks", "train.py", "predict.py"])
def test_no_seam_is_found_by_attribute_name(part: str) -> None:
    """The framework's seams are types (`isinstance` of an ABC or a class), never `getattr` or
    `hasattr` of a name that may or may not be there."""
    calls = [
        f"{path.relative_to(PACKAGE)}:{node.lineno} calls {node.func.id}"
        for path in _sources(part) for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr")
    ]
    assert calls == []


def test_every_function_reads_on_one_screen() -> None:
    long = [
        f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path in _sources() for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 >= MAX_FUNCTION_LINES
        and (path.relative_to(PACKAGE).as_posix(), node.name) not in LONG_FUNCTIONS
    ]
    assert long == []


def test_the_rules_see_an_offence() -> None:
    """The checks above read real imports: a module that breaks a rule is found."""
    data_module = PACKAGE / "data" / "datamodule.py"
    assert any(module == "anomalib_lite.schema" for _, module in _imports(data_module))
    assert _under("anomalib_lite.engine.module", ABOVE_DATA) and not _under("anomalib_lite.engineering", ABOVE_DATA)
    assert len(METHODS) >= 26


def test_the_engine_classes_still_import_from_their_old_home() -> None:
    """Users' code written before the engine moved keeps working, with a warning naming the new home."""
    import anomalib_lite.engine as engine
    import anomalib_lite.models.components as components

    for name in components.MOVED_TO_ENGINE:
        with pytest.warns(DeprecationWarning, match="import it from anomalib_lite.engine"):
            assert getattr(components, name) is getattr(engine, name)
    with pytest.raises(AttributeError):
        components.NoSuchThing  # noqa: B018
