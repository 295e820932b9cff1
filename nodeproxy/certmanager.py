"""The node proxy's per-identity certificates, fetched from the control plane and renewed.

Istio's rules: a fresh key per certificate, renewal at half-life
(``not_before + (not_after - not_before) / 2``), retries backing off 500 ms → 150 s, and the old
certificate stays in use until it expires. A renewed certificate is a new :class:`Certificate`
object, so connections already made keep the TLS context they were made with.
"""

from __future__ import annotations

import json
import logging
import ssl
import subprocess
import sys
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import trio

from nodeproxy import certs, tlsconfig
from nodeproxy import identity as spiffe
from nodeproxy.certs import CertError, CertInfo

log = logging.getLogger(__name__)

BACKOFF_MIN = 0.5
BACKOFF_MAX = 150.0
HELPER_TIMEOUT = 30.0  # a key, a CSR, a chain check: well under a second normally
HELPER_MAX_LINE = 1 << 20
_PACKAGE_ROOT = str(Path(certs.__file__).resolve().parents[1])


def _pem_to_der(pem: bytes) -> bytes:
    try:
        return ssl.PEM_cert_to_DER_cert(pem.decode("ascii"))
    except (ValueError, UnicodeDecodeError) as e:  # binascii.Error is a ValueError
        raise CertError(f"malformed certificate: {e}") from None


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
        isolate_crypto: bool = False,
    ) -> None:
        """``isolate_crypto``: make keys and check issued chains in a short-lived helper
        process (``python -m nodeproxy.certs``), so that this process never loads
        ``cryptography`` (the long-running node proxy does this to stay small)."""
        self._fetch = fetch
        self._roots_pem = roots_pem
        self._clock = clock
        self._isolate_crypto = isolate_crypto
        self._entries: dict[str, _Entry] = {}
        self._nursery: trio.Nursery | None = None
        pems = certs.split_pem_chain(roots_pem)
        if not pems:
            raise CertError("no certificate in the trust roots")
        try:
            if isolate_crypto:
                for pem in pems:  # the helper checks them fully on every issue
                    certs.der_spiffe_ids(_pem_to_der(pem))
            else:
                for pem in pems:
                    certs.load_certificate(pem)
        except CertError as e:
            raise CertError(f"trust roots: {e}") from None

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
        if self._isolate_crypto:
            return await self._fetch_new_isolated(identity)
        key_pem, csr = certs.issue_request(identity)
        chain = await self._sign(identity, csr)
        try:
            info = certs.check_issued(identity, key_pem, chain, self._roots_pem, self._clock())
        except CertError as e:
            raise self._unusable(identity, e) from e
        return Certificate(identity, chain, key_pem, self._roots_pem, info)

    async def _sign(self, identity: str, csr: bytes) -> list[bytes]:
        """The control plane's answer to our CSR (chain normalised to bytes)."""
        try:
            chain = await self._fetch(csr)
        except Exception as e:
            log.warning("fetching certificate for %s failed: %s", identity, e)
            raise CertificateUnavailable(f"fetching certificate for {identity} failed: {e}") from e
        if isinstance(chain, list):
            chain = [c.encode() if isinstance(c, str) else c for c in chain]
        return chain

    @staticmethod
    def _unusable(identity: str, e: CertError) -> CertificateUnavailable:
        log.error("control plane returned an unusable certificate for %s: %s", identity, e)
        return CertificateUnavailable(f"unusable certificate for {identity}: {e}")

    async def _fetch_new_isolated(self, identity: str) -> Certificate:
        """Key, CSR and the check of the answer in a short-lived ``python -m nodeproxy.certs``.

        ``cryptography`` stays out of this long-running process (its OpenSSL and Rust
        extension would stay resident, ≈ 9 MB); the key is made in the helper and comes back
        over its stdout pipe, never through a file.
        """
        helper = await trio.lowlevel.open_process(
            [sys.executable, "-m", "nodeproxy.certs"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            # run where this process's own nodeproxy package is: the helper then imports the
            # same code whatever our working directory holds
            cwd=_PACKAGE_ROOT,
        )
        try:
            assert helper.stdin is not None and helper.stdout is not None
            lines = _LineReader(helper.stdout)

            async def ask(obj: object) -> dict[str, Any]:
                await helper.stdin.send_all(json.dumps(obj).encode() + b"\n")
                with trio.fail_after(HELPER_TIMEOUT):
                    line = await lines.next()
                try:
                    answer = json.loads(line)
                except ValueError:
                    answer = None
                if not isinstance(answer, dict):
                    raise _HelperFailed(f"certificate helper answered {line[:80]!r}")
                if "error" in answer:
                    raise CertError(str(answer["error"]))
                return answer

            try:
                made = await ask({"identity": identity})
                key_pem, csr = made["key"].encode(), made["csr"].encode()
            except (CertError, _HelperFailed, KeyError, AttributeError, trio.TooSlowError,
                    OSError, trio.BrokenResourceError) as e:
                log.error("certificate helper failed for %s: %s", identity, e)
                raise CertificateUnavailable(
                    f"making a key for {identity} failed: {e or type(e).__name__}"
                ) from e
            chain = await self._sign(identity, csr)
            if not isinstance(chain, list) or not chain:
                raise self._unusable(identity, CertError("empty certificate chain"))
            try:
                checked = await ask(
                    {
                        "chain": [c.decode("ascii") for c in chain],
                        "roots": self._roots_pem.decode("ascii"),
                        "now": self._clock().isoformat(),
                    }
                )
                info = certs.info_from_json(checked)
            except (UnicodeDecodeError, AttributeError):
                raise self._unusable(identity, CertError("chain is not PEM text")) from None
            except CertError as e:
                raise self._unusable(identity, e) from e
            except (_HelperFailed, trio.TooSlowError, OSError, trio.BrokenResourceError) as e:
                log.error("certificate helper failed for %s: %s", identity, e)
                raise CertificateUnavailable(
                    f"checking the certificate for {identity} failed: {e or type(e).__name__}"
                ) from e
            return Certificate(identity, chain, key_pem, self._roots_pem, info)
        finally:
            with trio.CancelScope(shield=True):
                await _reap(helper)


async def _reap(helper: trio.Process) -> None:
    """Close the helper's pipes (it exits on end of input) and wait for it; kill it if stuck."""
    for pipe in (helper.stdin, helper.stdout):
        if pipe is not None:
            with trio.move_on_after(1):
                await pipe.aclose()
    with trio.move_on_after(5):
        await helper.wait()
        return
    helper.kill()
    await helper.wait()


class _HelperFailed(Exception):
    """The helper process died, hung or answered nonsense (not a verdict on a certificate)."""


class _LineReader:
    """Newline-terminated lines from a trio receive stream (the helper's stdout)."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buf = bytearray()

    async def next(self) -> str:
        while b"\n" not in self._buf:
            if len(self._buf) > HELPER_MAX_LINE:
                raise _HelperFailed("certificate helper answer too long")
            data = await self._stream.receive_some()
            if not data:
                raise _HelperFailed("certificate helper exited without an answer")
            self._buf += data
        line, _, rest = bytes(self._buf).partition(b"\n")
        self._buf = bytearray(rest)
        return line.decode("utf-8", "replace")
