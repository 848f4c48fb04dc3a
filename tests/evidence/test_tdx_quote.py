"""TDX quote codec and offline verification, against the real quotes in ../shared/vectors.

Expected values come from tdx-quote/MANIFEST.json and ccel/MANIFEST.json (go-tdx-guest,
trustee and evidence-api quotes, their source repositories' own expectations re-derived
by independent tools), trustee's parse_tdx_claims_expected.json, and quotes built here
under a throwaway PKI with ``cryptography`` (encoded with struct in this file, not with
the codec under test).
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from cima.errors import (
    CimaError,
    FreshnessError,
    ParseError,
    SignatureError,
    TruncatedError,
    UnsupportedFormatError,
)
from cima.evidence import tdx
from cima.evidence.tdx import (
    CertificateChainError,
    QEReportDataError,
    QEReportSignatureError,
    QuoteSignatureError,
    ReportDataBindingError,
    RootOfTrustError,
    TDXQuote,
    TDXVerificationError,
    verify,
)
from tests.vectors import manifest, path

# Every certificate of every vector chain is valid at this instant: the latest PCK leaf
# notBefore is 2026-01-27 (quote_v5_sample) and the earliest notAfter is 2029-09-20
# (tdx_prod_quote_SPR_E4, MANIFEST pck_leaf_not_after). A fixed instant keeps the tests
# from expiring with the certificates.
NOW = datetime(2026, 6, 1, tzinfo=UTC)

TDX_ENTRIES = [e for e in manifest("tdx-quote") if "header" in e["expected"]]
COS_ENTRY = next(e for e in manifest("ccel") if e["file"] == "go-tdx-guest/cos-113-tdx-quote.dat")
QUOTES: list[tuple[str, str, dict[str, Any]]] = [
    ("tdx-quote", e["file"], e["expected"]) for e in TDX_ENTRIES
] + [("ccel", COS_ENTRY["file"], COS_ENTRY["expected"])]
QUOTE_IDS = [f"{cat}/{file}" for cat, file, _ in QUOTES]
ROOT_ENTRY = next(e for e in manifest("tdx-quote") if e["file"] == "go-tdx-guest/trusted_root.pem")

PROD_V4 = "go-tdx-guest/tdx_prod_quote_SPR_E4.dat"


def read(category: str, file: str) -> bytes:
    return path(category, file).read_bytes()


@pytest.fixture(autouse=True)
def _cold_caches() -> None:
    tdx.clear_caches()


# --- decoding the real quotes ------------------------------------------------------------


@pytest.mark.parametrize(("category", "file", "expected"), QUOTES, ids=QUOTE_IDS)
def test_header_and_body_decode_to_the_manifest(
    category: str, file: str, expected: dict[str, Any]
) -> None:
    q = TDXQuote.from_bytes(read(category, file))
    eh = expected["header"]
    assert q.header.version == eh["version"]
    assert q.header.attestation_key_type == eh["attestation_key_type"]
    assert f"0x{q.header.tee_type:08x}" == eh["tee_type"]
    assert q.header.qe_vendor_id.hex() == eh["qe_vendor_id"]
    assert q.header.user_data.hex() == eh["user_data"]
    if "qe_svn_or_reserved" in eh:
        assert q.header.qe_svn.hex() == eh["qe_svn_or_reserved"]
        assert q.header.pce_svn.hex() == eh["pce_svn_or_reserved"]
    for name, value in expected["body"].items():
        assert getattr(q.body, name).hex() == value, name
    assert q.to_dict()["body"] == expected["body"]
    if "body_descriptor" in expected:
        assert q.body_descriptor is not None
        assert q.body_descriptor.body_type == expected["body_descriptor"]["type"]
        assert q.body_descriptor.size == expected["body_descriptor"]["size"]
        assert q.body.size == expected["body_descriptor"]["size"]
        assert q.body.tdx_version == "1.5"
    else:
        assert q.body_descriptor is None
        assert q.body.tdx_version == "1.0"


@pytest.mark.parametrize(("category", "file", "expected"), QUOTES, ids=QUOTE_IDS)
def test_signature_data_decodes_to_the_manifest(
    category: str, file: str, expected: dict[str, Any]
) -> None:
    data = read(category, file)
    q = TDXQuote.from_bytes(data)
    sd = q.signature_data
    assert q.size == expected["quote_bytes"]
    assert q.trailing == data[expected["quote_bytes"] :]
    assert len(q.trailing) == expected["trailing_bytes"]
    assert (not any(q.trailing)) == expected["trailing_all_zero"]
    if "trailing_bytes_ascii" in expected:
        assert q.trailing.decode("ascii") == expected["trailing_bytes_ascii"]
    d = q.to_dict()
    assert d["quote_bytes"] == expected["quote_bytes"]
    assert d["trailing_bytes"] == expected["trailing_bytes"]
    if "signature_data_len" in expected:
        assert d["signature_data_len"] == expected["signature_data_len"]
        assert len(q.signed_bytes) + 4 + expected["signature_data_len"] == q.size
    if "certification_data_type_outer" in expected:
        assert sd.certification_data_type == expected["certification_data_type_outer"]
        assert sd.pck_certification_data_type == expected["certification_data_type_inner"]
    if "attestation_public_key" in expected:
        assert sd.attestation_key.hex() == expected["attestation_public_key"]
    if "qe_auth_data_len" in expected:
        assert len(sd.qe_auth_data) == expected["qe_auth_data_len"]
    qe = sd.qe_report
    for name, value in expected["qe_report"].items():
        got = getattr(qe, name)
        assert (got.hex() if isinstance(got, bytes) else got) == value, name
    assert d["signature_data"]["qe_report"]["mrenclave"] == expected["qe_report"]["mrenclave"]
    certs = sd.certificates()
    if "pck_chain_subjects" in expected:
        assert [c.subject.rfc4514_string() for c in certs] == expected["pck_chain_subjects"]
    assert certs[0].not_valid_after_utc.isoformat() == expected["pck_leaf_not_after"]
    # The PEM text in the quote is what the certificates re-encode to.
    assert "".join(sd.pem_certificates()).encode() == sd.pck_chain_pem.rstrip(b"\0")
    json.dumps(d)  # the dict is plain JSON


@pytest.mark.parametrize(("category", "file", "expected"), QUOTES, ids=QUOTE_IDS)
def test_round_trip_reproduces_the_input(
    category: str, file: str, expected: dict[str, Any]
) -> None:
    data = read(category, file)
    q = TDXQuote.from_bytes(data)
    assert q.to_bytes() == data
    assert q.to_bytes(trailing=False) == data[: expected["quote_bytes"]]
    assert q.signed_bytes == data[: len(q.signed_bytes)]
    assert (
        q.header.to_bytes()
        + (q.body_descriptor.to_bytes() if q.body_descriptor else b"")
        + q.body.to_bytes()
        == q.signed_bytes
    )
    assert sd_qe_report_round_trips(q)


def sd_qe_report_round_trips(q: TDXQuote) -> bool:
    return q.signature_data.qe_report.to_bytes() == q.signature_data.qe_report_bytes


@pytest.mark.parametrize(("category", "file", "expected"), QUOTES, ids=QUOTE_IDS)
def test_registers_and_attributes(category: str, file: str, expected: dict[str, Any]) -> None:
    q = TDXQuote.from_bytes(read(category, file))
    body = expected["body"]
    regs = q.registers()
    assert list(regs) == ["mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3"]
    assert regs["mrtd"].hex() == body["mrtd"]
    for i in range(4):
        assert q.body.rtmr(i).hex() == body[f"rtmr{i}"]
        assert regs[f"rtmr{i}"].hex() == body[f"rtmr{i}"]
    # TDATTRIBUTES bit 0 (DEBUG) is the low bit of the first little-endian byte.
    assert q.body.debug == bool(bytes.fromhex(body["td_attributes"])[0] & 1)
    with pytest.raises(IndexError):
        q.body.rtmr(4)


@pytest.mark.parametrize(("category", "file", "expected"), QUOTES, ids=QUOTE_IDS)
def test_looks_like_every_vector(category: str, file: str, expected: dict[str, Any]) -> None:
    assert tdx.looks_like(read(category, file))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x04\x00\x02\x00",
        b"\x04\x00\x02\x00\x00\x00\x00\x00" + bytes(40),  # SGX TEE type
        b"\x03\x00\x02\x00\x81\x00\x00\x00" + bytes(40),  # SGX quote v3
        b"\xff\x54\x43\x47\x80\x18\x00\x22",  # TPMS_ATTEST magic
        b"[]",
    ],
    ids=["empty", "short", "sgx-tee", "version-3", "tpm-attest", "json"],
)
def test_looks_like_refuses_other_data(data: bytes) -> None:
    assert not tdx.looks_like(data)


def test_trustee_claims_for_tdx_quote_4() -> None:
    claims = json.loads(read("tdx-quote", "trustee/parse_tdx_claims_expected.json"))
    q = TDXQuote.from_bytes(read("tdx-quote", "trustee/tdx_quote_4.dat"))
    h, b = claims["quote"]["header"], claims["quote"]["body"]
    # trustee prints every header field as the raw little-endian bytes.
    assert struct.pack("<H", q.header.version).hex() == h["version"]
    assert struct.pack("<H", q.header.attestation_key_type).hex() == h["att_key_type"]
    assert struct.pack("<I", q.header.tee_type).hex() == h["tee_type"]
    assert (q.header.qe_svn + q.header.pce_svn).hex() == h["reserved"]
    assert q.header.qe_vendor_id.hex() == h["vendor_id"]
    assert q.header.user_data.hex() == h["user_data"]
    names = {
        "tcb_svn": "tee_tcb_svn",
        "mr_seam": "mrseam",
        "mrsigner_seam": "mrsignerseam",
        "seam_attributes": "seam_attributes",
        "td_attributes": "td_attributes",
        "xfam": "xfam",
        "mr_td": "mrtd",
        "mr_config_id": "mrconfigid",
        "mr_owner": "mrowner",
        "mr_owner_config": "mrownerconfig",
        "rtmr_0": "rtmr0",
        "rtmr_1": "rtmr1",
        "rtmr_2": "rtmr2",
        "rtmr_3": "rtmr3",
        "report_data": "report_data",
    }
    assert set(b) == set(names)
    for theirs, ours in names.items():
        assert getattr(q.body, ours).hex() == b[theirs], theirs
    assert q.body.report_data.hex() == claims["report_data"]
    assert q.body.mrconfigid.hex() == claims["init_data"]
    assert q.body.td_attribute_flags() == claims["td_attributes"]
    assert q.body.debug is claims["td_attributes"]["debug"]
    # The platform instance ID comes from the PCK leaf's SGX extension; trustee prints
    # it byte-reversed.
    result = verify(q, now=NOW)
    assert result.pck is not None
    assert result.pck.platform_instance_id is not None
    assert result.pck.platform_instance_id[::-1].hex() == claims["platform_instance_id"]


# --- verifying the real quotes -------------------------------------------------------------


def _chain_root(q: TDXQuote) -> x509.Certificate:
    return q.signature_data.certificates()[-1]


@pytest.mark.parametrize(("category", "file", "expected"), QUOTES, ids=QUOTE_IDS)
def test_signature_checks_as_the_manifest_says(
    category: str, file: str, expected: dict[str, Any]
) -> None:
    checks = expected["signature_checks"]
    q = TDXQuote.from_bytes(read(category, file))
    inner_ok = (
        checks["quote_sig_ok"]
        and checks["qe_report_sig_ok_by_pck_leaf"]
        and checks["qe_report_data_binds_att_key"]
        and checks["pck_chain_signatures_ok"]
    )
    assert inner_ok, "every vector is internally valid"
    if checks["chain_root_equals_trusted_root"]:
        result = verify(q, now=NOW)
        assert result.trusted_root_sha256.hex() == ROOT_ENTRY["expected"]["sha256_fingerprint_der"]
    else:
        with pytest.raises(RootOfTrustError) as err:
            verify(q, now=NOW)
        assert err.value.step == "root-of-trust"
        assert err.value.reason == "untrusted-root"
        # Anchored at its own (pre-production) root, everything else verifies.
        result = verify(q, now=NOW, trusted_root=_chain_root(q))
    assert result.checked == (
        "quote-signature",
        "pck-chain",
        "root-of-trust",
        "qe-report-signature",
        "qe-report-data",
    )
    for item in ("tcb_status", "qe_identity", "pck_revocation", "report_data_binding"):
        assert item in result.not_checked
    assert not set(result.checked) & set(result.not_checked)
    assert result.pck_leaf_not_after.isoformat() == expected["pck_leaf_not_after"]
    assert result.registers() == q.registers()
    json.dumps(result.to_dict())


def test_pinned_root_is_the_intel_sgx_root_ca() -> None:
    exp = ROOT_ENTRY["expected"]
    pinned = tdx.intel_sgx_root_ca()
    from_file = x509.load_pem_x509_certificate(read("tdx-quote", ROOT_ENTRY["file"]))
    assert pinned == from_file
    assert pinned.fingerprint(hashes.SHA256()).hex() == exp["sha256_fingerprint_der"]
    assert tdx.INTEL_SGX_ROOT_CA_SHA256.hex() == exp["sha256_fingerprint_der"]
    assert pinned.subject.rfc4514_string() == exp["subject"]
    assert f"{pinned.serial_number:x}" == exp["serial_hex"]
    assert pinned.not_valid_after_utc.isoformat() == exp["not_after"]


def test_cos_quote_binds_the_nonce_raw() -> None:
    q = TDXQuote.from_bytes(read("ccel", COS_ENTRY["file"]))
    nonce = read("ccel", "go-tdx-guest/nonce.dat")
    result = verify(q, now=NOW, nonce=nonce, binding="raw")
    assert result.checked[-1] == "report-data"
    assert result.binding == "raw"
    assert "report_data_binding" not in result.not_checked
    with pytest.raises(ReportDataBindingError) as err:
        verify(q, now=NOW, nonce=nonce, binding="hash")
    assert err.value.step == "report-data"
    assert isinstance(err.value, FreshnessError)
    with pytest.raises(ReportDataBindingError):
        verify(q, now=NOW, nonce=b"\x01" + nonce[1:], binding="raw")


def test_cos_quote_rtmrs_are_the_ccel_replay() -> None:
    ccel = next(e for e in manifest("ccel") if e["file"] == "go-tdx-guest/ccel_data.dat")
    assert ccel["expected"]["matching_quote"] == COS_ENTRY["file"]
    q = TDXQuote.from_bytes(read("ccel", COS_ENTRY["file"]))
    for i, value in ccel["expected"]["rtmr"].items():
        assert q.body.rtmr(int(i)).hex() == value


def test_trailing_bytes_are_not_part_of_the_quote() -> None:
    data = bytearray(read("tdx-quote", PROD_V4))
    data[-5] ^= 0x01
    q = TDXQuote.from_bytes(bytes(data))
    verify(q, now=NOW)
    assert q.trailing == bytes(data[q.size :])


def test_default_now_is_the_current_time() -> None:
    q = TDXQuote.from_bytes(read("tdx-quote", PROD_V4))
    leaf = q.signature_data.certificates()[0]
    now = datetime.now(UTC)
    if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
        pytest.skip("the vector's PCK leaf is not valid today")
    result = verify(q)
    assert abs(result.verified_at - now) < timedelta(minutes=5)


def test_naive_now_is_utc() -> None:
    q = TDXQuote.from_bytes(read("tdx-quote", PROD_V4))
    assert verify(q, now=NOW.replace(tzinfo=None)).verified_at == NOW


# --- one flipped bit anywhere fails at a named step ------------------------------------------


def _failed_step(data: bytes) -> str | None:
    try:
        q = TDXQuote.from_bytes(data)
    except ParseError:
        return "parse"
    try:
        verify(q, now=NOW)
    except TDXVerificationError as e:
        return e.step
    return None


def _regions() -> list[tuple[str, int, int, frozenset[str]]]:
    """The production v4 quote's regions (Intel DCAP quote v4 layout) and the step each fails."""
    data = read("tdx-quote", PROD_V4)
    (sig_len,) = struct.unpack_from("<I", data, 632)
    end = 636 + sig_len
    (auth_len,) = struct.unpack_from("<H", data, 1218)
    pem = 1220 + auth_len + 6
    begins = [i for i in range(pem, end) if data.startswith(b"-----BEGIN", i)]
    assert len(begins) == 3
    parse = frozenset({"parse"})
    chain = frozenset({"parse", "pck-chain"})
    return [
        ("header-version-type-tee", 0, 8, parse),
        ("header-rest", 8, 48, frozenset({"quote-signature"})),
        ("body", 48, 632, frozenset({"quote-signature"})),
        ("signature-data-length", 632, 636, parse),
        ("quote-signature", 636, 700, frozenset({"quote-signature"})),
        ("attestation-key", 700, 764, frozenset({"quote-signature"})),
        ("certification-data-header", 764, 770, parse),
        ("qe-report", 770, 1154, frozenset({"qe-report-signature"})),
        ("qe-report-signature", 1154, 1218, frozenset({"qe-report-signature"})),
        ("qe-auth-data-size", 1218, 1220, parse),
        ("qe-auth-data", 1220, 1220 + auth_len, frozenset({"qe-report-data"})),
        ("pck-certification-data-header", 1220 + auth_len, pem, parse),
        ("pck-leaf", begins[0], begins[1], chain),
        ("pck-intermediate", begins[1], begins[2], chain),
        ("pck-root", begins[2], end, chain | {"root-of-trust"}),
    ]


REGIONS = _regions()


def _samples(start: int, stop: int, count: int) -> list[int]:
    n = stop - start
    if n <= count:
        return list(range(start, stop))
    return sorted({start + (i * n) // count for i in range(count)} | {stop - 1})


@pytest.mark.parametrize(("region", "start", "stop", "steps"), REGIONS, ids=[r[0] for r in REGIONS])
def test_flipped_bit_fails_at_the_named_step(
    region: str, start: int, stop: int, steps: frozenset[str]
) -> None:
    original = read("tdx-quote", PROD_V4)
    assert _failed_step(original) is None
    count = 40 if region.startswith("pck-") else 12
    outcomes: dict[int, str | None] = {}
    for offset in _samples(start, stop, count):
        data = bytearray(original)
        data[offset] ^= 1 << (offset % 8)
        outcomes[offset] = _failed_step(bytes(data))
    wrong = {o: s for o, s in outcomes.items() if s not in steps}
    assert not wrong, f"{region}: offsets failing at the wrong step (or not at all): {wrong}"


def test_a_flipped_bit_in_any_byte_fails() -> None:
    """Every byte of the quote (one bit each): none verifies, each fails at a known step."""
    original = read("tdx-quote", PROD_V4)
    size = TDXQuote.from_bytes(original).size
    seen: dict[str | None, int] = {}
    for offset in range(size):
        data = bytearray(original)
        data[offset] ^= 1 << (offset % 8)
        step = _failed_step(bytes(data))
        seen[step] = seen.get(step, 0) + 1
    assert None not in seen, f"{seen[None]} flipped quotes verified"
    assert set(seen) <= {"parse", *tdx.STEPS}


# --- a quote under a throwaway PKI ----------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


@dataclass
class Pki:
    root_key: ec.EllipticCurvePrivateKey
    inter_key: ec.EllipticCurvePrivateKey
    leaf_key: ec.EllipticCurvePrivateKey
    root: x509.Certificate
    inter: x509.Certificate
    leaf: x509.Certificate


def make_cert(
    subject: str,
    issuer: str,
    public_key: Any,
    signer: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
    path_length: int | None = None,
    not_before: datetime = datetime(2020, 1, 1, tzinfo=UTC),
    not_after: datetime = datetime(2035, 1, 1, tzinfo=UTC),
    serial: int = 1000,
    critical_extra: bool = False,
    key_usage: bool = True,
) -> x509.Certificate:
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(
            x509.BasicConstraints(ca=ca, path_length=path_length if ca else None), critical=True
        )
    )
    if key_usage:
        b = b.add_extension(
            x509.KeyUsage(
                digital_signature=not ca,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    if critical_extra:
        b = b.add_extension(
            x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"), b"\x05\x00"),
            critical=True,
        )
    return b.sign(signer, hashes.SHA256())


@pytest.fixture(scope="module")
def pki() -> Pki:
    root_key = ec.generate_private_key(ec.SECP256R1())
    inter_key = ec.generate_private_key(ec.SECP256R1())
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    root = make_cert(
        "Test Root CA",
        "Test Root CA",
        root_key.public_key(),
        root_key,
        ca=True,
        path_length=1,
        serial=1,
    )
    inter = make_cert(
        "Test PCK CA",
        "Test Root CA",
        inter_key.public_key(),
        root_key,
        ca=True,
        path_length=0,
        serial=2,
    )
    leaf = make_cert(
        "Test PCK Certificate",
        "Test PCK CA",
        leaf_key.public_key(),
        inter_key,
        ca=False,
        serial=0x1234,
    )
    return Pki(root_key, inter_key, leaf_key, root, inter, leaf)


@pytest.fixture(scope="module")
def att_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _raw_sig(der: bytes) -> bytes:
    r, s = decode_dss_signature(der)
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _raw_point(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )[1:]


def pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def build_quote(
    att_key: ec.EllipticCurvePrivateKey,
    qe_signer: ec.EllipticCurvePrivateKey,
    chain_pem: bytes,
    *,
    version: int = 4,
    body_type: int = 2,
    report_data: bytes = bytes(64),
    auth_data: bytes = bytes(range(32)),
    qe_report_data: bytes | None = None,
) -> bytes:
    """A TDX quote laid out as the Intel DCAP quote v4/v5 format says, signed for real."""
    header = struct.pack(
        "<HHI2s2s16s20s", version, 2, 0x81, b"\0\0", b"\0\0", tdx.INTEL_QE_VENDOR_ID, b"\x11" * 20
    )
    size = 584 if body_type == 2 else 648
    body = bytes((i * 7) & 0xFF for i in range(520)) + report_data + bytes(size - 584)
    descriptor = struct.pack("<HI", body_type, size) if version == 5 else b""
    signed = header + descriptor + body
    signature = _raw_sig(att_key.sign(signed, ec.ECDSA(hashes.SHA256())))
    att_pub = _raw_point(att_key.public_key())
    if qe_report_data is None:
        qe_report_data = hashlib.sha256(att_pub + auth_data).digest() + bytes(32)
    qe_report = bytes(range(64)) * 5 + qe_report_data
    assert len(qe_report) == 384
    qe_sig = _raw_sig(qe_signer.sign(qe_report, ec.ECDSA(hashes.SHA256())))
    inner = struct.pack("<HI", 5, len(chain_pem)) + chain_pem
    qe_cert = qe_report + qe_sig + struct.pack("<H", len(auth_data)) + auth_data + inner
    sig_data = signature + att_pub + struct.pack("<HI", 6, len(qe_cert)) + qe_cert
    return signed + struct.pack("<I", len(sig_data)) + sig_data


def test_fake_root_fails_at_root_of_trust(pki: Pki, att_key: ec.EllipticCurvePrivateKey) -> None:
    data = build_quote(att_key, pki.leaf_key, pem(pki.leaf, pki.inter, pki.root) + b"\0")
    q = TDXQuote.from_bytes(data)
    assert q.to_bytes() == data
    with pytest.raises(RootOfTrustError) as err:
        verify(q, now=NOW)
    assert err.value.step == "root-of-trust"
    assert isinstance(err.value, SignatureError)


def test_fake_quote_verifies_under_its_root(pki: Pki, att_key: ec.EllipticCurvePrivateKey) -> None:
    data = build_quote(att_key, pki.leaf_key, pem(pki.leaf, pki.inter, pki.root) + b"\0")
    result = verify(TDXQuote.from_bytes(data), now=NOW, trusted_root=pki.root)
    assert result.trusted_root_sha256 == pki.root.fingerprint(hashes.SHA256())
    assert result.pck_chain_subjects == (
        "CN=Test PCK Certificate",
        "CN=Test PCK CA",
        "CN=Test Root CA",
    )
    assert result.pck is None  # no SGX extension in a test certificate


def test_chain_without_its_root_is_anchored_by_signature(
    pki: Pki, att_key: ec.EllipticCurvePrivateKey
) -> None:
    q = TDXQuote.from_bytes(build_quote(att_key, pki.leaf_key, pem(pki.leaf, pki.inter)))
    assert verify(q, now=NOW, trusted_root=pki.root).checked[2] == "root-of-trust"
    with pytest.raises(RootOfTrustError):
        verify(q, now=NOW)


@pytest.mark.parametrize(("version", "body_type"), [(5, 2), (5, 3)], ids=["v5-tdx10", "v5-tdx15"])
def test_fake_v5_quotes(
    pki: Pki, att_key: ec.EllipticCurvePrivateKey, version: int, body_type: int
) -> None:
    data = build_quote(
        att_key,
        pki.leaf_key,
        pem(pki.leaf, pki.inter, pki.root),
        version=version,
        body_type=body_type,
    )
    q = TDXQuote.from_bytes(data)
    assert q.body_descriptor is not None
    assert q.body_descriptor.body_type == body_type
    assert q.to_bytes() == data
    verify(q, now=NOW, trusted_root=pki.root)


def test_expired_leaf(pki: Pki, att_key: ec.EllipticCurvePrivateKey) -> None:
    q = TDXQuote.from_bytes(build_quote(att_key, pki.leaf_key, pem(pki.leaf, pki.inter, pki.root)))
    later = pki.leaf.not_valid_after_utc + timedelta(seconds=1)
    with pytest.raises(CertificateChainError, match="expired") as err:
        verify(q, now=later, trusted_root=pki.root)
    assert err.value.step == "pck-chain"
    assert err.value.reason == "expired"
    verify(q, now=pki.leaf.not_valid_after_utc, trusted_root=pki.root)


def test_leaf_not_yet_valid(pki: Pki, att_key: ec.EllipticCurvePrivateKey) -> None:
    q = TDXQuote.from_bytes(build_quote(att_key, pki.leaf_key, pem(pki.leaf, pki.inter, pki.root)))
    earlier = pki.leaf.not_valid_before_utc - timedelta(seconds=1)
    with pytest.raises(CertificateChainError, match="not yet valid") as err:
        verify(q, now=earlier, trusted_root=pki.root)
    assert err.value.reason == "not-yet-valid"


def make_crl(
    issuer: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    serials: list[int],
    *,
    next_update: datetime = datetime(2027, 1, 1, tzinfo=UTC),
) -> x509.CertificateRevocationList:
    b = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.subject)
        .last_update(datetime(2026, 1, 1, tzinfo=UTC))
        .next_update(next_update)
    )
    for serial in serials:
        b = b.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(datetime(2026, 2, 1, tzinfo=UTC))
            .build()
        )
    return b.sign(key, hashes.SHA256())


CRL_CASES: dict[str, tuple[Callable[[Pki], x509.CertificateRevocationList], str | None]] = {
    "leaf-revoked": (
        lambda p: make_crl(p.inter, p.inter_key, [5, p.leaf.serial_number]),
        "revoked",
    ),
    "intermediate-revoked": (
        lambda p: make_crl(p.root, p.root_key, [p.inter.serial_number]),
        "revoked",
    ),
    "crl-signed-by-another-key": (
        lambda p: make_crl(p.inter, p.root_key, [p.leaf.serial_number]),
        "crl-signature",
    ),
    "crl-expired": (
        lambda p: make_crl(p.inter, p.inter_key, [], next_update=datetime(2026, 3, 1, tzinfo=UTC)),
        "crl-expired",
    ),
    "leaf-not-listed": (lambda p: make_crl(p.inter, p.inter_key, [p.leaf.serial_number + 1]), None),
}


@pytest.mark.parametrize("case", list(CRL_CASES))
def test_crls(pki: Pki, att_key: ec.EllipticCurvePrivateKey, case: str) -> None:
    make, reason = CRL_CASES[case]
    q = TDXQuote.from_bytes(build_quote(att_key, pki.leaf_key, pem(pki.leaf, pki.inter, pki.root)))
    crl = make(pki)
    if reason is None:
        result = verify(q, now=NOW, trusted_root=pki.root, crls=[crl])
        assert result.crl_issuers == ("CN=Test PCK CA",)
        assert "pck_revocation" not in result.not_checked
    else:
        with pytest.raises(CertificateChainError) as err:
            verify(q, now=NOW, trusted_root=pki.root, crls=[crl])
        assert err.value.reason == reason
        assert err.value.step == "pck-chain"


def test_crl_of_an_unrelated_issuer_is_not_applied(
    pki: Pki, att_key: ec.EllipticCurvePrivateKey
) -> None:
    other_key = ec.generate_private_key(ec.SECP256R1())
    other = make_cert("Other CA", "Other CA", other_key.public_key(), other_key, ca=True)
    q = TDXQuote.from_bytes(build_quote(att_key, pki.leaf_key, pem(pki.leaf, pki.inter, pki.root)))
    result = verify(q, now=NOW, trusted_root=pki.root, crls=[make_crl(other, other_key, [0x1234])])
    assert result.crl_issuers == ()
    assert "pck_revocation" in result.not_checked


def _defective_chains(pki: Pki) -> dict[str, tuple[bytes, str]]:
    p = pki
    leaf_ca = make_cert(
        "Test PCK Certificate", "Test PCK CA", p.leaf_key.public_key(), p.inter_key, ca=True
    )
    inter_not_ca = make_cert(
        "Test PCK CA", "Test Root CA", p.inter_key.public_key(), p.root_key, ca=False
    )
    leaf_critical = make_cert(
        "Test PCK Certificate",
        "Test PCK CA",
        p.leaf_key.public_key(),
        p.inter_key,
        ca=False,
        critical_extra=True,
    )
    p384 = ec.generate_private_key(ec.SECP384R1())
    leaf_p384 = make_cert(
        "Test PCK Certificate", "Test PCK CA", p384.public_key(), p.inter_key, ca=False
    )
    stranger_key = ec.generate_private_key(ec.SECP256R1())
    leaf_wrong_signer = make_cert(
        "Test PCK Certificate", "Test PCK CA", p.leaf_key.public_key(), stranger_key, ca=False
    )
    return {
        "leaf-is-a-ca": (pem(leaf_ca, p.inter, p.root), "constraints"),
        "intermediate-not-a-ca": (pem(p.leaf, inter_not_ca, p.root), "constraints"),
        "unknown-critical-extension": (pem(leaf_critical, p.inter, p.root), "constraints"),
        "leaf-key-not-p256": (pem(leaf_p384, p.inter, p.root), "key"),
        "leaf-signed-by-a-stranger": (pem(leaf_wrong_signer, p.inter, p.root), "signature"),
        "out-of-order": (pem(p.inter, p.leaf, p.root), "signature"),
        "leaf-only": (pem(p.leaf), "untrusted-root"),
    }


DEFECTS = [
    "leaf-is-a-ca",
    "intermediate-not-a-ca",
    "unknown-critical-extension",
    "leaf-key-not-p256",
    "leaf-signed-by-a-stranger",
    "out-of-order",
    "leaf-only",
]


@pytest.mark.parametrize("defect", DEFECTS)
def test_defective_chains(pki: Pki, att_key: ec.EllipticCurvePrivateKey, defect: str) -> None:
    chain, reason = _defective_chains(pki)[defect]
    q = TDXQuote.from_bytes(build_quote(att_key, pki.leaf_key, chain))
    with pytest.raises(CertificateChainError) as err:
        verify(q, now=NOW, trusted_root=pki.root)
    assert err.value.reason == reason
    assert err.value.step == ("root-of-trust" if reason == "untrusted-root" else "pck-chain")


def test_constraints_checked_on_a_validly_signed_chain(
    pki: Pki, att_key: ec.EllipticCurvePrivateKey
) -> None:
    # Root with path length 0 above one intermediate: signatures fine, constraint broken.
    root0 = make_cert(
        "Test Root CA",
        "Test Root CA",
        pki.root_key.public_key(),
        pki.root_key,
        ca=True,
        path_length=0,
    )
    q = TDXQuote.from_bytes(build_quote(att_key, pki.leaf_key, pem(pki.leaf, pki.inter, root0)))
    with pytest.raises(CertificateChainError, match="intermediate CAs") as err:
        verify(q, now=NOW, trusted_root=root0)
    assert err.value.reason == "constraints"
    # An intermediate that is not a CA, signed by the real test root.
    inter = make_cert(
        "Test PCK CA", "Test Root CA", pki.inter_key.public_key(), pki.root_key, ca=False
    )
    q = TDXQuote.from_bytes(build_quote(att_key, pki.leaf_key, pem(pki.leaf, inter, pki.root)))
    with pytest.raises(CertificateChainError, match="not a CA") as err:
        verify(q, now=NOW, trusted_root=pki.root)
    assert err.value.reason == "constraints"


def test_qe_report_signed_by_another_key(pki: Pki, att_key: ec.EllipticCurvePrivateKey) -> None:
    q = TDXQuote.from_bytes(build_quote(att_key, pki.inter_key, pem(pki.leaf, pki.inter, pki.root)))
    with pytest.raises(QEReportSignatureError) as err:
        verify(q, now=NOW, trusted_root=pki.root)
    assert err.value.step == "qe-report-signature"


def test_qe_report_data_must_bind_the_attestation_key(
    pki: Pki, att_key: ec.EllipticCurvePrivateKey
) -> None:
    other = _raw_point(ec.generate_private_key(ec.SECP256R1()).public_key())
    wrong = hashlib.sha256(other + bytes(range(32))).digest() + bytes(32)
    chain = pem(pki.leaf, pki.inter, pki.root)
    q = TDXQuote.from_bytes(build_quote(att_key, pki.leaf_key, chain, qe_report_data=wrong))
    with pytest.raises(QEReportDataError, match="attestation key") as err:
        verify(q, now=NOW, trusted_root=pki.root)
    assert err.value.step == "qe-report-data"


def test_qe_report_data_upper_half_must_be_zero(
    pki: Pki, att_key: ec.EllipticCurvePrivateKey
) -> None:
    att_pub = _raw_point(att_key.public_key())
    rd = hashlib.sha256(att_pub + bytes(range(32))).digest() + b"\x01" + bytes(31)
    chain = pem(pki.leaf, pki.inter, pki.root)
    q = TDXQuote.from_bytes(build_quote(att_key, pki.leaf_key, chain, qe_report_data=rd))
    with pytest.raises(QEReportDataError, match="upper 32 bytes"):
        verify(q, now=NOW, trusted_root=pki.root)


def test_hash_binding_of_nonce_and_user_data(pki: Pki, att_key: ec.EllipticCurvePrivateKey) -> None:
    nonce, user = b"N" * 32, b"user data"
    rd = hashlib.sha512(nonce + user).digest()
    chain = pem(pki.leaf, pki.inter, pki.root)
    q = TDXQuote.from_bytes(build_quote(att_key, pki.leaf_key, chain, report_data=rd))
    result = verify(q, now=NOW, trusted_root=pki.root, nonce=nonce, user_data=user)
    assert result.binding == "hash"
    with pytest.raises(ReportDataBindingError):
        verify(q, now=NOW, trusted_root=pki.root, nonce=nonce, user_data=b"other")


def test_attestation_key_off_the_curve(pki: Pki, att_key: ec.EllipticCurvePrivateKey) -> None:
    data = bytearray(build_quote(att_key, pki.leaf_key, pem(pki.leaf, pki.inter, pki.root)))
    data[636 + 64 : 636 + 128] = b"\x01" * 64
    with pytest.raises(QuoteSignatureError, match="not a point") as err:
        verify(TDXQuote.from_bytes(bytes(data)), now=NOW, trusted_root=pki.root)
    assert err.value.reason == "key"


# --- bad input, one assertion each -------------------------------------------------------------


def _patched(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


def _pem_patched(data: bytes, old: bytes, new: bytes, count: int = 1) -> bytes:
    assert old in data
    return data.replace(old, new, count)


def _bad_inputs() -> dict[str, tuple[bytes, type[ParseError], int | None]]:
    """name -> (bytes, error type, offset): offsets from the Intel DCAP quote v4/v5 layout."""
    v4 = read("tdx-quote", "trustee/tdx_quote_4.dat")  # 4936 bytes, no trailing bytes
    v5 = read("tdx-quote", "trustee/tdx_quote_5.dat")
    pem_at = v4.index(b"-----BEGIN CERTIFICATE-----")
    first_line = pem_at + len(b"-----BEGIN CERTIFICATE-----\n")
    second_block = v4.index(b"-----BEGIN CERTIFICATE-----", pem_at + 1)
    (sig_len,) = struct.unpack_from("<I", v4, 632)
    cases: dict[str, tuple[bytes, type[ParseError], int | None]] = {
        "empty": (b"", TruncatedError, 0),
        "truncated-1": (v4[:1], TruncatedError, 0),
        "truncated-in-header": (v4[:47], TruncatedError, 0),
        "truncated-in-body": (v4[:300], TruncatedError, 48),
        "truncated-at-signature-length": (v4[:634], TruncatedError, 632),
        "truncated-in-signature": (v4[:680], TruncatedError, 632),
        "truncated-in-qe-report": (v4[:1000], TruncatedError, 632),
        "truncated-in-pem": (v4[:3000], TruncatedError, 632),
        "truncated-by-one": (v4[:-1], TruncatedError, 632),
        "v5-truncated-in-descriptor": (v5[:51], TruncatedError, 48),
        "version-3": (_patched(v4, 0, "<H", 3), UnsupportedFormatError, 0),
        "version-6": (_patched(v4, 0, "<H", 6), UnsupportedFormatError, 0),
        "tee-type-sgx": (_patched(v4, 4, "<I", 0), UnsupportedFormatError, 4),
        "attestation-key-type-3": (_patched(v4, 2, "<H", 3), UnsupportedFormatError, 2),
        "attestation-key-type-0": (_patched(v4, 2, "<H", 0), UnsupportedFormatError, 2),
        "v5-body-type-sgx": (_patched(v5, 48, "<H", 1), UnsupportedFormatError, 48),
        "v5-body-size-wrong": (_patched(v5, 50, "<I", 584), ParseError, 50),
        "signature-data-longer-than-rest": (
            _patched(v4, 632, "<I", sig_len + 1),
            TruncatedError,
            632,
        ),
        "signature-data-length-4g": (_patched(v4, 632, "<I", 0xFFFFFFFF), TruncatedError, 632),
        "signature-data-shorter": (_patched(v4, 632, "<I", sig_len - 1), TruncatedError, 766),
        "certification-data-type-5": (_patched(v4, 764, "<H", 5), UnsupportedFormatError, 764),
        "certification-data-type-7": (_patched(v4, 764, "<H", 7), UnsupportedFormatError, 764),
        "certification-data-shorter": (
            _patched(v4, 766, "<I", sig_len - 134 - 1),
            ParseError,
            636 + sig_len - 1,
        ),
        "qe-auth-data-size-too-big": (_patched(v4, 1218, "<H", 0xFFFF), TruncatedError, 1218),
        "pck-data-type-4": (_patched(v4, 1252, "<H", 4), UnsupportedFormatError, 1252),
        "pck-data-type-6": (_patched(v4, 1252, "<H", 6), UnsupportedFormatError, 1252),
        "pck-data-size-too-big": (_patched(v4, 1254, "<I", 1 << 31), TruncatedError, 1254),
        "pem-garbage-instead-of-begin": (
            _pem_patched(v4, b"-----BEGIN CERTIFICATE-----", b"-----BEGIN CERTIFICATF-----"),
            ParseError,
            pem_at,
        ),
        "pem-non-base64-character": (
            v4[:first_line] + b"*" + v4[first_line + 1 :],
            ParseError,
            first_line,
        ),
        "pem-noncanonical-padding-bits": (
            _pem_patched(v4, b"aqI=\n", b"aqJ=\n"),
            ParseError,
            None,
        ),
        "pem-bad-base64-length": (
            v4[:first_line] + b"AAAA" + v4[first_line + 3 :],
            ParseError,
            pem_at,
        ),
        "pem-text-after-nul": (v4[:-1] + b"X", ParseError, 4935),
        "pem-missing-end": (
            _pem_patched(v4, b"-----END CERTIFICATE-----", b"-----END CERTIFICATX-----"),
            ParseError,
            None,
        ),
        "pem-second-block-garbage": (
            v4[:second_block] + b"x" + v4[second_block + 1 :],
            ParseError,
            second_block,
        ),
        "pem-all-nul": (
            v4[:1258] + bytes(len(v4) - 1258),
            ParseError,
            1258,
        ),
    }
    return cases


BAD = _bad_inputs()


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_is_a_parse_error_with_offset(name: str) -> None:
    data, error, offset = BAD[name]
    with pytest.raises(error) as err:
        TDXQuote.from_bytes(data, source="quote.dat")
    assert err.value.source == "quote.dat"
    assert err.value.offset == offset if offset is not None else err.value.offset is not None


def test_errors_form_the_documented_hierarchy() -> None:
    for cls in (
        QuoteSignatureError,
        CertificateChainError,
        RootOfTrustError,
        QEReportSignatureError,
        QEReportDataError,
    ):
        assert issubclass(cls, TDXVerificationError)
        assert issubclass(cls, SignatureError)
        assert cls.step in tdx.STEPS
    assert issubclass(ReportDataBindingError, FreshnessError)
    assert issubclass(ReportDataBindingError, CimaError)
    assert ReportDataBindingError.step in tdx.STEPS
