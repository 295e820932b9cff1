"""Keys, CSRs and certificate parsing for SPIFFE identities (all X.509 work via ``cryptography``).

A workload CSR is what Istio's node proxy sends: ECDSA P-256, SHA-256, an empty subject and
exactly one URI SAN (the SPIFFE id), marked critical because the subject is empty (RFC 5280
§4.2.1.6).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from nodeproxy import identity as spiffe

log = logging.getLogger(__name__)


class CertError(ValueError):
    """A key, CSR or certificate that cannot be used; the message says why."""


def generate_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


def key_to_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """PKCS#8 PEM, unencrypted (it is only ever held in memory or in a 0600 file)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_key(key_pem: bytes) -> ec.EllipticCurvePrivateKey:
    """Load a PEM private key, which must be ECDSA P-256."""
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as e:
        raise CertError(f"malformed private key: {e}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise CertError("private key is not ECDSA P-256")
    return key


def make_csr(identity: str, key: ec.EllipticCurvePrivateKey) -> bytes:
    """A PEM CSR for ``identity`` (validated as a SPIFFE id) signed by ``key``."""
    try:
        spiffe.parse(identity)
    except spiffe.IdentityError as e:
        raise CertError(str(e)) from None
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def load_csr(csr_pem: bytes) -> x509.CertificateSigningRequest:
    """Parse a PEM CSR and check its self-signature; raise :class:`CertError` otherwise."""
    if isinstance(csr_pem, str):
        csr_pem = csr_pem.encode()
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except (ValueError, TypeError) as e:
        raise CertError(f"malformed CSR: {e}") from None
    try:
        valid = csr.is_signature_valid
    except Exception as e:  # unsupported key/algorithm surfaces here
        raise CertError(f"CSR signature cannot be checked: {e}") from None
    if not valid:
        raise CertError("CSR signature is not valid")
    return csr


def csr_identity(csr_pem: bytes) -> str:
    """The SPIFFE id a CSR asks for: exactly one SAN, a URI, of the SPIFFE shape."""
    csr = load_csr(csr_pem)
    try:
        ext = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        raise CertError("CSR has no subjectAltName") from None
    except (ValueError, x509.DuplicateExtension) as e:
        raise CertError(f"CSR extensions are malformed: {e}") from None
    names = list(ext.value)
    if len(names) != 1:
        raise CertError(f"CSR must have exactly one SAN, it has {len(names)}")
    name = names[0]
    if not isinstance(name, x509.UniformResourceIdentifier):
        raise CertError(f"CSR SAN must be a URI, got {type(name).__name__}")
    try:
        spiffe.parse(name.value)
    except spiffe.IdentityError as e:
        raise CertError(f"CSR SAN: {e}") from None
    return name.value


@dataclass(frozen=True)
class CertInfo:
    """What the mesh needs to know about a leaf certificate."""

    identity: str | None
    serial: int
    not_before: datetime
    not_after: datetime

    @property
    def refresh_at(self) -> datetime:
        """Half-life: ``not_before + (not_after - not_before) / 2`` (Istio's rule)."""
        return self.not_before + (self.not_after - self.not_before) / 2

    def expired(self, now: datetime) -> bool:
        return now >= self.not_after


def load_certificate(pem_or_der: bytes) -> x509.Certificate:
    """Parse one certificate, PEM or DER (the first one if a PEM chain is given)."""
    if isinstance(pem_or_der, str):
        pem_or_der = pem_or_der.encode()
    try:
        if pem_or_der.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(pem_or_der)
        return x509.load_der_x509_certificate(pem_or_der)
    except (ValueError, TypeError) as e:
        raise CertError(f"malformed certificate: {e}") from None


def spiffe_ids(cert: x509.Certificate) -> list[str]:
    """The ``spiffe://`` URI SANs of a certificate (usually exactly one)."""
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    except (ValueError, x509.DuplicateExtension) as e:
        raise CertError(f"certificate extensions are malformed: {e}") from None
    return [
        uri
        for uri in ext.value.get_values_for_type(x509.UniformResourceIdentifier)
        if uri.startswith("spiffe://")
    ]


def cert_info(pem_or_der: bytes) -> CertInfo:
    """Identity, serial and validity of a certificate (the leaf, if given a PEM chain)."""
    cert = load_certificate(pem_or_der)
    ids = spiffe_ids(cert)
    return CertInfo(
        identity=ids[0] if ids else None,
        serial=cert.serial_number,
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
    )


_PEM_BLOCK = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL
)


def split_pem_chain(pem: bytes) -> list[bytes]:
    """Split concatenated PEM certificates into one PEM (with trailing newline) each."""
    if isinstance(pem, str):
        pem = pem.encode()
    return [m.group(0) + b"\n" for m in _PEM_BLOCK.finditer(pem)]


def utcnow() -> datetime:
    return datetime.now(UTC)
