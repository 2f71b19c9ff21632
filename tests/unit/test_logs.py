"""The agent's logging: JSON lines, journald's native protocol on a real socket, redaction."""

from __future__ import annotations

import array
import fcntl
import io
import json
import logging
import os
import socket
import struct
import tempfile
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

import pytest

from agent.logs import (
    LogSetup,
    configure_logging,
    encode_journal_fields,
    journal_field_name,
    syslog_priority,
)
from agent.redaction import REDACTED

pytestmark = pytest.mark.timeout(30)

SECRET = "pnu_s3cr3t-api-key-value"
RUN_ID = uuid.UUID("0b7e8c6a-4f0e-4d47-9c1e-2d3c8f3a9b10")


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    """configure_logging is process-wide: put the root logger back as pytest had it."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    noisy = {name: logging.getLogger(name).level for name in ("httpx", "httpcore", "websockets")}
    try:
        yield
    finally:
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
                handler.close()
        for handler in handlers:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(level)
        for name, old in noisy.items():
            logging.getLogger(name).setLevel(old)


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # A short path: AF_UNIX addresses are limited to 108 bytes.
    with tempfile.TemporaryDirectory(prefix="journal-", dir="/tmp") as directory:
        yield Path(directory)


class Journal:
    """A stand-in for journald: a datagram socket, and stderr as a file it 'owns'."""

    def __init__(self, directory: Path) -> None:
        self.path = str(directory / "socket")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.stderr: TextIO = (directory / "stderr").open("w+")
        st = os.fstat(self.stderr.fileno())
        self.environ = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}

    def configure(self, level: str = "debug") -> LogSetup:
        return configure_logging(
            level, environ=self.environ, stream=self.stderr, journal_socket=self.path
        )

    def receive(self) -> list[tuple[str, bytes]]:
        return decode(self.sock.recv(1 << 20))

    def receive_fields(self) -> dict[str, str]:
        fields = dict(self.receive())
        return {name: value.decode() for name, value in fields.items()}

    def stderr_text(self) -> str:
        self.stderr.flush()
        return Path(self.stderr.name).read_text()

    def close(self) -> None:
        self.sock.close()
        self.stderr.close()


@pytest.fixture
def journal(sock_dir: Path) -> Iterator[Journal]:
    j = Journal(sock_dir)
    try:
        yield j
    finally:
        j.close()


def decode(data: bytes) -> list[tuple[str, bytes]]:
    """journald's side of the native protocol, strict: every field ends with a newline."""
    fields: list[tuple[str, bytes]] = []
    pos = 0
    while pos < len(data):
        end = data.index(b"\n", pos)
        line = data[pos:end]
        if b"=" in line:
            name, _, value = line.partition(b"=")
            pos = end + 1
        else:
            name = line
            (size,) = struct.unpack("<Q", data[end + 1 : end + 9])
            value = data[end + 9 : end + 9 + size]
            assert data[end + 9 + size : end + 10 + size] == b"\n"
            pos = end + 10 + size
        assert name and name == name.upper() and not name.startswith(b"_"), name
        fields.append((name.decode("ascii"), value))
    return fields


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_with_context_fields() -> None:
    stream = io.StringIO()
    setup = configure_logging("info", environ={}, stream=stream)
    assert not setup.journal
    log = logging.getLogger("agent.runner")
    context = {
        "flow_run_id": str(RUN_ID),
        "deployment": "hello/etl",
        "unit": "runner-agent-run-0b7e8c6a.scope",
    }
    log.info("launched %s", "flow", extra={**context, "attempt": 2})
    log.debug("not at info level")
    logging.getLogger("agent.daemon").warning("plain")
    first, second = json_lines(stream)
    assert set(first) == {
        "time",
        "level",
        "logger",
        "message",
        "flow_run_id",
        "deployment",
        "unit",
        "attempt",
    }
    assert first["level"] == "INFO"
    assert first["logger"] == "agent.runner"
    assert first["message"] == "launched flow"
    assert first["flow_run_id"] == str(RUN_ID)
    assert first["deployment"] == "hello/etl"
    assert first["unit"] == "runner-agent-run-0b7e8c6a.scope"
    assert first["attempt"] == 2
    when = datetime.fromisoformat(first["time"])
    assert when.utcoffset() == timedelta(0)
    assert abs((datetime.now(UTC) - when).total_seconds()) < 60
    assert second == {
        "time": second["time"],
        "level": "WARNING",
        "logger": "agent.daemon",
        "message": "plain",
    }


def test_exception_is_a_string_field() -> None:
    stream = io.StringIO()
    configure_logging("info", environ={}, stream=stream)
    try:
        raise ValueError("bad thing")
    except ValueError:
        logging.getLogger("agent").exception("it failed")
    (record,) = json_lines(stream)
    assert record["message"] == "it failed"
    assert record["level"] == "ERROR"
    assert isinstance(record["exc_info"], str)
    assert record["exc_info"].startswith("Traceback")
    assert "ValueError: bad thing" in record["exc_info"]


def test_configure_replaces_handlers_and_sets_levels() -> None:
    configure_logging("debug", environ={}, stream=io.StringIO())
    stream = io.StringIO()
    configure_logging("WARNING", environ={}, stream=stream)
    root = logging.getLogger()
    assert len(root.handlers) == 1
    assert root.level == logging.WARNING
    assert logging.getLogger("httpx").level == logging.WARNING
    logging.getLogger("agent").info("dropped")
    logging.getLogger("agent").error("kept")
    assert [r["message"] for r in json_lines(stream)] == ["kept"]
    with pytest.raises(ValueError, match="unknown log level"):
        configure_logging("loud", environ={}, stream=io.StringIO())


def test_secrets_never_reach_the_output() -> None:
    stream = io.StringIO()
    setup = configure_logging("info", environ={}, stream=stream)
    setup.set_secrets([SECRET, "abc", ""])
    log = logging.getLogger("agent.api")
    log.info("key is " + SECRET)
    log.info("header %s and %r", f"Bearer {SECRET}", {"key": SECRET})
    log.info("context", extra={"auth": SECRET, "nested": {"list": [f"x{SECRET}x", 1]}})
    try:
        raise RuntimeError(f"refused {SECRET}")
    except RuntimeError:
        log.exception("request failed")
    log.info("short values like abc are not secrets")
    log.info("url https://user:pa55word@prefect.example/api and ftp://u@h/x, not mail@host")
    output = stream.getvalue()
    assert SECRET not in output
    assert "pa55word" not in output
    records = json_lines(stream)
    assert records[0]["message"] == f"key is {REDACTED}"
    assert records[1]["message"] == f"header Bearer {REDACTED} and {{'key': '{REDACTED}'}}"
    assert records[2]["auth"] == REDACTED
    assert records[2]["nested"] == {"list": [f"x{REDACTED}x", 1]}
    assert f"RuntimeError: refused {REDACTED}" in records[3]["exc_info"]
    assert records[4]["message"] == "short values like abc are not secrets"
    assert records[5]["message"] == (
        "url https://***@prefect.example/api and ftp://***@h/x, not mail@host"
    )


def test_set_secrets_replaces_the_list() -> None:
    stream = io.StringIO()
    setup = configure_logging("info", environ={}, stream=stream)
    setup.set_secrets(["old-secret"])
    setup.set_secrets(["new-secret", "new-secret-longer"])
    log = logging.getLogger("agent")
    log.info("old-secret new-secret-longer new-secret")
    (record,) = json_lines(stream)
    # The longest match wins, so no tail of a longer secret is left behind.
    assert record["message"] == f"old-secret {REDACTED} {REDACTED}"


def test_journal_native_protocol(journal: Journal) -> None:
    setup = journal.configure()
    setup.set_secrets([SECRET])
    assert setup.journal
    log = logging.getLogger("agent.runner")
    log.info(
        "claimed with key %s",
        SECRET,
        extra={
            "flow_run_id": str(RUN_ID),
            "deployment": "hello/etl",
            "unit": "runner-agent-run-1.scope",
            "detail": "line one\nline two",
            "http.status-code": 503,
            "_private": "p",
            "empty": None,
        },
    )
    raw = journal.receive()
    names = [name for name, _ in raw]
    assert names[:3] == ["MESSAGE", "PRIORITY", "SYSLOG_IDENTIFIER"]
    assert len(names) == len(set(names))
    fields = {name: value.decode() for name, value in raw}
    assert fields["PRIORITY"] == "6"
    assert fields["SYSLOG_IDENTIFIER"] == "runner-agent"
    assert fields["FLOW_RUN_ID"] == str(RUN_ID)
    assert fields["DEPLOYMENT"] == "hello/etl"
    assert fields["UNIT"] == "runner-agent-run-1.scope"
    assert fields["DETAIL"] == "line one\nline two"
    assert fields["HTTP_STATUS_CODE"] == "503"
    assert fields["PRIVATE"] == "p"
    assert "EMPTY" not in fields
    assert fields["LOGGER"] == "agent.runner"
    record = json.loads(fields["MESSAGE"])
    assert record["message"] == f"claimed with key {REDACTED}"
    assert record["flow_run_id"] == str(RUN_ID)
    assert record["level"] == "INFO"
    assert journal.stderr_text() == ""  # nothing fell back to stderr


def test_journal_multi_line_values_use_the_binary_encoding(journal: Journal) -> None:
    journal.configure()
    try:
        raise KeyError("missing")
    except KeyError:
        logging.getLogger("agent").exception("first\nsecond", extra={"note": "a\nb=c"})
    sock_data = dict(journal.receive())
    # MESSAGE is JSON, so its newlines are escaped; a raw multi-line extra is binary-encoded.
    assert b"\n" not in sock_data["MESSAGE"]
    record = json.loads(sock_data["MESSAGE"])
    assert record["message"] == "first\nsecond"
    assert "KeyError: 'missing'" in record["exc_info"]
    assert sock_data["NOTE"] == b"a\nb=c"
    assert sock_data["PRIORITY"] == b"3"
    encoded = encode_journal_fields([("NOTE", "a\nb=c"), ("X", "y")])
    assert encoded == b"NOTE\n" + struct.pack("<Q", 5) + b"a\nb=c\n" + b"X=y\n"


@pytest.mark.parametrize(
    ("level", "priority"),
    [
        (logging.DEBUG, "7"),
        (logging.INFO, "6"),
        (logging.WARNING, "4"),
        (logging.ERROR, "3"),
        (logging.CRITICAL, "2"),
    ],
)
def test_journal_priority(journal: Journal, level: int, priority: str) -> None:
    journal.configure("debug")
    logging.getLogger("agent").log(level, "m")
    assert journal.receive_fields()["PRIORITY"] == priority


def test_priority_of_custom_levels() -> None:
    assert [syslog_priority(n) for n in (1, 15, 25, 45, 60)] == [7, 7, 6, 3, 2]


def test_journal_field_names() -> None:
    assert journal_field_name("flow_run_id") == "FLOW_RUN_ID"
    assert journal_field_name("http.status-code") == "HTTP_STATUS_CODE"
    assert journal_field_name("__x") == "X"
    assert journal_field_name("2fa") == "F_2FA"
    assert journal_field_name("___") is None
    assert journal_field_name("é") is None
    assert len(journal_field_name("k" * 100) or "") == 64


def test_journal_record_too_big_for_a_datagram_goes_in_a_sealed_memfd(
    journal: Journal,
) -> None:
    journal.configure()
    big = "x" * 400_000  # more than the socket's send buffer: EMSGSIZE
    logging.getLogger("agent").info(big, extra={"unit": "u.scope"})
    fds = array.array("i")
    data, ancdata, _, _ = journal.sock.recvmsg(4096, socket.CMSG_SPACE(fds.itemsize))
    assert data == b""
    ((level, kind, payload),) = ancdata
    assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
    fds.frombytes(payload[: fds.itemsize])
    fd = fds[0]
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        assert seals & 0x000F == 0x000F  # SEAL, SHRINK, GROW, WRITE: journald insists
        size = os.fstat(fd).st_size
        fields = dict(decode(os.pread(fd, size, 0)))
    finally:
        os.close(fd)
    assert json.loads(fields["MESSAGE"])["message"] == big
    assert fields["UNIT"] == b"u.scope"
    assert journal.stderr_text() == ""


def test_journal_socket_missing_falls_back_to_json_lines(journal: Journal) -> None:
    journal.sock.close()
    Path(journal.path).unlink()
    setup = journal.configure()
    assert setup.journal
    logging.getLogger("agent").warning("still logged", extra={"unit": "u.scope"})
    (line,) = journal.stderr_text().splitlines()
    record = json.loads(line)
    assert (record["message"], record["unit"]) == ("still logged", "u.scope")


def test_journal_stalled_falls_back_without_hanging(journal: Journal) -> None:
    journal.configure()
    log = logging.getLogger("agent")
    # Nobody reads: the socket queues net.unix.max_dgram_qlen datagrams, then sends time out.
    qlen = int(Path("/proc/sys/net/unix/max_dgram_qlen").read_text())
    for i in range(qlen + 2):
        log.info("record %d", i)
    lines = journal.stderr_text().splitlines()
    assert 1 <= len(lines) <= 3
    assert json.loads(lines[-1])["message"] == f"record {qlen + 1}"
    assert journal.receive_fields()["MESSAGE"].startswith("{")


def test_journal_stream_must_match_stderr(journal: Journal, sock_dir: Path) -> None:
    other = (sock_dir / "other").open("w+")
    try:
        setup = configure_logging(
            "info", environ=journal.environ, stream=other, journal_socket=journal.path
        )
        assert not setup.journal
        logging.getLogger("agent").info("to the stream")
        other.flush()
        assert json.loads(Path(other.name).read_text())["message"] == "to the stream"
    finally:
        other.close()
    for environ in ({}, {"JOURNAL_STREAM": "garbage"}, {"JOURNAL_STREAM": "1:x"}):
        assert not configure_logging(
            "info", environ=environ, stream=journal.stderr, journal_socket=journal.path
        ).journal
    # A stream without a file descriptor (pytest's capture, StringIO) is never the journal.
    assert not configure_logging(
        "info", environ=journal.environ, stream=io.StringIO(), journal_socket=journal.path
    ).journal
