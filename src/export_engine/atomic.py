"""Writing a file so that readers see the old one or the whole new one, never a half-written one."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replacing(target: Path) -> Iterator[Path]:
    """Yield a hidden temporary path beside ``target`` (same suffixes, so writers that pick a format from the name
    or append one, like numpy, behave); it replaces ``target`` when the block succeeds and is removed otherwise."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.partial-{os.getpid()}{''.join(target.suffixes)}")
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
