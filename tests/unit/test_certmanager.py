"""nodeproxy.certmanager against a real CertificateAuthority.

The control plane's ``sign()`` (the discovery client's) is stood in for by ``ControlPlane``
below: it signs with a real CA, and can be made to fail or to hold a request open.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

import pytest
import trio
import trio.testing

from nodeproxy import certs, tlsconfig
from nodeproxy.certmanager import (
    BACKOFF_MAX,
    BACKOFF_MIN,
    CertificateManager,
    CertificateUnavailable,
)
from tests.pki import TestPKI, make_pki

WEB = "spiffe://cluster.local/ns/web/sa/frontend"
CART = "spiffe://cluster.local/ns/shop/sa/cart"


class ControlPlane:
    """Stand-in for the discovery client's ``sign(csr) -> chain``, backed by a real CA."""

    def __init__(self, pki: TestPKI, ttl: timedelta = timedelta(hours=24)) -> None:
        self.pki = pki
        self.ttl = ttl
        self.calls: list[float] = []  # trio.current_time() of every request
        self.fail = False
        self.gate: trio.Event | None = None
        self.tamper: Callable[[bytes, list[bytes]], list[bytes]] | None = None

    async def sign(self, csr: bytes) -> list[bytes]:
        self.calls.append(trio.current_time())
        if self.gate is not None:
            await self.gate.wait()
        await trio.sleep(0)
        if self.fail:
            raise ConnectionError("control plane unreachable")
        chain = self.pki.ca.sign_csr(csr, self.ttl)
        return self.tamper(csr, chain) if self.tamper else chain


def trio_datetime_clock() -> Callable[[], datetime]:
    """Wall-clock datetimes that advance with trio's (mock) clock."""
    base = certs.utcnow()
    t0: list[float] = []

    def now() -> datetime:
        t = trio.current_time()
        if not t0:
            t0.append(t)
        return base + timedelta(seconds=t - t0[0])

    return now


@pytest.fixture
def pki() -> TestPKI:
    return make_pki()


async def _handshake(server_ctx, client_ctx) -> tuple[str | None, str | None]:
    """Real TLS over loopback; returns (identity the server saw, identity the client saw)."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    seen: dict[str, str | None] = {}

    async def serve() -> None:
        stream = trio.SSLStream(await listeners[0].accept(), server_ctx, server_side=True)
        await stream.do_handshake()
        seen["server"] = tlsconfig.peer_identity(stream)
        await stream.send_all(b"x")
        await trio.aclose_forcefully(stream)

    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve)
                tcp = await trio.open_tcp_stream("127.0.0.1", port)
                stream = trio.SSLStream(tcp, client_ctx, server_hostname=None)
                await stream.do_handshake()
                seen["client"] = tlsconfig.peer_identity(stream)
                await stream.receive_some(10)
                await trio.aclose_forcefully(stream)
    finally:
        for listener in listeners:
            await listener.aclose()
    return seen["server"], seen["client"]


async def test_get_fetches_a_usable_certificate(pki):
    cp = ControlPlane(pki)
    mgr = CertificateManager(cp.sign, pki.root_pem)
    cart = await mgr.get(CART)
    assert cart.identity == CART and cart.info.identity == CART
    assert cart.chain[-1] == pki.root_pem
    assert certs.cert_info(cart.chain[0]) == cart.info
    assert await mgr.get(CART) is cart and len(cp.calls) == 1  # held, not fetched again
    web = await mgr.get(WEB)
    assert len(cp.calls) == 2
    # the contexts really carry the identities, and are built once
    assert cart.server_context() is cart.server_context()
    assert await _handshake(cart.server_context(), web.client_context()) == (WEB, CART)
    [row_cart, row_web] = [r for r in mgr.snapshot() if r["identity"] in (CART, WEB)]
    assert row_cart["state"] == "valid" and row_cart["serial"] == f"{cart.info.serial:x}"
    assert row_cart["refresh_at"] == cart.info.refresh_at.isoformat()


async def test_concurrent_callers_share_one_fetch(pki):
    cp = ControlPlane(pki)
    cp.gate = trio.Event()
    mgr = CertificateManager(cp.sign, pki.root_pem)
    got = []

    async def caller() -> None:
        got.append(await mgr.get(CART))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(caller)
            await trio.testing.wait_all_tasks_blocked()
            assert [r["state"] for r in mgr.snapshot()] == ["pending"]
            cp.gate.set()
    assert len(cp.calls) == 1
    assert len(got) == 3 and got[0] is got[1] is got[2]


async def test_fetch_error_reaches_every_waiter_and_is_retried_later(pki):
    cp = ControlPlane(pki)
    cp.gate = trio.Event()
    cp.fail = True
    mgr = CertificateManager(cp.sign, pki.root_pem)
    errors = []

    async def caller() -> None:
        try:
            await mgr.get(CART)
        except CertificateUnavailable as e:
            errors.append(str(e))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(caller)
            nursery.start_soon(caller)
            await trio.testing.wait_all_tasks_blocked()
            cp.gate.set()
    assert len(cp.calls) == 1
    assert len(errors) == 2 and all("control plane unreachable" in e for e in errors)
    assert mgr.snapshot() == []  # nothing held for an identity that never got a certificate
    cp.fail = False
    assert (await mgr.get(CART)).identity == CART
    assert len(cp.calls) == 2


async def test_waiter_takes_over_when_the_fetching_caller_is_cancelled(pki):
    cp = ControlPlane(pki)
    cp.gate = trio.Event()
    mgr = CertificateManager(cp.sign, pki.root_pem)
    leader = trio.CancelScope()
    got = []

    async def lead() -> None:
        with leader:
            await mgr.get(CART)

    async def wait() -> None:
        got.append(await mgr.get(CART))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lead)
            await trio.testing.wait_all_tasks_blocked()  # lead() is fetching
            nursery.start_soon(wait)
            await trio.testing.wait_all_tasks_blocked()  # wait() shares that fetch
            leader.cancel()
            await trio.testing.wait_all_tasks_blocked()
            cp.gate.set()
    assert len(cp.calls) == 2  # the waiter fetched for itself
    assert len(got) == 1 and got[0].identity == CART


async def test_unusable_answers_are_refused(pki):
    cp = ControlPlane(pki)
    mgr = CertificateManager(cp.sign, pki.root_pem)
    stranger = make_pki()

    cp.tamper = lambda csr, chain: stranger.ca.sign_csr(csr, timedelta(hours=1))
    with pytest.raises(CertificateUnavailable, match="trust roots"):
        await mgr.get(CART)
    cp.tamper = lambda csr, chain: pki.ca.issue(WEB, timedelta(hours=1))[0]
    with pytest.raises(CertificateUnavailable, match="leaf identity"):
        await mgr.get(CART)
    cp.tamper = lambda csr, chain: pki.ca.issue(CART, timedelta(hours=1))[0]
    with pytest.raises(CertificateUnavailable, match="not for the key"):
        await mgr.get(CART)
    cp.tamper = lambda csr, chain: []
    with pytest.raises(CertificateUnavailable, match="empty"):
        await mgr.get(CART)
    cp.tamper = None
    assert (await mgr.get(CART)).identity == CART


async def test_renews_at_half_life_with_short_ttl(pki):
    """Real time: a 4 s certificate is replaced after its half-life and before it expires."""
    cp = ControlPlane(pki, ttl=timedelta(seconds=4))
    mgr = CertificateManager(cp.sign, pki.root_pem)
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            await nursery.start(mgr.run)
            first = await mgr.get(CART)
            first_ctx = first.client_context()
            while len(cp.calls) < 2:
                await trio.sleep(0.05)
            renewed_at = certs.utcnow()
            while (second := await mgr.get(CART)) is first:
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    assert second.info.serial != first.info.serial
    assert renewed_at >= first.info.refresh_at  # not before half-life
    assert not first.info.expired(renewed_at)  # the old one was still good when replaced
    # the old object is untouched, so connections made with it keep their context
    assert first.client_context() is first_ctx and first.info.identity == CART


async def test_backoff_keeps_old_cert_until_expiry_then_recovers(pki, autojump_clock):
    """Mock time: default 24 h certificates, control plane down from the first renewal on."""
    clock = trio_datetime_clock()
    clock()  # pin the epoch to now
    pki = make_pki(clock=clock)
    cp = ControlPlane(pki)
    mgr = CertificateManager(cp.sign, pki.root_pem, clock=clock)
    async with trio.open_nursery() as nursery:
        await nursery.start(mgr.run)
        first = await mgr.get(CART)
        assert first.info.not_after - first.info.not_before == timedelta(hours=24, minutes=2)
        cp.fail = True
        await trio.sleep(20 * 3600)  # 20 h: renewals have been failing for 8 h
        assert await mgr.get(CART) is first  # old certificate still served
        [row] = mgr.snapshot()
        assert row["state"] == "valid" and "unreachable" in row["last_error"]

        await trio.sleep(4 * 3600 + 1)  # past expiry
        [row] = mgr.snapshot()
        assert row["state"] == "expired"
        with pytest.raises(CertificateUnavailable):
            await mgr.get(CART)

        cp.fail = False
        await trio.sleep(BACKOFF_MAX + 1)
        renewed = await mgr.get(CART)
        assert renewed is not first and renewed.info.serial != first.info.serial
        assert mgr.snapshot()[0]["state"] == "valid"
        nursery.cancel_scope.cancel()

    t0 = cp.calls[0]
    first_renewal = cp.calls[1] - t0
    # half-life of 24 h + the 2 minutes the CA backdates by, counted from the backdated start
    assert first_renewal == pytest.approx(12 * 3600 - 60, abs=1)
    gaps = [b - a for a, b in zip(cp.calls[1:], cp.calls[2:], strict=False)]
    assert gaps[:5] == pytest.approx([0.5, 1, 2, 4, 8], abs=0.01)
    assert BACKOFF_MIN == 0.5 and max(gaps) == pytest.approx(BACKOFF_MAX, abs=0.01)


async def test_forget_stops_renewal(pki, autojump_clock):
    clock = trio_datetime_clock()
    clock()
    pki = make_pki(clock=clock)
    cp = ControlPlane(pki)
    mgr = CertificateManager(cp.sign, pki.root_pem, clock=clock)
    async with trio.open_nursery() as nursery:
        await nursery.start(mgr.run)
        await mgr.get(CART)
        await mgr.get(WEB)
        mgr.forget(CART)
        await trio.sleep(13 * 3600)
        assert [r["identity"] for r in mgr.snapshot()] == [WEB]
        nursery.cancel_scope.cancel()
    assert len(cp.calls) == 3  # CART once, WEB once and renewed once


async def test_renewal_after_run_restarts(pki, autojump_clock):
    """Identities fetched before run() starts are renewed once it does."""
    clock = trio_datetime_clock()
    clock()
    pki = make_pki(clock=clock)
    cp = ControlPlane(pki)
    mgr = CertificateManager(cp.sign, pki.root_pem, clock=clock)
    first = await mgr.get(CART)
    async with trio.open_nursery() as nursery:
        await nursery.start(mgr.run)
        await trio.sleep(12 * 3600 + 1)
        assert (await mgr.get(CART)).info.serial != first.info.serial
        nursery.cancel_scope.cancel()


async def test_bad_identity_is_refused(pki):
    mgr = CertificateManager(ControlPlane(pki).sign, pki.root_pem)
    with pytest.raises(certs.CertError, match="SPIFFE"):
        await mgr.get("cart")
