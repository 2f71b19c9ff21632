"""State bodies and every branch of the exit-status explanation."""

from __future__ import annotations

from uuid import UUID

import pytest

from agent import states

MiB = 1024 * 1024


def explain(
    status: int,
    result: str | None = None,
    *,
    memory_max: int | None = None,
    runtime_max: float | None = None,
    cancelled: bool = False,
    elapsed: float | None = None,
) -> str:
    return states.explain_exit(
        status,
        result,
        memory_max=memory_max,
        runtime_max=runtime_max,
        command="/opt/x/bin/python",
        cancelled=cancelled,
        elapsed=elapsed,
    ).message()


@pytest.mark.parametrize(
    ("body", "state_type", "name", "message"),
    [
        (states.pending_state(), "PENDING", "Pending", None),
        (states.crashed_state("boom"), "CRASHED", "Crashed", "boom"),
        (
            states.cancelled_state(),
            "CANCELLED",
            "Cancelled",
            "Flow run was cancelled successfully.",
        ),
        (states.cancelled_state("by hand"), "CANCELLED", "Cancelled", "by hand"),
    ],
)
def test_state_bodies_have_the_state_create_shape(
    body: dict[str, object], state_type: str, name: str, message: str | None
) -> None:
    assert set(body) == {"type", "name", "message", "state_details"}
    assert (body["type"], body["name"], body["message"]) == (state_type, name, message)
    details = body["state_details"]
    assert isinstance(details, dict) and set(details) == {"transition_id"}
    assert UUID(details["transition_id"]).version == 4


def test_every_body_gets_a_fresh_transition_id() -> None:
    first, second = states.crashed_state("x"), states.crashed_state("x")
    assert first["state_details"] != second["state_details"]


@pytest.mark.parametrize("state_type", ["COMPLETED", "FAILED", "CANCELLED", "CRASHED", "crashed"])
def test_final_states(state_type: str) -> None:
    assert states.is_final(state_type)


@pytest.mark.parametrize("state_type", ["SCHEDULED", "PENDING", "RUNNING", "CANCELLING", "PAUSED"])
def test_non_final_states(state_type: str) -> None:
    assert not states.is_final(state_type)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        # systemd saw it
        (
            dict(status=137, result="oom-kill", memory_max=512 * MiB),
            "Process exited with status 137 (SIGKILL): killed by the kernel OOM killer at "
            "MemoryMax=512M",
        ),
        (
            dict(status=137, result="oom-kill"),
            "Process exited with status 137 (SIGKILL): killed by the kernel OOM killer",
        ),
        (
            dict(status=143, result="timeout", runtime_max=6 * 3600.0),
            "Process exited with status 143 (SIGTERM): RuntimeMaxSec=6h exceeded",
        ),
        (
            dict(status=1, result="timeout", runtime_max=90.0),
            "Process exited with status 1: RuntimeMaxSec=1m30s exceeded",
        ),
        (
            dict(status=143, result="timeout"),
            "Process exited with status 143 (SIGTERM): the unit's runtime limit was exceeded",
        ),
        (
            dict(status=134, result="core-dump"),
            "Process exited with status 134 (SIGABRT): dumped core (SIGABRT)",
        ),
        (dict(status=1, result="core-dump"), "Process exited with status 1: dumped core"),
        # guesses from the number (cgroup v1, or the scope already collected)
        (
            dict(status=143, runtime_max=60.0, elapsed=61.0),
            "Process exited with status 143 (SIGTERM): RuntimeMaxSec=1m exceeded",
        ),
        (
            dict(status=137, result="success", memory_max=512 * MiB),
            "Process exited with status 137 (SIGKILL): probably killed by the kernel OOM killer "
            "(MemoryMax=512M)",
        ),
        (
            dict(status=-9, memory_max=2 * 1024 * MiB),
            "Process exited with status 137 (SIGKILL): probably killed by the kernel OOM killer "
            "(MemoryMax=2G)",
        ),
        (
            dict(status=137),
            "Process exited with status 137 (SIGKILL): killed by SIGKILL (the kernel OOM killer, "
            "a stop of its unit or a manual kill)",
        ),
        (
            dict(status=143, runtime_max=60.0, elapsed=10.0),
            "Process exited with status 143 (SIGTERM): terminated by SIGTERM (a stop of its unit, "
            "a shutdown or a manual kill)",
        ),
        (
            dict(status=-15),
            "Process exited with status 143 (SIGTERM): terminated by SIGTERM (a stop of its unit, "
            "a shutdown or a manual kill)",
        ),
        (dict(status=127), "Process exited with status 127: command not found: /opt/x/bin/python"),
        (
            dict(status=126),
            "Process exited with status 126: command not executable (permission denied): "
            "/opt/x/bin/python",
        ),
        (
            dict(status=1),
            "Process exited with status 1: general error (usually an unhandled exception); "
            "see the flow run's output",
        ),
        (
            dict(status=2),
            "Process exited with status 2: usage error: the interpreter rejected its command line",
        ),
        (dict(status=247), "Process exited with status 247: terminated for high memory usage"),
        (
            dict(status=139, result="signal"),
            "Process exited with status 139 (SIGSEGV): killed by SIGSEGV",
        ),
        (dict(status=-11), "Process exited with status 139 (SIGSEGV): killed by SIGSEGV"),
        (dict(status=3, result="signal"), "Process exited with status 3: killed by a signal"),
        (dict(status=3), "Process exited with status 3"),
        (dict(status=3, result="exit-code"), "Process exited with status 3"),
        (
            dict(status=255),
            "Process exited with status 255: unknown status (the process vanished without "
            "recording its exit status)",
        ),
        (dict(status=0, result="success"), "Process exited with status 0"),
        (
            dict(status=143, cancelled=True),
            "Process exited with status 143 (SIGTERM): stopped by a cancellation",
        ),
    ],
)
def test_explain_exit(kwargs: dict[str, object], expected: str) -> None:
    status = kwargs.pop("status")
    result = kwargs.pop("result", None)
    assert explain(status, result, **kwargs) == expected  # type: ignore[arg-type]


def test_shell_status_converts_python_signal_codes() -> None:
    assert [states.shell_status(s) for s in (-9, -15, 0, 3, 137)] == [137, 143, 0, 3, 137]


@pytest.mark.parametrize(
    ("status", "result", "memory_max", "runtime_max", "elapsed", "kind", "limit_hit"),
    [
        (137, "oom-kill", 256 * MiB, None, None, states.ExitKind.OOM_KILLED, True),
        (137, None, 256 * MiB, None, None, states.ExitKind.PROBABLY_OOM, True),
        (137, None, None, None, None, states.ExitKind.KILLED, False),
        (143, "timeout", None, 60.0, None, states.ExitKind.RUNTIME_EXCEEDED, True),
        (137, None, None, 60.0, 61.0, states.ExitKind.RUNTIME_EXCEEDED, True),
        (143, None, None, 60.0, 5.0, states.ExitKind.TERMINATED, False),
        (3, None, 256 * MiB, 60.0, 61.0, states.ExitKind.NONE, False),
        (1, None, None, None, None, states.ExitKind.KNOWN_STATUS, False),
    ],
)
def test_the_cause_is_data_and_says_whether_a_limit_ended_the_run(
    status: int,
    result: str | None,
    memory_max: int | None,
    runtime_max: float | None,
    elapsed: float | None,
    kind: states.ExitKind,
    limit_hit: bool,
) -> None:
    cause = states.explain_exit(
        status,
        result,
        memory_max=memory_max,
        runtime_max=runtime_max,
        command="python",
        elapsed=elapsed,
    )
    assert (cause.kind, cause.limit_hit) == (kind, limit_hit)
