"""TPM quote codec and verification against the real quotes in vectors/tpm-quote.

Expected values come from vectors/tpm-quote/MANIFEST.json (verified there with
cryptography, tpm2_checkquote 5.4 and 5.8); nothing here is copied from cima's output.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from cima.errors import FreshnessError, ParseError, SignatureError, TruncatedError
from cima.evidence.reportdata import tpm_qualifying_data
from cima.evidence.tpm import (
    PCRDigestError,
    PCRSelection,
    PCRValues,
    PublicArea,
    Quote,
    QuoteFreshnessError,
    QuoteParseError,
    QuoteSignatureError,
    QuoteTypeError,
    Signature,
    looks_like,
    pcr_digest,
    verify_quote,
)
from cima.registers import RegisterBank
from tests.vectors import manifest, path

CATEGORY = "tpm-quote"
SOURCES = ("keylime-perf-tests", "trustee")


def entry(file: str) -> dict[str, Any]:
    for e in manifest(CATEGORY):
        if e["file"] == file:
            return e["expected"]  # type: ignore[no-any-return]
    raise KeyError(file)


def read(source: str, name: str) -> bytes:
    return path(CATEGORY, f"{source}/{name}").read_bytes()


def expected_pcrs(source: str) -> dict[tuple[str, str], bytes]:
    pcrs = entry(f"{source}/attest.bin")["pcrs"]
    return {
        (f"pcr{index}", bank): bytes.fromhex(value)
        for bank, values in pcrs.items()
        for index, value in values.items()
    }


# --- decoding ----------------------------------------------------------------------------------


@pytest.mark.parametrize("source", SOURCES)
def test_attest_fields(source: str) -> None:
    want = entry(f"{source}/attest.bin")["attest"]
    quote = Quote.from_bytes(read(source, "attest.bin"))
    assert f"{quote.magic:08x}" == want["magic"]
    assert want["type"].startswith(f"0x{quote.type:04x}")
    assert quote.is_quote
    assert quote.qualified_signer.hex() == want["qualified_signer"]
    assert quote.extra_data.hex() == want["extra_data"]
    assert quote.clock == want["clock"]
    assert quote.reset_count == want["reset_count"]
    assert quote.restart_count == want["restart_count"]
    assert quote.safe is want["safe"]
    assert f"{quote.firmware_version:016x}" == want["firmware_version"]
    assert {s.algorithm: list(s.indices) for s in quote.pcr_selection} == want["pcr_selection"]
    assert quote.pcr_digest.hex() == want["pcr_digest"]
    d = quote.to_dict()
    for key in ("qualified_signer", "extra_data", "clock", "firmware_version", "pcr_digest"):
        assert d[key] == want[key]
    assert d["pcr_selection"] == want["pcr_selection"]


@pytest.mark.parametrize("source", SOURCES)
def test_attest_round_trip(source: str) -> None:
    data = read(source, "attest.bin")
    quote = Quote.from_bytes(data)
    assert quote.raw == data
    assert quote.to_bytes() == data
    assert looks_like(data)


@pytest.mark.parametrize("source", SOURCES)
def test_signature_decodes_and_round_trips(source: str) -> None:
    want = entry(f"{source}/signature.tpmt.bin")
    data = read(source, "signature.tpmt.bin")
    sig = Signature.from_bytes(data)
    assert sig.scheme == want["sig_alg"]
    assert sig.algorithm == want["hash"]
    assert sig.value == read(source, "signature.raw.bin")
    assert sig.to_bytes() == data


def test_keylime_raw_signature_size() -> None:
    want = entry("keylime-perf-tests/attest.bin")["signature"]
    sig = Signature.from_bytes(read("keylime-perf-tests", "signature.tpmt.bin"))
    assert len(sig.value) == want["raw_signature_bytes"]


def test_ak_public_area() -> None:
    want = entry("keylime-perf-tests/ak.tpm2b_public.bin")
    ak_want = entry("keylime-perf-tests/attest.bin")["ak"]
    data = read("keylime-perf-tests", "ak.tpm2b_public.bin")
    area = PublicArea.from_bytes(data)
    assert area.name.hex() == want["tpm_name"]
    assert area.key_type == "rsa"
    assert area.key_bits == want["rsa_bits"]
    assert (area.exponent or 65537) == want["exponent"]
    assert area.to_dict()["scheme"] == want["scheme"]
    assert area.to_dict()["scheme_hash"] == want["scheme_hash"]
    assert f"0x{area.object_attributes:08x}" == ak_want["object_attributes"]
    assert area.is_restricted_signing_key
    assert area.to_bytes() == data
    spki = area.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert hashlib.sha256(spki).hexdigest() == ak_want["spki_sha256"]
    pem_key = serialization.load_pem_public_key(read("keylime-perf-tests", "ak.pem"))
    assert area.public_key().public_numbers() == pem_key.public_numbers()  # type: ignore[union-attr]


@pytest.mark.parametrize("source", SOURCES)
def test_ak_pem_fingerprint(source: str) -> None:
    want = entry(f"{source}/ak.pem")
    key = serialization.load_pem_public_key(read(source, "ak.pem"))
    spki = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert hashlib.sha256(spki).hexdigest() == want["spki_sha256"]


@pytest.mark.parametrize("source", SOURCES)
def test_pcr_file_parses_to_the_manifest_values(source: str) -> None:
    want = entry(f"{source}/pcrs.tpm2tools.bin")["pcrs"]
    data = read(source, "pcrs.tpm2tools.bin")
    values = PCRValues.from_bytes(data)
    assert values.to_dict() == want
    assert values.to_bytes() == data


@pytest.mark.parametrize("source", SOURCES)
def test_pcr_digest_recomputes_from_the_pcr_file(source: str) -> None:
    quote = Quote.from_bytes(read(source, "attest.bin"))
    values = PCRValues.from_bytes(read(source, "pcrs.tpm2tools.bin"))
    assert entry(f"{source}/attest.bin")["pcr_digest_recomputes"] is True
    assert pcr_digest(quote.pcr_selection, values.to_bank(), "sha256") == quote.pcr_digest
    # An independent computation: SHA-256 over the manifest's values in index order.
    manifest_values = entry(f"{source}/attest.bin")["pcrs"]["sha256"]
    concatenated = b"".join(
        bytes.fromhex(manifest_values[str(i)]) for i in sorted(map(int, manifest_values))
    )
    assert hashlib.sha256(concatenated).digest() == quote.pcr_digest


# --- verification ------------------------------------------------------------------------------


@pytest.mark.parametrize("source", SOURCES)
def test_quote_verifies(source: str) -> None:
    result = verify_quote(
        read(source, "attest.bin"),
        read(source, "signature.tpmt.bin"),
        read(source, "ak.pem"),
        qualifying_data=read(source, "qualifying_data.bin"),
        pcr_values=expected_pcrs(source),
    )
    assert result.hash_algorithm == "sha256"
    assert result.freshness == "qualifying-data"
    assert len(result.pcrs) == len(expected_pcrs(source))
    assert (
        result.to_dict()["quote"]["pcr_digest"]
        == entry(f"{source}/attest.bin")["attest"]["pcr_digest"]
    )


def test_keylime_quote_verifies_with_the_tpm2b_public() -> None:
    area = PublicArea.from_bytes(read("keylime-perf-tests", "ak.tpm2b_public.bin"))
    result = verify_quote(
        read("keylime-perf-tests", "attest.bin"),
        Signature.from_bytes(read("keylime-perf-tests", "signature.tpmt.bin")),
        area,
        qualifying_data=read("keylime-perf-tests", "qualifying_data.bin"),
        pcr_values=PCRValues.from_bytes(read("keylime-perf-tests", "pcrs.tpm2tools.bin")).to_bank(),
    )
    assert result.pcrs_checked


def test_keylime_extra_data_is_base64_of_the_nonce() -> None:
    want = entry("keylime-perf-tests/attest.bin")["nonce"]
    nonce = read("keylime-perf-tests", "nonce.bin")
    assert nonce.hex() == want["value_hex"]
    quote = Quote.from_bytes(read("keylime-perf-tests", "attest.bin"))
    assert quote.extra_data == base64.b64encode(nonce)
    assert quote.extra_data.decode() == want["qualifying_data_in_quote"]
    verify_quote(
        quote,
        read("keylime-perf-tests", "signature.tpmt.bin"),
        read("keylime-perf-tests", "ak.pem"),
        qualifying_data=base64.b64encode(nonce),
    )
    # The raw nonce is not what the quote binds (the manifest: tpm2_checkquote fails with it).
    assert want["tpm2_checkquote_with_raw_nonce_fails"] is True
    with pytest.raises(QuoteFreshnessError):
        verify_quote(
            quote,
            read("keylime-perf-tests", "signature.tpmt.bin"),
            read("keylime-perf-tests", "ak.pem"),
            qualifying_data=nonce,
        )


def test_raw_signature_verifies_with_cryptography_alone() -> None:
    # Independent of cima's codec: RSASSA-PKCS1-v1_5/SHA-256 over attest.bin.
    for source in SOURCES:
        key = serialization.load_pem_public_key(read(source, "ak.pem"))
        assert isinstance(key, rsa.RSAPublicKey)
        key.verify(
            read(source, "signature.raw.bin"),
            read(source, "attest.bin"),
            padding.PKCS1v15(),
            hashes.SHA256(),
        )


def flip(data: bytes, offset: int, bit: int = 0) -> bytes:
    out = bytearray(data)
    out[offset] ^= 1 << bit
    return bytes(out)


def keylime_args() -> tuple[bytes, bytes, bytes, bytes]:
    s = "keylime-perf-tests"
    return (
        read(s, "attest.bin"),
        read(s, "signature.tpmt.bin"),
        read(s, "ak.pem"),
        read(s, "qualifying_data.bin"),
    )


# A flipped bit in a field the signature covers: each must fail at the signature step.
ATTEST_FLIPS = {
    "qualified_signer": 10,
    "extra_data": 46,
    "clock": 70,
    "firmware_version": 85,
    "pcr_selection_bitmap": 97,
    "pcr_digest": 120,
}


@pytest.mark.parametrize("field_name", sorted(ATTEST_FLIPS))
def test_flipped_attest_bit_fails_at_signature(field_name: str) -> None:
    attest, sig, ak, qd = keylime_args()
    bad = flip(attest, ATTEST_FLIPS[field_name])
    Quote.from_bytes(bad)  # still well formed
    with pytest.raises(QuoteSignatureError) as err:
        verify_quote(bad, sig, ak, qualifying_data=qd)
    assert err.value.step == 2
    assert "step (2) signature" in str(err.value)
    assert isinstance(err.value, SignatureError)


@pytest.mark.parametrize("offset", [10, 100, 200, 261])
def test_flipped_signature_bit_fails_at_signature(offset: int) -> None:
    attest, sig, ak, qd = keylime_args()
    with pytest.raises(QuoteSignatureError, match=r"step \(2\) signature"):
        verify_quote(attest, flip(sig, offset), ak, qualifying_data=qd)


def test_wrong_ak_fails_at_signature() -> None:
    attest, sig, _, qd = keylime_args()
    with pytest.raises(QuoteSignatureError):
        verify_quote(attest, sig, read("trustee", "ak.pem"), qualifying_data=qd)


def test_ecc_ak_for_rsa_signature_fails_at_signature() -> None:
    attest, sig, _, qd = keylime_args()
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(QuoteSignatureError, match="not RSA"):
        verify_quote(attest, sig, other, qualifying_data=qd)


def test_unloadable_ak_fails_at_signature() -> None:
    attest, sig, _, _ = keylime_args()
    with pytest.raises(QuoteSignatureError, match="does not load"):
        verify_quote(attest, sig, b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")


def test_wrong_qualifying_data_fails_at_freshness() -> None:
    attest, sig, ak, qd = keylime_args()
    with pytest.raises(QuoteFreshnessError) as err:
        verify_quote(attest, sig, ak, qualifying_data=qd[:-1] + b"X")
    assert err.value.step == 3
    assert isinstance(err.value, FreshnessError)


def test_nonce_binding_checked_against_hash_of_nonce_and_user_data() -> None:
    # The trustee quote's extraData is not H(nonce || user_data) of any nonce we know.
    with pytest.raises(QuoteFreshnessError, match=r"step \(3\) freshness"):
        verify_quote(
            read("trustee", "attest.bin"),
            read("trustee", "signature.tpmt.bin"),
            read("trustee", "ak.pem"),
            nonce=read("trustee", "qualifying_data.bin")[:32],
        )


def test_freshness_must_be_checked_or_skipped_explicitly() -> None:
    attest, sig, ak, _ = keylime_args()
    with pytest.raises(QuoteFreshnessError, match="skip_freshness"):
        verify_quote(attest, sig, ak)
    result = verify_quote(attest, sig, ak, skip_freshness=True)
    assert result.freshness == "skipped"


def test_missing_pcr_value_is_named() -> None:
    attest, sig, ak, qd = keylime_args()
    values = expected_pcrs("keylime-perf-tests")
    del values[("pcr16", "sha256")]
    with pytest.raises(PCRDigestError, match="pcr16/sha256") as err:
        verify_quote(attest, sig, ak, qualifying_data=qd, pcr_values=values)
    assert err.value.step == 4


def test_missing_pcr_value_in_a_register_bank_is_named() -> None:
    attest, sig, ak, qd = keylime_args()
    bank = RegisterBank()
    for (reg, alg), value in expected_pcrs("keylime-perf-tests").items():
        if reg != "pcr7":
            bank.set(reg, alg, value)
    with pytest.raises(PCRDigestError, match="pcr7/sha256"):
        verify_quote(attest, sig, ak, qualifying_data=qd, pcr_values=bank)


def test_changed_pcr_value_fails_at_pcr_digest() -> None:
    attest, sig, ak, qd = keylime_args()
    values = expected_pcrs("keylime-perf-tests")
    values[("pcr10", "sha256")] = bytes(32)
    with pytest.raises(PCRDigestError, match=r"step \(4\) pcr-digest"):
        verify_quote(attest, sig, ak, qualifying_data=qd, pcr_values=values)


def test_wrong_size_pcr_value_fails_at_pcr_digest() -> None:
    attest, sig, ak, qd = keylime_args()
    values = expected_pcrs("keylime-perf-tests")
    values[("pcr0", "sha256")] = bytes(20)
    with pytest.raises(PCRDigestError, match="20 bytes"):
        verify_quote(attest, sig, ak, qualifying_data=qd, pcr_values=values)


def test_garbage_attest_fails_at_parse() -> None:
    _, sig, ak, qd = keylime_args()
    with pytest.raises(QuoteParseError) as err:
        verify_quote(b"\xff\x54\x43\x47\x80\x18\x00", sig, ak, qualifying_data=qd)
    assert err.value.step == 1
    assert isinstance(err.value, ParseError)


def test_non_quote_attestation_is_rejected_with_its_type() -> None:
    attest, sig, ak, qd = keylime_args()
    quote = Quote.from_bytes(attest)
    # TPM_ST_ATTEST_CERTIFY (0x8017) with the same common part and a TPMS_CERTIFY_INFO.
    certify = attest[:4] + struct.pack(">H", 0x8017) + attest[6 : len(attest) - len(quote.attested)]
    certify += struct.pack(">H", 2) + b"\x00\x0b" + struct.pack(">H", 0)
    decoded = Quote.from_bytes(certify)
    assert decoded.type_name == "certify"
    assert not decoded.is_quote
    assert decoded.qualified_signer == quote.qualified_signer
    assert decoded.to_bytes() == certify
    with pytest.raises(QuoteTypeError, match="certify"):
        verify_quote(certify, sig, ak, qualifying_data=qd)


# --- named datasets of bad inputs --------------------------------------------------------------

KEYLIME_ATTEST = read("keylime-perf-tests", "attest.bin")

BAD_ATTEST = {
    "empty": b"",
    "magic only": KEYLIME_ATTEST[:4],
    "wrong magic": b"\x00" + KEYLIME_ATTEST[1:],
    "unknown type": KEYLIME_ATTEST[:4] + b"\x80\x99" + KEYLIME_ATTEST[6:],
    "truncated signer": KEYLIME_ATTEST[:20],
    "signer size beyond the end": KEYLIME_ATTEST[:6] + b"\xff\xff" + KEYLIME_ATTEST[8:],
    "truncated clock": KEYLIME_ATTEST[:60],
    "safe is not 0 or 1": KEYLIME_ATTEST[:80] + b"\x02" + KEYLIME_ATTEST[81:],
    "selection count 2**32-1": KEYLIME_ATTEST[:89] + b"\xff\xff\xff\xff" + KEYLIME_ATTEST[93:],
    "selection count 17": KEYLIME_ATTEST[:89] + b"\x00\x00\x00\x11" + KEYLIME_ATTEST[93:],
    "digest too long": KEYLIME_ATTEST[:-34] + b"\x00\x41" + KEYLIME_ATTEST[-32:] + bytes(33),
    "truncated digest": KEYLIME_ATTEST[:-1],
    "trailing byte": KEYLIME_ATTEST + b"\x00",
}


def test_bad_attest_offsets_are_where_expected() -> None:
    # The dataset above is built on the keylime quote's layout: check the offsets it uses.
    quote = Quote.from_bytes(KEYLIME_ATTEST)
    signer_end = 8 + len(quote.qualified_signer)
    clock_at = signer_end + 2 + len(quote.extra_data)
    assert clock_at == 64
    assert clock_at + 17 + 8 == 89  # clockInfo (17) + firmwareVersion (8) -> pcrSelect
    assert KEYLIME_ATTEST[80] == 1  # safe
    assert KEYLIME_ATTEST[89:97] == b"\x00\x00\x00\x01\x00\x0b\x03\xff"  # 1 bank, sha256, 3
    assert len(KEYLIME_ATTEST) - 32 - 2 == 99  # pcrDigest size field


@pytest.mark.parametrize("name", sorted(BAD_ATTEST))
def test_bad_attest_is_a_parse_error(name: str) -> None:
    with pytest.raises(ParseError) as err:
        Quote.from_bytes(BAD_ATTEST[name])
    assert err.value.offset is not None


KEYLIME_SIG = read("keylime-perf-tests", "signature.tpmt.bin")

BAD_SIGNATURES = {
    "empty": b"",
    "sigAlg only": KEYLIME_SIG[:2],
    "NULL scheme": b"\x00\x10",
    "HMAC scheme": b"\x00\x05\x00\x0b" + bytes(32),
    "size beyond the end": KEYLIME_SIG[:4] + b"\xff\xff" + KEYLIME_SIG[6:],
    "truncated": KEYLIME_SIG[:-1],
    "trailing byte": KEYLIME_SIG + b"\x00",
    "ecdsa without s": b"\x00\x18\x00\x0b\x00\x01\x01",
}


@pytest.mark.parametrize("name", sorted(BAD_SIGNATURES))
def test_bad_signature_is_a_parse_error(name: str) -> None:
    with pytest.raises(ParseError) as err:
        Signature.from_bytes(BAD_SIGNATURES[name])
    assert err.value.offset is not None


KEYLIME_PUBLIC = read("keylime-perf-tests", "ak.tpm2b_public.bin")

BAD_PUBLIC = {
    "empty": b"",
    "size larger than data": b"\x01\x19" + KEYLIME_PUBLIC[2:],
    "keyedhash object": b"\x00\x06\x00\x08\x00\x0b\x00\x00",
    "truncated modulus": b"\x01\x15" + KEYLIME_PUBLIC[2:-1],
    "trailing byte": KEYLIME_PUBLIC + b"\x00",
    "unknown RSA scheme": KEYLIME_PUBLIC[:12] + b"\x00\x99" + KEYLIME_PUBLIC[14:],
}


@pytest.mark.parametrize("name", sorted(BAD_PUBLIC))
def test_bad_public_area_is_a_parse_error(name: str) -> None:
    with pytest.raises(ParseError):
        PublicArea.from_bytes(BAD_PUBLIC[name])


KEYLIME_PCRS = read("keylime-perf-tests", "pcrs.tpm2tools.bin")

BAD_PCR_FILES = {
    "empty": b"",
    "selection only": KEYLIME_PCRS[:132],
    "selection count 17": b"\x11\x00\x00\x00" + KEYLIME_PCRS[4:],
    "sizeofSelect 5": KEYLIME_PCRS[:6] + b"\x05" + KEYLIME_PCRS[7:],
    "unknown bank": KEYLIME_PCRS[:4] + b"\x99\x00" + KEYLIME_PCRS[6:],
    "digest list count 2**32-1": KEYLIME_PCRS[:132] + b"\xff\xff\xff\xff" + KEYLIME_PCRS[136:],
    "one list missing": KEYLIME_PCRS[:132] + b"\x02\x00\x00\x00" + KEYLIME_PCRS[136:-532],
    "file truncated": KEYLIME_PCRS[:-1],
    "trailing bytes": KEYLIME_PCRS + bytes(4),
    "digest count 9": KEYLIME_PCRS[:136] + b"\x09" + KEYLIME_PCRS[137:],
    "digest of 20 bytes in sha256 bank": KEYLIME_PCRS[:140] + b"\x14" + KEYLIME_PCRS[141:],
    "fewer digests than PCRs": KEYLIME_PCRS[: 136 + 2 * 532]
    + b"\x00"
    + KEYLIME_PCRS[136 + 2 * 532 + 1 :],
    "pcr24 selected": KEYLIME_PCRS[:6] + b"\x04" + KEYLIME_PCRS[7:10] + b"\x01" + KEYLIME_PCRS[11:],
}


@pytest.mark.parametrize("name", sorted(BAD_PCR_FILES))
def test_bad_pcr_file_is_a_parse_error(name: str) -> None:
    with pytest.raises(ParseError):
        PCRValues.from_bytes(BAD_PCR_FILES[name])


def test_truncation_is_reported_as_truncated() -> None:
    with pytest.raises(TruncatedError):
        Quote.from_bytes(KEYLIME_ATTEST[:-1])
    with pytest.raises(TruncatedError):
        PCRValues.from_bytes(KEYLIME_PCRS[:-1])


# --- encoders ----------------------------------------------------------------------------------


def test_ecdsa_signature_round_trip_and_verification() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    selection = [PCRSelection.of("sha256", ["pcr0", "pcr7"])]
    values = {("pcr0", "sha256"): bytes(32), ("pcr7", "sha256"): b"\x07" * 32}
    qd = tpm_qualifying_data(b"nonce", b"user", "sha256")
    quote = Quote.new(
        extra_data=qd,
        pcr_selection=selection,
        pcr_digest=hashlib.sha256(bytes(32) + b"\x07" * 32).digest(),
    )
    der = key.sign(quote.raw, ec.ECDSA(hashes.SHA256()))
    sig = Signature.ecdsa_from_der("sha256", der, 32)
    assert Signature.from_bytes(sig.to_bytes()) == sig
    assert sig.to_bytes()[:4] == b"\x00\x18\x00\x0b"
    result = verify_quote(
        quote.raw,
        sig.to_bytes(),
        key.public_key(),
        nonce=b"nonce",
        user_data=b"user",
        pcr_values=values,
    )
    assert result.freshness == "nonce"
    with pytest.raises(QuoteFreshnessError):
        verify_quote(quote.raw, sig, key.public_key(), nonce=b"nonce", user_data=b"other")


def test_rsapss_signature_verifies() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    quote = Quote.new(extra_data=b"q", pcr_selection=[], pcr_digest=hashlib.sha256().digest())
    value = key.sign(
        quote.raw,
        padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32),
        hashes.SHA256(),
    )
    sig = Signature.rsapss("sha256", value)
    assert Signature.from_bytes(sig.to_bytes()) == sig
    verify_quote(quote.raw, sig.to_bytes(), key.public_key(), qualifying_data=b"q")
    with pytest.raises(QuoteSignatureError):
        verify_quote(
            quote.raw, Signature.rsassa("sha256", value), key.public_key(), qualifying_data=b"q"
        )


@pytest.mark.parametrize("kind", ["ecc", "rsa"])
def test_public_area_from_key_round_trip(kind: str) -> None:
    key = (
        ec.generate_private_key(ec.SECP256R1())
        if kind == "ecc"
        else rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ).public_key()
    area = PublicArea.from_public_key(key)
    assert PublicArea.from_bytes(area.to_bytes()) == area
    assert area.public_key().public_numbers() == key.public_numbers()
    assert area.is_restricted_signing_key
    # The name is nameAlg || SHA-256(TPMT_PUBLIC), computed independently here.
    assert area.name == b"\x00\x0b" + hashlib.sha256(area.to_bytes()[2:]).digest()


def test_pcr_file_written_from_values_round_trips() -> None:
    selections = [
        PCRSelection.of("sha1", ["pcr0", "pcr1"]),
        PCRSelection.of("sha256", [f"pcr{i}" for i in range(10)]),
    ]
    values = {(f"pcr{i}", "sha256"): bytes([i]) * 32 for i in range(10)}
    values |= {("pcr0", "sha1"): b"\x01" * 20, ("pcr1", "sha1"): b"\x02" * 20}
    pcr_file = PCRValues.from_values(selections, values)
    data = pcr_file.to_bytes()
    assert len(data) == 132 + 4 + 2 * 532  # 12 digests -> two TPML_DIGEST
    decoded = PCRValues.from_bytes(data)
    assert decoded == pcr_file
    assert decoded.to_bank().get("pcr9", "sha256") == b"\x09" * 32
