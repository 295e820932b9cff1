"""The node proxy's certificates without ``cryptography`` in its process (issue 4, memory).

- ``certs.der_spiffe_ids`` (stdlib only) gives the same SPIFFE ids as the ``cryptography`` path
  and refuses malformed DER;
- ``CertificateManager(isolate_crypto=True)`` makes the key and checks the issued chain in the
  short-lived ``python -m nodeproxy.certs`` helper: the certificate works for real TLS, the
  same unusable answers are refused, and a fresh process that fetched one never loaded
  ``cryptography``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from nodeproxy import certs
from nodeproxy.certmanager import CertificateManager, CertificateUnavailable
from nodeproxy.certs import CertError
from tests.pki import TestPKI, make_pki
from tests.unit.test_certmanager import ControlPlane, _handshake

ID = "spiffe://cluster.local/ns/shop/sa/cart"
WEB = "spiffe://cluster.local/ns/web/sa/frontend"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pki() -> TestPKI:
    return make_pki()


def _der(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)


def _self_signed(sans: list[x509.GeneralName] | None) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "t")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(7)
        .not_valid_before(certs.utcnow())
        .not_valid_after(certs.utcnow() + timedelta(hours=1))
    )
    if sans is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.DER)


# -- der_spiffe_ids ----------------------------------------------------------------------------


def test_der_spiffe_ids_matches_the_cryptography_reading(pki):
    chain, _ = pki.ca.issue(ID, timedelta(hours=1))
    for der in (
        _der(chain[0]),  # a workload leaf
        _der(pki.root_pem),  # a CA without SANs
        _self_signed(None),  # no extensions at all
        _self_signed([x509.DNSName("a.example"), x509.UniformResourceIdentifier("https://x")]),
        _self_signed([
            x509.UniformResourceIdentifier(WEB),
            x509.DNSName("b.example"),
            x509.UniformResourceIdentifier(ID),
        ]),
    ):
        assert certs.der_spiffe_ids(der) == certs.spiffe_ids(certs.load_certificate(der))
    assert certs.der_spiffe_ids(_der(chain[0])) == [ID]


def test_der_spiffe_ids_refuses_malformed_der(pki):
    chain, _ = pki.ca.issue(ID, timedelta(hours=1))
    der = _der(chain[0])
    for bad in (
        b"",
        b"\x30\x03\x02\x01",  # truncated
        der[:-1],  # one byte short
        der + b"\x00",  # trailing garbage
        b"\x30\x84\xff\xff\xff\xff" + der[4:],  # length beyond the data
        b"\x31" + der[1:],  # a SET, not a SEQUENCE
    ):
        with pytest.raises(CertError):
            certs.der_spiffe_ids(bad)


def test_der_spiffe_ids_refuses_a_repeated_san_extension(pki):
    chain, _ = pki.ca.issue(ID, timedelta(hours=1))
    der = _der(chain[0])
    # find the SAN extension (OID 2.5.29.17) and the extensions SEQUENCE, then append a copy
    oid = bytes.fromhex("0603551d11")
    at = der.index(oid)
    ext_start = at - 2  # SEQUENCE header of a short Extension (tag + 1-byte length)
    assert der[ext_start] == 0x30 and der[ext_start + 1] < 0x80
    ext = der[ext_start : ext_start + 2 + der[ext_start + 1]]
    exts_tag = der.rindex(b"\xa3", 0, ext_start)
    # rebuild [3] { SEQUENCE { ..., ext } } with the copy added; lengths re-encoded
    _, e0, e1 = certs._tlv(der, exts_tag, len(der))
    _, s0, s1 = certs._tlv(der, e0, e1)
    inner = der[s0:s1] + ext

    def enc(tag: int, body: bytes) -> bytes:
        n = len(body)
        if n < 0x80:
            return bytes([tag, n]) + body
        size = n.to_bytes((n.bit_length() + 7) // 8, "big")
        return bytes([tag, 0x80 | len(size)]) + size + body

    _, t0, t1 = certs._tlv(der, 0, len(der))
    _, b0, b1 = certs._tlv(der, t0, t1)  # tbsCertificate
    tbs = der[b0:exts_tag] + enc(0xA3, enc(0x30, inner))
    rest = der[b1:t1]  # signature algorithm and value (no longer valid: we only parse)
    forged = enc(0x30, enc(0x30, tbs) + rest)
    with pytest.raises(CertError, match="duplicate"):
        certs.der_spiffe_ids(forged)


# -- CertificateManager(isolate_crypto=True) ---------------------------------------------------


async def test_isolated_manager_issues_a_certificate_that_works_for_mtls(pki):
    cp = ControlPlane(pki)
    mgr = CertificateManager(cp.sign, pki.root_pem, isolate_crypto=True)
    cart = await mgr.get(ID)
    web = await mgr.get(WEB)
    assert cart.identity == ID and web.identity == WEB
    assert certs.cert_info(cart.chain[0]) == cart.info
    assert certs.load_key(cart.key_pem)  # a usable P-256 key came back from the helper
    assert len(cp.calls) == 2
    seen = await _handshake(cart.server_context(), web.client_context())
    assert seen == (WEB, ID)
    assert [row["identity"] for row in mgr.snapshot()] == sorted([ID, WEB])


async def test_isolated_manager_refuses_unusable_answers(pki):
    cp = ControlPlane(pki)
    mgr = CertificateManager(cp.sign, pki.root_pem, isolate_crypto=True)
    stranger = make_pki()
    cases = [
        (lambda csr, chain: stranger.ca.sign_csr(csr, timedelta(hours=1)), "trust roots"),
        (lambda csr, chain: pki.ca.issue(WEB, timedelta(hours=1))[0], "leaf identity"),
        (lambda csr, chain: pki.ca.issue(ID, timedelta(hours=1))[0], "not for the key"),
        (lambda csr, chain: [], "empty"),
        (lambda csr, chain: [b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"],
         "malformed"),
    ]
    for tamper, reason in cases:
        cp.tamper = tamper
        with pytest.raises(CertificateUnavailable, match=reason):
            await mgr.get(ID)
    cp.tamper = None
    assert (await mgr.get(ID)).identity == ID


async def test_isolated_manager_reports_a_failed_fetch_and_the_helper_exits(pki):
    cp = ControlPlane(pki)
    cp.fail = True
    mgr = CertificateManager(cp.sign, pki.root_pem, isolate_crypto=True)
    with pytest.raises(CertificateUnavailable, match="unreachable"):
        await mgr.get(ID)
    cp.fail = False
    assert (await mgr.get(ID)).identity == ID


def test_isolated_manager_refuses_bad_roots():
    with pytest.raises(CertError, match="no certificate"):
        CertificateManager(ControlPlane(make_pki()).sign, b"junk", isolate_crypto=True)
    bad = b"-----BEGIN CERTIFICATE-----\nMAMCAQA=\n-----END CERTIFICATE-----\n"
    with pytest.raises(CertError, match="trust roots"):
        CertificateManager(ControlPlane(make_pki()).sign, bad, isolate_crypto=True)


def test_helper_answers_errors_as_json():
    """``python -m nodeproxy.certs`` with a bad request: one JSON error line, exit status 1."""
    proc = subprocess.run(
        [sys.executable, "-m", "nodeproxy.certs"], input='{"identity": "http://nope"}\n',
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert proc.returncode == 1
    assert "not a SPIFFE id" in json.loads(proc.stdout)["error"]


def test_helper_whose_parent_went_away_exits_quietly():
    """The node proxy gave up on a certificate (the pod was released): it closes the pipes
    before the helper answers. The helper exits without a traceback in the log it shares
    with the node proxy (a crash there reads like the node proxy's own)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "nodeproxy.certs"], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
    )
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # nobody will read the answer
    proc.stdin.write(json.dumps({"identity": ID}).encode() + b"\n")
    proc.stdin.close()
    assert proc.wait(timeout=60) == 0
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert "Traceback" not in err and "Exception ignored" not in err, err


_CHILD = r"""
import json, ssl, sys, trio
from nodeproxy import certs
from nodeproxy.certmanager import CertificateManager

roots = json.loads(sys.stdin.readline())["roots"].encode()

async def sign(csr):
    print(json.dumps({"csr": csr.decode()}), flush=True)
    line = await trio.to_thread.run_sync(sys.stdin.readline)
    return [c.encode() for c in json.loads(line)["chain"]]

async def main():
    mgr = CertificateManager(sign, roots, isolate_crypto=True)
    cert = await mgr.get(sys.argv[1])
    cert.server_context(), cert.client_context()
    ids = certs.der_spiffe_ids(ssl.PEM_cert_to_DER_cert(cert.chain[0].decode()))
    loaded = sorted(m for m in sys.modules if m.split(".")[0] == "cryptography")
    print(json.dumps({"ids": ids, "cryptography": loaded}), flush=True)

trio.run(main)
"""


def test_a_process_issuing_through_the_helper_never_loads_cryptography(pki):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, ID], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True, env=env, cwd=ROOT,
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps({"roots": pki.root_pem.decode()}) + "\n")
        proc.stdin.flush()
        csr = json.loads(proc.stdout.readline())["csr"].encode()
        assert certs.csr_identity(csr) == ID
        chain = pki.ca.sign_csr(csr, timedelta(hours=1))
        proc.stdin.write(json.dumps({"chain": [c.decode() for c in chain]}) + "\n")
        proc.stdin.flush()
        result = json.loads(proc.stdout.readline())
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert result == {"ids": [ID], "cryptography": []}


def test_in_process_and_isolated_checks_agree(pki):
    """The helper runs the very same ``check_issued`` the in-process mode does."""
    key_pem, csr = certs.issue_request(ID)
    chain = pki.ca.sign_csr(csr, timedelta(hours=1))
    info = certs.check_issued(ID, key_pem, chain, pki.root_pem, certs.utcnow())
    assert info == certs.cert_info(chain[0])
    assert certs.info_from_json(json.loads(json.dumps(certs.info_to_json(info)))) == info
    with pytest.raises(CertError, match="time zone"):
        certs.info_from_json({**certs.info_to_json(info), "not_after": "2030-01-01T00:00:00"})
    later = certs.utcnow() + timedelta(hours=2)  # after the leaf expired
    with pytest.raises(CertError, match="trust roots"):
        certs.check_issued(ID, key_pem, chain, pki.root_pem, later)
