"""A mesh PKI for tests: a real CertificateAuthority and identities issued from it.

    from tests.pki import make_pki
    pki = make_pki()                       # in memory; make_pki(tmp_path) stores the root there
    chain, key = pki.issue("spiffe://cluster.local/ns/a/sa/b")
    server_ctx = pki.server_context("spiffe://cluster.local/ns/a/sa/b")
    client_ctx = pki.client_context("spiffe://cluster.local/ns/c/sa/d")

A thin wrapper over controlplane.ca and nodeproxy.tlsconfig, so tests exercise the real code.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from controlplane.ca import CertificateAuthority
from nodeproxy import tlsconfig
from nodeproxy.certs import utcnow
from nodeproxy.identity import spiffe_id

DEFAULT_TTL = timedelta(hours=1)


@dataclass
class TestPKI:
    ca: CertificateAuthority
    _issued: dict[tuple[str, timedelta], tuple[list[bytes], bytes]] = field(default_factory=dict)

    __test__ = False  # not a pytest test class

    @property
    def trust_domain(self) -> str:
        return self.ca.trust_domain

    @property
    def root_pem(self) -> bytes:
        return self.ca.root_pem

    def identity(self, namespace: str, service_account: str) -> str:
        return spiffe_id(self.ca.trust_domain, namespace, service_account)

    def issue(self, identity: str, ttl: timedelta = DEFAULT_TTL) -> tuple[list[bytes], bytes]:
        """``(chain_pems, key_pem)`` for ``identity``; cached per (identity, ttl)."""
        key = (identity, ttl)
        if key not in self._issued:
            self._issued[key] = self.ca.issue(identity, ttl)
        return self._issued[key]

    def server_context(
        self,
        identity: str,
        *,
        alpn: tuple[str, ...] = ("h2",),
        require_client_cert: bool = True,
    ) -> ssl.SSLContext:
        chain, key = self.issue(identity)
        return tlsconfig.server_context(
            chain, key, self.ca.root_pem, alpn=alpn, require_client_cert=require_client_cert
        )

    def client_context(
        self, identity: str | None, *, alpn: tuple[str, ...] = ("h2",)
    ) -> ssl.SSLContext:
        """A client context presenting ``identity`` (no client certificate if ``None``)."""
        if identity is None:
            return tlsconfig.client_context(None, None, self.ca.root_pem, alpn=alpn)
        chain, key = self.issue(identity)
        return tlsconfig.client_context(chain, key, self.ca.root_pem, alpn=alpn)


def make_pki(
    directory: Path | None = None,
    trust_domain: str = "cluster.local",
    *,
    clock: Callable[[], datetime] = utcnow,
) -> TestPKI:
    """A fresh CA (stored in ``directory`` if given, else in memory only).

    ``clock`` dates what the CA signs (e.g. one driven by trio's MockClock).
    """
    if directory is None:
        ca = CertificateAuthority.create(trust_domain, clock=clock)
    else:
        ca = CertificateAuthority.load_or_create(Path(directory), trust_domain, clock=clock)
    return TestPKI(ca)
