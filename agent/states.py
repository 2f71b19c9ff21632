"""State bodies the agent proposes, the final-state rule, and why a run's process ended.

Bodies follow Prefect 3.8's `StateCreate` (prefect/server/schemas/actions.py): `type`, `name`,
`message`, `state_details`. Each carries a fresh `transition_id`, which makes a retried proposal
idempotent on the server.

`explain_exit` turns an exit status (shell convention, 128+N for signal N) plus the systemd unit's
`Result` into the one-line message of a Crashed state. See docs/launcher.md for the decision table.
"""

from __future__ import annotations

import signal
import uuid
from typing import Any

from agent.values import format_duration, format_size

CANCELLED_MESSAGE = "Flow run was cancelled successfully."

_FINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED", "CRASHED"})

# Exit statuses with a fixed meaning (Prefect's infrastructure exit-code table, shell conventions).
_FIXED = {
    1: "general error (usually an unhandled exception); see the flow run's output",
    2: "usage error: the interpreter rejected its command line",
    247: "terminated for high memory usage",
    # Also what recovery reports (recovery.UNKNOWN_EXIT_STATUS) for a run that left no record.
    255: "unknown status (the process vanished without recording its exit status)",
}


def _state(state_type: str, name: str, message: str | None) -> dict[str, Any]:
    return {
        "type": state_type,
        "name": name,
        "message": message,
        "state_details": {"transition_id": str(uuid.uuid4())},
    }


def pending_state() -> dict[str, Any]:
    return _state("PENDING", "Pending", None)


def crashed_state(message: str) -> dict[str, Any]:
    return _state("CRASHED", "Crashed", message)


def cancelled_state(message: str = CANCELLED_MESSAGE) -> dict[str, Any]:
    return _state("CANCELLED", "Cancelled", message)


def is_final(state_type: str) -> bool:
    return state_type.upper() in _FINAL


def shell_status(status: int) -> int:
    """Python's -N (killed by signal N) as the shell's 128+N; others unchanged."""
    return 128 - status if status < 0 else status


def signal_name(number: int) -> str | None:
    try:
        return signal.Signals(number).name
    except ValueError:
        return None


def _signal_of(status: int) -> int | None:
    """The signal behind a shell-convention status, if it looks like one."""
    if 128 < status <= 128 + 64 and status != 255:
        return status - 128
    return None


def explain_exit(
    status: int,
    unit_result: str | None,
    *,
    memory_max: int | None,
    runtime_max: float | None,
    command: str,
    cancelled: bool = False,
    elapsed: float | None = None,
) -> str:
    """One line: `Process exited with status 137 (SIGKILL): killed by the kernel OOM killer at
    MemoryMax=512M`.

    `unit_result` is the systemd unit's Result when it could still be read (None when unknown:
    the process launcher, or a scope already garbage-collected). `elapsed` (seconds the run
    lived), when known, lets a runtime-limit kill be named even when Result is gone.
    """
    status = shell_status(status)
    number = _signal_of(status)
    name = signal_name(number) if number is not None else None
    head = f"Process exited with status {status}" + (f" ({name})" if name else "")
    cause = _cause(status, number, unit_result, memory_max=memory_max,
                   runtime_max=runtime_max, command=command, cancelled=cancelled,
                   elapsed=elapsed)
    return f"{head}: {cause}" if cause else head


def _cause(
    status: int,
    number: int | None,
    unit_result: str | None,
    *,
    memory_max: int | None,
    runtime_max: float | None,
    command: str,
    cancelled: bool,
    elapsed: float | None,
) -> str:
    limit = f"MemoryMax={format_size(memory_max)}" if memory_max is not None else None
    runtime = f"RuntimeMaxSec={format_duration(runtime_max)}" if runtime_max else None
    killed = number in (signal.SIGKILL, signal.SIGTERM)
    if cancelled:
        return "stopped by a cancellation"
    # What systemd saw wins over guesses from the number.
    if unit_result == "oom-kill":
        return (f"killed by the kernel OOM killer at {limit}" if limit
                else "killed by the kernel OOM killer")
    if unit_result == "timeout":
        return f"{runtime} exceeded" if runtime else "the unit's runtime limit was exceeded"
    if unit_result == "core-dump":
        sig = signal_name(number) if number is not None else None
        return f"dumped core ({sig})" if sig else "dumped core"
    if killed and runtime_max and elapsed is not None and elapsed >= runtime_max:
        return f"{runtime} exceeded"
    if status == 137 or number == signal.SIGKILL:
        # On cgroup v1 (and when the scope is already collected) Result says nothing about OOM.
        if limit:
            return f"probably killed by the kernel OOM killer ({limit})"
        return "killed by SIGKILL (the kernel OOM killer, a stop of its unit or a manual kill)"
    if number == signal.SIGTERM:
        return "terminated by SIGTERM (a stop of its unit, a shutdown or a manual kill)"
    if status == 127:
        return f"command not found: {command}"
    if status == 126:
        return f"command not executable (permission denied): {command}"
    if status in _FIXED:
        return _FIXED[status]
    if number is not None:
        name = signal_name(number)
        return f"killed by {name}" if name else f"killed by signal {number}"
    if unit_result == "signal":
        return "killed by a signal"
    return ""
