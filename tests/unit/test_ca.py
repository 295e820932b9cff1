"""controlplane.ca: the root on disk, what it signs and what it refuses."""

from __future__ import annotations

import stat
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from controlplane.ca import CLOCK_SKEW_GRACE, CAError, CertificateAuthority, NotAuthorized
from nodeproxy import certs
from nodeproxy.certs import CertError

ID = "spiffe://cluster.local/ns/shop/sa/cart"


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create()


def test_load_or_create_stores_root_with_private_key_mode(tmp_path):
    d = tmp_path / "ca"
    ca = CertificateAuthority.load_or_create(d)
    key_file, cert_file = d / "root-key.pem", d / "root-cert.pem"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert cert_file.read_bytes() == ca.root_pem
    root = x509.load_pem_x509_certificate(ca.root_pem)
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert root.not_valid_after_utc - root.not_valid_before_utc >= timedelta(days=3650)
    # loading again gives the same root, and it still signs verifiable leaves
    again = CertificateAuthority.load_or_create(d)
    assert again.root_pem == ca.root_pem
    chain, _ = again.issue(ID, timedelta(hours=1))
    _verify(chain, ca.root_pem)


def test_load_refuses_corrupt_key(tmp_path):
    CertificateAuthority.load_or_create(tmp_path)
    (tmp_path / "root-key.pem").write_bytes(b"-----BEGIN PRIVATE KEY-----\nzz\n")
    with pytest.raises(CAError, match="cannot load CA key"):
        CertificateAuthority.load_or_create(tmp_path)


def test_load_refuses_corrupt_cert(tmp_path):
    CertificateAuthority.load_or_create(tmp_path)
    (tmp_path / "root-cert.pem").write_bytes(b"garbage")
    with pytest.raises(CAError, match="cannot load CA certificate"):
        CertificateAuthority.load_or_create(tmp_path)


def test_load_refuses_key_of_another_root(tmp_path):
    CertificateAuthority.load_or_create(tmp_path / "a")
    CertificateAuthority.load_or_create(tmp_path / "b")
    (tmp_path / "a" / "root-key.pem").write_bytes((tmp_path / "b" / "root-key.pem").read_bytes())
    with pytest.raises(CAError, match="does not match"):
        CertificateAuthority.load_or_create(tmp_path / "a")


def test_load_refuses_half_a_ca_and_another_trust_domain(tmp_path):
    CertificateAuthority.load_or_create(tmp_path)
    with pytest.raises(CAError, match="trust domain"):
        CertificateAuthority.load_or_create(tmp_path, "other.example")
    (tmp_path / "root-key.pem").unlink()
    with pytest.raises(CAError, match="incomplete"):
        CertificateAuthority.load_or_create(tmp_path)


def test_signed_leaf_profile(ca):
    key = certs.generate_key()
    chain = ca.sign_csr(certs.make_csr(ID, key), timedelta(hours=24))
    assert len(chain) == 2 and chain[1] == ca.root_pem  # leaf first, root last
    leaf = x509.load_pem_x509_certificate(chain[0])
    root = x509.load_pem_x509_certificate(ca.root_pem)
    ext = leaf.extensions
    san = ext.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical and list(san.value) == [x509.UniformResourceIdentifier(ID)]
    assert len(leaf.subject) == 0
    assert leaf.public_key().public_numbers() == key.public_key().public_numbers()
    ku = ext.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and ku.key_agreement and not ku.key_cert_sign
    eku = ext.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert ext.get_extension_for_class(x509.BasicConstraints).value.ca is False
    aki = ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    root_ski = root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == root_ski.digest
    assert ext.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert isinstance(leaf.signature_hash_algorithm, hashes.SHA256)
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == timedelta(hours=24, minutes=2)
    _verify(chain, ca.root_pem)


def test_leaf_and_root_are_valid_from_two_minutes_before_signing():
    """A node whose clock is a minute behind the CA's still accepts what it is given."""
    signed_at = datetime(2026, 12, 5, 18, 0, 0, tzinfo=UTC)
    ca = CertificateAuthority.create(clock=lambda: signed_at)
    chain, _ = ca.issue(ID, timedelta(hours=24))
    leaf = x509.load_pem_x509_certificate(chain[0])
    root = x509.load_pem_x509_certificate(ca.root_pem)
    assert CLOCK_SKEW_GRACE == timedelta(minutes=2)
    assert leaf.not_valid_before_utc == root.not_valid_before_utc == signed_at - CLOCK_SKEW_GRACE
    assert leaf.not_valid_after_utc == signed_at + timedelta(hours=24)
    _verify(chain, ca.root_pem, at=signed_at - timedelta(minutes=1))


def test_refuses_identity_of_another_trust_domain(ca):
    csr = certs.make_csr("spiffe://evil.example/ns/shop/sa/cart", certs.generate_key())
    with pytest.raises(CertError, match="not in trust domain cluster.local"):
        ca.sign_csr(csr, timedelta(hours=1))


def test_refuses_malformed_csr_and_two_sans(ca):
    with pytest.raises(CertError, match="malformed CSR"):
        ca.sign_csr(b"-----BEGIN CERTIFICATE REQUEST-----\nnope\n", timedelta(hours=1))
    key = certs.generate_key()
    two = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.UniformResourceIdentifier(ID),
                    x509.UniformResourceIdentifier("spiffe://cluster.local/ns/kube-system/sa/x"),
                ]
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    with pytest.raises(CertError, match="exactly one SAN"):
        ca.sign_csr(two, timedelta(hours=1))


def test_refuses_non_p256_key(ca):
    key = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(CertError, match="P-256"):
        ca.sign_csr(certs.make_csr(ID, key), timedelta(hours=1))


def test_allowed_decides(ca):
    seen = []

    def only_cart(identity: str) -> bool:
        seen.append(identity)
        return identity == ID

    chain = ca.sign_csr(certs.make_csr(ID, certs.generate_key()), timedelta(hours=1), only_cart)
    assert certs.cert_info(chain[0]).identity == ID
    other = "spiffe://cluster.local/ns/shop/sa/payments"
    with pytest.raises(NotAuthorized, match="payments"):
        ca.sign_csr(certs.make_csr(other, certs.generate_key()), timedelta(hours=1), only_cart)
    assert seen == [ID, other]
    assert issubclass(NotAuthorized, CertError)


def test_issue_returns_matching_key(ca):
    chain, key_pem = ca.issue(ID, timedelta(minutes=5))
    leaf = x509.load_pem_x509_certificate(chain[0])
    key = certs.load_key(key_pem)
    assert leaf.public_key().public_numbers() == key.public_key().public_numbers()
    assert certs.cert_info(chain[0]).identity == ID


def test_leaf_from_other_ca_does_not_verify(ca):
    other = CertificateAuthority.create()
    chain, _ = other.issue(ID, timedelta(hours=1))
    with pytest.raises(VerificationError):
        _verify(chain, ca.root_pem)


def _verify(chain: list[bytes], root_pem: bytes, at: datetime | None = None) -> None:
    store = Store([x509.load_pem_x509_certificate(root_pem)])
    leaf = x509.load_pem_x509_certificate(chain[0])
    policy = PolicyBuilder().store(store)
    if at is not None:
        policy = policy.time(at)
    verified = policy.build_client_verifier().verify(leaf, [])
    assert [n.value for n in verified.subjects] == [ID]
