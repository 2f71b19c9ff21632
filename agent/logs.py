"""The agent's own logging: JSON records, journald's native protocol, context fields, redaction.

`configure_logging` is called once at start-up and replaces the root logger's handlers; nothing
happens at import time. Records are JSON objects (time, level, logger, message, context fields
such as `flow_run_id`, `deployment`, `unit`, any other `extra=` keys, `exc_info`).

When stderr is connected to the journal (`$JOURNAL_STREAM` names the stream's device and inode),
records go to journald's socket with the native protocol instead, so the context fields become
journal fields (`journalctl -u runner-agent FLOW_RUN_ID=<id>`). A record too big for one datagram
is passed in a sealed memfd (SCM_RIGHTS), as sd_journal_send does. When the socket fails, the
record is written as a JSON line to the stream: logging never crashes the agent.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import socket
import struct
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

from pythonjsonlogger.json import JsonFormatter

from agent.redaction import SecretScrubber

JOURNAL_SOCKET = "/run/systemd/journal/socket"
SYSLOG_IDENTIFIER = "runner-agent"
NOISY_LOGGERS = ("httpx", "httpcore", "websockets")
# A stalled journald must not stall the event loop for long; the record then goes to the stream.
SEND_TIMEOUT = 0.5

_PRIORITIES = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}
# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}
_FIELD_INVALID = re.compile(r"[^A-Z0-9_]")


def syslog_priority(levelno: int) -> int:
    """The syslog priority for a logging level (custom levels round down to the next known)."""
    for known in sorted(_PRIORITIES, reverse=True):
        if levelno >= known:
            return _PRIORITIES[known]
    return 7


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The record's `extra=` keys (context fields such as flow_run_id, deployment, unit)."""
    return {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS}


def journal_field_name(key: str) -> str | None:
    """A journal field name: upper case, [A-Z0-9_], not starting with `_` (reserved) or a digit."""
    name = _FIELD_INVALID.sub("_", key.upper()).lstrip("_")
    if name and name[0].isdigit():
        name = "F_" + name
    return name[:64] or None


def encode_journal_fields(fields: Iterable[tuple[str, str]]) -> bytes:
    """journald's native datagram: `NAME=value\\n`, or the binary form when value has a newline."""
    parts: list[bytes] = []
    for name, value in fields:
        data = value.encode("utf-8", "replace")
        key = name.encode("ascii")
        if b"\n" in data:
            parts.append(key + b"\n" + struct.pack("<Q", len(data)) + data + b"\n")
        else:
            parts.append(key + b"=" + data + b"\n")
    return b"".join(parts)


def is_journal_stream(stream: TextIO, environ: Mapping[str, str]) -> bool:
    """True when `$JOURNAL_STREAM` ("dev:inode") names the file behind `stream`."""
    expected = environ.get("JOURNAL_STREAM", "")
    dev, sep, inode = expected.partition(":")
    if not sep:
        return False
    try:
        st = os.fstat(stream.fileno())
        return (st.st_dev, st.st_ino) == (int(dev), int(inode))
    except (OSError, ValueError, AttributeError):
        return False


class Redactor(logging.Filter):
    """Replaces secrets and URL credentials in the message, its args, extras and exception text.

    Attached to the handler, so it sees records of every logger, and it rewrites the record in
    place before any output is built from it.
    """

    def __init__(self) -> None:
        super().__init__()
        self._scrubber = SecretScrubber()

    def set_secrets(self, values: Iterable[str]) -> None:
        self._scrubber.set_secrets(values)

    def redact(self, text: str) -> str:
        return self._scrubber.scrub(text)

    def _redact_value(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.redact(value)
        if isinstance(value, dict):
            return {k: self._redact_value(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._redact_value(v) for v in value]
        return value

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not lose the record
            message = f"{record.msg!r} % {record.args!r}"
        record.msg = self.redact(message)
        record.args = None
        for key, value in extra_fields(record).items():
            setattr(record, key, self._redact_value(value))
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        record.exc_info = None  # formatters would re-render the unredacted traceback
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        return True


class RecordFormatter(JsonFormatter):
    """One JSON object per record: time (ISO 8601 UTC), level, logger, message, extras."""

    def __init__(self) -> None:
        super().__init__(
            "%(asctime)s %(levelname)s %(name)s %(message)s",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            json_ensure_ascii=False,
        )

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")


class JournalHandler(logging.Handler):
    """Sends records to journald's native socket; falls back to JSON lines on `fallback`."""

    def __init__(self, socket_path: str, fallback: TextIO) -> None:
        super().__init__()
        self.socket_path = socket_path
        self.fallback = fallback
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.settimeout(SEND_TIMEOUT)

    def fields(self, record: logging.LogRecord, message: str) -> list[tuple[str, str]]:
        fields = [
            ("MESSAGE", message),
            ("PRIORITY", str(syslog_priority(record.levelno))),
            ("SYSLOG_IDENTIFIER", SYSLOG_IDENTIFIER),
            ("LOGGER", record.name),
            ("CODE_FILE", record.pathname),
            ("CODE_LINE", str(record.lineno)),
            ("CODE_FUNC", record.funcName),
        ]
        taken = {name for name, _ in fields}
        for key, value in extra_fields(record).items():
            name = journal_field_name(key)
            if name is None or name in taken or value is None:
                continue
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            fields.append((name, text))
        return fields

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
        except Exception:
            self.handleError(record)
            return
        try:
            self._send(encode_journal_fields(self.fields(record, message)))
        except Exception:
            self._write_fallback(message)

    def _send(self, data: bytes) -> None:
        try:
            self._sock.sendto(data, self.socket_path)
        except OSError as exc:
            if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                raise
            self._send_memfd(data)

    def _send_memfd(self, data: bytes) -> None:
        # Like sd_journal_send: journald reads a sealed memfd passed with SCM_RIGHTS.
        fd = os.memfd_create("journal-message", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.write(fd, data)
            seals = 0x0001 | 0x0002 | 0x0004 | 0x0008  # F_SEAL_SEAL|SHRINK|GROW|WRITE
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
            self._sock.sendmsg(
                [],
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))],
                0,
                self.socket_path,
            )
        finally:
            os.close(fd)

    def _write_fallback(self, message: str) -> None:
        try:
            self.fallback.write(message + "\n")
            self.fallback.flush()
        except Exception:  # nowhere left to log to
            pass

    def close(self) -> None:
        self._sock.close()
        super().close()


@dataclass
class LogSetup:
    """What `configure_logging` installed; `set_secrets` updates the redaction list."""

    handler: logging.Handler
    redactor: Redactor
    journal: bool

    def set_secrets(self, values: Iterable[str]) -> None:
        """Redact these strings from now on (values shorter than 4 characters are ignored)."""
        self.redactor.set_secrets(values)


def configure_logging(
    level: str,
    *,
    environ: Mapping[str, str],
    stream: TextIO | None = None,
    journal_socket: str = JOURNAL_SOCKET,
) -> LogSetup:
    """Configure the root logger (replacing its handlers) and return the setup."""
    levelno = logging.getLevelName(level.upper())
    if not isinstance(levelno, int):
        raise ValueError(f"unknown log level {level!r}")
    out = sys.stderr if stream is None else stream
    handler: logging.Handler
    journal = False
    if is_journal_stream(out, environ):
        try:
            handler = JournalHandler(journal_socket, fallback=out)
            journal = True
        except OSError:
            handler = logging.StreamHandler(out)
    else:
        handler = logging.StreamHandler(out)
    redactor = Redactor()
    handler.addFilter(redactor)
    handler.setFormatter(RecordFormatter())

    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(levelno)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(max(levelno, logging.WARNING))
    return LogSetup(handler=handler, redactor=redactor, journal=journal)
