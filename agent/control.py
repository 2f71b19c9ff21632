"""The supervisor side of the engine's control channel (Prefect's Attempt Control Session).

Prefect 3.6.27+ engines given `PREFECT__CONTROL_PORT` and `PREFECT__CONTROL_TOKEN` connect back to
127.0.0.1 once their SIGTERM bridge is armed and send the token and a newline. Version 1: the
supervisor sends one intent byte (`c` cancel, `r` reschedule, `q` relinquish), the engine commits
it and answers `a`, and a later SIGTERM ends the run as that intent (cancel: no CRASHED). Version
2 adds a hello (`\\x00PF` + version + capabilities, answered with the selected ones) and outcome
receipts (`\\x01` + 4-byte big-endian length + JSON, at most 4096 bytes, acked with `\\x02`).
The first terminal exchange (an acked intent or a receipt) is the attempt's conclusion. Without
one the caller falls back to signals. Tokens are single use and never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import secrets
import socket
import time
from dataclasses import dataclass, field
from uuid import UUID

from agent.control_protocol import (
    ACK,
    CURRENT_VERSION,
    HELLO_PREFIX,
    HELLO_SIZE,
    INTENT_BYTES,
    LEGACY_VERSION,
    MAX_RECEIPT_SIZE,
    MAX_TOKEN_LINE,
    RECEIPT_ACK,
    RECEIPT_CAPABILITY,
    RECEIPT_PREFIX,
    TOKEN_BYTES,
    AcknowledgedIntent,
    Conclusion,
    ControlEndpoint,
    EngineReceipt,
    Intent,
    ProtocolError,
    ReportedState,
    SignalResult,
    parse_receipt,
)

__all__ = [
    "AcknowledgedIntent",
    "Conclusion",
    "ControlChannel",
    "ControlEndpoint",
    "EngineReceipt",
    "ReportedState",
    "SignalResult",
]

log = logging.getLogger("agent.control")


@dataclass(eq=False)
class _Registration:
    flow_run_id: UUID
    token: bytes | None  # None once an engine has used it
    writer: asyncio.StreamWriter | None = None  # the live session, if any
    version: int | None = None  # what the engine's hello selected; None: no hello (yet)
    conclusion: Conclusion | None = None
    pending_intent: Intent | None = None
    intent_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    changed: asyncio.Event = field(default_factory=asyncio.Event)  # concluded or session ended


class ControlChannel:
    """One loopback listener per agent; an async context manager.

    Every connection is a task of the listener's own TaskGroup, so leaving the context closes
    all of them before it returns. When the listener cannot bind, `register` returns None and
    the agent cancels with signals only.
    """

    def __init__(
        self,
        *,
        ack_timeout: float = 2.0,
        peer_timeout: float = 5.0,  # for the token line, and for the rest of a started frame
        max_handshakes: int = 64,
        rejection_log_interval: float = 60.0,
    ) -> None:
        self._ack_timeout = ack_timeout
        self._peer_timeout = peer_timeout
        self._max_handshakes = max_handshakes
        self._rejection_log_interval = rejection_log_interval
        self._next_rejection_log = 0.0
        self._rejections_unlogged = 0
        self._registrations: dict[UUID, _Registration] = {}
        self._listener: socket.socket | None = None
        self._serve_task: asyncio.Task[None] | None = None
        # A connection task cancelled before its first step cannot close its own socket.
        self._accepted: set[socket.socket] = set()
        self._handshakes = 0
        self.port: int | None = None

    async def __aenter__(self) -> ControlChannel:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.bind(("127.0.0.1", 0))
            listener.listen(128)
            listener.setblocking(False)
        except OSError as exc:
            listener.close()
            log.warning("control channel unavailable, cancelling with signals only: %s", exc)
            return self
        self._listener = listener
        self.port = int(listener.getsockname()[1])
        self._serve_task = asyncio.create_task(self._serve(listener), name="control-channel")
        log.debug("control channel listening on 127.0.0.1:%d", self.port)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        task, self._serve_task = self._serve_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for connection in self._accepted:
            connection.close()
        self._accepted.clear()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self.port = None
        for registration in self._registrations.values():
            self._end_session(registration)
        self._registrations.clear()

    def register(self, flow_run_id: UUID) -> ControlEndpoint | None:
        """A fresh single-use token for this run's next engine (None: no listener)."""
        if self.port is None:
            return None
        self.unregister(flow_run_id)
        token = secrets.token_hex(TOKEN_BYTES)
        self._registrations[flow_run_id] = _Registration(flow_run_id, token.encode("ascii"))
        return ControlEndpoint(self.port, token)

    def unregister(self, flow_run_id: UUID) -> Conclusion | None:
        """Forget the run (its token stops working, its session closes); its conclusion, if any."""
        registration = self._registrations.pop(flow_run_id, None)
        if registration is None:
            return None
        registration.token = None
        self._end_session(registration)
        return registration.conclusion

    def conclusion(self, flow_run_id: UUID) -> Conclusion | None:
        """The first terminal exchange: a receipt or an acknowledged intent (None: neither yet)."""
        registration = self._registrations.get(flow_run_id)
        return registration.conclusion if registration is not None else None

    def protocol_version(self, flow_run_id: UUID) -> int | None:
        """The live session's protocol (1, or 2 once a hello selected it); None: not connected."""
        registration = self._registrations.get(flow_run_id)
        if registration is None or registration.writer is None:
            return None
        return registration.version or LEGACY_VERSION

    async def signal(self, flow_run_id: UUID, intent: Intent) -> SignalResult:
        """Send `intent` and wait (bounded) for the engine's ack.

        At most one intent is sent per session: a concurrent or later call waits for the first
        and then reports ALREADY_CONCLUDED (there is a conclusion) or NOT_ACKNOWLEDGED.
        """
        registration = self._registrations.get(flow_run_id)
        if registration is None:
            return SignalResult.NOT_ACKNOWLEDGED
        async with registration.intent_lock:
            writer = registration.writer
            if registration.conclusion or not writer or registration.pending_intent:
                return self._signal_result(registration)
            registration.pending_intent = intent
            registration.changed.clear()
            try:
                async with asyncio.timeout(self._ack_timeout):
                    writer.write(INTENT_BYTES[intent])
                    await writer.drain()
                    await registration.changed.wait()
            except (TimeoutError, OSError):
                pass
            return self._signal_result(registration, delivered=intent)

    def _signal_result(
        self, registration: _Registration, delivered: Intent | None = None
    ) -> SignalResult:
        if delivered is not None and registration.conclusion == AcknowledgedIntent(delivered):
            return SignalResult.ACKNOWLEDGED
        if registration.conclusion is not None:
            return SignalResult.ALREADY_CONCLUDED
        if delivered is not None and registration.writer is not None:
            # A late ack must not become a conclusion once the caller has fallen back.
            log.debug(
                "engine did not acknowledge %s within %.1fs",
                delivered,
                self._ack_timeout,
                extra={"flow_run_id": str(registration.flow_run_id)},
            )
            self._end_session(registration)
        return SignalResult.NOT_ACKNOWLEDGED

    def _end_session(self, registration: _Registration) -> None:
        writer, registration.writer = registration.writer, None
        if writer is not None:
            writer.close()
        registration.changed.set()

    async def _serve(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        async with asyncio.TaskGroup() as group:
            while True:
                try:
                    connection, _address = await loop.sock_accept(listener)
                except OSError as exc:
                    # Out of file descriptors and the like: keep listening.
                    log.warning("control channel: accept failed: %s", exc)
                    await asyncio.sleep(0.5)
                    continue
                if self._handshakes >= self._max_handshakes:
                    connection.close()
                    self._reject("too many unauthenticated connections")
                    continue
                self._handshakes += 1
                self._accepted.add(connection)
                group.create_task(self._connection(connection))

    async def _connection(self, connection: socket.socket) -> None:
        """Authenticate, then serve one session; never raises (the TaskGroup must survive)."""
        writer: asyncio.StreamWriter | None = None
        registration: _Registration | None = None
        try:
            try:
                reader, writer = await asyncio.open_connection(
                    sock=connection, limit=MAX_RECEIPT_SIZE + 64
                )
                async with asyncio.timeout(self._peer_timeout):
                    line = await reader.readuntil(b"\n")
            except (TimeoutError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                self._reject("no token line")
                return
            finally:
                self._handshakes -= 1
            registration = self._claim(line.strip()) if len(line) <= MAX_TOKEN_LINE else None
            if registration is None:
                self._reject("unknown or already used token")
                return
            registration.writer = writer
            registration.changed.clear()
            await self._converse(registration, writer, reader)
        except ProtocolError as exc:
            if registration is None:
                self._reject(str(exc))
            else:
                log.warning(
                    "control channel: the engine broke the protocol (%s); session closed",
                    exc,
                    extra={"flow_run_id": str(registration.flow_run_id)},
                )
        except (OSError, asyncio.IncompleteReadError):
            pass  # the engine went away
        except Exception:
            log.exception("control channel: unexpected error in a session")
        finally:
            if registration is not None and registration.writer is writer:
                self._end_session(registration)
            self._accepted.discard(connection)
            if writer is None:
                connection.close()
            else:
                await self._close(writer)

    @staticmethod
    async def _close(writer: asyncio.StreamWriter) -> None:
        writer.close()
        try:
            async with asyncio.timeout(1.0):
                await writer.wait_closed()
        except (TimeoutError, OSError):
            writer.transport.abort()

    def _reject(self, reason: str) -> None:
        """A hostile local peer must not flood the journal: one warning per interval, counted."""
        now = time.monotonic()
        if now < self._next_rejection_log:
            self._rejections_unlogged += 1
            return
        more = f" (and {self._rejections_unlogged} more)" if self._rejections_unlogged else ""
        log.warning("control channel: closed a connection: %s%s", reason, more)
        self._next_rejection_log = now + self._rejection_log_interval
        self._rejections_unlogged = 0

    def _claim(self, presented: bytes) -> _Registration | None:
        found = None
        for registration in self._registrations.values():
            token = registration.token
            # Every token is compared, so the time taken says nothing about which one matched.
            if token is not None and hmac.compare_digest(token, presented):
                found = registration
        if found is not None:
            found.token = None
        return found

    async def _frame(self, reader: asyncio.StreamReader, size: int) -> bytes:
        """The rest of a frame whose first byte arrived: a stalled peer is cut off."""
        try:
            async with asyncio.timeout(self._peer_timeout):
                return await reader.readexactly(size)
        except (TimeoutError, asyncio.IncompleteReadError):
            raise ProtocolError("incomplete frame") from None

    async def _converse(
        self,
        registration: _Registration,
        writer: asyncio.StreamWriter,
        reader: asyncio.StreamReader,
    ) -> None:
        """Answer the hello, then wait for the terminal exchange (no time limit: runs are long)."""
        context = {"flow_run_id": str(registration.flow_run_id)}
        log.debug("engine connected to the control channel", extra=context)
        while True:
            first = await reader.read(1)
            if not first or registration.writer is not writer:
                return
            if first == HELLO_PREFIX[:1] and registration.version is None:
                frame = first + await self._frame(reader, HELLO_SIZE - 1)
                if not frame.startswith(HELLO_PREFIX):
                    raise ProtocolError("malformed hello")
                receipts = frame[-2] >= CURRENT_VERSION and bool(frame[-1] & RECEIPT_CAPABILITY)
                registration.version = CURRENT_VERSION if receipts else LEGACY_VERSION
                capabilities = RECEIPT_CAPABILITY if receipts else 0
                writer.write(HELLO_PREFIX + bytes((registration.version, capabilities)))
                await writer.drain()
                log.debug("control protocol %d", registration.version, extra=context)
            elif first == ACK:
                if registration.pending_intent is None:
                    raise ProtocolError("acknowledgement without an intent")
                self._conclude(registration, AcknowledgedIntent(registration.pending_intent))
                return
            elif first == RECEIPT_PREFIX and registration.version == CURRENT_VERSION:
                size = int.from_bytes(await self._frame(reader, 4), "big")
                if size > MAX_RECEIPT_SIZE:
                    raise ProtocolError("receipt is too large")
                receipt = parse_receipt(await self._frame(reader, size))
                if registration.writer is writer and self._conclude(registration, receipt):
                    writer.write(RECEIPT_ACK)
                    await writer.drain()
                return
            else:
                raise ProtocolError("unexpected message")

    def _conclude(self, registration: _Registration, conclusion: Conclusion) -> bool:
        """Record the first terminal exchange; later ones are ignored."""
        if registration.conclusion is not None:
            return False
        registration.conclusion = conclusion
        registration.changed.set()
        context = {"flow_run_id": str(registration.flow_run_id)}
        log.debug("control session concluded: %s", conclusion, extra=context)
        return True
