"""Durable per-run records, so a restarted (or SIGKILLed) agent knows what it was doing.

A record is written *before* each step that changes the outside world: before the claim,
before the launch, after the exit. On start the agent reads them back and finishes each run's
story exactly once (see recovery.py). Records live in `<state_dir>/runs/<id>/record.json`
(0600 in a 0700 directory) and are written atomically (temp file, fsync, rename, fsync of the
directory). A save that fails (a full disk, a read-only file system) raises RecordError and
leaves the previous record as it was.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

log = logging.getLogger("agent.records")

RECORD_NAME = "record.json"


class RecordError(Exception):
    """A record could not be made durable; str() names the file and the problem."""


@dataclass
class RunRecord:
    flow_run_id: str
    deployment: str
    phase: str  # claiming | launching | running | exited
    claimed_at: float | None = None
    unit: str | None = None
    pid: int | None = None
    launcher: str | None = None
    run_dir: str | None = None
    exit_status: int | None = None
    unit_result: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> UUID:
        return UUID(self.flow_run_id)


class RunRecords:
    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / "runs"

    def run_dir(self, flow_run_id: UUID) -> Path:
        return self.root / str(flow_run_id)

    def save(self, record: RunRecord) -> None:
        """Write `record` durably; raises RecordError (the old record then stays as it was)."""
        directory = self.run_dir(record.id)
        path = directory / RECORD_NAME
        tmp = directory / f".{RECORD_NAME}.tmp"
        try:
            # mkdir(parents=True) gives the parents the umask's mode; runs/ must be private too.
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            directory.mkdir(exist_ok=True, mode=0o700)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as handle:
                json.dump(asdict(record), handle)
                handle.flush()
                # ENOSPC may only show here (delayed allocation): a record is durable or it fails.
                os.fsync(handle.fileno())
            tmp.replace(path)
            _fsync_directory(directory)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise RecordError(f"cannot write the run record {path}: {exc.strerror or exc}") from exc

    def load(self, flow_run_id: UUID) -> RunRecord | None:
        try:
            raw = json.loads((self.run_dir(flow_run_id) / RECORD_NAME).read_text())
            return RunRecord(**raw)
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as exc:
            log.error("unreadable run record for %s: %s", flow_run_id, exc)
            return None

    def age(self, flow_run_id: UUID) -> float | None:
        """Seconds since the run's record was last written; None when there is none."""
        try:
            mtime = (self.run_dir(flow_run_id) / RECORD_NAME).stat().st_mtime
        except OSError:
            return None
        return max(0.0, time.time() - mtime)

    def all(self) -> list[RunRecord]:
        records: list[RunRecord] = []
        if not self.root.is_dir():
            return records
        for directory in sorted(self.root.iterdir()):
            try:
                flow_run_id = UUID(directory.name)
            except ValueError:
                continue
            record = self.load(flow_run_id)
            if record is not None:
                records.append(record)
        return records

    def remove(self, flow_run_id: UUID) -> None:
        def make_writable_and_retry(func: Any, path: str, _exc: Any) -> None:
            # A flow's TMPDIR may hold read-only directories.
            Path(path).parent.chmod(0o700)
            func(path)

        try:
            shutil.rmtree(self.run_dir(flow_run_id), onerror=make_writable_and_retry)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("could not remove %s: %s", self.run_dir(flow_run_id), exc)


def _fsync_directory(directory: Path) -> None:
    """The rename itself must survive a power loss, not only the file's bytes."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
