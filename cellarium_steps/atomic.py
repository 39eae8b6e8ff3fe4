"""Write outputs under a temporary name and rename, so a killed step leaves no partial file."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from typing import Any

import pandas as pd


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary sibling of ``path``; rename it to ``path`` only if the block succeeds."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.remove(tmp)


def remove_stale_temporaries(outputs: Sequence[str]) -> None:
    """Temporary files and directories that a killed run (its process gone) left beside ``outputs``
    under :func:`atomic_path`'s names."""
    by_parent: dict[str, set[str]] = {}
    for output in outputs:
        by_parent.setdefault(os.path.dirname(os.path.abspath(output)) or ".", set()).add(os.path.basename(output))
    for parent, names in by_parent.items():
        if not os.path.isdir(parent):
            continue
        for entry in os.listdir(parent):
            name, sep, pid = entry.rpartition(".tmp-")
            if sep and name.startswith(".") and name[1:] in names and pid.isdigit() and not _alive(int(pid)):
                stale = os.path.join(parent, entry)
                if os.path.isdir(stale):
                    shutil.rmtree(stale, ignore_errors=True)
                else:
                    os.remove(stale)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_csv_atomically(df: pd.DataFrame, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def write_json_atomically(payload: dict[str, Any] | str, path: str | os.PathLike) -> None:
    text = payload if isinstance(payload, str) else json.dumps(payload, default=str, indent=2, sort_keys=True)
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)
