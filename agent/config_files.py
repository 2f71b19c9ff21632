"""Reading config files safely: TOML documents, drop-in directories and secret files.

Nobody but root and the agent's own user may be able to change what is read (the file and every
directory above it); FIFOs and devices are refused without blocking; every string read must be
usable text. Each problem is one ConfigError naming the file.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import stat
import tomllib
from pathlib import Path
from typing import Any

from agent.config_errors import ConfigError

MAX_SECRET_BYTES = 64 * 1024
MAX_DEPTH = 32


def bad_text(text: str) -> str | None:
    """Why a string cannot be config: a NUL (no path, argv, environment or Postgres text column
    takes one), or bytes that were not UTF-8 (a variable's value, kept as surrogate escapes)."""
    if "\x00" in text:
        return "must not contain a NUL character"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "not UTF-8 text"
    return None


def check_value(value: Any, source: str, key: str, depth: int = 0) -> None:
    """Every string in `value`, keys included, is usable text, every integer fits 64 bits (as
    TOML says; tomllib takes any size, and Python cannot print one of 5000 digits) and nothing
    nests deeper than MAX_DEPTH (`a.a.a...` keys parse flat, then recursion everywhere fails)."""
    if depth > MAX_DEPTH:
        raise ConfigError(source, key.split(".")[0], f"nested more than {MAX_DEPTH} levels deep")
    if isinstance(value, str):
        problem = bad_text(value)
        if problem is not None:
            raise ConfigError(source, key, problem)
    elif isinstance(value, int) and not -(2**63) <= value < 2**63:
        raise ConfigError(source, key, "integer out of range (TOML integers are 64-bit)")
    elif isinstance(value, dict):
        for name, item in value.items():
            check_value(name, source, f"{key}.{name}", depth + 1)
            check_value(item, source, f"{key}.{name}", depth + 1)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            check_value(item, source, f"{key}[{index}]", depth + 1)


def check_document(document: dict[str, Any], source: str) -> None:
    """check_value for a whole file; a deployment is named by its name where it has one."""
    for top, value in document.items():
        check_value(top, source, top)
        if top != "deployment" or not isinstance(value, list):
            check_value(value, source, top)
            continue
        for index, item in enumerate(value):
            name = item.get("name") if isinstance(item, dict) else None
            ok = isinstance(name, str) and bad_text(name) is None
            check_value(item, source, f"deployment[{name if ok else f'#{index + 1}'}]")


def dropins(directory: Path) -> list[Path]:
    """The `*.toml` files of a drop-in directory, in lexical order; none if it is missing."""
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


def read_toml(path: Path, *, required: bool) -> dict[str, Any] | None:
    """The parsed file, or None when it is missing and not `required`."""
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
            sticky = bool(st.st_mode & stat.S_ISVTX)
            _check_writers(source, st, f"directory {directory}", sticky_ok=sticky)


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
    """A secret file's one line: a regular file of at most 64 KiB, UTF-8, not empty."""
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
