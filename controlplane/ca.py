"""The mesh certificate authority: a self-signed root that signs workload CSRs.

The root key never leaves the control plane: it is kept in ``<dir>/root-key.pem`` (mode 0600)
next to ``<dir>/root-cert.pem``. Leaves copy the CSR's SPIFFE id into a critical URI SAN and are
good for both ends of an mTLS connection.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from nodeproxy import certs
from nodeproxy import identity as spiffe
from nodeproxy.certs import CertError

log = logging.getLogger(__name__)

ROOT_KEY_FILE = "root-key.pem"
ROOT_CERT_FILE = "root-cert.pem"
ROOT_TTL = timedelta(days=3650)
# Certificates are valid from a little before they are made, as Istio's CA does
# (ClockSkewGracePeriod): a node whose clock runs behind the control plane's, or a
# machine whose clock is stepped back just after boot, must not see "not yet valid".
CLOCK_SKEW_GRACE = timedelta(minutes=2)


class NotAuthorized(CertError):
    """The caller may not hold the identity it asked for."""


class CAError(Exception):
    """The CA's own files cannot be used (corrupt, mismatched, unreadable)."""


def _write_private(path: Path, data: bytes, mode: int) -> None:
    """Write atomically with ``mode`` from the start (the key is never world-readable)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.unlink()
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


class CertificateAuthority:
    """Signs workload certificates under one root for one trust domain."""

    def __init__(
        self,
        root_key: ec.EllipticCurvePrivateKey,
        root_cert: x509.Certificate,
        trust_domain: str,
        *,
        clock: Callable[[], datetime] = certs.utcnow,
    ) -> None:
        self.trust_domain = trust_domain
        self._clock = clock
        self._key = root_key
        self._cert = root_cert
        self.root_pem: bytes = root_cert.public_bytes(serialization.Encoding.PEM)

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def create(
        cls, trust_domain: str = "cluster.local", *, clock: Callable[[], datetime] = certs.utcnow
    ) -> CertificateAuthority:
        """A new CA held only in memory (tests, throw-away labs)."""
        _check_trust_domain(trust_domain)
        key = certs.generate_key()
        now = clock().replace(microsecond=0)
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
                x509.NameAttribute(NameOID.COMMON_NAME, "nodeproxy root CA"),
            ]
        )
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW_GRACE)
            .not_valid_after(now + ROOT_TTL)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert, trust_domain, clock=clock)

    @classmethod
    def load_or_create(
        cls,
        directory: Path,
        trust_domain: str = "cluster.local",
        *,
        clock: Callable[[], datetime] = certs.utcnow,
    ) -> CertificateAuthority:
        """Load the root from ``directory``, or create and store one there if there is none."""
        _check_trust_domain(trust_domain)
        directory = Path(directory)
        key_path, cert_path = directory / ROOT_KEY_FILE, directory / ROOT_CERT_FILE
        have_key, have_cert = key_path.exists(), cert_path.exists()
        if have_key != have_cert:
            missing = cert_path if have_key else key_path
            raise CAError(f"CA directory {directory} is incomplete: {missing} is missing")
        if not have_key:
            ca = cls.create(trust_domain, clock=clock)
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            _write_private(key_path, certs.key_to_pem(ca._key), 0o600)
            _write_private(cert_path, ca.root_pem, 0o644)
            log.info("created CA root for %s in %s", trust_domain, directory)
            return ca
        return cls._load(key_path, cert_path, trust_domain, clock)

    @classmethod
    def _load(
        cls, key_path: Path, cert_path: Path, trust_domain: str, clock: Callable[[], datetime]
    ) -> CertificateAuthority:
        try:
            key = certs.load_key(key_path.read_bytes())
        except (OSError, CertError) as e:
            raise CAError(f"cannot load CA key {key_path}: {e}") from None
        try:
            cert = certs.load_certificate(cert_path.read_bytes())
        except (OSError, CertError) as e:
            raise CAError(f"cannot load CA certificate {cert_path}: {e}") from None
        if cert.public_key().public_numbers() != key.public_key().public_numbers():
            raise CAError(f"CA key {key_path} does not match certificate {cert_path}")
        try:
            bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            bc = None
        if bc is None or not bc.ca:
            raise CAError(f"{cert_path} is not a CA certificate")
        orgs = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)]
        if orgs and orgs[0] != trust_domain:
            # Identities of one trust domain must not be minted under another's root.
            raise CAError(
                f"CA root {cert_path} belongs to trust domain {orgs[0]!r}, not {trust_domain!r}"
            )
        if cert.not_valid_after_utc <= clock():
            raise CAError(f"CA root {cert_path} expired at {cert.not_valid_after_utc}")
        if key_path.stat().st_mode & 0o077:
            log.warning("CA key %s is readable by group/other; tightening to 0600", key_path)
            os.chmod(key_path, 0o600)
        log.info("loaded CA root for %s from %s", trust_domain, cert_path.parent)
        return cls(key, cert, trust_domain, clock=clock)

    # -- signing ------------------------------------------------------------------------------

    def sign_csr(
        self,
        csr_pem: bytes,
        ttl: timedelta,
        allowed: Callable[[str], bool] | None = None,
    ) -> list[bytes]:
        """Sign a workload CSR; return ``[leaf_pem, root_pem]``.

        Raises :class:`CertError` for a malformed CSR or a foreign trust domain and
        :class:`NotAuthorized` when ``allowed(identity)`` says no.
        """
        ident = certs.csr_identity(csr_pem)
        td = spiffe.parse(ident).trust_domain
        if td != self.trust_domain:
            raise CertError(f"identity {ident} is not in trust domain {self.trust_domain}")
        if allowed is not None and not allowed(ident):
            raise NotAuthorized(f"not allowed to hold {ident}")
        if ttl <= timedelta(0):
            raise ValueError(f"certificate TTL must be positive, got {ttl}")
        csr = certs.load_csr(csr_pem)
        pub = csr.public_key()
        if not isinstance(pub, ec.EllipticCurvePublicKey) or not isinstance(
            pub.curve, ec.SECP256R1
        ):
            raise CertError("CSR key is not ECDSA P-256")
        now = self._clock().replace(microsecond=0)
        # A leaf never outlives its root.
        not_after = min(now + ttl, self._cert.not_valid_after_utc)
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self._cert.subject)
            .public_key(pub)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW_GRACE)
            .not_valid_after(not_after)
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(ident)]),
                critical=True,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=True,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        log.info("signed %s serial %x until %s", ident, leaf.serial_number, not_after)
        return [leaf.public_bytes(serialization.Encoding.PEM), self.root_pem]

    def issue(self, identity: str, ttl: timedelta) -> tuple[list[bytes], bytes]:
        """Make a key and CSR for ``identity`` and sign it; return ``(chain, key_pem)``."""
        key = certs.generate_key()
        chain = self.sign_csr(certs.make_csr(identity, key), ttl)
        return chain, certs.key_to_pem(key)


def _check_trust_domain(trust_domain: str) -> None:
    try:
        spiffe.parse(spiffe.spiffe_id(trust_domain, "ns", "sa"))
    except spiffe.IdentityError:
        raise ValueError(f"bad trust domain {trust_domain!r}") from None
