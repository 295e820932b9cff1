"""Keys, CSRs and certificate parsing for SPIFFE identities.

A workload CSR is what Istio's node proxy sends: ECDSA P-256, SHA-256, an empty subject and
exactly one URI SAN (the SPIFFE id), marked critical because the subject is empty (RFC 5280
§4.2.1.6).

X.509 work is done with ``cryptography``, imported only inside the functions that need it: once
loaded, its own OpenSSL and Rust extension stay resident (≈ 9 MB), and the node proxy needs it
only while it makes a key and checks what the CA returned. :func:`der_spiffe_ids` reads a peer
certificate's SPIFFE ids with the stdlib alone (the per-connection check), and
``python -m nodeproxy.certs`` is the short-lived helper process that makes a key + CSR and checks
the issued chain (:func:`issue_request`, :func:`check_issued`), used by
``nodeproxy.certmanager.CertificateManager(isolate_crypto=True)``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from nodeproxy import identity as spiffe

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

log = logging.getLogger(__name__)


class CertError(ValueError):
    """A key, CSR or certificate that cannot be used; the message says why."""


def generate_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 private key."""
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def key_to_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """PKCS#8 PEM, unencrypted (it is only ever held in memory or in a 0600 file)."""
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_key(key_pem: bytes) -> ec.EllipticCurvePrivateKey:
    """Load a PEM private key, which must be ECDSA P-256."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as e:
        raise CertError(f"malformed private key: {e}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise CertError("private key is not ECDSA P-256")
    return key


def make_csr(identity: str, key: ec.EllipticCurvePrivateKey) -> bytes:
    """A PEM CSR for ``identity`` (validated as a SPIFFE id) signed by ``key``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

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
    from cryptography import x509

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
    from cryptography import x509

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
    from cryptography import x509

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
    from cryptography import x509

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


# -- issuing, in this process or in the helper process ----------------------------------------


def issue_request(identity: str) -> tuple[bytes, bytes]:
    """A fresh key and a CSR for ``identity``: ``(key PEM, CSR PEM)``."""
    key = generate_key()  # a fresh key for every certificate, as Istio does
    return key_to_pem(key), make_csr(identity, key)


def check_issued(
    identity: str, key_pem: bytes, chain: list[bytes], roots_pem: bytes, now: datetime
) -> CertInfo:
    """Check what the CA returned for our CSR before any connection relies on it.

    The leaf must carry exactly ``identity``, be for ``key_pem``'s key, and verify (with the
    rest of ``chain`` as intermediates) against ``roots_pem`` at ``now``. Raises
    :class:`CertError` saying why not.
    """
    from cryptography.x509 import verification

    if not isinstance(chain, list) or not chain:
        raise CertError("empty certificate chain")
    chain = [c.encode() if isinstance(c, str) else c for c in chain]
    parsed = [load_certificate(c) for c in chain]
    leaf = parsed[0]
    ids = spiffe_ids(leaf)
    if ids != [identity]:
        raise CertError(f"leaf identity is {ids}, asked for {identity}")
    key = load_key(key_pem)
    if leaf.public_key().public_numbers() != key.public_key().public_numbers():
        raise CertError("leaf certificate is not for the key we sent")
    try:
        roots = [load_certificate(pem) for pem in split_pem_chain(roots_pem)]
    except CertError as e:
        raise CertError(f"trust roots: {e}") from None
    if not roots:
        raise CertError("no certificate in the trust roots")
    verifier = (
        verification.PolicyBuilder()
        .store(verification.Store(roots))
        .time(now)
        .build_client_verifier()
    )
    try:
        verifier.verify(leaf, parsed[1:])
    except verification.VerificationError as e:
        raise CertError(f"chain does not verify against the trust roots: {e}") from None
    return CertInfo(
        identity=identity,
        serial=leaf.serial_number,
        not_before=leaf.not_valid_before_utc,
        not_after=leaf.not_valid_after_utc,
    )


def info_to_json(info: CertInfo) -> dict[str, object]:
    return {
        "identity": info.identity,
        "serial": str(info.serial),  # JSON numbers lose precision beyond 2**53
        "not_before": info.not_before.isoformat(),
        "not_after": info.not_after.isoformat(),
    }


def info_from_json(obj: dict[str, object]) -> CertInfo:
    """The inverse of :func:`info_to_json`; raises :class:`CertError` on anything else."""
    try:
        identity = obj["identity"]
        info = CertInfo(
            identity=identity if isinstance(identity, str) else None,
            serial=int(str(obj["serial"])),
            not_before=datetime.fromisoformat(str(obj["not_before"])),
            not_after=datetime.fromisoformat(str(obj["not_after"])),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise CertError(f"malformed certificate description: {e!r}") from None
    if info.not_before.tzinfo is None or info.not_after.tzinfo is None:
        raise CertError("certificate validity without a time zone")
    return info


def helper_main(stdin=None, stdout=None) -> int:  # noqa: ANN001 - text streams
    """``python -m nodeproxy.certs``: the short-lived issuing helper of the node proxy.

    One JSON object per line. In: ``{"identity"}``; out: ``{"key", "csr"}`` (PEM text). In:
    ``{"chain", "roots", "now"}`` (PEM texts, ISO time); out: :func:`info_to_json` of the checked
    leaf. Any failure is answered ``{"error": "..."}`` and ends the helper (exit status 1).
    """
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout

    def answer(obj: dict[str, object]) -> None:
        stdout.write(json.dumps(obj) + "\n")
        stdout.flush()

    try:
        request = json.loads(stdin.readline() or "null")
        if not isinstance(request, dict) or not isinstance(request.get("identity"), str):
            raise CertError("helper: expected {\"identity\": ...}")
        identity = request["identity"]
        key_pem, csr_pem = issue_request(identity)
        answer({"key": key_pem.decode(), "csr": csr_pem.decode()})
        issued = json.loads(stdin.readline() or "null")
        if issued is None:
            return 0  # the parent gave up (fetch failed): nothing to check
        if not isinstance(issued, dict):
            raise CertError("helper: expected {\"chain\", \"roots\", \"now\"}")
        chain = issued.get("chain")
        if not isinstance(chain, list) or not all(isinstance(c, str) for c in chain):
            raise CertError("empty certificate chain" if not chain else "chain is not PEM text")
        roots, now = issued.get("roots"), issued.get("now")
        if not isinstance(roots, str) or not isinstance(now, str):
            raise CertError("helper: roots and time missing")
        info = check_issued(
            identity, key_pem, [c.encode() for c in chain], roots.encode(),
            datetime.fromisoformat(now),
        )
        answer(info_to_json(info))
        return 0
    except BrokenPipeError:
        return _parent_gone(stdout)
    except (CertError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        try:
            answer({"error": str(e)})
        except BrokenPipeError:
            return _parent_gone(stdout)
        return 1


def _parent_gone(stdout) -> int:  # noqa: ANN001 - a text stream
    """The node proxy closed our pipe (it gave the certificate up: the pod went away). Not an
    error: exit quietly, and let the interpreter's final flush of stdout go nowhere, or it
    prints a traceback into the log we share with the node proxy."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass  # not a real file (a test's StringIO): nothing will be flushed at exit
    return 0


# -- reading a certificate with the stdlib (the per-connection identity check) ---------------

_SAN_OID = bytes.fromhex("551d11")  # 2.5.29.17 subjectAltName


def _tlv(data: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """One DER element at ``pos``: ``(tag, start of contents, end of contents)``."""
    if pos + 2 > end:
        raise CertError("malformed certificate: truncated DER")
    tag = data[pos]
    if tag & 0x1F == 0x1F:
        raise CertError("malformed certificate: unexpected multi-byte DER tag")
    length = data[pos + 1]
    pos += 2
    if length & 0x80:
        count = length & 0x7F
        if count == 0 or count > 4 or pos + count > end:
            raise CertError("malformed certificate: bad DER length")
        length = int.from_bytes(data[pos : pos + count], "big")
        if length < 0x80 or data[pos] == 0:
            raise CertError("malformed certificate: non-minimal DER length")
        pos += count
    if pos + length > end:
        raise CertError("malformed certificate: DER element overruns its container")
    return tag, pos, pos + length


def _children(data: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    out = []
    while start < end:
        tag, c0, c1 = _tlv(data, start, end)
        out.append((tag, c0, c1))
        start = c1
    return out


def der_spiffe_ids(der: bytes) -> list[str]:
    """The ``spiffe://`` URI SANs of a DER certificate, read with the stdlib alone.

    Same answer as ``spiffe_ids(load_certificate(der))`` for the certificates a TLS handshake
    let through, without loading ``cryptography``; anything malformed (including a repeated
    subjectAltName extension) raises :class:`CertError`.
    """
    data = bytes(der)
    tag, c0, c1 = _tlv(data, 0, len(data))
    if tag != 0x30 or c1 != len(data):
        raise CertError("malformed certificate: not one DER SEQUENCE")
    parts = _children(data, c0, c1)
    if len(parts) != 3 or parts[0][0] != 0x30:
        raise CertError("malformed certificate: not a Certificate")
    tbs = _children(data, parts[0][1], parts[0][2])
    extensions = [p for p in tbs if p[0] == 0xA3]  # [3] EXPLICIT Extensions
    if not extensions:
        return []
    if len(extensions) > 1:
        raise CertError("malformed certificate: repeated extensions field")
    tag, e0, e1 = _tlv(data, extensions[0][1], extensions[0][2])
    if tag != 0x30 or e1 != extensions[0][2]:
        raise CertError("malformed certificate: extensions are not a SEQUENCE")
    san: tuple[int, int] | None = None
    for tag, x0, x1 in _children(data, e0, e1):
        if tag != 0x30:
            raise CertError("malformed certificate: extension is not a SEQUENCE")
        fields = _children(data, x0, x1)
        if len(fields) not in (2, 3) or fields[0][0] != 0x06 or fields[-1][0] != 0x04:
            raise CertError("malformed certificate: bad extension")
        if data[fields[0][1] : fields[0][2]] != _SAN_OID:
            continue
        if san is not None:
            raise CertError("certificate extensions are malformed: duplicate subjectAltName")
        san = (fields[-1][1], fields[-1][2])
    if san is None:
        return []
    tag, g0, g1 = _tlv(data, san[0], san[1])
    if tag != 0x30 or g1 != san[1]:
        raise CertError("malformed certificate: subjectAltName is not a SEQUENCE")
    uris = []
    for tag, n0, n1 in _children(data, g0, g1):
        if tag == 0x86:  # [6] IMPLICIT IA5String: uniformResourceIdentifier
            try:
                uri = data[n0:n1].decode("ascii")
            except UnicodeDecodeError:
                raise CertError("malformed certificate: URI SAN is not ASCII") from None
            if uri.startswith("spiffe://"):
                uris.append(uri)
    return uris


if __name__ == "__main__":
    sys.exit(helper_main())
