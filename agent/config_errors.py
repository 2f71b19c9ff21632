"""How a config problem reads: one line that names the source, the key and the problem.

`ConfigError` is what every config source raises; `from_validation_error` turns pydantic's
first error into one, naming the file, drop-in or variable that set the offending value.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from agent.redaction import hide_url_credentials

# Keys whose values are never shown, not even in an error about their type.
SECRET_KEYS = frozenset({"api.key", "api.auth_string"})
Loc = tuple[str | int, ...]


class ConfigError(Exception):
    """A config problem. str() is one line: `agent.toml: agent.limit: must be >= 1, got 0`."""

    def __init__(self, source: str, key: str | None, problem: str, *, more: int = 0) -> None:
        super().__init__(source, key, problem)
        self.source = source
        self.key = key
        self.problem = problem
        self.more = more

    def __str__(self) -> str:
        where = f"{self.source}: {self.key}" if self.key else self.source
        extra = f" (and {self.more} more)" if self.more else ""
        problem = self.problem
        if self.key in SECRET_KEYS:  # "expected a string, got ['<the key>']"
            problem = problem.split(", got ", 1)[0]
        # The line goes to stderr and from there to the journal: never a URL's credentials.
        text = one_line(f"{where}: {problem}{extra}")
        return hide_url_credentials(text)


def one_line(text: str) -> str:
    """`text` with every non-printable character (line breaks of any kind too) escaped."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def show(value: Any) -> str:
    """A value quoted for an error message, cut short."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def from_validation_error(
    exc: ValidationError,
    *,
    origin: Callable[[Loc], str | None],
    deployments: Sequence[Any],
    default_source: str,
    union_tags: Mapping[str, tuple[str, ...]],
) -> ConfigError:
    """The first of pydantic's errors, as a line naming where the bad value came from.

    `deployments` are the raw `[[deployment]]` tables (to name one by its name), `union_tags`
    the tags pydantic puts in a location after a tagged union field (`schedule` -> `cron`).
    """
    errors = exc.errors(include_url=False)
    error = errors[0]
    raw = error["loc"]
    # Drop the union tags, and the `[key]` marker of dict keys.
    loc: Loc = tuple(
        part
        for i, part in enumerate(raw)
        if part != "[key]" and not (i and part in union_tags.get(_field_of(raw, i - 1), ()))
    )
    return ConfigError(
        origin(loc) or default_source,
        _key_name(loc, deployments) or None,
        _problem(error),
        more=len(errors) - 1,
    )


def _field_of(raw: Loc, i: int) -> str:
    """The field at raw[i], or the list field an index there belongs to (schedules[1])."""
    if isinstance(raw[i], int) and i:
        return str(raw[i - 1])
    return str(raw[i])


def _key_name(loc: Loc, deployments: Sequence[Any]) -> str:
    parts: list[str] = []
    for i, part in enumerate(loc):
        if isinstance(part, int) and i and loc[i - 1] == "deployment":
            item = deployments[part] if part < len(deployments) else None
            name = item.get("name") if isinstance(item, dict) else None
            flow = item.get("flow_name", name) if isinstance(item, dict) else None
            label = name if isinstance(name, str) else f"#{part + 1}"
            if isinstance(flow, str) and flow != name:
                label = f"{flow}/{label}"
            parts[-1] = f"deployment[{label}]"
        elif isinstance(part, int):
            parts[-1] += f"[{part}]"
        else:
            parts.append(part if re.fullmatch(r"[\w-]+", part) else json.dumps(part))
    return ".".join(parts)


_EXPECTED = {
    "int": "an integer",
    "float": "a number",
    "string": "a string",
    "bool": "true or false",
    "dict": "a table",
    "model": "a table",
    "model_attributes": "a table",
    "list": "an array",
    "tuple": "an array",
    "path": "a path",
}


def _problem(error: Any) -> str:
    kind: str = error["type"]
    ctx = error.get("ctx") or {}
    got = show(error.get("input"))
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    if kind in ("value_error", "assertion_error") and "error" in ctx:
        return str(ctx["error"])
    if kind == "string_too_short":
        return "must not be empty"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}, got {got}"
    if kind in ("greater_than_equal", "greater_than"):
        bound = ctx.get("ge", ctx.get("gt"))
        return f"must be {'>=' if kind.endswith('equal') else '>'} {bound}, got {got}"
    for prefix, expected in _EXPECTED.items():
        if kind.startswith(f"{prefix}_"):
            return f"expected {expected}, got {got}"
    return f"{error['msg']}, got {got}"
