"""``ssl.SSLContext``s for HBONE and the control plane, built from in-memory PEM.

HBONE's TLS profile (as ztunnel's): TLS 1.3 only, ALPN ``h2`` both sides, no SNI from the client,
no session resumption, cipher suites TLS_AES_256_GCM_SHA384 / TLS_AES_128_GCM_SHA256. Hostname
checking is off: a peer is identified by the SPIFFE URI SAN of its leaf, checked after the
handshake with :func:`check_peer` (client side) or :func:`check_trust_domain` (server side).

stdlib ``ssl`` loads certificates and keys only from paths; we write them into an anonymous
``memfd_create`` file and hand OpenSSL ``/proc/self/fd/N``, so private keys never touch disk.
Client code must create its ``trio.SSLStream`` with ``server_hostname=None`` (no SNI).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import ssl
import sys
from collections.abc import Collection, Iterator
from typing import Any

from nodeproxy import certs
from nodeproxy import identity as spiffe
from nodeproxy.certs import CertError

log = logging.getLogger(__name__)

TLS13_CIPHERSUITES = "TLS_AES_256_GCM_SHA384:TLS_AES_128_GCM_SHA256"


class PeerIdentityError(Exception):
    """The peer's certificate does not carry an identity we accept."""


@contextlib.contextmanager
def _memfd(data: bytes) -> Iterator[str]:
    """A path to an anonymous in-memory file holding ``data``; gone when the block ends."""
    fd = os.memfd_create("nodeproxy-tls", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def _set_tls13_ciphersuites(ctx: ssl.SSLContext, suites: str) -> bool:
    """Restrict TLS 1.3 cipher suites; return False (and log) if this Python cannot.

    ``SSLContext.set_ciphers`` only governs TLS ≤ 1.2 and Python 3.11 has no
    ``set_ciphersuites``, so we call OpenSSL's ``SSL_CTX_set_ciphersuites`` through ctypes on the
    context's ``SSL_CTX*`` (the first field after ``PyObject_HEAD`` in CPython's
    ``PySSLContext``). The pointer is checked by comparing ``SSL_CTX_get_options`` with
    ``ctx.options`` before anything is changed.
    """
    setter = getattr(ctx, "set_ciphersuites", None)  # should a future Python grow it
    if setter is not None:
        setter(suites)
        return True
    if sys.implementation.name != "cpython":
        log.warning("cannot restrict TLS 1.3 cipher suites on %s", sys.implementation.name)
        return False
    lib = _libssl()
    if lib is None:
        return False
    ptr = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if not ptr or lib.SSL_CTX_get_options(ptr) != int(ctx.options):
        log.warning("cannot locate SSL_CTX; TLS 1.3 cipher suites left at OpenSSL defaults")
        return False
    if lib.SSL_CTX_set_ciphersuites(ptr, suites.encode()) != 1:
        raise ssl.SSLError(f"OpenSSL refused TLS 1.3 cipher suites {suites!r}")
    return True


_LIBSSL: Any = None


def _libssl() -> Any:
    global _LIBSSL
    if _LIBSSL is None:
        try:
            import _ssl

            lib = ctypes.CDLL(_ssl.__file__)  # dlsym also searches its libssl dependency
            lib.SSL_CTX_get_options.restype = ctypes.c_uint64
            lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
            lib.SSL_CTX_set_ciphersuites.restype = ctypes.c_int
            lib.SSL_CTX_set_ciphersuites.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
            _LIBSSL = lib
        except (OSError, AttributeError, ImportError) as e:
            log.warning("libssl symbols unavailable (%s); TLS 1.3 cipher suites not set", e)
            _LIBSSL = False
    return _LIBSSL or None


def _base_context(purpose: int, roots_pem: bytes, alpn: tuple[str, ...]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    # Resumption would skip the certificate exchange that carries the peer's identity.
    ctx.options |= ssl.OP_NO_TICKET
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    _set_tls13_ciphersuites(ctx, TLS13_CIPHERSUITES)
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    roots = roots_pem.decode("ascii") if isinstance(roots_pem, bytes) else roots_pem
    try:
        ctx.load_verify_locations(cadata=roots)
    except (ssl.SSLError, ValueError) as e:
        raise CertError(f"cannot load trust roots: {e}") from None
    return ctx


def _load_identity(ctx: ssl.SSLContext, chain: list[bytes], key_pem: bytes) -> None:
    if not chain:
        raise CertError("empty certificate chain")
    pem = b"".join(c if c.endswith(b"\n") else c + b"\n" for c in chain) + key_pem
    with _memfd(pem) as path:
        try:
            ctx.load_cert_chain(path)
        except ssl.SSLError as e:
            raise CertError(f"cannot load certificate/key: {e}") from None


def server_context(
    chain: list[bytes],
    key_pem: bytes,
    roots_pem: bytes,
    *,
    alpn: tuple[str, ...] = ("h2",),
    require_client_cert: bool = True,
) -> ssl.SSLContext:
    """A server context presenting ``chain`` and verifying client certificates against roots."""
    ctx = _base_context(ssl.PROTOCOL_TLS_SERVER, roots_pem, alpn)
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    # In TLS 1.3 OP_NO_TICKET only turns stateless tickets into stateful ones; sending none
    # is what actually rules out resumption.
    ctx.num_tickets = 0
    _load_identity(ctx, chain, key_pem)
    return ctx


def client_context(
    chain: list[bytes] | None,
    key_pem: bytes | None,
    roots_pem: bytes,
    *,
    alpn: tuple[str, ...] = ("h2",),
) -> ssl.SSLContext:
    """A client context verifying the server chain against roots; identity is checked by SAN
    afterwards (:func:`check_peer`), so hostname checking is off."""
    ctx = _base_context(ssl.PROTOCOL_TLS_CLIENT, roots_pem, alpn)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    if chain:
        if key_pem is None:
            raise CertError("client certificate given without its key")
        _load_identity(ctx, chain, key_pem)
    return ctx


def peer_certificate_der(stream: Any) -> bytes | None:
    """The DER of the peer's leaf certificate (``None`` if it sent none)."""
    try:
        return stream.getpeercert(binary_form=True)
    except ValueError:  # handshake not done
        return None


def peer_identities(stream: Any) -> list[str]:
    """All SPIFFE URI SANs of the peer's leaf (``[]`` if no certificate)."""
    der = peer_certificate_der(stream)
    if not der:
        return []
    try:
        # parsed with the stdlib: the node proxy must not load cryptography (~9 MB resident)
        return certs.der_spiffe_ids(der)
    except CertError as e:  # OpenSSL accepted it, our parser did not: treat as no identity
        log.warning("peer certificate unreadable: %s", e)
        return []


def peer_identity(stream: Any) -> str | None:
    """The SPIFFE URI SAN of the peer's leaf, or ``None`` if it has none."""
    ids = peer_identities(stream)
    return ids[0] if ids else None


def alpn_protocol(stream: Any) -> str | None:
    """The negotiated ALPN protocol (``None`` if none was agreed)."""
    return stream.selected_alpn_protocol()


def check_peer(stream: Any, expected: Collection[str]) -> str:
    """Client side: the server's SAN must equal one of ``expected``; return it."""
    ids = peer_identities(stream)
    if not ids:
        raise PeerIdentityError("peer presented no SPIFFE identity")
    for ident in ids:
        if ident in expected:
            return ident
    raise PeerIdentityError(
        f"peer identity {', '.join(ids)} is not one of the expected {sorted(expected)}"
    )


def check_trust_domain(stream: Any, trust_domain: str) -> str:
    """Server side: the client's SAN must be a SPIFFE id in ``trust_domain``; return it."""
    ids = peer_identities(stream)
    if not ids:
        raise PeerIdentityError("peer presented no SPIFFE identity")
    for ident in ids:
        try:
            if spiffe.parse(ident).trust_domain == trust_domain:
                return ident
        except spiffe.IdentityError:
            continue
    raise PeerIdentityError(f"peer identity {', '.join(ids)} is not in trust domain {trust_domain}")
