"""State bodies the agent proposes, the final-state rule, and why a run's process ended.

Bodies follow Prefect 3.8's `StateCreate` (prefect/server/schemas/actions.py): `type`, `name`,
`message`, `state_details`. Each carries a fresh `transition_id`, which makes a retried proposal
idempotent on the server.

`explain_exit` turns an exit status (shell convention, 128+N for signal N) plus the systemd unit's
`Result` into an `ExitCause`: data the supervisor decides on, and the one-line message of a
Crashed state. See docs/launcher.md for the decision table.
"""

from __future__ import annotations

import enum
import signal
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from agent.schemas import FlowRun, State, StateType
from agent.values import format_duration, format_size

CANCELLED_MESSAGE = "Flow run was cancelled successfully."
# A run that waits for a slot of a concurrency limit (Prefect's name, a SCHEDULED type).
AWAITING_SLOT = "AwaitingConcurrencySlot"

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


def awaiting_slot_state(scheduled_time: datetime, message: str) -> dict[str, Any]:
    """SCHEDULED again, for a claim over a concurrency limit (Prefect's own name for it)."""
    state = _state("SCHEDULED", AWAITING_SLOT, message)
    state["state_details"]["scheduled_time"] = scheduled_time.isoformat()
    return state


def crashed_state(message: str) -> dict[str, Any]:
    return _state("CRASHED", "Crashed", message)


def cancelled_state(message: str = CANCELLED_MESSAGE) -> dict[str, Any]:
    return _state("CANCELLED", "Cancelled", message)


def is_final(state_type: str) -> bool:
    return state_type.upper() in _FINAL


def left_in_flight(flow_run: FlowRun) -> bool:
    """Whether a run whose process has ended was left mid-flight, i.e. crashed.

    PENDING and RUNNING are. So is an in-process retry (AwaitingRetry with `retry_type`
    in_process): the engine that was to run it again is gone. Not so: a final state; PAUSED
    (Suspended: the engine exits 0 on purpose and a resume reschedules the run); any other
    SCHEDULED (Resuming, a rescheduled retry: another start will pick it up); CANCELLING (the
    cancellation path settles it).
    """
    state_type = flow_run.state_type
    # No state at all is a server answer nobody can trust: the proposal lets the server decide
    # (it refuses to move a final run, force=false).
    if state_type in (None, StateType.PENDING, StateType.RUNNING):
        return True
    return state_type is StateType.SCHEDULED and flow_run.retrying_in_process


def describe(state: State | None) -> str:
    """`SCHEDULED (AwaitingRetry)`, for log lines."""
    if state is None:
        return "without a state"
    name = f" ({state.name})" if state.name and state.name.upper() != state.type.value else ""
    return f"{state.type.value}{name}"


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


class ExitKind(enum.Enum):
    """Why a run's process ended, as far as the agent can tell."""

    NONE = "none"  # nothing more to say (e.g. status 0, or an unknown status)
    CANCELLED = "cancelled"
    OOM_KILLED = "oom-killed"  # systemd saw the kernel's OOM kill
    PROBABLY_OOM = "probably-oom"  # SIGKILL under a MemoryMax where systemd can't tell
    RUNTIME_EXCEEDED = "runtime-exceeded"
    CORE_DUMP = "core-dump"
    KILLED = "killed"  # SIGKILL without a memory limit to blame
    TERMINATED = "terminated"  # SIGTERM
    COMMAND_NOT_FOUND = "command-not-found"
    NOT_EXECUTABLE = "not-executable"
    KNOWN_STATUS = "known-status"  # a status with a fixed meaning (_FIXED)
    SIGNAL = "signal"


# The kinds where one of the run's own limits ended it: the agent's message, which names the
# limit, then replaces the engine's own "aborted by a termination signal".
LIMIT_KINDS = frozenset({ExitKind.OOM_KILLED, ExitKind.PROBABLY_OOM, ExitKind.RUNTIME_EXCEEDED})


@dataclass(frozen=True)
class ExitCause:
    """A structured explanation of an exit; `message()` renders the Crashed state's line."""

    status: int  # shell convention
    signal: int | None  # the signal behind the status, if it looks like one
    kind: ExitKind
    limit: str | None = None  # the limit that applied, as systemd spells it: "MemoryMax=512M"
    command: str | None = None  # for COMMAND_NOT_FOUND and NOT_EXECUTABLE

    @property
    def limit_hit(self) -> bool:
        return self.kind in LIMIT_KINDS and self.status != 0

    def message(self) -> str:
        """`Process exited with status 137 (SIGKILL): killed by the kernel OOM killer at
        MemoryMax=512M`."""
        name = signal_name(self.signal) if self.signal is not None else None
        head = f"Process exited with status {self.status}" + (f" ({name})" if name else "")
        cause = self._cause_text()
        return f"{head}: {cause}" if cause else head

    def _cause_text(self) -> str:
        kind, limit = self.kind, self.limit
        if kind is ExitKind.CANCELLED:
            return "stopped by a cancellation"
        if kind is ExitKind.OOM_KILLED:
            return (
                f"killed by the kernel OOM killer at {limit}"
                if limit
                else ("killed by the kernel OOM killer")
            )
        if kind is ExitKind.RUNTIME_EXCEEDED:
            return f"{limit} exceeded" if limit else "the unit's runtime limit was exceeded"
        if kind is ExitKind.CORE_DUMP:
            sig = signal_name(self.signal) if self.signal is not None else None
            return f"dumped core ({sig})" if sig else "dumped core"
        if kind is ExitKind.PROBABLY_OOM:
            return f"probably killed by the kernel OOM killer ({limit})"
        if kind is ExitKind.KILLED:
            return "killed by SIGKILL (the kernel OOM killer, a stop of its unit or a manual kill)"
        if kind is ExitKind.TERMINATED:
            return "terminated by SIGTERM (a stop of its unit, a shutdown or a manual kill)"
        if kind is ExitKind.COMMAND_NOT_FOUND:
            return f"command not found: {self.command}"
        if kind is ExitKind.NOT_EXECUTABLE:
            return f"command not executable (permission denied): {self.command}"
        if kind is ExitKind.KNOWN_STATUS:
            return _FIXED[self.status]
        if kind is ExitKind.SIGNAL:
            if self.signal is None:
                return "killed by a signal"
            name = signal_name(self.signal)
            return f"killed by {name}" if name else f"killed by signal {self.signal}"
        return ""


def explain_exit(
    status: int,
    unit_result: str | None,
    *,
    memory_max: int | None,
    runtime_max: float | None,
    command: str,
    cancelled: bool = False,
    elapsed: float | None = None,
) -> ExitCause:
    """Why the run's process ended with `status` (shell convention, or Python's -N).

    `unit_result` is the systemd unit's Result when it could still be read (None when unknown:
    the process launcher, or a scope already garbage-collected). `elapsed` (seconds the run
    lived), when known, lets a runtime-limit kill be named even when Result is gone.
    """
    status = shell_status(status)
    number = _signal_of(status)
    memory = f"MemoryMax={format_size(memory_max)}" if memory_max is not None else None
    runtime = f"RuntimeMaxSec={format_duration(runtime_max)}" if runtime_max else None

    def cause(kind: ExitKind, limit: str | None = None) -> ExitCause:
        return ExitCause(status, number, kind, limit, command)

    killed = number in (signal.SIGKILL, signal.SIGTERM)
    if cancelled:
        return cause(ExitKind.CANCELLED)
    # What systemd saw wins over guesses from the number.
    if unit_result == "oom-kill":
        return cause(ExitKind.OOM_KILLED, memory)
    if unit_result == "timeout":
        return cause(ExitKind.RUNTIME_EXCEEDED, runtime)
    if unit_result == "core-dump":
        return cause(ExitKind.CORE_DUMP)
    if killed and runtime_max and elapsed is not None and elapsed >= runtime_max:
        return cause(ExitKind.RUNTIME_EXCEEDED, runtime)
    if status == 137 or number == signal.SIGKILL:
        # On cgroup v1 (and when the scope is already collected) Result says nothing about OOM.
        return cause(ExitKind.PROBABLY_OOM, memory) if memory else cause(ExitKind.KILLED)
    if number == signal.SIGTERM:
        return cause(ExitKind.TERMINATED)
    if status == 127:
        return cause(ExitKind.COMMAND_NOT_FOUND)
    if status == 126:
        return cause(ExitKind.NOT_EXECUTABLE)
    if status in _FIXED:
        return cause(ExitKind.KNOWN_STATUS)
    if number is not None:
        return cause(ExitKind.SIGNAL)
    if unit_result == "signal":
        return ExitCause(status, None, ExitKind.SIGNAL)
    return cause(ExitKind.NONE)
