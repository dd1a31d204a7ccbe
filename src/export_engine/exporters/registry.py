"""The models export-engine knows: an explicit tuple, no plugin magic."""

from __future__ import annotations

from export_engine.errors import UsageError
from export_engine.exporters import fastsam3d, mast3r
from export_engine.exporters.spec import FamilySpec

FAMILIES: tuple[FamilySpec, ...] = (mast3r.FAMILY, fastsam3d.FAMILY)


def list_models() -> list[str]:
    return [family.name for family in FAMILIES]


def get_family(name: str) -> FamilySpec:
    for family in FAMILIES:
        if family.name == name.lower():
            return family
    raise UsageError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}")
