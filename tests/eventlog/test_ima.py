"""Linux IMA lists: the real vectors, hand-built entries of every template, bad input, replay.

Expected values come from the vectors' MANIFEST.json files, or are computed in
the tests themselves with hashlib and struct over bytes the tests assemble
(never through the code under test).
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from cima.errors import ParseError, ReplayError, TruncatedError, UnsupportedFormatError
from cima.eventlog import ima
from cima.eventlog.replay import compare_prefix, replay
from cima.registers import RegisterBank
from tests.vectors import manifest, path

U32 = struct.Struct("<I").pack
IMA_VECTORS = {e["file"]: e["expected"] for e in manifest("ima")}
CCEL_IMA = next(e for e in manifest("ccel") if e["file"] == "evidence-api/ima_log.bin")
KEYLIME = "keylime-perf-tests/ima_log.txt"
RUST_KEYLIME = "rust-keylime/ascii_runtime_measurements"


class Trickle(io.RawIOBase):
    """A stream that returns at most ``step`` bytes per read, like a pipe."""

    def __init__(self, data: bytes, step: int = 3) -> None:
        self._data = data
        self._pos = 0
        self._step = step

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        n = self._step if size < 0 else min(size, self._step)
        out = self._data[self._pos : self._pos + n]
        self._pos += len(out)
        return out


def _extend(alg: str, old: bytes, digest: bytes) -> bytes:
    return hashlib.new(alg, old + digest).digest()


def _regs(bank: RegisterBank) -> dict[tuple[str, str], str]:
    return {(v.register, v.algorithm): v.digest.hex() for v in bank}


# -- the real vectors ----------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(IMA_VECTORS))
def test_vector_decodes_as_manifest_says(name: str) -> None:
    exp = IMA_VECTORS[name]
    data = path("ima", name).read_bytes()
    assert exp["format"] == "ima-ascii"
    assert ima.looks_like_ascii(data) and not ima.looks_like_binary(data)
    log = ima.parse_ascii(data, source=name)
    assert log.format == exp["format"]
    assert len(log) == exp["entries"]
    assert list(log.template_names()) == exp["template_names"]
    assert len(log.violations()) == exp["violations"]
    assert len(log.template_hash_mismatches()) == exp["template_hash_mismatches"]
    log.verify_template_hashes()
    assert {e.pcr for e in log} == {exp["pcr"]}
    assert {e.template_hash_algorithm for e in log} == {exp["template_hash_alg"]}
    assert {e.digest_algorithm for e in log} == set(exp["file_digest_algs"])
    assert log.entries[0].to_ascii().decode() == exp["first_entry"]
    assert log.entries[-1].to_ascii().decode() == exp["last_entry"]
    # the whole list prints back byte for byte
    assert log.to_ascii() == data


@pytest.mark.parametrize("name", sorted(IMA_VECTORS))
def test_vector_replays_to_manifest_values(name: str) -> None:
    exp = IMA_VECTORS[name]
    log = ima.parse_ascii(path("ima", name).read_bytes())
    pcr10 = exp["pcr10"]
    sha256 = pcr10.get("sha256", exp.get("pcr10_sha256_per_bank_template_hash"))
    bank = replay(log.entries, ["sha1", "sha256"])
    assert bank.get("pcr10", "sha1").hex() == pcr10["sha1"]
    assert bank.get("pcr10", "sha256").hex() == sha256
    assert log.replay(["sha1", "sha256"]).to_list() == bank.to_list()
    legacy = exp.get("pcr10_sha256_legacy_zero_padded_sha1")
    if legacy is not None:
        assert replay(ima.padded(log.entries), ["sha256"]).get("pcr10", "sha256").hex() == legacy
        assert log.replay(["sha256"], padded=True).get("pcr10", "sha256").hex() == legacy


@pytest.mark.parametrize("name", sorted(IMA_VECTORS))
def test_vector_streaming_replay_ascii_and_binary(name: str) -> None:
    exp = IMA_VECTORS[name]
    data = path("ima", name).read_bytes()
    sha256 = exp["pcr10"].get("sha256", exp.get("pcr10_sha256_per_bank_template_hash"))
    binary = ima.parse_ascii(data).to_bytes()
    assert ima.looks_like_binary(binary) and not ima.looks_like_ascii(binary)
    with path("ima", name).open("rb") as f:
        from_ascii = ima.replay_ascii(f, ["sha1", "sha256"], source=name)
    from_binary = ima.replay_binary(io.BytesIO(binary), ["sha1", "sha256"])
    for r, fmt in ((from_ascii, "ima-ascii"), (from_binary, "ima-binary")):
        assert r.format == fmt
        assert r.entries == exp["entries"]
        assert r.violations == exp["violations"]
        assert r.template_hash_mismatch_count == exp["template_hash_mismatches"] == 0
        assert r.template_names == exp["template_names"]
        assert r.bank.get("pcr10", "sha1").hex() == exp["pcr10"]["sha1"]
        assert r.bank.get("pcr10", "sha256").hex() == sha256
        r.raise_for_mismatch()
    assert from_binary.end_offset == len(binary)
    assert from_ascii.end_offset == len(data)
    assert from_ascii.end_line == exp["entries"] + 1
    legacy = exp.get("pcr10_sha256_legacy_zero_padded_sha1")
    if legacy is not None:
        r = ima.replay_binary(io.BytesIO(binary), ["sha256"], padded=True)
        assert r.bank.get("pcr10", "sha256").hex() == legacy
        r = ima.replay_ascii(io.BytesIO(data), ["sha256"], padded=True)
        assert r.bank.get("pcr10", "sha256").hex() == legacy


@pytest.mark.parametrize("name", sorted(IMA_VECTORS))
def test_vector_binary_round_trip(name: str) -> None:
    data = path("ima", name).read_bytes()
    log = ima.parse_ascii(data)
    binary = log.to_bytes()
    # the first record, assembled here from the first line's text
    pcr, th, tname, dng, fname = data.split(b"\n", 1)[0].split(b" ", 4)
    alg, _, hexdigest = dng.partition(b":")
    tdata = (
        U32(len(alg) + 2 + len(hexdigest) // 2) + alg + b":\x00" + bytes.fromhex(hexdigest.decode())
    )
    tdata += U32(len(fname) + 1) + fname + b"\x00"
    first = U32(int(pcr)) + bytes.fromhex(th.decode()) + U32(len(tname)) + tname
    first += U32(len(tdata)) + tdata
    assert binary.startswith(first)
    assert hashlib.sha1(tdata).digest() == bytes.fromhex(th.decode())
    back = ima.parse_binary(binary, source="x.bin")
    assert back.to_bytes() == binary
    assert back.to_ascii() == data
    assert [e.offset for e in back][:2] == [0, len(first)]
    assert all(e.line is None for e in back)
    assert [e.line for e in log][:2] == [1, 2]


def test_evidence_api_ima_log_is_an_ascii_list_for_rtmr2() -> None:
    exp = CCEL_IMA["expected"]
    data = path("ccel", CCEL_IMA["file"]).read_bytes()
    assert exp["format"] == "ima-ascii" and ima.looks_like_ascii(data)
    log = ima.parse_ascii(data)
    assert len(log) == exp["lines"]
    (entry,) = log.entries
    assert entry.template_name == exp["template"]
    assert entry.pcr == exp["register_field"]
    assert entry.template_hash_algorithm == exp["template_hash_alg"]
    assert entry.algorithms() == (exp["template_hash_alg"],)
    assert entry.template_hash.hex() == exp["template_hash"]
    assert entry.file_digest is not None
    assert f"{entry.digest_algorithm}:{entry.file_digest.hex()}" == exp["file_digest"]
    assert entry.file_name == exp["file_name"]
    assert (entry.computed_template_hash() == entry.template_hash) is exp[
        "template_hash_recomputes"
    ]
    assert log.to_ascii() == data  # " 2 ..." : the kernel prints the index with %2d
    # IMR 2 is RTMR2 (CC measurement-register index 3): extend the CCEL-only value
    ccel_only = next(e for e in manifest("ccel") if e["file"] == "evidence-api/ccel_data.bin")
    start = bytes.fromhex(ccel_only["expected"]["rtmr_ccel_only"]["2"])
    want = exp["rtmr2_after_extending_ccel_rtmr2"]
    bank = RegisterBank()
    bank.initialise("rtmr2", "sha384", start)
    digest = entry.replay_digest("sha384")
    assert digest is not None
    assert bank.extend("rtmr2", "sha384", digest).hex() == want
    # the streaming replay, mapping the index to rtmr2 and starting from the CCEL value
    start_bank = RegisterBank()
    start_bank.initialise("rtmr2", "sha384", start)
    r = ima.replay_ascii(io.BytesIO(data), ["sha384"], bank=start_bank, registers={2: "rtmr2"})
    assert r.bank.get("rtmr2", "sha384").hex() == want
    assert start_bank.get("rtmr2", "sha384") == start  # the starting bank is not modified
    # as a binary list with a SHA-384 template hash
    binary = log.to_bytes()
    assert ima.parse_binary(binary, template_hash_algorithm="sha384").to_ascii() == data
    with pytest.raises(ParseError):
        ima.parse_binary(binary)  # a SHA-1 reading misaligns the record


def test_compare_prefix_finds_where_the_quote_was_taken() -> None:
    data = path("ima", KEYLIME).read_bytes()
    log = ima.parse_ascii(data)
    value = bytes(20)
    for line in data.splitlines()[:700]:
        value = _extend("sha1", value, bytes.fromhex(line.split(b" ")[1].decode()))
    result = compare_prefix(log.entries, {("pcr10", "sha1"): value})
    assert result.ok
    assert result.prefix is not None
    assert (result.prefix.matched_events, result.prefix.beyond) == (700, 80)


@pytest.mark.parametrize("fmt", ["ascii", "binary"])
def test_flipped_file_digest_is_reported(fmt: str) -> None:
    lines = path("ima", KEYLIME).read_bytes().splitlines(keepends=True)
    pcr, th, tname, dng, rest = lines[4].split(b" ", 4)
    flipped = dng[:-1] + (b"0" if dng[-1:] != b"0" else b"1")
    lines[4] = b" ".join((pcr, th, tname, flipped, rest))
    data = b"".join(lines)
    log = ima.parse_ascii(data)
    if fmt == "binary":
        data = log.to_bytes()
        log = ima.parse_binary(data)
    assert [e.index for e in log.template_hash_mismatches()] == [4]
    assert log.entries[4].template_hash_matches() is False
    with pytest.raises(ima.TemplateHashMismatchError) as info:
        log.verify_template_hashes()
    assert info.value.indices == (4,)
    fn = ima.replay_binary if fmt == "binary" else ima.replay_ascii
    r = fn(io.BytesIO(data), ["sha1", "sha256"])
    assert (r.template_hash_mismatch_count, r.template_hash_mismatches) == (1, [4])
    with pytest.raises(ima.TemplateHashMismatchError):
        r.raise_for_mismatch()
    # the logged hash is still what the sha1 bank is extended with
    assert r.bank.get("pcr10", "sha1").hex() == IMA_VECTORS[KEYLIME]["pcr10"]["sha1"]
    assert r.bank.to_list() == log.replay(["sha1", "sha256"]).to_list()
    unchecked = fn(io.BytesIO(data), ["sha1", "sha256"], check_template_hash=False)
    assert unchecked.template_hash_mismatch_count == 0
    assert unchecked.bank.to_list() == r.bank.to_list()


# -- hand-built entries of every template ------------------------------------------

D256 = hashlib.sha256(b"a file").digest()
D256B = hashlib.sha256(b"another file").digest()
D1 = hashlib.sha1(b"a file").digest()
SIG = bytes([0x03, 0x02, 0x04]) + hashlib.sha256(b"sig").digest() * 2
MODSIG = b"\x30\x82\x01\x00" + hashlib.sha512(b"pkcs7").digest()


def framed(*fields: bytes) -> bytes:
    return b"".join(U32(len(f)) + f for f in fields)


def dng(alg: bytes, digest: bytes) -> bytes:
    return alg + b":\x00" + digest


def nul(s: bytes) -> bytes:
    return s + b"\x00"


@dataclass
class Case:
    id: str
    template: bytes
    data: bytes
    ascii: bytes | None  # the fields as the ascii list prints them; None: no ascii form
    expect: dict[str, Any] = field(default_factory=dict)
    pcr: int = 10
    violation: bool = False

    @property
    def hash_input(self) -> bytes:
        if self.template == b"ima":
            name = self.data[24:]
            return self.data[:20] + name + bytes(256 - len(name))
        return self.data

    @property
    def template_hash(self) -> bytes:
        return bytes(20) if self.violation else hashlib.sha1(self.hash_input).digest()

    def record(self) -> bytes:
        head = U32(self.pcr) + self.template_hash + U32(len(self.template)) + self.template
        if self.template == b"ima":
            return head + self.data
        return head + U32(len(self.data)) + self.data

    def line(self) -> bytes:
        assert self.ascii is not None
        return b"%2d %s %s %s" % (
            self.pcr,
            self.template_hash.hex().encode(),
            self.template,
            self.ascii,
        )


DEP = b"/usr/bin/containerd-shim-runc-v2:/usr/lib/systemd/systemd:swapper/0"
CGPATH = b"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod12.slice/cri-c-ab.scope"
H = D256.hex().encode()
H2 = D256B.hex().encode()

CASES = [
    Case(
        "ima-ng",
        b"ima-ng",
        framed(dng(b"sha256", D256), nul(b"/usr/bin/kubelet")),
        b"sha256:" + H + b" /usr/bin/kubelet",
        {"file_name": "/usr/bin/kubelet", "file_digest": D256, "digest_algorithm": "sha256"},
    ),
    Case(
        "ima-ng-name-with-spaces",
        b"ima-ng",
        framed(dng(b"sha256", D256), nul(b"/var/lib/my file (copy) .txt")),
        b"sha256:" + H + b" /var/lib/my file (copy) .txt",
        {"file_name": "/var/lib/my file (copy) .txt"},
    ),
    Case(
        "ima-ng-non-utf8-name",
        b"ima-ng",
        framed(dng(b"sha1", D1), nul(b"/tmp/caf\xe9-\xff")),
        b"sha1:" + D1.hex().encode() + b" /tmp/caf\xe9-\xff",
        {"file_name": os.fsdecode(b"/tmp/caf\xe9-\xff"), "digest_algorithm": "sha1"},
    ),
    Case(
        "ima-ngv2",
        b"ima-ngv2",
        framed(b"ima:sha256:\x00" + D256, nul(b"/usr/bin/runc")),
        b"ima:sha256:" + H + b" /usr/bin/runc",
        {"digest_type": "ima", "digest_algorithm": "sha256", "file_digest": D256},
    ),
    Case(
        "ima-ngv2-verity",
        b"ima-ngv2",
        framed(b"verity:sha256:\x00" + D256, nul(b"/usr/lib/x.so")),
        b"verity:sha256:" + H + b" /usr/lib/x.so",
        {"digest_type": "verity"},
    ),
    Case(
        "ima-sig",
        b"ima-sig",
        framed(dng(b"sha256", D256), nul(b"/usr/bin/ls"), SIG),
        b"sha256:" + H + b" /usr/bin/ls " + SIG.hex().encode(),
        {"signature": SIG, "file_name": "/usr/bin/ls"},
    ),
    Case(
        "ima-sig-without-signature",
        b"ima-sig",
        framed(dng(b"sha256", D256), nul(b"/usr/bin/ls"), b""),
        b"sha256:" + H + b" /usr/bin/ls ",  # the kernel prints the space of an empty field
        {"signature": None},
    ),
    Case(
        "ima-sig-name-with-spaces",
        b"ima-sig",
        framed(dng(b"sha256", D256), nul(b"/opt/a b/c d"), SIG),
        b"sha256:" + H + b" /opt/a b/c d " + SIG.hex().encode(),
        {"signature": SIG, "file_name": "/opt/a b/c d"},
    ),
    Case(
        "ima-sigv2",
        b"ima-sigv2",
        framed(b"ima:sha256:\x00" + D256, nul(b"/usr/bin/ls"), SIG),
        b"ima:sha256:" + H + b" /usr/bin/ls " + SIG.hex().encode(),
        {"signature": SIG, "digest_type": "ima"},
    ),
    Case(
        "ima-buf",
        b"ima-buf",
        framed(
            dng(b"sha256", hashlib.sha256(b"root=/dev/vda1 ro").digest()),
            nul(b"kexec-cmdline"),
            b"root=/dev/vda1 ro",
        ),
        b"sha256:"
        + hashlib.sha256(b"root=/dev/vda1 ro").hexdigest().encode()
        + b" kexec-cmdline "
        + b"root=/dev/vda1 ro".hex().encode(),
        {"buffer": b"root=/dev/vda1 ro", "file_name": "kexec-cmdline"},
    ),
    Case(
        "ima-modsig",
        b"ima-modsig",
        framed(dng(b"sha256", D256), nul(b"/lib/modules/m.ko"), b"", dng(b"sha256", D256B), MODSIG),
        b"sha256:" + H + b" /lib/modules/m.ko  sha256:" + H2 + b" " + MODSIG.hex().encode(),
        {
            "modsig": MODSIG,
            "modsig_digest": D256B,
            "modsig_digest_algorithm": "sha256",
            "signature": None,
        },
    ),
    Case(
        "ima-cgpath",
        b"ima-cgpath",
        framed(nul(DEP), nul(CGPATH), dng(b"sha256", D256), nul(b"/usr/bin/python3")),
        DEP + b" " + CGPATH + b" sha256:" + H + b" /usr/bin/python3",
        {
            "cgroup_path": CGPATH,
            "dependencies": tuple(DEP.split(b":")),
            "file_name": "/usr/bin/python3",
            "file_digest": D256,
        },
    ),
    Case(
        "ima-dep-cgn",
        b"ima-dep-cgn",
        framed(nul(DEP), nul(b"cri-containerd-ab12.scope"), dng(b"sha256", D256), nul(b"/bin/sh")),
        DEP + b" cri-containerd-ab12.scope sha256:" + H + b" /bin/sh",
        {"cgroup_name": b"cri-containerd-ab12.scope", "file_name": "/bin/sh"},
    ),
    Case(
        "evm-sig",
        b"evm-sig",
        framed(
            dng(b"sha256", D256),
            nul(b"/etc/passwd"),
            b"\x05\x02" + SIG,
            b"security.ima|security.selinux",
            b"\x10\x00\x20\x00",
            b"\x01" * 6,
            U32(0),
            U32(1000),
            struct.pack("<H", 0o100644),
        ),
        b"sha256:"
        + H
        + b" /etc/passwd "
        + (b"\x05\x02" + SIG).hex().encode()
        + b" security.ima|security.selinux 10002000 "
        + (b"\x01" * 6).hex().encode()
        + b" 0 1000 33188",
        {"file_name": "/etc/passwd"},
    ),
    Case(
        "ima",
        b"ima",
        D1 + U32(len(b"/sbin/init")) + b"/sbin/init",
        D1.hex().encode() + b" /sbin/init",
        {"file_name": "/sbin/init", "file_digest": D1, "digest_algorithm": "sha1"},
    ),
    Case(
        "custom-format-string",
        b"d-ng|n-ng|buf",
        framed(dng(b"sha512", hashlib.sha512(b"k").digest()), nul(b"keys"), b"\x00\x01"),
        b"sha512:" + hashlib.sha512(b"k").hexdigest().encode() + b" keys 0001",
        {"buffer": b"\x00\x01", "digest_algorithm": "sha512"},
    ),
    Case(
        "violation",
        b"ima-ng",
        framed(dng(b"sha256", bytes(20)), nul(b"/var/log/open-for-write")),
        b"sha256:" + b"00" * 20 + b" /var/log/open-for-write",
        {"file_digest": bytes(20)},
        violation=True,
    ),
    Case(
        "another-pcr",
        b"ima-ng",
        framed(dng(b"sha384", hashlib.sha384(b"x").digest()), nul(b"/usr/bin/x")),
        b"sha384:" + hashlib.sha384(b"x").hexdigest().encode() + b" /usr/bin/x",
        {"digest_algorithm": "sha384"},
        pcr=11,
    ),
    Case(
        "unknown-template",
        b"my-template",
        framed(b"abc", b"\x01\x02\x03"),
        None,
        {"file_name": None, "file_digest": None},
    ),
]
BINARY = b"".join(c.record() for c in CASES)
ASCII_CASES = [c for c in CASES if c.ascii is not None]
ASCII = b"".join(c.line() + b"\n" for c in ASCII_CASES)


def _independent_replay(cases: list[Case], algs: tuple[str, ...]) -> dict[tuple[str, str], str]:
    regs: dict[tuple[str, str], bytes] = {}
    for c in cases:
        for alg in algs:
            key = (f"pcr{c.pcr}", alg)
            old = regs.get(key, bytes(hashlib.new(alg).digest_size))
            if c.violation:
                digest = b"\xff" * hashlib.new(alg).digest_size
            elif alg == "sha1":
                digest = c.template_hash
            else:
                digest = hashlib.new(alg, c.hash_input).digest()
            regs[key] = _extend(alg, old, digest)
    return {k: v.hex() for k, v in regs.items()}


def test_hand_built_binary_list_round_trips() -> None:
    log = ima.parse_binary(BINARY)
    assert log.to_bytes() == BINARY
    assert [e.template_name for e in log] == [c.template.decode() for c in CASES]
    offsets = [0]
    for c in CASES[:-1]:
        offsets.append(offsets[-1] + len(c.record()))
    assert [e.offset for e in log] == offsets
    assert [e.index for e in log] == list(range(len(CASES)))
    assert log.template_hash_mismatches() == ()
    assert [e.index for e in log.violations()] == [CASES.index(CASES[-3])]
    for e, c in zip(log, CASES, strict=True):
        assert e.template_data == c.data
        assert e.is_violation is c.violation
        assert e.template_hash_matches() is (None if c.violation else True)
        assert e.computed_template_hash() == hashlib.sha1(c.hash_input).digest()
        assert e.register == f"pcr{c.pcr}" and e.extends and e.startup_locality is None


@pytest.mark.parametrize("case", ASCII_CASES, ids=[c.id for c in ASCII_CASES])
def test_hand_built_entry_prints_as_the_kernel_does(case: Case) -> None:
    (entry,) = ima.parse_binary(case.record()).entries
    assert entry.to_ascii() == case.line()
    # and the line gives back the very template data
    (back,) = ima.parse_ascii(case.line() + b"\n").entries
    assert back.template_data == case.data
    assert back.template_hash == case.template_hash
    assert back.to_bytes() == case.record()
    assert back.to_ascii() == case.line()


def test_hand_built_ascii_list_round_trips() -> None:
    log = ima.parse_ascii(ASCII)
    assert log.to_ascii() == ASCII
    assert log.to_bytes() == b"".join(c.record() for c in ASCII_CASES)
    assert [e.line for e in log] == list(range(1, len(ASCII_CASES) + 1))
    assert log.template_hash_mismatches() == ()
    text = ima.parse_ascii(ASCII.decode("utf-8", "surrogateescape"))
    assert text.to_ascii() == ASCII


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hand_built_fields_decode(case: Case) -> None:
    (entry,) = ima.parse_binary(case.record()).entries
    fields = entry.fields
    assert fields.known is (case.id != "unknown-template")
    for attr, want in case.expect.items():
        have = getattr(entry, attr) if hasattr(entry, attr) else getattr(fields, attr)
        assert have == want, attr


def test_unknown_template_keeps_its_raw_fields() -> None:
    case = CASES[-1]
    (entry,) = ima.parse_binary(case.record()).entries
    assert [f.data for f in entry.fields.fields] == [b"abc", b"\x01\x02\x03"]
    assert all(f.id == "" for f in entry.fields.fields)
    with pytest.raises(UnsupportedFormatError):
        entry.to_ascii()
    # in an ascii list its fields cannot become template data: only its own bank replays
    line = b"10 " + case.template_hash.hex().encode() + b" my-template 616263 010203"
    (text,) = ima.parse_ascii(line).entries
    assert not text.has_template_data
    assert text.to_ascii() == line
    assert text.computed_template_hash() is None and text.template_hash_matches() is None
    assert text.replay_digest("sha1") == case.template_hash
    assert text.replay_digest("sha256", padded=True) == case.template_hash + bytes(12)
    with pytest.raises(ReplayError):
        text.replay_digest("sha256")
    with pytest.raises(UnsupportedFormatError):
        text.to_bytes()
    log = ima.parse_ascii(line)
    assert log.unverified() == (text,) and log.template_hash_mismatches() == ()
    r = ima.replay_ascii(io.BytesIO(line), ["sha1"])
    assert (r.entries, r.unverified) == (1, 1)
    assert r.bank.get("pcr10", "sha1") == _extend("sha1", bytes(20), case.template_hash)
    with pytest.raises(ReplayError):
        ima.replay_ascii(io.BytesIO(line), ["sha1", "sha256"])


def test_hand_built_list_replays_into_every_bank() -> None:
    algs = ("sha1", "sha256", "sha384")
    want = _independent_replay(CASES, algs)
    log = ima.parse_binary(BINARY)
    assert _regs(replay(log.entries, algs)) == want
    assert _regs(ima.replay_binary(io.BytesIO(BINARY), algs).bank) == want
    assert _regs(ima.replay_binary(Trickle(BINARY, 5), algs, chunk_size=7).bank) == want
    want_ascii = _independent_replay(ASCII_CASES, algs)
    assert _regs(ima.replay_ascii(io.BytesIO(ASCII), algs).bank) == want_ascii
    assert _regs(ima.replay_ascii(Trickle(ASCII, 11), algs).bank) == want_ascii
    r = ima.replay_binary(io.BytesIO(BINARY), algs)
    assert (r.entries, r.violations, r.template_hash_mismatch_count) == (len(CASES), 1, 0)
    assert r.template_names == list(dict.fromkeys(c.template.decode() for c in CASES))


def test_padded_form_pads_the_sha1_hash() -> None:
    want: dict[tuple[str, str], bytes] = {}
    for c in CASES:
        key = (f"pcr{c.pcr}", "sha256")
        digest = b"\xff" * 32 if c.violation else c.template_hash + bytes(12)
        want[key] = _extend("sha256", want.get(key, bytes(32)), digest)
    expect = {k: v.hex() for k, v in want.items()}
    log = ima.parse_binary(BINARY)
    assert _regs(replay(ima.padded(log.entries), ["sha256"])) == expect
    assert _regs(ima.replay_binary(io.BytesIO(BINARY), ["sha256"], padded=True).bank) == expect


def test_streams_that_trickle_give_the_same_entries() -> None:
    whole = ima.parse_binary(BINARY).entries
    assert tuple(ima.iter_binary(Trickle(BINARY, 3))) == whole
    assert tuple(ima.iter_ascii(Trickle(ASCII, 2))) == ima.parse_ascii(ASCII).entries
    assert tuple(ima.iter_ascii(io.StringIO(ASCII.decode("utf-8", "surrogateescape")))) == (
        ima.parse_ascii(ASCII).entries
    )


def test_incremental_reader_starts_at_an_offset() -> None:
    whole = ima.parse_binary(BINARY).entries
    k = 5
    start = whole[k].offset
    assert start is not None
    tail = tuple(ima.iter_binary(io.BytesIO(BINARY[start:]), offset=start, index=k))
    assert tail == whole[k:]
    lines = ASCII.splitlines(keepends=True)
    atail = tuple(ima.iter_ascii(io.BytesIO(b"".join(lines[k:])), line=k + 1, index=k))
    assert atail == ima.parse_ascii(ASCII).entries[k:]
    # a replay continued from there equals the replay of the whole list
    head = ima.replay_binary(io.BytesIO(BINARY[:start]), ["sha1", "sha256"])
    assert head.end_offset == start
    rest = ima.replay_binary(
        io.BytesIO(BINARY[start:]), ["sha1", "sha256"], bank=head.bank, offset=start, index=k
    )
    assert rest.end_offset == len(BINARY)
    assert (
        rest.bank.to_list()
        == ima.replay_binary(io.BytesIO(BINARY), ["sha1", "sha256"]).bank.to_list()
    )


def test_to_dict_escapes_non_utf8_names() -> None:
    case = next(c for c in CASES if c.id == "ima-ng-non-utf8-name")
    (entry,) = ima.parse_binary(case.record()).entries
    d = entry.to_dict()
    assert d["file_name"] == "/tmp/caf\\xe9-\\xff"
    assert d["offset"] == 0 and "line" not in d
    assert d["register"] == "pcr10" and d["template_name"] == "ima-ng"
    assert d["template_hash"] == case.template_hash.hex()
    assert d["fields"][1] == {"id": "n-ng", "value": "/tmp/caf\\xe9-\\xff"}
    assert os.fsencode(entry.file_name or "") == b"/tmp/caf\xe9-\xff"
    log = ima.parse_binary(BINARY).to_dict()
    assert log["entries"] == len(CASES) and log["violations"] == 1
    assert log["template_hash_mismatches"] == []


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(b"\xd4\xc3\xb2\xa1" + bytes(60), id="pcap-header"),
        pytest.param(b'[{"recnum": 0}]', id="json"),
        pytest.param(b"", id="empty"),
        pytest.param(b"10 abc ima-ng sha1:00 /x", id="short-hash"),
    ],
)
def test_other_data_is_not_taken_for_an_ima_list(text: bytes) -> None:
    assert not ima.looks_like_ascii(text)
    assert not ima.looks_like_binary(text)


@pytest.mark.parametrize("name", [e["file"] for e in manifest("tcg")][:6])
def test_tcg_logs_are_not_taken_for_an_ima_list(name: str) -> None:
    data = path("tcg", name).read_bytes()
    assert not ima.looks_like_binary(data)
    assert not ima.looks_like_ascii(data)


# -- bad input ---------------------------------------------------------------------

GOOD = CASES[0].record()
AT = len(GOOD)  # offset of the second record in GOOD + bad
NG = CASES[0]
IMA_CASE = next(c for c in CASES if c.id == "ima")


def _with(**over: Any) -> bytes:
    """The ima-ng record of CASES[0] with header fields replaced."""
    pcr = over.get("pcr", 10)
    name = over.get("name", b"ima-ng")
    nlen = over.get("nlen", len(name))
    data = over.get("data", NG.data)
    dlen = over.get("dlen", len(data))
    return U32(pcr) + NG.template_hash + U32(nlen) + name + U32(dlen) + data


REC = NG.record()
SIG_CASE = next(c for c in CASES if c.id == "ima-sig")
SIG_REC = SIG_CASE.record()
SIG_AT = len(framed(dng(b"sha256", D256), nul(b"/usr/bin/ls")))  # the signature length field
# (an ima-sig record's template data starts at 39: 4 + 20 + 4 + len("ima-sig") + 4)


def _sig(tail: bytes) -> bytes:
    """An ima-sig record whose signature field (length and bytes) is ``tail``."""
    data = SIG_CASE.data[:SIG_AT] + tail
    name = b"ima-sig"
    return U32(10) + SIG_CASE.template_hash + U32(len(name)) + name + U32(len(data)) + data


IMA_REC = IMA_CASE.record()
BAD_BINARY: dict[str, tuple[bytes, type[ParseError], int]] = {
    # truncated at each field of the second record: (list, error, offset)
    "truncated-pcr": (GOOD + REC[:2], TruncatedError, AT),
    "truncated-template-hash": (GOOD + REC[:10], TruncatedError, AT + 4),
    "truncated-name-length": (GOOD + REC[:26], TruncatedError, AT + 24),
    "truncated-name": (GOOD + REC[:31], TruncatedError, AT + 28),
    "truncated-data-length": (GOOD + REC[:36], TruncatedError, AT + 34),
    "truncated-data": (GOOD + REC[:-1], TruncatedError, AT + 38),
    "truncated-ima-digest": (GOOD + IMA_REC[:40], TruncatedError, AT + 31),
    "truncated-ima-name-length": (GOOD + IMA_REC[:53], TruncatedError, AT + 51),
    "truncated-ima-name": (GOOD + IMA_REC[:-1], TruncatedError, AT + 55),
    "ima-name-length-over-255": (
        GOOD + IMA_REC[:51] + U32(256) + b"x" * 256,
        ParseError,
        AT + 51,
    ),
    "template-name-length-huge": (GOOD + _with(nlen=0xFFFFFFFF), ParseError, AT + 24),
    "template-name-length-zero": (GOOD + _with(nlen=0, name=b""), ParseError, AT + 24),
    "template-name-not-printable": (GOOD + _with(name=b"ima\x00ng"), ParseError, AT + 28),
    "template-data-length-4gb": (GOOD + _with(dlen=0xFFFFFFFF), ParseError, AT + 34),
    "template-data-length-over-limit": (
        GOOD + _with(dlen=ima.MAX_TEMPLATE_DATA_LEN + 1),
        ParseError,
        AT + 34,
    ),
    "template-data-length-past-the-end": (GOOD + _with(dlen=1000), TruncatedError, AT + 38),
    "pcr-24": (GOOD + _with(pcr=24), ParseError, AT),
    "pcr-huge": (_with(pcr=0xFFFFFFFF), ParseError, 0),
    # ima-ng: the d-ng length says 41 where the field has 40 bytes
    "ima-ng-field-length-too-long": (
        GOOD + _with(data=U32(41) + NG.data[4:]),
        ParseError,
        AT + 38 + 4 + 41,
    ),
    "ima-ng-field-length-past-the-data": (
        GOOD + _with(data=U32(400) + NG.data[4:]),
        ParseError,
        AT + 38,
    ),
    "ima-ng-extra-bytes-after-fields": (
        GOOD + _with(data=NG.data + b"\x00"),
        ParseError,
        AT + 38 + len(NG.data),
    ),
    # ima-sig after a good ima-sig record (the streaming replay's three-field fast path)
    "ima-sig-signature-length-past-the-data": (
        SIG_REC + _sig(U32(len(SIG) + 1) + SIG),
        ParseError,
        len(SIG_REC) + 39 + SIG_AT,
    ),
    "ima-sig-bytes-after-the-signature": (
        SIG_REC + _sig(U32(len(SIG)) + SIG + b"\x00"),
        ParseError,
        len(SIG_REC) + 39 + SIG_AT + 4 + len(SIG),
    ),
    "ima-ng-one-field-only": (GOOD + _with(data=NG.data[:44]), ParseError, AT + 38 + 44),
}


@pytest.mark.parametrize("name", BAD_BINARY)
def test_bad_binary_list_names_the_offset(name: str) -> None:
    data, kind, offset = BAD_BINARY[name]
    with pytest.raises(kind) as info:
        ima.parse_binary(data, source="bad.bin")
    assert type(info.value) is kind
    assert info.value.offset == offset
    assert info.value.source == "bad.bin"
    assert f"offset {offset}" in str(info.value)


@pytest.mark.parametrize("name", BAD_BINARY)
def test_bad_binary_list_fails_alike_when_streamed(name: str) -> None:
    data, kind, offset = BAD_BINARY[name]
    with pytest.raises(kind) as info:
        list(ima.iter_binary(Trickle(data, 64)))
    assert info.value.offset == offset
    for chunk in (5, 1 << 20):
        with pytest.raises(kind) as info:
            ima.replay_binary(io.BytesIO(data), ["sha1", "sha256"], chunk_size=chunk)
        assert info.value.offset == offset


def _line(rest: bytes, th: bytes | None = None) -> bytes:
    return b"10 " + (th if th is not None else b"ab" * 20) + b" " + rest


FIRST = NG.line() + b"\n"
BAD_ASCII: dict[str, bytes] = {
    "template-hash-bad-hex": b"10 " + b"zz" * 20 + b" ima-ng sha256:" + H + b" /x",
    "template-hash-odd-length": b"10 " + b"a" * 39 + b" ima-ng sha256:" + H + b" /x",
    "template-hash-38-hex": b"10 " + b"ab" * 19 + b" ima-ng sha256:" + H + b" /x",
    "template-hash-size-differs": _line(b"ima-ng sha256:" + H + b" /x", th=b"ab" * 32),
    "d-ng-bad-hex": _line(b"ima-ng sha256:" + b"g" * 64 + b" /x"),
    "d-ng-wrong-length-for-sha256": _line(b"ima-ng sha256:" + b"ab" * 20 + b" /x"),
    "d-ng-wrong-length-for-sha1": _line(b"ima-ng sha1:" + b"ab" * 32 + b" /x"),
    "d-ng-no-algorithm": _line(b"ima-ng " + H + b" /x"),
    "d-ng-two-colons": _line(b"ima-ng a:sha256:" + H + b" /x"),
    "d-ngv2-no-type": _line(b"ima-ngv2 sha256:" + H + b" /x"),
    "sig-bad-hex": _line(b"ima-sig sha256:" + H + b" /x 0g"),
    # evm-sig: name, then evmsig xattrnames xattrlengths xattrvalues (empty), iuid igid imode
    "uint-not-a-number": _line(b"evm-sig sha256:" + H + b" /x     0 0 -1"),
    "uint-too-large-for-imode": _line(b"evm-sig sha256:" + H + b" /x     0 0 65536"),
    "uint-thousands-of-digits": _line(b"evm-sig sha256:" + H + b" /x     0 0 " + b"9" * 5000),
    "ima-digest-wrong-size": _line(b"ima abcd /x"),
    "nul-in-file-name": _line(b"ima-ng sha256:" + H + b" /x\x00y"),
    "line-shape-one-word": b"hello",
    "line-shape-two-words": b"10 " + b"ab" * 20,
    "pcr-not-a-number": b"x0 " + b"ab" * 20 + b" ima-ng sha256:" + H + b" /x",
    "pcr-24": b"24 " + b"ab" * 20 + b" ima-ng sha256:" + H + b" /x",
    "template-name-not-printable": _line(b"ima\x01ng sha256:" + H + b" /x"),
}


@pytest.mark.parametrize("name", BAD_ASCII)
def test_bad_ascii_line_names_the_line(name: str) -> None:
    data = FIRST + b"\n" + BAD_ASCII[name] + b"\n" + FIRST  # the bad line is line 3
    with pytest.raises(ParseError) as info:
        ima.parse_ascii(data, source="bad.txt")
    assert info.value.line == 3
    assert "bad.txt, line 3" in str(info.value)
    for stream in (io.BytesIO(data), Trickle(data, 7)):
        with pytest.raises(ParseError) as info:
            ima.replay_ascii(stream, ["sha1", "sha256"])
        assert info.value.line == 3


def test_violation_digest_may_be_20_zero_bytes_for_any_algorithm() -> None:
    zero_hash = b"00" * 20
    ok = _line(b"ima-ng sha256:" + b"00" * 20 + b" /x", th=zero_hash)
    (e,) = ima.parse_ascii(ok).entries
    assert e.is_violation and e.replay_digest("sha512") == b"\xff" * 64
    with pytest.raises(ParseError):  # not a violation: the size must fit the algorithm
        ima.parse_ascii(_line(b"ima-ng sha256:" + b"00" * 20 + b" /x"))


def test_signature_line_stripped_of_its_trailing_space() -> None:
    case = next(c for c in CASES if c.id == "ima-sig-without-signature")
    (e,) = ima.parse_ascii(case.line().rstrip(b" ")).entries
    assert e.template_data == case.data and e.template_hash_matches()
    spaced = framed(dng(b"sha256", D256), nul(b"/opt/a b"), b"")
    th = hashlib.sha1(spaced).digest().hex().encode()
    stripped = b"10 " + th + b" ima-sig sha256:" + H + b" /opt/a b"
    (e,) = ima.parse_ascii(stripped).entries
    assert e.template_data == spaced and e.template_hash_matches()
    assert e.fields.signature is None and e.file_name == "/opt/a b"


def test_blank_lines_are_skipped_and_counted() -> None:
    data = b"\n" + FIRST + b"\n\n" + FIRST
    log = ima.parse_ascii(data)
    assert [e.line for e in log] == [2, 5]
    assert [e.index for e in log] == [0, 1]
    r = ima.replay_ascii(io.BytesIO(data), ["sha1"])
    assert r.entries == 2 and r.end_line == 6


def test_replay_rejects_a_bank_that_cannot_hold_the_padded_hash() -> None:
    sha384_log = path("ccel", CCEL_IMA["file"]).read_bytes()
    with pytest.raises(ReplayError):
        ima.replay_ascii(io.BytesIO(sha384_log), ["sha256"], padded=True)
    (e,) = ima.parse_ascii(sha384_log).entries
    with pytest.raises(ReplayError):
        e.replay_digest("sha256", padded=True)


def test_empty_list() -> None:
    assert len(ima.parse_binary(b"")) == 0 and len(ima.parse_ascii(b"")) == 0
    r = ima.replay_binary(io.BytesIO(b""), ["sha1"])
    assert r.entries == 0 and len(r.bank) == 0
    assert ima.replay_ascii(io.BytesIO(b""), ["sha1"]).entries == 0


# -- the benchmark's own code ----------------------------------------------------------


def test_benchmark_generator_and_replay(tmp_path: Path) -> None:
    from benchmarks import bench_ima

    n = 2000
    bin_path, txt_path, datas = bench_ima.generate(
        tmp_path, n, seed=7, violation_every=500, keep_template_data=True
    )
    assert len(datas) == n
    c1, c256 = bytes(20), bytes(32)
    violations = 0
    for i, d in enumerate(datas):
        if i and i % 500 == 0:
            c1 = _extend("sha1", c1, b"\xff" * 20)
            c256 = _extend("sha256", c256, b"\xff" * 32)
            violations += 1
        else:
            c1 = _extend("sha1", c1, hashlib.sha1(d).digest())
            c256 = _extend("sha256", c256, hashlib.sha256(d).digest())
    for fn, p in ((ima.replay_binary, bin_path), (ima.replay_ascii, txt_path)):
        with p.open("rb") as f:
            r = fn(f, ["sha1", "sha256"])
        assert (r.entries, r.violations, r.template_hash_mismatch_count) == (n, violations, 0)
        assert r.bank.get("pcr10", "sha1") == c1
        assert r.bank.get("pcr10", "sha256") == c256
    # the two files are the same list
    assert ima.parse_ascii(txt_path.read_bytes()).to_bytes() == bin_path.read_bytes()
    # the floors compute what the replay does (on a list without violations)
    _, _, plain = bench_ima.generate(tmp_path, 300, seed=3, keep_template_data=True)
    assert bench_ima.floor_loop(plain) == bench_ima.floor_batched(plain)
    with (tmp_path / "ima.bin").open("rb") as f:
        r = ima.replay_binary(f, ["sha1", "sha256"])
    assert bench_ima.floor_loop(plain) == (
        r.bank.get("pcr10", "sha1"),
        r.bank.get("pcr10", "sha256"),
    )


def test_benchmark_run_reports_every_figure() -> None:
    from benchmarks import bench_ima, run

    rows = bench_ima.run(entries=300, repeat=1)
    names = [r["name"] for r in rows]
    assert any("replay_binary" in n for n in names) and any("replay_ascii" in n for n in names)
    for r in rows:
        if "cima" in r["name"]:
            assert r["entries_per_s"] > 0 and r["ratio_to_floor"] > 0 and r["peak_rss_mb"] > 0
    assert "x floor" in run.table(rows)
