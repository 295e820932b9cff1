"""HBONE connection driver and server: real h2 over trio memory streams and TLS on loopback."""

from __future__ import annotations

import datetime
import hashlib
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import hyperframe.frame
import pytest
import trio
import trio.testing
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ztunnel.hbone import protocol as p
from ztunnel.hbone.connection import HboneConnection, HboneStatusError, HboneStream
from ztunnel.hbone.protocol import HboneError
from ztunnel.hbone.server import HboneRequest, serve_hbone_connection

CLIENT_ID = "spiffe://cluster.local/ns/default/sa/sleep"
SERVER_ID = "spiffe://cluster.local/ns/default/sa/echo"


async def echo_handler(req: HboneRequest) -> None:
    stream = await req.accept()
    while data := await stream.receive_some():
        await stream.send_all(data)
    await stream.send_eof()


@asynccontextmanager
async def hbone_pair(
    handler, client_transport=None, server_transport=None, **client_opts
) -> AsyncIterator[tuple[HboneConnection, HboneConnection]]:
    """A client HboneConnection and a served server side over a memory stream pair."""
    if client_transport is None:
        client_transport, server_transport = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        server = await nursery.start(partial(
            serve_hbone_connection, server_transport, handler, peer_identity=CLIENT_ID,
            peer_address=("10.0.0.1", 40000)))
        client = HboneConnection(client_transport, client_side=True, peer_identity=SERVER_ID,
                                 **client_opts)
        await nursery.start(client.run)
        try:
            yield client, server
        finally:
            await client.aclose()
            nursery.cancel_scope.cancel()


async def read_all(stream: trio.abc.ReceiveStream, max_bytes: int | None = None) -> bytes:
    chunks = []
    while data := await stream.receive_some(max_bytes):
        chunks.append(data)
    return b"".join(chunks)


# -- basic relaying ----------------------------------------------------------------------------


async def test_bytes_both_ways_over_memory_streams() -> None:
    seen: list[HboneRequest] = []

    async def handler(req: HboneRequest) -> None:
        seen.append(req)
        await echo_handler(req)

    async with hbone_pair(handler) as (client, _):
        headers = p.connect_headers("10.0.0.2:8080", forwarded_for="10.0.0.1:5555",
                                    baggage=p.baggage_value("default", "sleep-1"))
        stream = await client.open_stream("10.0.0.2:8080", headers)
        assert isinstance(stream, HboneStream)
        assert stream.peer_identity == SERVER_ID and stream.authority == "10.0.0.2:8080"
        payload = b"hello hbone " * 10000
        async with trio.open_nursery() as n:
            n.start_soon(stream.send_all, payload)
            got = b""
            while len(got) < len(payload):
                got += await stream.receive_some()
        assert got == payload
        await stream.send_eof()
        assert await stream.receive_some() == b""
        await stream.aclose()
    (req,) = seen
    assert req.authority == ("10.0.0.2", 8080)
    assert req.peer_identity == CLIENT_ID and req.peer_address == ("10.0.0.1", 40000)
    assert req.forwarded_for == ("10.0.0.1", 5555)
    assert req.headers["baggage"] == "k8s.namespace.name=default,k8s.pod.name=sleep-1"


# -- TLS on loopback ---------------------------------------------------------------------------


def _cert(name: str, key, issuer_name, issuer_key, *, ca: bool, uri: str | None):
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, name)]))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if uri:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=True)
    return builder.sign(issuer_key, hashes.SHA256())


def make_pki(tmp: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """Throwaway CA + SPIFFE leaf certs → (client context, server context): TLS 1.3, ALPN h2."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "test-ca")])
    ca = _cert("test-ca", ca_key, ca_name, ca_key, ca=True, uri=None)
    (tmp / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    contexts = []
    for role, uri, purpose in (("client", CLIENT_ID, ssl.PROTOCOL_TLS_CLIENT),
                               ("server", SERVER_ID, ssl.PROTOCOL_TLS_SERVER)):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(role, key, ca_name, ca_key, ca=False, uri=uri)
        pem = tmp / f"{role}.pem"
        pem.write_bytes(
            cert.public_bytes(serialization.Encoding.PEM)
            + key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()))
        ctx = ssl.SSLContext(purpose)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(tmp / "ca.pem")
        ctx.load_cert_chain(pem)
        ctx.set_alpn_protocols(["h2"])
        contexts.append(ctx)
    return contexts[0], contexts[1]


def spiffe_of(stream: trio.SSLStream) -> str | None:
    for kind, value in stream.getpeercert().get("subjectAltName", ()):
        if kind == "URI" and value.startswith("spiffe://"):
            return value
    return None


async def test_bytes_both_ways_over_tls_on_loopback(tmp_path: Path) -> None:
    client_ctx, server_ctx = make_pki(tmp_path)
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    identities: list[str | None] = []

    async def serve_one() -> None:
        sock = await listener.accept()
        tls = trio.SSLStream(sock, server_ctx, server_side=True)
        await tls.do_handshake()
        assert tls.selected_alpn_protocol() == "h2"
        identities.append(spiffe_of(tls))
        await serve_hbone_connection(tls, echo_handler, peer_identity=spiffe_of(tls),
                                     peer_address=sock.socket.getpeername())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_one)
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        tls = trio.SSLStream(tcp, client_ctx, server_hostname=None)
        await tls.do_handshake()
        assert tls.version() == "TLSv1.3" and tls.selected_alpn_protocol() == "h2"
        client = HboneConnection(tls, client_side=True, peer_identity=spiffe_of(tls))
        await nursery.start(client.run)
        payload = hashlib.sha256(b"seed").digest() * 200_000  # 6.4 MB: several windows
        streams = [await client.open_stream("127.0.0.1:9") for _ in range(3)]
        results: dict[int, bytes] = {}

        async def roundtrip(i: int, stream: HboneStream) -> None:
            async with trio.open_nursery() as n:
                async def send() -> None:
                    await stream.send_all(payload[i:])
                    await stream.send_eof()
                n.start_soon(send)
                results[i] = await read_all(stream)
            await stream.aclose()

        async with trio.open_nursery() as n:
            for i, s in enumerate(streams):
                n.start_soon(roundtrip, i, s)
        assert all(results[i] == payload[i:] for i in range(3))
        assert streams[0].peer_identity == SERVER_ID
        assert client.open_streams == 0
        await client.aclose()
    await listener.aclose()
    assert identities == [CLIENT_ID]


# -- half-close and reset ----------------------------------------------------------------------


async def test_client_half_close_server_keeps_sending() -> None:
    async def handler(req: HboneRequest) -> None:
        stream = await req.accept()
        request = await read_all(stream)  # until the client's END_STREAM
        for _ in range(3):
            await stream.send_all(b"reply to " + request)
        await stream.send_eof()

    async with hbone_pair(handler) as (client, _):
        stream = await client.open_stream("10.0.0.2:80")
        await stream.send_all(b"question")
        await stream.send_eof()
        with pytest.raises(trio.ClosedResourceError):
            await stream.send_all(b"more")
        assert await read_all(stream) == b"reply to question" * 3
        await stream.aclose()
        assert client.open_streams == 0


async def test_server_half_close_client_keeps_sending() -> None:
    received = trio.Event()
    got: list[bytes] = []

    async def handler(req: HboneRequest) -> None:
        stream = await req.accept()
        await stream.send_all(b"banner")
        await stream.send_eof()
        got.append(await read_all(stream))
        received.set()

    async with hbone_pair(handler) as (client, _):
        stream = await client.open_stream("10.0.0.2:80")
        assert await read_all(stream) == b"banner"
        for i in range(5):
            await stream.send_all(b"x%d" % i)
        await stream.send_eof()
        await received.wait()
        await stream.aclose()
    assert got == [b"x0x1x2x3x4"]


async def test_client_reset_reaches_server_and_connection_lives_on() -> None:
    outcome: list[str] = []
    done = trio.Event()

    async def handler(req: HboneRequest) -> None:
        stream = await req.accept()
        try:
            await read_all(stream)
            outcome.append("eof")
        except trio.BrokenResourceError:
            outcome.append("reset")
        done.set()

    async with hbone_pair(handler) as (client, _):
        stream = await client.open_stream("10.0.0.2:80")
        await stream.send_all(b"partial")
        await stream.aclose()  # not finished → RST_STREAM
        await done.wait()
        assert outcome == ["reset"]
        assert client.is_usable


async def test_server_handler_error_resets_stream_only() -> None:
    async def handler(req: HboneRequest) -> None:
        if req.authority[1] == 666:
            stream = await req.accept()
            await stream.receive_some()
            raise RuntimeError("handler bug")
        await echo_handler(req)

    async with hbone_pair(handler) as (client, _):
        good = await client.open_stream("10.0.0.2:80")
        bad = await client.open_stream("10.0.0.2:666")
        await bad.send_all(b"boom")
        with pytest.raises(trio.BrokenResourceError):
            await read_all(bad)
        with pytest.raises(trio.BrokenResourceError):
            while True:  # sending on a reset stream fails too, once the reset arrived
                await bad.send_all(b"more")
        await good.send_all(b"still fine")
        await good.send_eof()
        assert await read_all(good) == b"still fine"
        assert client.is_usable


# -- flow control ------------------------------------------------------------------------------


async def test_large_transfer_with_slow_reader_applies_back_pressure() -> None:
    server_streams: list[HboneStream] = []
    start_reading = trio.Event()
    result: list[bytes] = []

    async def handler(req: HboneRequest) -> None:
        stream = await req.accept()
        server_streams.append(stream)
        await start_reading.wait()
        data = bytearray()
        while chunk := await stream.receive_some(100_000):
            data += chunk
            await trio.sleep(0)  # a slow consumer
        result.append(bytes(data))
        await stream.send_eof()

    chunk = 256 * 1024
    payload = hashlib.sha256(b"x").digest() * (12 * 1024 * 1024 // 32)  # 12 MiB
    sent = 0

    async def sender(stream: HboneStream) -> None:
        nonlocal sent
        for off in range(0, len(payload), chunk):
            await stream.send_all(payload[off : off + chunk])
            sent = off + chunk
        await stream.send_eof()

    async with hbone_pair(handler) as (client, _):
        stream = await client.open_stream("10.0.0.2:80")
        async with trio.open_nursery() as n:
            n.start_soon(sender, stream)
            await trio.testing.wait_all_tasks_blocked()
            # The reader took nothing: the sender is stuck at the stream window.
            (server_stream,) = server_streams
            assert sent <= p.STREAM_WINDOW + chunk
            assert server_stream.buffered <= p.STREAM_WINDOW
            assert server_stream.buffered >= p.STREAM_WINDOW - chunk
            start_reading.set()
        assert sent == len(payload)
        assert await read_all(stream) == b""
        await stream.aclose()
    assert result == [payload]


async def test_reset_wakes_a_sender_blocked_on_flow_control() -> None:
    give_up = trio.Event()

    async def handler(req: HboneRequest) -> None:
        await req.accept()
        await give_up.wait()  # never reads, then fails → RST_STREAM
        raise RuntimeError("upstream gone")

    async with hbone_pair(handler) as (client, _):
        stream = await client.open_stream("10.0.0.2:80")
        with trio.fail_after(5):
            async with trio.open_nursery() as n:
                async def send() -> None:
                    with pytest.raises(trio.BrokenResourceError):
                        await stream.send_all(b"z" * (3 * p.STREAM_WINDOW))
                n.start_soon(send)
                await trio.testing.wait_all_tasks_blocked()  # sender waits for window
                give_up.set()
        assert client.is_usable


async def test_many_concurrent_streams_on_one_connection() -> None:
    async with hbone_pair(echo_handler) as (client, server):
        results: dict[int, bytes] = {}

        async def one(i: int) -> None:
            stream = await client.open_stream(f"10.0.{i}.1:{1000 + i}")
            msg = (b"%d;" % i) * (1000 + i)
            await stream.send_all(msg)
            await stream.send_eof()
            results[i] = await read_all(stream)
            assert results[i] == msg
            await stream.aclose()

        async with trio.open_nursery() as n:
            for i in range(60):
                n.start_soon(one, i)
        assert len(results) == 60
        assert client.open_streams == 0
        assert server.open_streams == 0


# -- refusals ----------------------------------------------------------------------------------


async def test_non_connect_gets_400_and_handler_not_called() -> None:
    called: list[HboneRequest] = []

    async def handler(req: HboneRequest) -> None:
        called.append(req)
        await req.accept()

    a, b = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(serve_hbone_connection, b, handler, peer_identity=CLIENT_ID))
        raw = p.HboneH2(client_side=True)
        raw.initiate()
        sid = raw.h2.get_next_available_stream_id()
        raw.h2.send_headers(sid, [(":method", "GET"), (":scheme", "https"), (":path", "/"),
                                  (":authority", "10.0.0.2:80")], end_stream=True)
        await a.send_all(raw.data_to_send())
        status = None
        while status is None:
            for ev in raw.receive(await a.receive_some()):
                if isinstance(ev, p.ResponseReceived):
                    status = ev.status
            await a.send_all(raw.data_to_send())
        assert status == 400
        nursery.cancel_scope.cancel()
    assert called == []


@pytest.mark.parametrize("status", [401, 503, 400])
async def test_handler_reject_gives_status_error(status: int) -> None:
    async def handler(req: HboneRequest) -> None:
        await req.reject(status)

    async with hbone_pair(handler) as (client, _):
        with pytest.raises(HboneStatusError) as e:
            await client.open_stream("10.0.0.2:80")
        assert e.value.status == status
        assert client.open_streams == 0 and client.is_usable


async def test_bad_authority_answered_400_without_handler() -> None:
    called: list[HboneRequest] = []

    async def handler(req: HboneRequest) -> None:
        called.append(req)
        await echo_handler(req)

    async with hbone_pair(handler) as (client, _):
        with pytest.raises(HboneStatusError) as e:
            await client.open_stream("svc.example:80")
        assert e.value.status == 400
    assert called == []


async def test_oversize_headers_refused_without_killing_other_streams() -> None:
    called: list[str] = []

    async def handler(req: HboneRequest) -> None:
        called.append(req.authority_raw)
        await echo_handler(req)

    async with hbone_pair(handler) as (client, _):
        good = await client.open_stream("10.0.0.2:80")
        with pytest.raises(HboneStatusError) as e:
            await client.open_stream("10.0.0.3:80", [("x-big", "b" * 100_000)])
        assert e.value.status == 431
        await good.send_all(b"alive")
        await good.send_eof()
        assert await read_all(good) == b"alive"
        assert client.is_usable
    assert called == ["10.0.0.2:80"]


async def test_garbage_instead_of_preface_closes_with_goaway() -> None:
    a, b = trio.testing.memory_stream_pair()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(serve_hbone_connection, b, echo_handler,
                                       peer_identity=None))
            await a.send_all(b"GET / HTTP/1.1\r\nHost: example\r\n\r\n" + b"\x00" * 100)
            out = await read_all(a)  # the server closes the connection: EOF
    kinds = []
    view = memoryview(out)
    while len(view) >= 9:
        frame, length = hyperframe.frame.Frame.parse_frame_header(view[:9])
        kinds.append(type(frame).__name__)
        view = view[9 + length :]
    assert kinds[-1] == "GoAwayFrame"

    # The same server code serves the next connection normally.
    async with hbone_pair(echo_handler) as (client, _):
        stream = await client.open_stream("10.0.0.2:80")
        await stream.send_eof()
        assert await read_all(stream) == b""


# -- connection life ---------------------------------------------------------------------------


async def test_server_drain_keeps_open_stream_refuses_new_then_closes() -> None:
    async with hbone_pair(echo_handler) as (client, server):
        stream = await client.open_stream("10.0.0.2:80")
        async with trio.open_nursery() as n:
            n.start_soon(server.drain)
            while client.is_usable:  # wait for the GOAWAY to arrive
                await trio.sleep(0.001)
            with pytest.raises(HboneError):
                await client.open_stream("10.0.0.2:81")
            await stream.send_all(b"after goaway")
            await stream.send_eof()
            assert await read_all(stream) == b"after goaway"
            await stream.aclose()
        assert server.closed


async def test_connection_loss_breaks_streams_and_pending_opens() -> None:
    a, b = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        client = HboneConnection(a, client_side=True)
        await nursery.start(client.run)
        # The "server" speaks no HTTP/2 and hangs up while an open is pending.
        pending = nursery.start_soon
        errors: list[BaseException] = []

        async def opener() -> None:
            try:
                await client.open_stream("10.0.0.2:80")
            except HboneError as e:
                errors.append(e)

        pending(opener)
        await b.receive_some()
        await trio.testing.wait_all_tasks_blocked()
        assert client.open_streams == 1  # the CONNECT is out, waiting for an answer
        await b.aclose()
    assert len(errors) == 1
    assert client.closed and not client.is_usable


async def test_ping_timeout_drops_silent_peer(autojump_clock: trio.abc.Clock) -> None:
    a, b = trio.testing.memory_stream_pair()

    async def black_hole() -> None:
        while await b.receive_some():
            pass

    async with trio.open_nursery() as nursery:
        nursery.start_soon(black_hole)
        client = HboneConnection(a, client_side=True)
        start = trio.current_time()
        await client.run()  # returns when the keepalive gives up
        elapsed = trio.current_time() - start
        nursery.cancel_scope.cancel()
    assert client.dead_reason == "PING timeout"
    assert p.PING_TIMEOUT <= elapsed <= p.PING_INTERVAL + p.PING_TIMEOUT + 1


async def test_ping_answered_keeps_connection(autojump_clock: trio.abc.Clock) -> None:
    async with hbone_pair(echo_handler) as (client, _):
        await trio.sleep(120)  # many PING rounds
        assert client.is_usable
        stream = await client.open_stream("10.0.0.2:80")
        await stream.send_eof()
        assert await read_all(stream) == b""
