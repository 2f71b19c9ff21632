"""The benchmark's cancellation figures: history, CRASHED flag, path, and `--only`."""

from __future__ import annotations

import pytest

from bench.report import ROWS, ContenderResult, Row, cancellation_detail
from bench.run import parse_args
from bench.scenarios import Cancellation, cancel_path

CLEAN = ("SCHEDULED", "PENDING", "RUNNING", "CANCELLING", "CANCELLED")
CRASHED = ("SCHEDULED", "PENDING", "RUNNING", "CANCELLING", "CRASHED", "CANCELLED")


def cancellation(history: tuple[str, ...], latency: float, path: str | None) -> Cancellation:
    return Cancellation(
        run_id="0123456789abcdef",
        final_type=history[-1],
        latency=latency,
        orphans=0,
        leftovers=0,
        engine_gone=0.5,
        states=((0.0, "CANCELLING"), (latency, history[-1])),
        history=history,
        path=path,
    )


def row(figure: str) -> Row:
    return next(r for r in ROWS if r.figure == figure)


def test_a_crashed_in_a_cancelled_runs_history_is_counted_and_flagged() -> None:
    result = ContenderResult(
        "runner-agent",
        cancellations=[
            cancellation(CLEAN, 0.2, "control channel"),
            cancellation(CRASHED, 2.5, None),
            cancellation(CLEAN, 0.4, "control channel"),
        ],
    )
    crashed = row("cancelled runs with CRASHED in their history")
    assert crashed.get(result) == 1.0
    assert crashed.total is not None and crashed.total(result) == 3
    assert crashed.target == 0.5  # "none"
    p50 = row("cancel, CANCELLING → CANCELLED, p50")
    assert p50.get(result) == 0.4
    assert p50.target == 1.0

    lines = cancellation_detail((result,))
    assert len(lines) == 3
    assert "history SCHEDULED > PENDING > RUNNING > CANCELLING > CANCELLED;" in lines[0]
    assert "path: control channel" in lines[0]
    assert "CRASHED" not in lines[0]
    assert "CANCELLING > CRASHED > CANCELLED **CRASHED in its history**" in lines[1]
    assert "path:" not in lines[1]


def test_the_cancel_path_is_read_from_the_agents_note() -> None:
    acked = "Cancelling (the engine acknowledged the cancellation): SIGTERM to every process"
    fallback = "Cancelling (no control channel answer from the engine): SIGTERM to every process"
    assert cancel_path(["Launched in process 12", acked]) == "control channel"
    assert cancel_path([fallback]) == "fallback: SIGTERM without acknowledgement"
    assert cancel_path(["Flow run was cancelled."]) is None


def test_only_selects_scenarios_and_needs_an_explicit_report_path(
    capsys: pytest.CaptureFixture[str],
) -> None:
    venv = ["--prefect-venv", "/nonexistent"]
    args = parse_args([*venv, "--only", "cancel", "--out", "/tmp/partial.md"])
    assert args.scenarios == frozenset({"cancel"})
    assert set(parse_args(venv).scenarios) >= {"idle", "cancel", "footprint", "imports"}
    with pytest.raises(SystemExit) as exited:
        parse_args([*venv, "--only", "cancel"])
    assert exited.value.code == 2
    assert "--only writes a partial report" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args([*venv, "--only", "nonsense", "--out", "/tmp/partial.md"])
