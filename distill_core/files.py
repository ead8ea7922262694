"""Files a reader must never see half-written: written under a temporary name, then renamed."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path


def replace_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Call write(tmp) on a temporary path beside `path`, then rename it onto `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def write_json(path: Path, data: object) -> None:
    """Write data as JSON under a temporary name, then rename: a reader never sees half a file."""
    replace_atomic(path, lambda p: p.write_text(json.dumps(data, indent=2, default=float) + "\n"))
