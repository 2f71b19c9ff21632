"""A flow's parameter schema as Prefect 3.8.8 computes it for `def count(n: int)`."""

from __future__ import annotations

from typing import Any

SCHEMA: dict[str, Any] = {
    "title": "Parameters",
    "type": "object",
    "properties": {"n": {"title": "n", "type": "integer", "position": 0}},
    "required": ["n"],
    "definitions": {},
}
