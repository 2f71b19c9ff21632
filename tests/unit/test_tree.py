"""The source tree holds no leftovers of an unfinished merge.

A conflict block once reached main in CHANGELOG.md: the text of both sides, shipped to users.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SUFFIXES = {".md", ".py", ".toml", ".yml", ".yaml", ".sh", ".service", ".cfg", ".txt"}
SKIP = {".git", ".venv", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache", "build"}
MARKER = re.compile(r"^(<{7}|>{7})( |$)", re.MULTILINE)


def text_files(root: Path) -> list[Path]:
    return [
        path
        for path in sorted(root.rglob("*"))
        if path.suffix in SUFFIXES
        and path.is_file()
        and not SKIP.intersection(path.relative_to(root).parts)
    ]


def conflicted(root: Path) -> list[str]:
    return [
        str(path.relative_to(root))
        for path in text_files(root)
        if MARKER.search(path.read_text(encoding="utf-8", errors="replace"))
    ]


def test_no_merge_conflict_markers_in_the_tree() -> None:
    assert conflicted(ROOT) == []


def test_the_check_finds_a_conflict_block(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("x\n<<<<<<< HEAD\na\n=======\nb\n>>>>>>> main\n")
    (tmp_path / "b.md").write_text("Title\n=======\n\n> quoted\n")
    assert conflicted(tmp_path) == ["docs/a.md"]
