from __future__ import annotations

import stat
from pathlib import Path
from uuid import uuid4

from agent.records import RunRecord, RunRecords


def test_records_round_trip_with_tight_modes(tmp_path: Path) -> None:
    records = RunRecords(tmp_path)
    run_id = uuid4()
    record = RunRecord(
        flow_run_id=str(run_id), deployment="hello", phase="claiming", claimed_at=1.5
    )
    records.save(record)
    path = records.run_dir(run_id) / "record.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(records.run_dir(run_id).stat().st_mode) == 0o700
    record.phase = "running"
    record.pid = 42
    records.save(record)
    loaded = records.load(run_id)
    assert loaded == record
    assert [r.id for r in records.all()] == [run_id]


def test_unreadable_and_foreign_entries_are_skipped(tmp_path: Path) -> None:
    records = RunRecords(tmp_path)
    good = uuid4()
    records.save(RunRecord(flow_run_id=str(good), deployment="d", phase="exited", exit_status=3))
    bad = uuid4()
    records.run_dir(bad).mkdir(parents=True)
    (records.run_dir(bad) / "record.json").write_text("{not json")
    (records.root / "not-a-uuid").mkdir()
    assert [r.id for r in records.all()] == [good]


def test_remove_handles_read_only_tmp_dirs(tmp_path: Path) -> None:
    records = RunRecords(tmp_path)
    run_id = uuid4()
    records.save(RunRecord(flow_run_id=str(run_id), deployment="d", phase="running"))
    locked = records.run_dir(run_id) / "tmp" / "locked"
    locked.mkdir(parents=True)
    (locked / "f").write_text("x")
    locked.chmod(0o500)
    records.remove(run_id)
    assert not records.run_dir(run_id).exists()
    records.remove(run_id)  # idempotent
