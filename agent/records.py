"""Durable per-run records, so a restarted (or SIGKILLed) agent knows what it was doing.

A record is written *before* each step that changes the outside world: before the claim,
before the launch, after the exit. On start the agent reads them back and finishes each run's
story exactly once (see recovery.py). Records live in `<state_dir>/runs/<id>/record.json`
(0600 in a 0700 directory) and are written atomically (temp file, fsync, rename).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

log = logging.getLogger("agent.records")

RECORD_NAME = "record.json"


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
        directory = self.run_dir(record.id)
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = directory / RECORD_NAME
        tmp = directory / f".{RECORD_NAME}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(asdict(record), handle)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(path)

    def load(self, flow_run_id: UUID) -> RunRecord | None:
        try:
            raw = json.loads((self.run_dir(flow_run_id) / RECORD_NAME).read_text())
            return RunRecord(**raw)
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as exc:
            log.error("unreadable run record for %s: %s", flow_run_id, exc)
            return None

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
