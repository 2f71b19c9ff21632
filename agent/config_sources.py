"""Where config values come from: TOML files, drop-ins and the environment, merged raw.

The main file, then `agent.d/*.toml` next to it in lexical order, then the environment
(`RUNNER_AGENT_<SECTION>__<KEY>`). Tables deep-merge; a `[[deployment]]` is appended, or
replaces an earlier one of the same name. Every value keeps a note of the source that set it,
so that an error names the file (or the variable) the user has to fix. settings.py validates.
"""

from __future__ import annotations

import copy
import grp
import json
import os
import pwd
import re
import stat
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent.redaction import hide_url_credentials

DEFAULT_CONFIG = Path("/etc/runner-agent/agent.toml")
ENV_PREFIX = "RUNNER_AGENT_"
SECTIONS = ("api", "agent", "flow_run")
MAX_SECRET_BYTES = 64 * 1024
MAX_DEPTH = 32
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


class RawConfig:
    """The raw merged data, and which source set each key (for the error line)."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.origins: dict[Loc, str] = {}
        self.files: list[str] = []

    def origin(self, loc: Loc) -> str | None:
        for end in range(len(loc), 0, -1):
            if loc[:end] in self.origins:
                return self.origins[loc[:end]]
        return None

    def add_file(self, document: dict[str, Any], source: str) -> None:
        self.files.append(source)
        _check_document(document, source)
        for top, value in document.items():
            if top == "deployment":
                self._add_deployments(value, source)
            elif top not in SECTIONS:
                raise ConfigError(
                    source, top, "unknown key (sections: api, agent, flow_run, deployment)"
                )
            elif not isinstance(value, dict):
                raise ConfigError(source, top, f"expected a table [{top}], got {show(value)}")
            else:
                self._merge(self.data.setdefault(top, {}), value, (top,), source)

    def _merge(self, target: dict[str, Any], new: Mapping[str, Any], loc: Loc, source: str) -> None:
        for key, value in new.items():
            self.origins[(*loc, key)] = source
            if isinstance(value, dict) and isinstance(target.get(key), dict):
                self._merge(target[key], value, (*loc, key), source)
            else:
                target[key] = copy.deepcopy(value)

    def _add_deployments(self, items: Any, source: str) -> None:
        if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
            raise ConfigError(source, "deployment", "expected [[deployment]] tables")
        existing: list[dict[str, Any]] = self.data.setdefault("deployment", [])
        seen: set[str] = set()
        for item in items:
            name = item.get("name")
            index = len(existing)
            if isinstance(name, str):
                if name in seen:
                    raise ConfigError(
                        source,
                        f"deployment[{name}]",
                        f"duplicate deployment name {name!r}; names must be unique",
                    )
                seen.add(name)
                # A later file's deployment of the same name replaces the earlier one in place.
                index = next((i for i, d in enumerate(existing) if d.get("name") == name), index)
            if index == len(existing):
                existing.append(item)
            else:
                existing[index] = item
            self.origins[("deployment", index)] = source

    def add_environment(self, environ: Mapping[str, str]) -> None:
        for name in sorted(environ):
            section, sep, rest = name.removeprefix(ENV_PREFIX).partition("__")
            if not name.startswith(ENV_PREFIX) or not sep:
                continue  # e.g. RUNNER_AGENT_CONFIG and RUNNER_AGENT_LOG_LEVEL are not config keys
            source = f"environment ({name})"
            section = section.lower()
            if section not in SECTIONS:
                raise ConfigError(
                    source,
                    None,
                    f"unknown section {section!r} (use API, AGENT or "
                    "FLOW_RUN; [[deployment]] can only be set in files)",
                )
            key, sep, sub = rest.partition("__")
            key = key.lower()
            value: Any = environ[name]
            _check_value(value, source, f"{section}.{key}")
            if sep and key == "env":  # RUNNER_AGENT_FLOW_RUN__ENV__NAME=value
                value = {sub: value}
            elif sep:
                raise ConfigError(source, f"{section}.{key}", f"unknown key {sub.lower()!r}")
            elif key == "env":
                value = _json_table(value, source, f"{section}.env")
            self._merge(self.data.setdefault(section, {}), {key: value}, (section,), source)
        api = self.data.get("api", {})
        if "url" not in api and environ.get("PREFECT_API_URL"):
            _check_value(environ["PREFECT_API_URL"], "environment (PREFECT_API_URL)", "api.url")
            self.data["api"] = {**api, "url": environ["PREFECT_API_URL"]}
            self.origins[("api", "url")] = "environment (PREFECT_API_URL)"


def _bad_text(text: str) -> str | None:
    """Why a string cannot be config: a NUL (no path, argv, environment or Postgres text column
    takes one), or bytes that were not UTF-8 (a variable's value, kept as surrogate escapes)."""
    if "\x00" in text:
        return "must not contain a NUL character"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "not UTF-8 text"
    return None


def _check_value(value: Any, source: str, key: str, depth: int = 0) -> None:
    """Every string in `value`, keys included, is usable text, every integer fits 64 bits (as
    TOML says; tomllib takes any size, and Python cannot print one of 5000 digits) and nothing
    nests deeper than MAX_DEPTH (`a.a.a...` keys parse flat, then recursion everywhere fails)."""
    if depth > MAX_DEPTH:
        raise ConfigError(source, key.split(".")[0], f"nested more than {MAX_DEPTH} levels deep")
    if isinstance(value, str):
        problem = _bad_text(value)
        if problem is not None:
            raise ConfigError(source, key, problem)
    elif isinstance(value, int) and not -(2**63) <= value < 2**63:
        raise ConfigError(source, key, "integer out of range (TOML integers are 64-bit)")
    elif isinstance(value, dict):
        for name, item in value.items():
            _check_value(name, source, f"{key}.{name}", depth + 1)
            _check_value(item, source, f"{key}.{name}", depth + 1)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_value(item, source, f"{key}[{index}]", depth + 1)


def _check_document(document: dict[str, Any], source: str) -> None:
    for top, value in document.items():
        _check_value(top, source, top)
        if top != "deployment" or not isinstance(value, list):
            _check_value(value, source, top)
            continue
        for index, item in enumerate(value):
            name = item.get("name") if isinstance(item, dict) else None
            ok = isinstance(name, str) and _bad_text(name) is None
            _check_value(item, source, f"deployment[{name if ok else f'#{index + 1}'}]")


def _json_table(text: str, source: str, key: str) -> Any:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        value = None
    if not isinstance(value, dict):
        raise ConfigError(source, key, 'expected a JSON object like {"NAME": "value"}')
    return value


def _dropins(directory: Path) -> list[Path]:
    try:
        st = directory.stat()
        if not stat.S_ISDIR(st.st_mode):
            return []
        _check_writers(str(directory), st, "directory")
        names = sorted(p.name for p in directory.iterdir())
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise ConfigError(str(directory), None, f"cannot read: {exc.strerror or exc}") from None
    # Hidden files are editors' and Ansible's temporary files, not drop-ins.
    return [directory / n for n in names if n.endswith(".toml") and not n.startswith(".")]


def _read_toml(path: Path, *, required: bool) -> dict[str, Any] | None:
    source = str(path)
    try:
        text = _read_checked(path, source).decode("utf-8")
        return tomllib.loads(text)
    except FileNotFoundError:
        if required:
            raise ConfigError(source, None, "file not found") from None
        return None
    except OSError as exc:
        raise ConfigError(source, None, f"cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(source, None, "not UTF-8 text") from None
    except RecursionError:
        raise ConfigError(source, None, "invalid TOML: nested too deeply") from None
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        match = re.fullmatch(r"(.*) \(at line (\d+), column (\d+)\)", message, re.DOTALL)
        if match:
            text, line, column = match.groups()
            message = f"invalid TOML at line {line}, column {column}: {text}"
        else:
            message = f"invalid TOML: {message}"
        raise ConfigError(source, None, message) from None
    except ValueError as exc:
        # Not a TOMLDecodeError: a number past Python's 4300-digit limit, a NUL in the path.
        what = "a number too long" if "digits" in str(exc) else str(exc)
        raise ConfigError(source, None, f"invalid TOML: {what}") from None


def _read_checked(path: Path, source: str) -> bytes:
    """The file's bytes, once it and every directory above it passed the writers check.

    The checks look at the opened file itself (fstat), so a file swapped in between the check
    and the read is never read. O_NONBLOCK: a FIFO in its place must not hang the agent.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as handle:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(source, None, "not a regular file")
        _check_writers(source, st, "file")
        _check_directories_above(path, source)
        return handle.read()


def _check_directories_above(path: Path, source: str) -> None:
    """Who can write a directory above the file can replace the file: apply the same rule to
    every directory up to `/`, both along the path as given and along its resolved target.

    A sticky directory (`/tmp`, 1777) may be writable by all: there nobody can rename or remove
    an entry they do not own, and the entry below is checked in turn.
    """
    seen: set[Path] = set()
    for start in (path.absolute().parent, path.resolve().parent):
        for directory in (start, *start.parents):
            if directory in seen:
                continue
            seen.add(directory)
            st = directory.stat()
            _check_writers(source, st, f"directory {directory}",
                           sticky_ok=bool(st.st_mode & stat.S_ISVTX))


def _check_writers(source: str, st: os.stat_result, what: str, *, sticky_ok: bool = False) -> None:
    """Refuse a config file or directory that anyone but root and our own user could change."""
    mode = f"mode {stat.S_IMODE(st.st_mode):04o}"
    tail = "only root and the agent's user may write it"
    if st.st_uid not in (0, os.geteuid()):
        owner = _name(pwd.getpwuid, st.st_uid)
        raise ConfigError(source, None, f"{what} is owned by user {owner} ({mode}); {tail}")
    if sticky_ok:
        return
    if st.st_mode & stat.S_IWOTH:
        raise ConfigError(source, None, f"{what} is writable by everyone ({mode}); {tail}")
    if st.st_mode & stat.S_IWGRP and st.st_gid not in (0, os.getegid()):
        group = _name(grp.getgrgid, st.st_gid)
        raise ConfigError(source, None, f"{what} is writable by group {group} ({mode}); {tail}")


def _name(lookup: Any, number: int) -> str:
    try:
        return repr(lookup(number)[0])
    except KeyError:
        return str(number)


def read_secret(path: Path, source: str, key: str | None) -> str:
    where = f"{path}: " if key else ""
    try:
        # Non-blocking and regular files only: a FIFO would hang the start, /dev/zero fill memory.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as handle:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ConfigError(source, key, f"{where}not a regular file")
            data = handle.read(MAX_SECRET_BYTES + 1)
        if len(data) > MAX_SECRET_BYTES:
            raise ConfigError(source, key, f"{where}too large for a secret (over 64 KiB)")
        text = data.decode("utf-8").rstrip("\r\n")
    except OSError as exc:
        raise ConfigError(source, key, f"{where}cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(source, key, f"{where}not UTF-8 text") from None
    except ValueError as exc:  # a NUL in the path
        raise ConfigError(source, key, f"{where}cannot read: {exc}") from None
    if not text.strip():
        raise ConfigError(source, key, f"{where}file is empty")
    if "\n" in text or "\r" in text:
        raise ConfigError(source, key, f"{where}must hold one line")
    return text


def read_sources(config_path: Path | None, environ: Mapping[str, str]) -> tuple[RawConfig, str]:
    """Read and merge every source; returns the raw config and the main file's name."""
    explicit = config_path is not None or bool(environ.get("RUNNER_AGENT_CONFIG"))
    path = config_path or Path(environ.get("RUNNER_AGENT_CONFIG") or DEFAULT_CONFIG)
    raw = RawConfig()
    for file in (path, *_dropins(path.parent / "agent.d")):
        # A missing default file is fine (built-in defaults apply); a named one is an error.
        document = _read_toml(file, required=explicit or file != path)
        if document is not None:
            raw.add_file(document, str(file))
    raw.add_environment(environ)
    return raw, str(path)


def show(value: Any) -> str:
    """A value quoted for an error message, cut short."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
