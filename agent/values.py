"""Parsing and formatting of the config's value types: durations, sizes, CPU quotas, cron, zones.

Every parser raises ValueError with a short text meant for a human ("not a duration: 'abc' (use
e.g. 30s, 5m, 1h30m)"); settings.py puts the file and the key in front of it. Sizes use base 1024
like systemd, so "2G" here is what `MemoryMax=2G` means to systemd.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import Any

DURATION_UNITS: dict[str, Fraction] = {
    "ms": Fraction(1, 1000),
    "s": Fraction(1),
    "m": Fraction(60),
    "h": Fraction(3600),
    "d": Fraction(86400),
    "w": Fraction(7 * 86400),
}
SIZE_UNITS: dict[str, int] = {
    "K": 1024,
    "M": 1024**2,
    "G": 1024**3,
    "T": 1024**4,
    "P": 1024**5,
    "E": 1024**6,
}
INFINITY_WORDS = frozenset({"infinity", "inf", "unlimited"})

_NUMBER = r"\d+(?:\.\d+)?"
_DURATION_PART = re.compile(rf"\s*({_NUMBER})\s*(ms|s|m|h|d|w)\s*")
_DURATION_FULL = re.compile(rf"(?:\s*{_NUMBER}\s*(?:ms|s|m|h|d|w)\s*)+")
_SIZE = re.compile(rf"\s*({_NUMBER})\s*([KMGTPE]?)\s*", re.IGNORECASE)
_CPU_QUOTA = re.compile(r"\s*(\d+)\s*%\s*")

DURATION_HINT = "use e.g. 30s, 5m, 1h30m"
SIZE_HINT = "use e.g. 512M, 2G, infinity"


def _number(value: Any, what: str, hint: str) -> float:
    """An int or float from TOML or JSON, refusing booleans, NaN and infinities."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"not {what}: {value!r} ({hint})")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"not {what}: {value!r} ({hint})")
    if value < 0:
        raise ValueError(f"must not be negative, got {value!r}")
    return float(value)


def parse_duration(value: Any) -> float:
    """`"30s"`, `"5m"`, `"1h30m"`, `"1d"`, `"90"` or a number of seconds -> float seconds."""
    if not isinstance(value, str):
        return _number(value, "a duration", DURATION_HINT)
    text = value.strip()
    if re.fullmatch(_NUMBER, text):
        return float(Fraction(text))
    if not text or not _DURATION_FULL.fullmatch(text):
        raise ValueError(f"not a duration: {value!r} ({DURATION_HINT})")
    total = sum(
        (Fraction(number) * DURATION_UNITS[unit] for number, unit in _DURATION_PART.findall(text)),
        Fraction(0),
    )
    return float(total)


def parse_optional_duration(value: Any) -> float | None:
    """Like parse_duration, plus "infinity" -> None (no limit)."""
    if isinstance(value, str) and value.strip().lower() in INFINITY_WORDS:
        return None
    return parse_duration(value)


def parse_size(value: Any) -> int | None:
    """`"512M"`, `"2G"`, `"1.5G"`, `"1024K"`, a number of bytes, or "infinity" -> bytes or None."""
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in INFINITY_WORDS:
            return None
        match = _SIZE.fullmatch(text)
        if match is None:
            raise ValueError(f"not a size: {value!r} ({SIZE_HINT})")
        number, unit = match.groups()
        if "." in number and not unit:
            raise ValueError(f"not a size: {value!r} (a number of bytes must be whole)")
        return int(Fraction(number) * SIZE_UNITS.get(unit.upper(), 1))
    number_value = _number(value, "a size", SIZE_HINT)
    if number_value != int(number_value):
        raise ValueError(f"not a size: {value!r} (a number of bytes must be whole)")
    return int(number_value)


def parse_cpu_quota(value: Any) -> int:
    """`"150%"` -> 150 (percent of one CPU, as systemd's CPUQuota=); must be > 0."""
    if not isinstance(value, str):
        raise ValueError(f'not a CPU quota: {value!r} (use a percentage, e.g. "150%")')
    match = _CPU_QUOTA.fullmatch(value)
    if match is None:
        raise ValueError(f"not a CPU quota: {value!r} (use a whole percentage, e.g. 150%)")
    percent = int(match.group(1))
    if percent <= 0:
        raise ValueError(f"must be > 0%, got {value!r}")
    return percent


def parse_count(value: Any, *, minimum: int = 0) -> int:
    """A whole number from TOML (int) or the environment (digits); booleans are refused."""
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"must be >= {minimum}, got {value}")
    return value


def validate_cron(expression: Any) -> str:
    """A standard 5-field cron expression (minute hour day month weekday)."""
    hint = "5 fields: minute hour day-of-month month day-of-week, e.g. '*/5 * * * *'"
    if not isinstance(expression, str):
        raise ValueError(f"not a cron expression: {expression!r} ({hint})")
    fields = expression.split()
    if len(fields) != 5:
        raise ValueError(f"not a cron expression: {expression!r} ({hint})")
    from croniter import croniter  # lazily: only configs with cron schedules need it

    try:
        valid = bool(croniter.is_valid(" ".join(fields)))
    except Exception:  # croniter raises assorted errors for odd input
        valid = False
    if not valid:
        raise ValueError(f"not a cron expression: {expression!r} ({hint})")
    return expression.strip()


def validate_timezone(name: Any) -> str:
    """An IANA time zone name known to this host's zoneinfo database."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    hint = "use an IANA name such as UTC or Europe/Berlin"
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"not a time zone: {name!r} ({hint})")
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError(f"unknown time zone: {name!r} ({hint})") from None
    return name


def format_duration(seconds: float | None) -> str:
    """Seconds -> "6h", "1h30m", "1m30s", "1.5s"; None -> "infinity". Round-trips parse_duration."""
    if seconds is None or math.isinf(seconds):
        return "infinity"
    if seconds == 0:
        return "0s"
    whole = int(seconds)
    fraction = round(seconds - whole, 3)
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        count, whole = divmod(whole, size)
        if count:
            parts.append(f"{count}{unit}")
    if whole or fraction:
        parts.append(f"{whole + fraction:g}s" if fraction else f"{whole}s")
    return "".join(parts)


def format_size(size: int | None) -> str:
    """Bytes -> "512M", "2G", "1536M" (largest exact unit) or "infinity" for None."""
    if size is None:
        return "infinity"
    for unit in ("E", "P", "T", "G", "M", "K"):
        factor = SIZE_UNITS[unit]
        if size and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def positive_duration(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError(f"must be longer than 0s, got {value!r}")
    return seconds


def limit_duration(value: Any) -> float | None:
    """A run-time limit: a positive duration, or "infinity" -> None."""
    seconds = parse_optional_duration(value)
    if seconds is not None and seconds <= 0:
        raise ValueError(f"must be longer than 0s (use infinity for no limit), got {value!r}")
    return seconds


def limit_size(value: Any) -> int | None:
    """A memory limit: a positive size, or "infinity" -> None."""
    size = parse_size(value)
    if size == 0:
        raise ValueError(f"must be larger than 0 (use infinity for no limit), got {value!r}")
    return size


def limit_cpu_quota(value: Any) -> int | None:
    if isinstance(value, str) and value.strip().lower() in INFINITY_WORDS:
        return None
    return parse_cpu_quota(value)


def limit_count(value: Any) -> int | None:
    """TasksMax: a whole number >= 1, or "infinity" -> None."""
    if isinstance(value, str) and value.strip().lower() in INFINITY_WORDS:
        return None
    return parse_count(value, minimum=1)


def format_cpu_quota(percent: int | None) -> str:
    return "infinity" if percent is None else f"{percent}%"


def format_count(count: int | None) -> int | str:
    return "infinity" if count is None else count


def validate_http_url(value: Any) -> str:
    """The Prefect API URL: http(s), with a host, without credentials (they'd end up in logs)."""
    from urllib.parse import urlsplit

    hint = "use e.g. http://127.0.0.1:4200/api"
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    try:
        parts = urlsplit(value.strip())
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ValueError(f"not a URL: {value!r} ({hint})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {value!r} ({hint})")
    if parts.username or parts.password:
        raise ValueError("must not contain credentials; use auth_string_file or key_file")
    return value.strip().rstrip("/")


def validate_git_url(value: Any) -> str:
    """A git remote: a URL, user@host:path, or an absolute local path; never with a password."""
    from urllib.parse import urlsplit

    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"not a git URL: {value!r}")
    text = value.strip()
    if "://" in text:
        try:
            parts = urlsplit(text)
        except ValueError:
            raise ValueError(f"not a git URL: {value!r}") from None
        if parts.scheme not in ("https", "http", "ssh", "git", "file"):
            raise ValueError(f"unsupported git URL scheme {parts.scheme!r} in {value!r}")
        if parts.password:
            raise ValueError("must not contain a password or token; use token_file")
    elif not (text.startswith("/") or re.fullmatch(r"[\w.-]+@[\w.-]+:.+", text)):
        raise ValueError(f"not a git URL: {value!r} (use https://..., user@host:path or /path)")
    return text


def validate_absolute_path(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a path, got {value!r}")
    if not value.startswith("/"):
        raise ValueError(f"must be an absolute path, got {value!r}")
    if "\0" in value:
        raise ValueError("must not contain a NUL character")
    return value


def validate_relative_subdirectory(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    parts = [p for p in value.split("/") if p not in ("", ".")]
    if value.startswith("/") or ".." in parts:
        raise ValueError(f"must be a relative path inside the repository, got {value!r}")
    return value


# Prefect refuses these in flow and deployment names; "/" would also escape the storage directory.
BANNED_NAME_CHARACTERS = "/%&><"


def validate_name(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    if not value.strip():
        raise ValueError("must not be empty")
    if value in (".", ".."):
        raise ValueError(f"must not be {value!r}")
    if any(c in BANNED_NAME_CHARACTERS or not c.isprintable() for c in value):
        raise ValueError(f"must not contain / % & > < or control characters, got {value!r}")
    return value


def validate_entrypoint(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[^:]+\.py:[A-Za-z_][\w.]*", value):
        raise ValueError(f"not an entrypoint: {value!r} (use file.py:function)")
    return value


def validate_commit(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-fA-F]{7,64}", value):
        raise ValueError(f"not a commit sha: {value!r} (7 to 64 hex digits)")
    return value.lower()


def validate_env_name(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
        raise ValueError(f"not an environment variable name: {value!r}")
    return value


def validate_user(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    if value and not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\$?", value):
        raise ValueError(f"not a user name: {value!r}")
    return value


def validate_slice(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9:_.\\-]+\.slice", value):
        raise ValueError(f"not a slice unit name: {value!r} (use e.g. runner-agent-flows.slice)")
    return value
