"""Where a run keeps its checkpoints: RUN_DIR/checkpoints/step_<N> (N zero-padded to 6 digits, more past
999999), ordered by N, not by name (step_1000000 sorts before step_999999 as text)."""
from __future__ import annotations

import re
from pathlib import Path

_STEP_DIR = re.compile(r"step_(\d+)")


def step_dirs(root: Path, holding: str | None = None) -> list[Path]:
    """The step_<N> directories under ``root``, oldest (smallest N) first; with ``holding``, only those that
    hold that file. [] when ``root`` is not a directory."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.fullmatch(p.name)
        if m and (holding is None or (p / holding).is_file()):
            found.append((int(m.group(1)), p.name, p))
    return [p for _, _, p in sorted(found)]


def step_of(path: Path) -> int:
    """N of a step_<N> directory."""
    return int(_STEP_DIR.fullmatch(path.name).group(1))
