"""The node proxy's per-identity certificates, fetched from the control plane and renewed.

Istio's rules: a fresh key per certificate, renewal at half-life
(``not_before + (not_after - not_before) / 2``), retries backing off 500 ms → 150 s, and the old
certificate stays in use until it expires. A renewed certificate is a new :class:`Certificate`
object, so connections already made keep the TLS context they were made with.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import trio
from cryptography.x509 import verification

from nodeproxy import certs, tlsconfig
from nodeproxy import identity as spiffe
from nodeproxy.certs import CertError, CertInfo

log = logging.getLogger(__name__)

BACKOFF_MIN = 0.5
BACKOFF_MAX = 150.0


class CertificateUnavailable(Exception):
    """No valid certificate could be obtained for an identity."""


class Certificate:
    """One issued certificate with its key; TLS contexts are built on first use and cached."""

    def __init__(
        self, identity: str, chain: list[bytes], key_pem: bytes, roots_pem: bytes, info: CertInfo
    ) -> None:
        self.identity = identity
        self.chain = chain
        self.key_pem = key_pem
        self.roots_pem = roots_pem
        self.info = info
        self._server_ctx: ssl.SSLContext | None = None
        self._client_ctx: ssl.SSLContext | None = None

    def server_context(self) -> ssl.SSLContext:
        """HBONE server context (client certificate required)."""
        if self._server_ctx is None:
            self._server_ctx = tlsconfig.server_context(self.chain, self.key_pem, self.roots_pem)
        return self._server_ctx

    def client_context(self) -> ssl.SSLContext:
        """HBONE client context presenting this certificate."""
        if self._client_ctx is None:
            self._client_ctx = tlsconfig.client_context(self.chain, self.key_pem, self.roots_pem)
        return self._client_ctx

    def __repr__(self) -> str:
        return (
            f"<Certificate {self.identity} serial={self.info.serial:x} "
            f"until={self.info.not_after.isoformat()}>"
        )


class _Fetch:
    """One in-flight fetch that concurrent callers share."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: Certificate | None = None
        self.error: str | None = None


class _Entry:
    def __init__(self, identity: str) -> None:
        self.identity = identity
        self.cert: Certificate | None = None
        self.fetching: _Fetch | None = None
        self.renewer: trio.CancelScope | None = None
        self.last_error: str | None = None


class CertificateManager:
    """Holds one certificate per identity the proxy serves; :meth:`run` keeps them fresh."""

    def __init__(
        self,
        fetch: Callable[[bytes], Awaitable[list[bytes]]],
        roots_pem: bytes,
        *,
        clock: Callable[[], datetime] = certs.utcnow,
    ) -> None:
        self._fetch = fetch
        self._roots_pem = roots_pem
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._nursery: trio.Nursery | None = None
        try:
            roots = [certs.load_certificate(pem) for pem in certs.split_pem_chain(roots_pem)]
        except CertError as e:
            raise CertError(f"trust roots: {e}") from None
        if not roots:
            raise CertError("no certificate in the trust roots")
        self._store = verification.Store(roots)

    # -- public API ---------------------------------------------------------------------------

    async def get(self, identity: str) -> Certificate:
        """A currently valid certificate for ``identity``, fetched if there is none."""
        try:
            spiffe.parse(identity)
        except spiffe.IdentityError as e:
            raise CertError(str(e)) from None
        entry = self._entries.get(identity)
        if entry is None:
            entry = self._entries[identity] = _Entry(identity)
        cert = entry.cert
        if cert is not None and not cert.info.expired(self._clock()):
            return cert
        return await self._refresh(entry)

    def forget(self, identity: str) -> None:
        """Stop holding and renewing ``identity`` (its last certificate is simply dropped)."""
        entry = self._entries.pop(identity, None)
        if entry is not None and entry.renewer is not None:
            entry.renewer.cancel()

    def snapshot(self) -> list[dict[str, Any]]:
        """JSON-ready rows for the admin page."""
        now = self._clock()
        rows = []
        for ident in sorted(self._entries):
            entry = self._entries[ident]
            cert = entry.cert
            if cert is None:
                state = "pending"
            elif cert.info.expired(now):
                state = "expired"
            else:
                state = "valid"
            rows.append(
                {
                    "identity": ident,
                    "serial": f"{cert.info.serial:x}" if cert else None,
                    "not_before": cert.info.not_before.isoformat() if cert else None,
                    "not_after": cert.info.not_after.isoformat() if cert else None,
                    "refresh_at": cert.info.refresh_at.isoformat() if cert else None,
                    "state": state,
                    "fetching": entry.fetching is not None,
                    "last_error": entry.last_error,
                }
            )
        return rows

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Renew every held identity at its half-life until cancelled."""
        if self._nursery is not None:
            raise RuntimeError("CertificateManager.run is already running")
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for entry in self._entries.values():
                    self._start_renewer(entry)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            for entry in self._entries.values():
                entry.renewer = None

    # -- internals ----------------------------------------------------------------------------

    def _start_renewer(self, entry: _Entry) -> None:
        if self._nursery is None or entry.renewer is not None or entry.cert is None:
            return
        if self._entries.get(entry.identity) is not entry:
            return
        scope = trio.CancelScope()
        entry.renewer = scope
        self._nursery.start_soon(self._renew, entry, scope)

    async def _renew(self, entry: _Entry, scope: trio.CancelScope) -> None:
        backoff = BACKOFF_MIN
        with scope:
            while True:
                cert = entry.cert
                assert cert is not None
                wait = (cert.info.refresh_at - self._clock()).total_seconds()
                if wait > 0:
                    await trio.sleep(wait)
                    continue  # re-evaluate: a caller of get() may have replaced it meanwhile
                try:
                    new = await self._refresh(entry)
                except CertificateUnavailable as e:
                    log.warning(
                        "renewing %s failed, retrying in %.1fs: %s", entry.identity, backoff, e
                    )
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, BACKOFF_MAX)
                    continue
                if new.info.refresh_at <= self._clock():
                    # A certificate already past its half-life (clock skew, tiny TTL): do not
                    # spin, back off as if it had failed.
                    log.warning("certificate for %s is already due for renewal", entry.identity)
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, BACKOFF_MAX)
                else:
                    backoff = BACKOFF_MIN

    async def _refresh(self, entry: _Entry) -> Certificate:
        """Fetch a new certificate for ``entry``, sharing an in-flight fetch if there is one."""
        while True:
            pending = entry.fetching
            if pending is None:
                return await self._lead_fetch(entry)
            await pending.done.wait()
            if pending.result is not None:
                return pending.result
            if pending.error is not None:
                raise CertificateUnavailable(pending.error)
            # The task that was fetching got cancelled: take over.

    async def _lead_fetch(self, entry: _Entry) -> Certificate:
        pending = entry.fetching = _Fetch()
        try:
            cert = await self._fetch_new(entry.identity)
        except CertificateUnavailable as e:
            pending.error = entry.last_error = str(e)
            if entry.cert is None and self._entries.get(entry.identity) is entry:
                del self._entries[entry.identity]  # nothing held: nothing to show or renew
            raise
        else:
            pending.result = entry.cert = cert
            entry.last_error = None
        finally:
            # Also on cancellation: waiters then find neither result nor error and take over.
            entry.fetching = None
            pending.done.set()
        log.info(
            "certificate for %s: serial %x, refresh at %s",
            cert.identity,
            cert.info.serial,
            cert.info.refresh_at.isoformat(),
        )
        self._start_renewer(entry)
        return cert

    async def _fetch_new(self, identity: str) -> Certificate:
        key = certs.generate_key()  # a fresh key for every certificate, as Istio does
        csr = certs.make_csr(identity, key)
        try:
            chain = await self._fetch(csr)
        except Exception as e:
            log.warning("fetching certificate for %s failed: %s", identity, e)
            raise CertificateUnavailable(f"fetching certificate for {identity} failed: {e}") from e
        try:
            return self._accept(identity, key, chain)
        except CertError as e:
            log.error("control plane returned an unusable certificate for %s: %s", identity, e)
            raise CertificateUnavailable(f"unusable certificate for {identity}: {e}") from e

    def _accept(self, identity: str, key: Any, chain: list[bytes]) -> Certificate:
        """Check what the control plane returned before any connection relies on it."""
        if not isinstance(chain, list) or not chain:
            raise CertError("empty certificate chain")
        chain = [c.encode() if isinstance(c, str) else c for c in chain]
        parsed = [certs.load_certificate(c) for c in chain]
        leaf = parsed[0]
        ids = certs.spiffe_ids(leaf)
        if ids != [identity]:
            raise CertError(f"leaf identity is {ids}, asked for {identity}")
        if leaf.public_key().public_numbers() != key.public_key().public_numbers():
            raise CertError("leaf certificate is not for the key we sent")
        verifier = (
            verification.PolicyBuilder()
            .store(self._store)
            .time(self._clock())
            .build_client_verifier()
        )
        try:
            verifier.verify(leaf, parsed[1:])
        except verification.VerificationError as e:
            raise CertError(f"chain does not verify against the trust roots: {e}") from None
        info = certs.CertInfo(
            identity=identity,
            serial=leaf.serial_number,
            not_before=leaf.not_valid_before_utc,
            not_after=leaf.not_valid_after_utc,
        )
        return Certificate(identity, chain, certs.key_to_pem(key), self._roots_pem, info)
