"""The control channel against a fake engine speaking the protocol over real loopback sockets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import struct
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvloop

from agent.control import ControlChannel
from agent.control_protocol import (
    HELLO_PREFIX,
    MAX_RECEIPT_SIZE,
    PORT_ENV,
    RECEIPT_ACK,
    TOKEN_ENV,
    AcknowledgedIntent,
    ControlEndpoint,
    Disposition,
    EngineReceipt,
    ProtocolError,
    ReportedState,
    SignalResult,
    parse_receipt,
)

# A lost wake-up or a leaked connection must fail fast, not hang the suite.
pytestmark = pytest.mark.timeout(30)

ACK_TIMEOUT = 0.5
PEER_TIMEOUT = 0.5
LONG = 20.0  # a bound that must not be waited for: finishing well within it shows it was not
STATE_ID = uuid.UUID("5e2c8a4e-1f0b-4b8e-9a53-0d7f7c1a2b3c")
COMPLETED = {
    "disposition": "STATE_REPORTED",
    "state_id": str(STATE_ID),
    "state_type": "COMPLETED",
    "state_name": "Completed",
}


async def eventually(predicate: Callable[[], bool], within: float = 5.0) -> None:
    async with asyncio.timeout(within):
        while not predicate():
            await asyncio.sleep(0.01)


def receipt_frame(body: dict[str, Any] | bytes) -> bytes:
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    return b"\x01" + struct.pack("!I", len(payload)) + payload


class FakeEngine:
    """The engine's end of one session, driven step by step by the test."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(
        cls, port: int, token: str | bytes, *, hello: tuple[int, int] | None = (2, 1)
    ) -> FakeEngine:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        line = token.encode() if isinstance(token, str) else token
        writer.write(line + b"\n" + (HELLO_PREFIX + bytes(hello) if hello else b""))
        await writer.drain()
        return cls(reader, writer)

    async def read(self, size: int) -> bytes:
        async with asyncio.timeout(5.0):
            return await self.reader.readexactly(size)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def closed_by_peer(self, within: float = 5.0) -> bytes:
        """Everything the channel still sent, once it has closed the connection (else a timeout)."""
        async with asyncio.timeout(within):
            try:
                return await self.reader.read()
            except ConnectionResetError:
                return b""

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


@dataclass
class Harness:
    channel: ControlChannel
    tokens: list[str] = field(default_factory=list)
    engines: list[FakeEngine] = field(default_factory=list)

    @property
    def port(self) -> int:
        assert self.channel.port is not None
        return self.channel.port

    def register(self) -> tuple[uuid.UUID, ControlEndpoint]:
        flow_run_id = uuid.uuid4()
        endpoint = self.channel.register(flow_run_id)
        assert endpoint is not None
        self.tokens.append(endpoint.token)
        return flow_run_id, endpoint

    async def engine(
        self, token: str | bytes, *, hello: tuple[int, int] | None = (2, 1)
    ) -> FakeEngine:
        engine = await FakeEngine.connect(self.port, token, hello=hello)
        self.engines.append(engine)
        return engine

    async def connected(
        self, *, hello: tuple[int, int] | None = (2, 1)
    ) -> tuple[uuid.UUID, FakeEngine]:
        """A registered run whose engine has connected (and, with a hello, negotiated)."""
        flow_run_id, endpoint = self.register()
        engine = await self.engine(endpoint.token, hello=hello)
        if hello is not None:
            await engine.read(5)
        await eventually(lambda: self.channel.protocol_version(flow_run_id) is not None)
        return flow_run_id, engine


@pytest.fixture
async def harness(
    request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> AsyncIterator[Harness]:
    """A listener with short bounds; indirect parametrization overrides them."""
    caplog.set_level(logging.DEBUG, logger="agent.control")
    options: dict[str, Any] = {"ack_timeout": ACK_TIMEOUT, "peer_timeout": PEER_TIMEOUT}
    options.update(getattr(request, "param", {}))
    async with ControlChannel(**options) as channel:
        harness = Harness(channel)
        try:
            yield harness
        finally:
            for engine in harness.engines:
                await engine.close()
    logged = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert harness.tokens and not any(token in logged for token in harness.tokens)


async def test_version_two_hello_is_answered_with_receipts() -> None:
    async with ControlChannel() as channel:
        assert channel.port is not None
        flow_run_id = uuid.uuid4()
        endpoint = channel.register(flow_run_id)
        assert endpoint is not None
        engine = await FakeEngine.connect(channel.port, endpoint.token, hello=(2, 1))
        assert await engine.read(5) == b"\x00PF\x02\x01"
        assert channel.protocol_version(flow_run_id) == 2
        await engine.close()


@pytest.mark.parametrize(
    ("offer", "answer"),
    [
        ((1, 0), b"\x00PF\x01\x00"),
        ((2, 0), b"\x00PF\x01\x00"),  # version 2 without receipts is version 1
        ((7, 3), b"\x00PF\x02\x01"),  # a newer engine gets what this side speaks
    ],
)
async def test_hello_selects_what_both_sides_support(
    harness: Harness, offer: tuple[int, int], answer: bytes
) -> None:
    flow_run_id, endpoint = harness.register()
    engine = await harness.engine(endpoint.token, hello=offer)
    assert await engine.read(5) == answer
    assert harness.channel.protocol_version(flow_run_id) == answer[3]


async def test_version_one_engine_without_hello_is_cancelled(harness: Harness) -> None:
    flow_run_id, engine = await harness.connected(hello=None)
    assert harness.channel.protocol_version(flow_run_id) == 1

    signal = asyncio.create_task(harness.channel.signal(flow_run_id, "cancel"))
    assert await engine.read(1) == b"c"
    await engine.send(b"a")
    assert await signal is SignalResult.ACKNOWLEDGED
    assert harness.channel.conclusion(flow_run_id) == AcknowledgedIntent("cancel")


async def test_version_one_session_refuses_receipts(harness: Harness) -> None:
    flow_run_id, engine = await harness.connected(hello=(1, 0))
    await engine.send(receipt_frame(COMPLETED))
    assert await engine.closed_by_peer() == b""
    assert harness.channel.conclusion(flow_run_id) is None


async def test_cancel_acknowledged_concludes_and_ends_the_session(harness: Harness) -> None:
    flow_run_id, engine = await harness.connected()
    signal = asyncio.create_task(harness.channel.signal(flow_run_id, "cancel"))
    assert await engine.read(1) == b"c"
    await engine.send(b"a")
    assert await signal is SignalResult.ACKNOWLEDGED
    assert harness.channel.conclusion(flow_run_id) == AcknowledgedIntent("cancel")
    assert await engine.closed_by_peer() == b""
    # A second request delivers nothing new: the attempt is concluded.
    assert await harness.channel.signal(flow_run_id, "cancel") is SignalResult.ALREADY_CONCLUDED
    assert harness.channel.unregister(flow_run_id) == AcknowledgedIntent("cancel")
    assert harness.channel.conclusion(flow_run_id) is None


@pytest.mark.parametrize(("intent", "byte"), [("reschedule", b"r"), ("relinquish", b"q")])
async def test_other_intents_use_their_own_byte(harness: Harness, intent: Any, byte: bytes) -> None:
    flow_run_id, engine = await harness.connected()
    signal = asyncio.create_task(harness.channel.signal(flow_run_id, intent))
    assert await engine.read(1) == byte
    await engine.send(b"a")
    assert await signal is SignalResult.ACKNOWLEDGED
    assert harness.channel.conclusion(flow_run_id) == AcknowledgedIntent(intent)


async def test_no_ack_within_the_bound_falls_back_and_a_late_ack_is_ignored(
    harness: Harness,
) -> None:
    flow_run_id, engine = await harness.connected()
    loop = asyncio.get_running_loop()
    started = loop.time()
    signal = asyncio.create_task(harness.channel.signal(flow_run_id, "cancel"))
    assert await engine.read(1) == b"c"
    assert await signal is SignalResult.NOT_ACKNOWLEDGED
    assert loop.time() - started >= ACK_TIMEOUT
    # The session is gone, so the fallback cannot be overtaken by a late ack.
    assert await engine.closed_by_peer() == b""
    with pytest.raises(OSError):
        for _ in range(50):  # the reset shows on a write after the peer's close
            await engine.send(b"a")
            await asyncio.sleep(0.01)
    assert harness.channel.conclusion(flow_run_id) is None
    assert await harness.channel.signal(flow_run_id, "cancel") is SignalResult.NOT_ACKNOWLEDGED


@pytest.mark.parametrize("harness", [{"ack_timeout": LONG}], indirect=True)
async def test_engine_that_hangs_up_instead_of_acking_is_not_acknowledged_at_once(
    harness: Harness,
) -> None:
    # What the real engine does when its SIGTERM bridge is no longer armed.
    flow_run_id, engine = await harness.connected()
    signal = asyncio.create_task(harness.channel.signal(flow_run_id, "cancel"))
    assert await engine.read(1) == b"c"
    started = asyncio.get_running_loop().time()
    await engine.close()
    assert await signal is SignalResult.NOT_ACKNOWLEDGED
    assert asyncio.get_running_loop().time() - started < LONG / 2


async def test_receipt_then_intent_is_already_concluded(harness: Harness) -> None:
    flow_run_id, engine = await harness.connected()
    await engine.send(receipt_frame(COMPLETED))
    assert await engine.read(1) == RECEIPT_ACK
    expected = EngineReceipt(
        Disposition.STATE_REPORTED, ReportedState(STATE_ID, "COMPLETED", "Completed")
    )
    assert harness.channel.conclusion(flow_run_id) == expected
    assert await harness.channel.signal(flow_run_id, "cancel") is SignalResult.ALREADY_CONCLUDED
    # No intent byte followed the receipt's ack.
    assert await engine.closed_by_peer() == b""
    assert harness.channel.unregister(flow_run_id) == expected


async def test_intent_then_receipt_in_flight_is_already_concluded(harness: Harness) -> None:
    # The engine had started its receipt when the intent arrived, so it ignores the intent.
    flow_run_id, engine = await harness.connected()
    signal = asyncio.create_task(harness.channel.signal(flow_run_id, "cancel"))
    assert await engine.read(1) == b"c"
    await engine.send(receipt_frame({"disposition": "ORCHESTRATION_ABORTED"}))
    assert await engine.read(1) == RECEIPT_ACK
    assert await signal is SignalResult.ALREADY_CONCLUDED
    assert harness.channel.conclusion(flow_run_id) == EngineReceipt(
        Disposition.ORCHESTRATION_ABORTED
    )


async def test_concurrent_cancels_send_one_intent(harness: Harness) -> None:
    flow_run_id, engine = await harness.connected()
    first = asyncio.create_task(harness.channel.signal(flow_run_id, "cancel"))
    second = asyncio.create_task(harness.channel.signal(flow_run_id, "cancel"))
    assert await engine.read(1) == b"c"
    await engine.send(b"a")
    assert await first is SignalResult.ACKNOWLEDGED
    assert await second is SignalResult.ALREADY_CONCLUDED
    assert await engine.closed_by_peer() == b""


@pytest.mark.parametrize("harness", [{"ack_timeout": LONG}], indirect=True)
async def test_signal_without_a_connected_engine_is_not_acknowledged_at_once(
    harness: Harness,
) -> None:
    flow_run_id, _endpoint = harness.register()
    unknown = uuid.uuid4()
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await harness.channel.signal(flow_run_id, "cancel") is SignalResult.NOT_ACKNOWLEDGED
    assert await harness.channel.signal(unknown, "cancel") is SignalResult.NOT_ACKNOWLEDGED
    assert loop.time() - started < LONG / 2
    assert harness.channel.protocol_version(flow_run_id) is None


async def test_bad_token_is_rejected_without_logging_it(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    flow_run_id, endpoint = harness.register()
    wrong = "f" * len(endpoint.token)
    harness.tokens.append(wrong)
    intruder = await harness.engine(wrong)
    assert await intruder.closed_by_peer() == b""
    assert any("unknown or already used token" in r.getMessage() for r in caplog.records)
    # The run's own engine still gets in.
    engine = await harness.engine(endpoint.token)
    assert await engine.read(5) == b"\x00PF\x02\x01"
    assert harness.channel.protocol_version(flow_run_id) == 2


async def test_replayed_token_is_rejected_and_the_first_session_survives(
    harness: Harness,
) -> None:
    flow_run_id, endpoint = harness.register()
    engine = await harness.engine(endpoint.token)
    assert await engine.read(5) == b"\x00PF\x02\x01"
    replay = await harness.engine(endpoint.token)
    assert await replay.closed_by_peer() == b""
    signal = asyncio.create_task(harness.channel.signal(flow_run_id, "cancel"))
    assert await engine.read(1) == b"c"
    await engine.send(b"a")
    assert await signal is SignalResult.ACKNOWLEDGED


async def test_token_stops_working_after_unregister_and_reregister(harness: Harness) -> None:
    flow_run_id, first = harness.register()
    harness.channel.unregister(flow_run_id)
    stale = await harness.engine(first.token)
    assert await stale.closed_by_peer() == b""

    _same_id, second = harness.register()
    assert second.token != first.token
    flow_run_id_2, third = harness.register()
    engine = await harness.engine(third.token)
    await engine.read(5)
    # Registering the run again (a new attempt) closes the old attempt's session.
    assert harness.channel.register(flow_run_id_2) is not None
    assert await engine.closed_by_peer() == b""


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(b"z", id="unknown-byte"),
        pytest.param(b"a", id="ack-without-intent"),
        pytest.param(b"\x00XY\x02\x01", id="malformed-hello"),
        pytest.param(b"\x00PF\x02\x01", id="second-hello"),
        pytest.param(b"\x01" + struct.pack("!I", MAX_RECEIPT_SIZE + 1), id="oversize-receipt"),
        pytest.param(receipt_frame(b"{not json"), id="receipt-not-json"),
        pytest.param(receipt_frame({**COMPLETED, "extra": 1}), id="receipt-extra-field"),
        pytest.param(receipt_frame({**COMPLETED, "state_id": "nope"}), id="receipt-bad-id"),
        pytest.param(b"\x01\x00\x00", id="partial-length"),
        pytest.param(b"\x01\x00\x00\x00\x10{", id="partial-payload"),
    ],
)
async def test_malformed_frames_end_the_session_without_a_conclusion(
    harness: Harness, garbage: bytes
) -> None:
    flow_run_id, engine = await harness.connected()
    await engine.send(garbage)
    # Partial frames are cut off after the peer timeout; the others at once.
    assert await engine.closed_by_peer() == b""
    assert harness.channel.conclusion(flow_run_id) is None
    await eventually(lambda: harness.channel.protocol_version(flow_run_id) is None)
    assert await harness.channel.signal(flow_run_id, "cancel") is SignalResult.NOT_ACKNOWLEDGED


@pytest.mark.parametrize(
    "line", [b"", b"x" * 5000, b"\xff\xfe" * 10], ids=["silent", "endless-line", "binary"]
)
async def test_peers_without_a_token_line_are_cut_off(harness: Harness, line: bytes) -> None:
    harness.register()
    reader, writer = await asyncio.open_connection("127.0.0.1", harness.port)
    writer.write(line)
    await writer.drain()
    async with asyncio.timeout(PEER_TIMEOUT + 5):
        assert await reader.read() == b""
    writer.close()


async def test_unauthenticated_connections_are_bounded(caplog: pytest.LogCaptureFixture) -> None:
    async with ControlChannel(peer_timeout=LONG, max_handshakes=4) as channel:
        assert channel.port is not None
        idle = [await asyncio.open_connection("127.0.0.1", channel.port) for _ in range(4)]
        extra = [await asyncio.open_connection("127.0.0.1", channel.port) for _ in range(3)]
        for reader, writer in extra:  # refused long before the idle ones would time out
            async with asyncio.timeout(LONG / 2):
                assert await reader.read() == b""
            writer.close()
        for _, idle_writer in idle:  # idle ones that go away free their places
            idle_writer.close()
        flow_run_id = uuid.uuid4()
        endpoint = channel.register(flow_run_id)
        assert endpoint is not None
        async with asyncio.timeout(LONG / 2):
            while True:  # until the channel has seen the idle ones go
                engine = await FakeEngine.connect(channel.port, endpoint.token)
                answer = await engine.reader.read(5)
                await engine.close()
                if answer:
                    break
                await asyncio.sleep(0.05)
        assert answer == b"\x00PF\x02\x01"
    rejected = [r for r in caplog.records if "closed a connection" in r.getMessage()]
    assert rejected and len(rejected) < 5  # the flood shows once, with a count


async def test_leaving_the_context_closes_everything() -> None:
    before = asyncio.all_tasks()
    channel = ControlChannel()
    async with channel:
        port = channel.port
        assert port is not None
        flow_run_id = uuid.uuid4()
        endpoint = channel.register(flow_run_id)
        assert endpoint is not None
        engine = await FakeEngine.connect(port, endpoint.token, hello=None)
        pending, _ = await asyncio.open_connection("127.0.0.1", port)  # never authenticates
        await eventually(lambda: channel.protocol_version(flow_run_id) == 1)
    assert asyncio.all_tasks() == before
    assert await engine.closed_by_peer(within=1.0) == b""
    assert await pending.read() == b""
    assert channel.port is None and channel.register(uuid.uuid4()) is None
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)
    await engine.close()


async def test_without_a_listener_everything_falls_back(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def refuse(self: socket.socket, address: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(socket.socket, "bind", refuse)
    async with ControlChannel() as channel:
        assert channel.port is None
        flow_run_id = uuid.uuid4()
        assert channel.register(flow_run_id) is None
        assert await channel.signal(flow_run_id, "cancel") is SignalResult.NOT_ACKNOWLEDGED
        assert channel.conclusion(flow_run_id) is None
    assert "signals only" in caplog.text


def test_endpoint_keeps_its_token_out_of_its_repr() -> None:
    endpoint = ControlEndpoint(4242, "secret-token-value")
    assert "secret-token-value" not in repr(endpoint)
    assert endpoint.environment() == {PORT_ENV: "4242", TOKEN_ENV: "secret-token-value"}


@pytest.mark.parametrize(
    "payload",
    [
        b"[]",
        b'"STATE_REPORTED"',
        json.dumps({"disposition": "DONE"}).encode(),
        json.dumps({"disposition": "ORCHESTRATION_ABORTED", "state_id": str(STATE_ID)}).encode(),
        json.dumps({**COMPLETED, "disposition": "ORCHESTRATION_ABORTED"}).encode(),
        json.dumps({k: v for k, v in COMPLETED.items() if k != "state_name"}).encode(),
        json.dumps({**COMPLETED, "state_type": ""}).encode(),
        json.dumps({**COMPLETED, "state_type": "X" * 65}).encode(),
        json.dumps({**COMPLETED, "state_name": None}).encode(),
        json.dumps({**COMPLETED, "state_id": 5}).encode(),
        b"\xff\xfe",
    ],
)
def test_parse_receipt_rejects_anything_but_the_two_shapes(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_receipt(payload)


def test_parse_receipt_reads_both_shapes() -> None:
    assert parse_receipt(json.dumps(COMPLETED).encode()) == EngineReceipt(
        Disposition.STATE_REPORTED, ReportedState(STATE_ID, "COMPLETED", "Completed")
    )
    assert parse_receipt(b'{"disposition":"ORCHESTRATION_ABORTED"}') == EngineReceipt(
        Disposition.ORCHESTRATION_ABORTED
    )


async def _whole_exchange() -> None:
    async with ControlChannel(ack_timeout=ACK_TIMEOUT, peer_timeout=PEER_TIMEOUT) as channel:
        assert channel.port is not None
        cancelled, receipted = uuid.uuid4(), uuid.uuid4()
        endpoints = [channel.register(cancelled), channel.register(receipted)]
        assert endpoints[0] is not None and endpoints[1] is not None
        first = await FakeEngine.connect(channel.port, endpoints[0].token)
        second = await FakeEngine.connect(channel.port, endpoints[1].token)
        assert await first.read(5) == await second.read(5) == b"\x00PF\x02\x01"
        signal = asyncio.create_task(channel.signal(cancelled, "cancel"))
        assert await first.read(1) == b"c"
        await first.send(b"a")
        assert await signal is SignalResult.ACKNOWLEDGED
        await second.send(receipt_frame(COMPLETED))
        assert await second.read(1) == RECEIPT_ACK
        assert isinstance(channel.conclusion(receipted), EngineReceipt)
        idle = await FakeEngine.connect(channel.port, "nobody")
    assert await idle.closed_by_peer() == b""
    for engine in (first, second, idle):
        await engine.close()


def test_whole_exchange_under_uvloop() -> None:
    # The daemon runs on uvloop: accept, streams and cancellation must behave the same there.
    run: Callable[[Awaitable[None]], None] = uvloop.run  # type: ignore[assignment]
    run(_whole_exchange())
