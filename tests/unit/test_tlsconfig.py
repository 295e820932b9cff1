"""nodeproxy.tlsconfig over real TLS on loopback (trio.SSLStream, stdlib ssl)."""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio

from nodeproxy import tlsconfig
from nodeproxy.certs import CertError
from nodeproxy.tlsconfig import PeerIdentityError
from tests.pki import TestPKI, make_pki

SERVER = "spiffe://cluster.local/ns/shop/sa/cart"
CLIENT = "spiffe://cluster.local/ns/web/sa/frontend"


@pytest.fixture(scope="module")
def pki() -> TestPKI:
    return make_pki()


@dataclass
class Side:
    stream: trio.SSLStream | None = None
    error: BaseException | None = None
    received: bytes = b""
    extra: dict[str, Any] = field(default_factory=dict)


async def _exchange(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> tuple[Side, Side]:
    """One TLS connection over 127.0.0.1: handshake, client sends b"ping", server echoes.

    Records each side's stream or error instead of raising, so tests can look at both ends.
    """
    server, client = Side(), Side()
    sni: list[str | None] = []
    server_ctx.sni_callback = lambda _obj, name, _ctx: sni.append(name)
    server.extra["sni"] = sni
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]

    async def serve() -> None:
        tcp = await listeners[0].accept()
        stream = trio.SSLStream(tcp, server_ctx, server_side=True)
        try:
            await stream.do_handshake()
            server.stream = stream
            data = await stream.receive_some(100)
            server.received = data
            await stream.send_all(data)
        except (trio.BrokenResourceError, ssl.SSLError) as e:
            server.error = e
        finally:
            await trio.aclose_forcefully(stream)

    async def connect() -> None:
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        stream = trio.SSLStream(tcp, client_ctx, server_hostname=None)
        try:
            await stream.do_handshake()
            client.stream = stream
            await stream.send_all(b"ping")
            # TLS 1.3 tickets arrive after the handshake, before the echo: look after it.
            client.received = await stream.receive_some(100)
            client.extra["session"] = stream.session
        except (trio.BrokenResourceError, ssl.SSLError) as e:
            client.error = e
        finally:
            await trio.aclose_forcefully(stream)

    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve)
                nursery.start_soon(connect)
    finally:
        for listener in listeners:
            await listener.aclose()
    return server, client


async def test_mutual_tls_h2_tls13_and_identities(pki):
    server, client = await _exchange(pki.server_context(SERVER), pki.client_context(CLIENT))
    assert server.error is None and client.error is None
    assert client.received == b"ping"
    for side in (server.stream, client.stream):
        assert side.version() == "TLSv1.3"
        assert tlsconfig.alpn_protocol(side) == "h2"
        assert side.cipher()[0] in ("TLS_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256")
    assert tlsconfig.peer_identity(client.stream) == SERVER
    assert tlsconfig.peer_identity(server.stream) == CLIENT
    assert tlsconfig.check_peer(client.stream, {SERVER, "spiffe://cluster.local/ns/a/sa/b"}) == (
        SERVER
    )
    assert tlsconfig.check_trust_domain(server.stream, "cluster.local") == CLIENT
    assert server.extra["sni"] == [None]  # the client sent no SNI
    session = client.extra["session"]
    assert session is None or not session.has_ticket  # no resumption


async def test_client_rejects_server_with_unexpected_identity(pki):
    other = "spiffe://cluster.local/ns/shop/sa/payments"
    server, client = await _exchange(pki.server_context(other), pki.client_context(CLIENT))
    assert client.error is None  # the chain is good; the identity is what is wrong
    with pytest.raises(PeerIdentityError, match="payments.*not one of the expected"):
        tlsconfig.check_peer(client.stream, [SERVER])


async def test_client_rejects_server_from_another_ca(pki):
    stranger = make_pki()
    server, client = await _exchange(stranger.server_context(SERVER), pki.client_context(CLIENT))
    assert client.stream is None
    assert "CERTIFICATE_VERIFY_FAILED" in repr(client.error.__cause__ or client.error)


async def test_server_rejects_client_cert_from_another_ca(pki):
    stranger = make_pki()
    chain, key = stranger.issue(CLIENT)  # same identity, but signed by a root we do not trust
    client_ctx = tlsconfig.client_context(chain, key, pki.root_pem)
    server, client = await _exchange(pki.server_context(SERVER), client_ctx)
    assert server.stream is None
    assert isinstance(server.error, trio.BrokenResourceError)
    assert "certificate verify failed" in str(server.error.__cause__)
    assert client.received == b""  # the client got nothing through


async def test_server_rejects_client_without_cert(pki):
    server, client = await _exchange(pki.server_context(SERVER), pki.client_context(None))
    assert server.stream is None
    assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in repr(server.error.__cause__)
    assert client.received == b""


async def test_optional_client_cert_gives_no_identity(pki):
    server, client = await _exchange(
        pki.server_context(SERVER, require_client_cert=False), pki.client_context(None)
    )
    assert server.error is None and client.received == b"ping"
    assert tlsconfig.peer_identity(server.stream) is None
    with pytest.raises(PeerIdentityError, match="no SPIFFE identity"):
        tlsconfig.check_trust_domain(server.stream, "cluster.local")


async def test_server_refuses_identity_of_another_trust_domain(pki):
    # A root the server trusts, but whose identities live in another trust domain.
    foreign = make_pki(trust_domain="partner.example")
    roots = pki.root_pem + foreign.root_pem
    chain, key = pki.issue(SERVER)
    server_ctx = tlsconfig.server_context(chain, key, roots)
    foreign_id = "spiffe://partner.example/ns/web/sa/frontend"
    fchain, fkey = foreign.issue(foreign_id)
    client_ctx = tlsconfig.client_context(fchain, fkey, roots)
    server, client = await _exchange(server_ctx, client_ctx)
    assert server.error is None
    assert tlsconfig.peer_identity(server.stream) == foreign_id
    with pytest.raises(PeerIdentityError, match="not in trust domain cluster.local"):
        tlsconfig.check_trust_domain(server.stream, "cluster.local")


async def test_client_without_h2_gets_no_alpn(pki):
    server, client = await _exchange(
        pki.server_context(SERVER), pki.client_context(CLIENT, alpn=("http/1.1",))
    )
    assert server.error is None
    assert tlsconfig.alpn_protocol(server.stream) is None  # HBONE must then refuse


async def test_cipher_suites_are_restricted(pki):
    client_ctx = pki.client_context(CLIENT)
    if not tlsconfig._set_tls13_ciphersuites(client_ctx, "TLS_CHACHA20_POLY1305_SHA256"):
        pytest.skip("this Python cannot set TLS 1.3 cipher suites")
    server, client = await _exchange(pki.server_context(SERVER), client_ctx)
    assert server.stream is None and client.stream is None
    assert "NO_SHARED_CIPHER" in repr(server.error.__cause__)


def test_tls12_is_off(pki):
    for ctx in (pki.server_context(SERVER), pki.client_context(CLIENT)):
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.options & ssl.OP_NO_TICKET
    assert pki.server_context(SERVER).num_tickets == 0


def test_bad_material_is_a_clear_error(pki):
    chain, _ = pki.issue(SERVER)
    _, other_key = pki.issue(CLIENT)
    with pytest.raises(CertError, match="certificate/key"):
        tlsconfig.server_context(chain, other_key, pki.root_pem)
    with pytest.raises(CertError, match="trust roots"):
        tlsconfig.client_context(None, None, b"-----BEGIN CERTIFICATE-----\nxx\n")
    with pytest.raises(CertError, match="empty"):
        tlsconfig.server_context([], other_key, pki.root_pem)


def test_contexts_leave_no_files_or_descriptors(pki, tmp_path, monkeypatch):
    """Keys go through memfd only: nothing written in the working dir, no fd left open."""
    monkeypatch.chdir(tmp_path)
    fds_before = set(os.listdir("/proc/self/fd"))
    for _ in range(20):
        pki.server_context(SERVER)
        pki.client_context(CLIENT)
    assert set(os.listdir("/proc/self/fd")) <= fds_before
    assert list(tmp_path.iterdir()) == []
