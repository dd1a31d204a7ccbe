"""Import rules read from the source: every module imports only from layers below its own (so no two
subpackages import each other), what a deployment loads does not pull in model code, and torch-free modules
stay torch-free. Imports inside functions count as much as those at the top."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "export_engine"

# module (file or package, relative to the package) -> import prefixes it must never use, anywhere in the file
RULES = {
    "core": ("torch", "export_engine.models", "export_engine.exporters", "export_engine.runtime",
             "export_engine.pipeline", "export_engine.validation"),
    # what generic code and a deployment learn about a model: torch-free (matching and preprocessing may use torch)
    "families/__init__.py": ("torch", "export_engine.models", "export_engine.exporters", "export_engine.pipeline"),
    "families/mast3r/session.py": ("torch", "export_engine.models", "export_engine.exporters"),
    "families/fastsam3d/session.py": ("torch", "export_engine.models", "export_engine.exporters"),
    "families": ("export_engine.models", "export_engine.exporters", "export_engine.pipeline"),
    "validation/compare.py": ("torch", "polygraphy", "export_engine.exporters", "export_engine.models"),
    "artifacts/status.py": ("export_engine.models", "export_engine.exporters", "export_engine.pipeline"),
    "runtime/verify.py": ("export_engine.models", "export_engine.exporters", "export_engine.pipeline"),
    "runtime": ("export_engine.models", "export_engine.exporters", "export_engine.pipeline",
                "export_engine.calibration.statistics", "export_engine.builders.build"),
    "graph_passes": ("export_engine.runtime", "export_engine.pipeline", "export_engine.models"),
    "models": ("export_engine.exporters", "export_engine.runtime", "export_engine.pipeline"),
    # collection jobs run artifacts: no model code; pycolmap and h5py only inside functions (optional extra)
    "sfm": ("export_engine.models", "export_engine.exporters", "export_engine.pipeline"),
    # the service loads artifacts only; fastapi / uvicorn are imported at call time (see the test below)
    "serve": ("export_engine.models", "export_engine.exporters", "export_engine.pipeline"),
}  # fmt: skip


# Layers, lowest first (STYLE.md's order): a module may import only from units of a lower rank. Units of one
# layer are ordered too where one builds on another (runners < builders; families < models < exporters).
RANKS = {
    "errors": 0, "atomic": 1, "hashing": 1, "progress": 1, "config": 1, "core": 2, "artifacts": 3,
    "graph_passes": 4, "validation": 4,
    "calibration": 5, "runners": 5, "builders": 6,
    "families": 7, "models": 8, "exporters": 9,
    "runtime": 10, "record": 10, "pipeline": 11, "sfm": 11, "serve": 11, "cli": 12, "__init__": 13, "__main__": 14,
}  # fmt: skip


def unit_of(path: Path) -> str:
    """The layer unit of a source file: its subpackage, or the module name for top-level modules."""
    return path.relative_to(SRC).with_suffix("").parts[0]


def imports_of(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def _files(target: str) -> list[Path]:
    path = SRC / target
    return sorted(path.rglob("*.py")) if path.is_dir() else [path]


@pytest.mark.parametrize("target", sorted(RULES))
def test_layer_rules(target: str) -> None:
    files = _files(target)
    assert files, f"{target} matches no source file: update the rules"
    bad = [
        f"{f.relative_to(SRC)}:{line} imports {name}"
        for f in files
        for line, name in imports_of(f)
        if any(name == p or name.startswith(p + ".") for p in RULES[target])
    ]
    assert not bad, "\n".join(bad)


def test_every_import_goes_down_the_layers() -> None:
    units = {unit_of(f) for f in SRC.rglob("*.py")}
    assert units <= set(RANKS), f"units without a layer: {sorted(units - set(RANKS))}: add them to RANKS"
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        unit = unit_of(path)
        for line, name in imports_of(path):
            parts = name.split(".")
            if parts[0] != "export_engine" or len(parts) < 2 or parts[1] == unit:
                continue
            if RANKS[parts[1]] >= RANKS[unit]:
                bad.append(f"{path.relative_to(SRC)}:{line} ({unit}, layer {RANKS[unit]}) imports {name} "
                           f"(layer {RANKS[parts[1]]})")  # fmt: skip
    assert not bad, "imports that go up or sideways:\n" + "\n".join(bad)


def test_the_rules_would_catch_a_violation(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from export_engine.models.mast3r import MASt3R\n")
    assert imports_of(probe) == [(2, "export_engine.models.mast3r")]


def test_serve_imports_its_web_stack_at_call_time() -> None:
    """fastapi, uvicorn, starlette and ray only inside functions: the package imports without the [serve] and
    [ray] extras."""
    heavy = ("fastapi", "uvicorn", "starlette", "pydantic", "torch", "ray")
    bad = []
    for path in sorted((SRC / "serve").rglob("*.py")):
        for node in ast.parse(path.read_text()).body:  # module level only
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])  # fmt: skip
            bad += [f"{path.relative_to(SRC)}:{node.lineno} {n}" for n in names if n.split(".")[0] in heavy]
    assert not bad, "module-level imports of optional packages:\n" + "\n".join(bad)
