"""The wire format of Prefect's Attempt Control Session, and its outcomes as data.

Version 1: the supervisor sends one intent byte (`c` cancel, `r` reschedule, `q` relinquish)
and the engine commits it and answers `a`. Version 2 adds a hello (`\\x00PF` + version +
capabilities, answered with the selected ones) and outcome receipts (`\\x01` + 4-byte
big-endian length + JSON, at most 4096 bytes, acked with `\\x02`). control.py speaks it.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from typing import Literal
from uuid import UUID

PORT_ENV = "PREFECT__CONTROL_PORT"
TOKEN_ENV = "PREFECT__CONTROL_TOKEN"

Intent = Literal["cancel", "reschedule", "relinquish"]
INTENT_BYTES: dict[Intent, bytes] = {"cancel": b"c", "reschedule": b"r", "relinquish": b"q"}

ACK = b"a"
HELLO_PREFIX = b"\x00PF"
HELLO_SIZE = len(HELLO_PREFIX) + 2
RECEIPT_PREFIX = b"\x01"
RECEIPT_ACK = b"\x02"
MAX_RECEIPT_SIZE = 4096
LEGACY_VERSION = 1
CURRENT_VERSION = 2
RECEIPT_CAPABILITY = 1

TOKEN_BYTES = 32
MAX_TOKEN_LINE = 256
MAX_STATE_TYPE = 64


class SignalResult(enum.Enum):
    ACKNOWLEDGED = "acknowledged"  # the engine owns the intent: send SIGTERM now
    ALREADY_CONCLUDED = "already_concluded"  # the engine concluded first: see conclusion()
    NOT_ACKNOWLEDGED = "not_acknowledged"  # no evidence: use the signal-only fallback


class Disposition(enum.Enum):
    STATE_REPORTED = "STATE_REPORTED"
    ORCHESTRATION_ABORTED = "ORCHESTRATION_ABORTED"


@dataclass(frozen=True)
class ReportedState:
    """The state the engine says it reported to the server (Prefect's `StateType` value)."""

    id: UUID
    type: str
    name: str


@dataclass(frozen=True)
class EngineReceipt:
    """The engine concluded the attempt itself; `state` is set exactly for STATE_REPORTED."""

    disposition: Disposition
    state: ReportedState | None = None


@dataclass(frozen=True)
class AcknowledgedIntent:
    """The engine committed the supervisor's intent; the supervisor owns the next state."""

    intent: Intent


Conclusion = EngineReceipt | AcknowledgedIntent


@dataclass(frozen=True)
class ControlEndpoint:
    """Where one run's engine connects back; the token never appears in a repr."""

    port: int
    token: str = field(repr=False)

    def environment(self) -> dict[str, str]:
        return {PORT_ENV: str(self.port), TOKEN_ENV: self.token}


class ProtocolError(ValueError):
    """A peer broke the protocol (the message never quotes the peer's bytes)."""


def parse_receipt(payload: bytes) -> EngineReceipt:
    """A receipt's JSON body, validated strictly: unknown, missing or mistyped fields are errors."""
    try:
        body = json.loads(payload)
        disposition = Disposition(body["disposition"])
        if disposition is Disposition.ORCHESTRATION_ABORTED and set(body) == {"disposition"}:
            return EngineReceipt(disposition)
        state_type, state_name = body["state_type"], body["state_name"]
        if (
            disposition is not Disposition.STATE_REPORTED
            or set(body) != {"disposition", "state_id", "state_type", "state_name"}
            or not isinstance(state_type, str)
            or not isinstance(state_name, str)
            or not 0 < len(state_type) <= MAX_STATE_TYPE
        ):
            raise ValueError
        state = ReportedState(UUID(body["state_id"]), state_type, state_name)
    except (ValueError, TypeError, KeyError, AttributeError):
        raise ProtocolError("malformed receipt") from None
    return EngineReceipt(disposition, state)
