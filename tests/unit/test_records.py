from __future__ import annotations

import errno
import os
import stat
import time
from pathlib import Path
from uuid import uuid4

import pytest

from agent.records import RecordError, RunRecord, RunRecords


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


def test_a_failed_save_raises_naming_the_file_and_keeps_the_old_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    records = RunRecords(tmp_path)
    run_id = uuid4()
    record = RunRecord(flow_run_id=str(run_id), deployment="d", phase="launching", run_dir="/r")
    records.save(record)

    def disk_full(_fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    # ENOSPC often shows only at fsync (delayed allocation); that must fail the save.
    monkeypatch.setattr("agent.records.os.fsync", disk_full)
    changed = RunRecord(flow_run_id=str(run_id), deployment="d", phase="running", pid=7)
    with pytest.raises(RecordError) as caught:
        records.save(changed)
    path = records.run_dir(run_id) / "record.json"
    assert str(caught.value) == f"cannot write the run record {path}: No space left on device"
    monkeypatch.undo()
    assert records.load(run_id) == record
    assert sorted(p.name for p in records.run_dir(run_id).iterdir()) == ["record.json"]


def test_a_save_where_no_directory_can_be_made_raises(tmp_path: Path) -> None:
    # Root ignores permission bits; a path under a regular file fails for everyone.
    blocker = tmp_path / "state"
    blocker.write_text("a file, not a directory")
    records = RunRecords(blocker)
    run_id = uuid4()
    with pytest.raises(RecordError, match=r"cannot write the run record .*: Not a directory"):
        records.save(RunRecord(flow_run_id=str(run_id), deployment="d", phase="claiming"))
    assert records.all() == []


def test_age_is_the_time_since_the_last_save(tmp_path: Path) -> None:
    records = RunRecords(tmp_path)
    run_id = uuid4()
    assert records.age(run_id) is None
    records.save(RunRecord(flow_run_id=str(run_id), deployment="d", phase="launching"))
    path = records.run_dir(run_id) / "record.json"
    os.utime(path, (time.time() - 30, time.time() - 30))
    age = records.age(run_id)
    assert age is not None and 29 < age < 40
    records.save(RunRecord(flow_run_id=str(run_id), deployment="d", phase="running"))
    age = records.age(run_id)
    assert age is not None and age < 5
