"""nodeproxy.certs: keys, CSRs, certificate parsing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from nodeproxy import certs
from nodeproxy.certs import CertError, CertInfo
from tests.pki import make_pki

ID = "spiffe://cluster.local/ns/default/sa/web"


def _csr_with(names: list[x509.GeneralName], key=None, critical: bool = True) -> bytes:
    key = key or certs.generate_key()
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=critical)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def test_key_is_p256_and_pem_roundtrips():
    key = certs.generate_key()
    assert isinstance(key.curve, ec.SECP256R1)
    pem = certs.key_to_pem(key)
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8, unencrypted
    assert certs.load_key(pem).private_numbers() == key.private_numbers()


def test_csr_has_empty_subject_one_critical_uri_san_sha256():
    key = certs.generate_key()
    pem = certs.make_csr(ID, key)
    csr = x509.load_pem_x509_csr(pem)
    assert csr.is_signature_valid
    assert len(csr.subject) == 0
    assert isinstance(csr.signature_hash_algorithm, hashes.SHA256)
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert list(san.value) == [x509.UniformResourceIdentifier(ID)]
    assert csr.public_key().public_numbers() == key.public_key().public_numbers()
    assert certs.csr_identity(pem) == ID


def test_make_csr_refuses_non_spiffe_identity():
    with pytest.raises(CertError, match="SPIFFE"):
        certs.make_csr("https://example.com/", certs.generate_key())


@pytest.mark.parametrize(
    "csr, message",
    [
        (b"not a csr", "malformed CSR"),
        (
            b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
            "malformed CSR",
        ),
        (_csr_with([]), "no subjectAltName"),
        (
            _csr_with(
                [
                    x509.UniformResourceIdentifier(ID),
                    x509.UniformResourceIdentifier("spiffe://cluster.local/ns/x/sa/y"),
                ]
            ),
            "exactly one SAN",
        ),
        (_csr_with([x509.DNSName("web.default.svc")]), "must be a URI"),
        (_csr_with([x509.UniformResourceIdentifier("spiffe://cluster.local/web")]), "ns/NS/sa"),
    ],
    ids=["garbage", "bad-base64-body", "no-san", "two-sans", "dns-san", "bad-spiffe-shape"],
)
def test_csr_identity_refuses_bad_csrs(csr, message):
    with pytest.raises(CertError, match=message):
        certs.csr_identity(csr)


def test_csr_identity_refuses_bad_signature():
    pem = certs.make_csr(ID, certs.generate_key())
    der = bytearray(x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0x01  # inside the signature
    tampered = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(CertError, match="signature"):
        certs.csr_identity(tampered)


def test_cert_info_from_pem_der_and_chain():
    pki = make_pki()
    chain, _ = pki.ca.issue(ID, timedelta(hours=24))
    info = certs.cert_info(chain[0])
    assert info.identity == ID
    assert info.not_after - info.not_before == timedelta(hours=24, minutes=2)  # backdated
    der = x509.load_pem_x509_certificate(chain[0]).public_bytes(serialization.Encoding.DER)
    assert certs.cert_info(der) == info
    # a PEM bundle: the first certificate (the leaf) is described
    assert certs.cert_info(b"".join(chain)) == info
    root = certs.cert_info(pki.root_pem)
    assert root.identity is None


def test_cert_info_refuses_garbage():
    with pytest.raises(CertError, match="malformed certificate"):
        certs.cert_info(b"\x30\x03\x02\x01")


def test_refresh_at_is_half_life_and_expiry():
    start = datetime(2030, 1, 1, tzinfo=UTC)
    info = CertInfo(ID, 1, start, start + timedelta(hours=24))
    assert info.refresh_at == start + timedelta(hours=12)
    assert not info.expired(start + timedelta(hours=23, minutes=59))
    assert info.expired(start + timedelta(hours=24))


def test_split_pem_chain_and_spiffe_ids():
    pki = make_pki()
    chain, _ = pki.ca.issue(ID, timedelta(hours=1))
    parts = certs.split_pem_chain(b"junk\n" + b"".join(chain) + b"trailing")
    assert parts == chain
    assert certs.spiffe_ids(x509.load_pem_x509_certificate(parts[0])) == [ID]
    assert certs.spiffe_ids(x509.load_pem_x509_certificate(parts[1])) == []
    assert certs.split_pem_chain(b"") == []
