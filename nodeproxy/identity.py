"""SPIFFE identities: ``spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>``."""

from __future__ import annotations

from dataclasses import dataclass


class IdentityError(ValueError):
    pass


@dataclass(frozen=True)
class Identity:
    trust_domain: str
    namespace: str
    service_account: str

    def __str__(self) -> str:
        return spiffe_id(self.trust_domain, self.namespace, self.service_account)

    @property
    def principal(self) -> str:
        """The form Istio's AuthorizationPolicy ``principals`` use (no scheme)."""
        return f"{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"


def spiffe_id(trust_domain: str, namespace: str, service_account: str) -> str:
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"


def parse(uri: str) -> Identity:
    """Parse a SPIFFE URI of the Kubernetes shape; raise :class:`IdentityError` otherwise."""
    prefix = "spiffe://"
    if not uri.startswith(prefix):
        raise IdentityError(f"not a SPIFFE id: {uri!r}")
    parts = uri[len(prefix) :].split("/")
    if len(parts) != 5 or parts[1] != "ns" or parts[3] != "sa" or not all(parts):
        raise IdentityError(f"SPIFFE id is not spiffe://TD/ns/NS/sa/SA: {uri!r}")
    return Identity(parts[0], parts[2], parts[4])
