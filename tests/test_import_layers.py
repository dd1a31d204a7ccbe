"""Import rules read from the source: what a deployment loads must not pull in model code, torch-free modules
stay torch-free, and lower layers never import the export pipeline."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "export_engine"

# module (file or package, relative to the package) -> import prefixes it must never use, anywhere in the file
RULES = {
    "core": ("torch", "export_engine.models", "export_engine.exporters", "export_engine.runtime",
             "export_engine.pipeline", "export_engine.validation"),
    "families": ("torch", "export_engine.models", "export_engine.exporters", "export_engine.pipeline"),
    "validation/compare.py": ("torch", "polygraphy", "export_engine.exporters", "export_engine.models"),
    "artifacts/status.py": ("export_engine.models", "export_engine.exporters", "export_engine.pipeline"),
    "artifacts/verify.py": ("export_engine.models", "export_engine.exporters", "export_engine.pipeline"),
    "runtime": ("export_engine.models", "export_engine.exporters", "export_engine.pipeline",
                "export_engine.calibration.statistics", "export_engine.builders.build"),
    "graph_passes": ("export_engine.runtime", "export_engine.pipeline", "export_engine.models"),
    "models": ("export_engine.exporters", "export_engine.runtime", "export_engine.pipeline"),
}  # fmt: skip


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


def test_the_rules_would_catch_a_violation(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from export_engine.models.mast3r import MASt3R\n")
    assert imports_of(probe) == [(2, "export_engine.models.mast3r")]
