"""Writes that a crash cannot leave half done: build beside the target, then rename.

A reader (a resumed coordinator, a restarted agent, ``fedtune export``) then sees the
old file or directory or the new one, never part of one. A directory is replaced by a
removal and a rename: a crash between the two leaves no target, never a mixed one.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged_file(target: Path) -> Iterator[Path]:
    """A path to write TARGET's new content to; it becomes TARGET when the block ends without error."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.tmp")
    try:
        yield staging
        staging.replace(target)
    finally:
        staging.unlink(missing_ok=True)


@contextmanager
def staged_dir(target: Path) -> Iterator[Path]:
    """An empty directory to build TARGET in; it replaces TARGET when the block ends without error.

    The staging name is fixed (``.NAME.tmp``), so what a crash leaves is cleared by the next
    write, and the directory gets the usual permissions (a bundle is meant to be shipped).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
