"""cima on a real kernel: measured boot, IMA and a TPM quote from a virtual machine.

Three boots of one guest (OVMF + swtpm + Debian's 6.1 kernel with ``ima_policy=tcb``), one
TPM across them (a machine that reboots), a fresh nonce chosen here for every quote:

1. ``ima_hash=sha256 ima_template=ima-ng``, the payload's ``/payload/bin/hello`` version 1;
2. ``ima_hash=sha384 ima_template=ima-sig``, payload files signed with ``evmctl`` and a key
   made by this test (``security.ima`` set on the payload disk);
3. as 1, but ``/payload/bin/hello`` has other content.

For each boot the quote over pcr0-pcr10 in the sha1, sha256 and sha384 banks is verified by
cima (AK signature, nonce, pcrDigest) and by ``tpm2_checkquote``; the boot log replays into
pcr0-pcr9 with cima and with ``tpm2_eventlog``; the IMA list replays into pcr10 with cima,
with ``evmctl ima_measurement`` (sha1 and sha256: the banks evmctl 1.4 knows) and with a
hashlib-only replay (every bank). Expected values come from the quote, from the tools and
from hashes of the inputs computed here (the payload files, the initrd, the command line).

Then, in the same boot, ``cima agent`` runs in the guest (:mod:`tests.vm.agent`: busybox's
syslogd, a crun container, the guest's Python processes and the agent itself measured into
pcr13, IMA as the backend, the TPM's persisted AK, its journal on a disk that every boot of
the machine keeps) and the host asks it for an evidence bundle through the forwarded socket,
with a fresh nonce. cima's verifier, on the host, appraises those bundles against reference
values made from earlier boots' bundles: boot 2 is named by its kernel command line (the EFI
stub's load options event), boot 3 by its changed file (the IMA entry, by path and index);
with the new file approved boot 3 is affirming. ``cima verify --json`` gives the same
verdicts as the library.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import shutil
import socket
import struct
import subprocess
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.x509.oid import NameOID

from cima.cli.main import main as cima_main
from cima.eventlog import ima, replay, tcg
from cima.evidence import tpm
from cima.evidence.bundle import TPMQuoteReport
from cima.verifier.appraise import appraise
from cima.verifier.reference import create_references, load_references
from cima.verifier.result import AttestationResult, Failure
from tests.vm import agent, build, checks
from tests.vm.agent import AgentEvidence, reviewed_references, run_agent
from tests.vm.evidence import BANKS, TIMINGS, BootEvidence, collect
from tests.vm.guest import BootConfig, GuestError, ProvisionedTPM

pytestmark = [pytest.mark.slow, pytest.mark.peer]

for _tool, _pkg in (
    ("tpm2_checkquote", "tpm2-tools"),
    ("tpm2_eventlog", "tpm2-tools"),
    ("evmctl", "ima-evm-utils"),
):
    if shutil.which(_tool) is None:
        pytest.skip(f"{_tool} is not installed (Debian package {_pkg})", allow_module_level=True)

BOOT1 = BootConfig(ima_hash="sha256", ima_template="ima-ng")
BOOT2 = BootConfig(ima_hash="sha384", ima_template="ima-sig")
BOOT3 = BOOT1

HELLO = "bin/hello"
SETTINGS = "etc/settings"
PAYLOAD_V1 = {
    HELLO: "#!/bin/sh\necho hello from the payload, version 1\n",
    SETTINGS: "mode=strict\n",
}
PAYLOAD_V3 = {**PAYLOAD_V1, HELLO: "#!/bin/sh\necho hello from the payload, version 3\n"}
PAYLOAD_COMMANDS = [[f"/payload/{HELLO}"], ["cat", f"/payload/{SETTINGS}"]]

# Kernel enum hash_algo (include/uapi/linux/hash_info.h) and the IMA signature header
# (security/integrity/integrity.h: struct signature_v2_hdr, after the xattr type byte).
HASH_ALGO = {2: "sha1", 4: "sha256", 5: "sha384", 6: "sha512"}
EVM_IMA_XATTR_DIGSIG = 0x03
DIGSIG_VERSION_2 = 2


def _payload_tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        p.chmod(0o755 if rel.startswith("bin/") else 0o644)
    return root


#: The boots in the order they happened (the state disk remembers that order).
BOOT_ORDER: list[str] = []


def _boot(
    boot_guest: Callable[..., Any],
    folder: Path,
    name: str,
    config: BootConfig,
    payload: Path,
    after: Callable[[Any], dict[str, Any]] | None = None,
) -> tuple[BootEvidence, dict[str, Any]]:
    start = time.monotonic()
    vm, session = boot_guest(name, config, payload)
    BOOT_ORDER.append(name)
    ev = collect(
        session,
        folder / "evidence",
        name=name,
        config=config,
        payload_commands=PAYLOAD_COMMANDS,
    )
    t = time.monotonic()
    ev.agent = run_agent(session, folder / "agent", name=name)
    agent_seconds = round(time.monotonic() - t, 2)
    extra = after(session) if after is not None else {}
    vm.stop()
    TIMINGS["boots"][name].update(
        collect_seconds=round(sum(ev.timings.values()), 2), agent_seconds=agent_seconds
    )
    TIMINGS["boots"][name]["total_seconds"] = round(time.monotonic() - start, 2)
    return ev, extra


# -- the three boots ---------------------------------------------------------------------------


@dataclass
class IMAKey:
    private_pem: Path
    certificate_der: Path
    public_key: rsa.RSAPublicKey


@pytest.fixture(scope="module")
def ima_key(tmp_path_factory: pytest.TempPathFactory) -> IMAKey:
    """An RSA key for evmctl and its self-signed certificate (evmctl --verify-sig reads it)."""
    folder = tmp_path_factory.mktemp("ima-key")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    priv = folder / "privkey_ima.pem"
    priv.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cima vm test IMA key")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    der = folder / "x509_ima.der"
    der.write_bytes(cert.public_bytes(serialization.Encoding.DER))
    return IMAKey(priv, der, key.public_key())


@pytest.fixture(scope="module")
def boot1(boot_guest: Callable[..., Any], tmp_path_factory: pytest.TempPathFactory) -> BootEvidence:
    folder = tmp_path_factory.mktemp("boot1")
    payload = build.payload_image(
        _payload_tree(folder / "payload", PAYLOAD_V1), folder / "payload.ext4"
    )
    ev, _ = _boot(boot_guest, folder, "boot1", BOOT1, payload)
    return ev


@pytest.fixture(scope="module")
def boot2(
    boot_guest: Callable[..., Any], tmp_path_factory: pytest.TempPathFactory, ima_key: IMAKey
) -> BootEvidence:
    folder = tmp_path_factory.mktemp("boot2")
    tree = _payload_tree(folder / "payload", PAYLOAD_V1)
    sigs = folder / "signatures"
    sigs.mkdir()
    xattrs: dict[str, dict[str, bytes]] = {}
    for rel in PAYLOAD_V1:
        copy = sigs / rel.replace("/", "_")
        shutil.copyfile(tree / rel, copy)
        subprocess.run(
            ["evmctl", "ima_sign", "-a", "sha384", "--key", str(ima_key.private_pem),
             "--sigfile", str(copy)],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        xattrs[rel] = {"security.ima": copy.with_name(copy.name + ".sig").read_bytes()}
    payload = build.payload_image(tree, folder / "payload.ext4", xattrs)
    ev, _ = _boot(boot_guest, folder, "boot2", BOOT2, payload)
    return ev


ECHO_SERVER = """
import socket, sys

server = socket.socket(socket.AF_UNIX)
server.bind(sys.argv[1])
server.listen()
while True:
    conn, _ = server.accept()
    conn.sendall(conn.recv(1024)[::-1])
    conn.close()
"""


def _http_get(url: str, deadline: float) -> bytes:
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return bytes(r.read())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _harness_probe(session: Any) -> dict[str, Any]:
    """What the agent and verifier will plug into, tried after boot 3's evidence is taken:
    a long-running server in the guest reached through a forwarded port, a Unix socket in
    the guest reached through the bridge, a command killed at its timeout, a missing file."""
    out: dict[str, Any] = {}
    http = session.spawn(
        ["/usr/local/bin/python3", "-m", "http.server", "8080", "--bind", "0.0.0.0",
         "--directory", "/payload"],
        log="/tmp/http.log",
    )  # fmt: skip
    port = session.forward_tcp(8080)
    out["http_body"] = _http_get(f"http://127.0.0.1:{port}/{SETTINGS}", time.monotonic() + 60)
    out["http_running"] = http.running()
    http.signal()
    echo = session.spawn(["/usr/local/bin/python3", "-c", ECHO_SERVER, "/tmp/echo.sock"])
    _bridge, uport = session.forward_unix("/tmp/echo.sock", agent.BRIDGE_PORT + 1)
    deadline = time.monotonic() + 60
    while True:
        try:
            with socket.create_connection(("127.0.0.1", uport), timeout=10) as s:
                s.sendall(b"cima")
                out["unix_echo"] = s.recv(1024)
            if out["unix_echo"]:
                break
        except OSError:
            pass
        if time.monotonic() > deadline:
            out["unix_echo"] = b""
            break
        time.sleep(0.5)
    echo.signal()
    slow = session.run(["sleep", "30"], timeout=1)
    out["timeout"] = (slow.timed_out, slow.rc)
    try:
        session.read_file("/nonexistent")
        out["missing_file"] = None
    except GuestError as e:
        out["missing_file"] = str(e)
    return out


@pytest.fixture(scope="module")
def boot3_with_probe(
    boot_guest: Callable[..., Any], tmp_path_factory: pytest.TempPathFactory
) -> tuple[BootEvidence, dict[str, Any]]:
    folder = tmp_path_factory.mktemp("boot3")
    payload = build.payload_image(
        _payload_tree(folder / "payload", PAYLOAD_V3), folder / "payload.ext4"
    )
    return _boot(boot_guest, folder, "boot3", BOOT3, payload, after=_harness_probe)


@pytest.fixture(scope="module")
def boot3(boot3_with_probe: tuple[BootEvidence, dict[str, Any]]) -> BootEvidence:
    return boot3_with_probe[0]


# -- helpers -------------------------------------------------------------------------------------


def _entry(ev: BootEvidence, path: str) -> ima.IMAEntry:
    found = [e for e in ev.ima_log.entries if e.file_name == path]
    assert len(found) == 1, f"{ev.name}: {path} is measured {len(found)} times, not once"
    return found[0]


def _event(ev: BootEvidence, name: str) -> tcg.TCGEvent:
    found = [e for e in ev.boot_log.events if e.decoded().get("tagged_event_name") == name]
    assert len(found) == 1, f"{ev.name}: {len(found)} {name} events"
    return found[0]


def _load_options_digest(cmdline: str, alg: str) -> bytes:
    """The EFI stub measures LoadOptions: the command line in UTF-16LE with its NUL."""
    return hashlib.new(alg, cmdline.encode("utf-16-le") + b"\0\0").digest()


def _assert_all_agree(ev: BootEvidence) -> checks.BootChecks:
    result = checks.check_boot(ev)
    bad = [f"{r.register}/{r.algorithm}: quoted {r.quoted}, {r.sources}" for r in result.failures()]
    assert not bad, f"{ev.name}: sources disagree:\n" + "\n".join(bad)
    assert {(r.register, r.algorithm) for r in result.registers} == {
        (f"pcr{i}", alg) for i in range(11) for alg in BANKS
    }
    return result


# -- boot 1 ------------------------------------------------------------------------------------


def test_boot1_quote_verifies_with_cima_library_and_cli(boot1: BootEvidence) -> None:
    v = checks.cima_verify_quote(boot1)
    assert v.freshness == "nonce"
    assert {p.algorithm for p in v.pcrs} == set(BANKS)
    assert {p.register for p in v.pcrs} == {f"pcr{i}" for i in range(11)}
    # The guest CLI's sha256 quote, verified by the host CLI with the same nonce.
    assert (
        cima_main(["quote", "verify", str(boot1.cli_quote_dir), "--nonce", boot1.nonce.hex()]) == 0
    )
    # ... and refused with another nonce (exit 1: verification failed).
    other = bytes(32).hex()
    assert cima_main(["quote", "verify", str(boot1.cli_quote_dir), "--nonce", other]) == 1


def test_boot1_every_register_agrees_in_every_bank(boot1: BootEvidence) -> None:
    result = _assert_all_agree(boot1)
    # The three IMA replays stop at the same entry.
    assert result.evmctl == {"sha1": result.ima_prefix, "sha256": result.ima_prefix}
    assert result.ima_prefix <= result.ima_entries


def test_boot1_ima_extends_sha384_per_bank(boot1: BootEvidence) -> None:
    """The sha384 bank holds sha384(template data), not the padded SHA-1 of older kernels:
    the initramfs loads sha512_generic before IMA allocates its bank hashes."""
    matched, _ = checks.hashlib_ima_replay(
        boot1.ima_file.read_bytes(), "sha384", boot1.quoted[("pcr10", "sha384")]
    )
    assert matched is not None
    padded = replay.compare_prefix(
        list(ima.padded(boot1.ima_log.entries)),
        {("pcr10", "sha384"): boot1.quoted[("pcr10", "sha384")]},
        algorithms=["sha384"],
    )
    assert padded.prefix is None


def test_boot1_payload_and_guest_measured_from_ext4(boot1: BootEvidence) -> None:
    names = [e.file_name for e in boot1.ima_log.entries]
    assert names[0] == "boot_aggregate"
    assert {"ima-ng"} == set(boot1.ima_log.template_names())
    hello = _entry(boot1, f"/payload/{HELLO}")
    assert hello.digest_algorithm == "sha256"
    assert hello.file_digest == hashlib.sha256(PAYLOAD_V1[HELLO].encode()).digest()
    settings = _entry(boot1, f"/payload/{SETTINGS}")
    assert settings.file_digest == hashlib.sha256(PAYLOAD_V1[SETTINGS].encode()).digest()
    # The guest's init, its interpreter and cima's code come from the ext4 disks too.
    for path in ("/usr/sbin/init", "/usr/bin/busybox"):
        assert path in names
    assert any(n and n.startswith(build.GUEST_CODE + "/src/cima/") for n in names)
    assert boot1.payload_runs[0]["stdout"] == "hello from the payload, version 1\n"


def test_boot1_pcr9_holds_this_command_line_and_initrd(
    boot1: BootEvidence, vm_images: build.GuestImages
) -> None:
    options = _event(boot1, "linux_load_options")
    initrd = _event(boot1, "linux_initrd")
    assert options.register == initrd.register == "pcr9"
    data = vm_images.initrd.read_bytes()
    for alg in BANKS:
        assert options.replay_digest(alg) == _load_options_digest(boot1.cmdline, alg)
        assert initrd.replay_digest(alg) == hashlib.new(alg, data).digest()
    assert "ima_hash=sha256" in boot1.cmdline


def test_boot1_guest_cli_views_match_the_quote(boot1: BootEvidence) -> None:
    """``cima platform measurement`` and ``eventlog`` in the guest, against the quote."""
    read = {
        (v["register"], v["algorithm"]): v["digest"] for v in boot1.guest_measurement["registers"]
    }
    for alg in BANKS:
        for i in range(10):  # boot registers do not move after the boot
            assert read[(f"pcr{i}", alg)] == boot1.quoted[(f"pcr{i}", alg)].hex()
    records = boot1.guest_eventlog
    boot_records = [r for r in records if "template_name" not in r.get("content", {})]
    assert len(boot_records) == len(boot1.boot_log)
    ima_records = len(records) - len(boot_records)
    # The guest read its IMA list before quoting: a prefix of what the host fetched later.
    assert 0 < ima_records <= len(boot1.ima_log)


# -- boot 2 ------------------------------------------------------------------------------------


def test_boot2_every_register_agrees_in_every_bank(boot2: BootEvidence) -> None:
    _assert_all_agree(boot2)


def test_boot2_measures_with_sha384_and_ima_sig(boot2: BootEvidence) -> None:
    assert set(boot2.ima_log.template_names()) == {"ima-sig"}
    algs = {e.digest_algorithm for e in boot2.ima_log.entries if not e.is_violation}
    assert algs == {"sha384"}
    assert (
        _entry(boot2, f"/payload/{HELLO}").file_digest
        == hashlib.sha384(PAYLOAD_V1[HELLO].encode()).digest()
    )


def test_boot2_signatures_verify_with_the_public_key(boot2: BootEvidence, ima_key: IMAKey) -> None:
    """Each signed payload file's ima-sig entry carries its security.ima signature, which
    verifies over the logged file digest with the test's key (and evmctl agrees)."""
    keyid = hashlib.sha1(
        ima_key.public_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.PKCS1
        )
    ).digest()[-4:]
    for rel, content in PAYLOAD_V1.items():
        entry = _entry(boot2, f"/payload/{rel}")
        sig = entry.fields.signature
        assert sig, f"/payload/{rel} has no signature in the log"
        xattr_type, version, hash_algo, entry_keyid, size = struct.unpack_from(">BBB4sH", sig)
        assert (xattr_type, version) == (EVM_IMA_XATTR_DIGSIG, DIGSIG_VERSION_2)
        assert HASH_ALGO[hash_algo] == "sha384"
        assert entry_keyid == keyid
        assert len(sig) == 9 + size
        digest = entry.file_digest
        assert digest == hashlib.sha384(content.encode()).digest()
        ima_key.public_key.verify(sig[9:], digest, padding.PKCS1v15(), Prehashed(hashes.SHA384()))
    unsigned = [e for e in boot2.ima_log.entries if e.file_name and e.file_name.startswith("/usr/")]
    assert unsigned and all(not e.fields.signature for e in unsigned)
    # evmctl checks the same signatures (and the sha256 replay) on its own.
    _, out = checks.evmctl_ima_measurement(boot2, "sha256", keys=[ima_key.certificate_der])
    for rel in PAYLOAD_V1:
        assert f"/payload/{rel}: verification is OK" in out


def test_boot2_boot_log_differs_from_boot1_in_the_command_line_only(
    boot1: BootEvidence, boot2: BootEvidence
) -> None:
    differing = _boot_log_differences(boot1, boot2)
    options = _event(boot2, "linux_load_options")
    assert differing == [options.index], "only the measured command line may differ"
    for alg in BANKS:
        assert options.replay_digest(alg) == _load_options_digest(boot2.cmdline, alg)
    assert "ima_hash=sha384 ima_template=ima-sig" in boot2.cmdline
    quoted_diff = {r for (r, _a) in boot1.quoted if boot1.quoted[(r, _a)] != boot2.quoted[(r, _a)]}
    assert quoted_diff == {"pcr9", "pcr10"}


# -- boot 3 ------------------------------------------------------------------------------------


def _boot_log_differences(a: BootEvidence, b: BootEvidence) -> list[int]:
    assert len(a.boot_log) == len(b.boot_log), "the boot logs have different lengths"
    out = []
    for x, y in zip(a.boot_log.events, b.boot_log.events, strict=True):
        assert (x.register, x.event_type) == (y.register, y.event_type)
        if any(x.replay_digest(alg) != y.replay_digest(alg) for alg in BANKS):
            out.append(x.index)
    return out


def test_boot3_every_register_agrees_in_every_bank(boot3: BootEvidence) -> None:
    _assert_all_agree(boot3)


def _quoted_entries(ev: BootEvidence) -> tuple[ima.IMAEntry, ...]:
    result = checks.cima_ima_prefix(ev)
    assert result.prefix is not None
    return ev.ima_log.entries[: result.prefix.matched_events]


def test_boot3_differs_from_boot1_exactly_in_the_changed_file(
    boot1: BootEvidence, boot3: BootEvidence
) -> None:
    """The logs are honest (boot 3 replays to its own quote, checked above) and they differ
    from boot 1 in one IMA entry: the file whose content changed, named by path and index.
    Entries are matched by path (Python may import a few modules in another order)."""
    assert _boot_log_differences(boot1, boot3) == [], "same firmware, kernel, initrd, cmdline"
    entries1 = {e.file_name: e for e in _quoted_entries(boot1)}
    entries3 = {e.file_name: e for e in _quoted_entries(boot3)}
    assert set(entries1) == set(entries3), "both boots measured the same files"
    changed = sorted(
        (entries3[name].index, name)
        for name in entries1
        if entries1[name].file_digest != entries3[name].file_digest
    )
    hello = f"/payload/{HELLO}"
    assert [name for _, name in changed] == [hello], changed
    assert entries1[hello].file_digest == hashlib.sha256(PAYLOAD_V1[HELLO].encode()).digest()
    assert entries3[hello].file_digest == hashlib.sha256(PAYLOAD_V3[HELLO].encode()).digest()
    # Measured at the same place: everything before it is the same boot.
    assert entries1[hello].index == entries3[hello].index == changed[0][0]
    before1 = [(e.file_name, e.file_digest) for e in boot1.ima_log.entries[: changed[0][0]]]
    before3 = [(e.file_name, e.file_digest) for e in boot3.ima_log.entries[: changed[0][0]]]
    assert before1 == before3
    diff = {r for (r, a) in boot1.quoted if boot1.quoted[(r, a)] != boot3.quoted[(r, a)]}
    assert diff == {"pcr10"}
    assert boot3.payload_runs[0]["stdout"] == "hello from the payload, version 3\n"


def test_every_boot_quotes_with_the_registered_attestation_key(
    boot1: BootEvidence, boot2: BootEvidence, boot3: BootEvidence, vm_tpm: ProvisionedTPM
) -> None:
    """One TPM across the boots: the AK registered before the first boot signs every quote."""
    registered = serialization.load_pem_public_key(vm_tpm.ak_pem.encode())
    for ev in (boot1, boot2, boot3):
        for folder in (ev.quote_dir, ev.cli_quote_dir):
            assert (folder / "ak.pem").read_text() == vm_tpm.ak_pem
        tpm.verify_quote(
            (ev.quote_dir / "attest.bin").read_bytes(),
            (ev.quote_dir / "signature.bin").read_bytes(),
            registered,  # type: ignore[arg-type]
            nonce=ev.nonce,
        )
    assert len({ev.nonce for ev in (boot1, boot2, boot3)}) == 3


def test_harness_forwards_ports_and_sockets_and_enforces_timeouts(
    boot3_with_probe: tuple[BootEvidence, dict[str, Any]],
) -> None:
    _, probe = boot3_with_probe
    assert probe["http_running"]
    assert probe["http_body"] == PAYLOAD_V3[SETTINGS].encode()
    assert probe["unix_echo"] == b"amic"
    timed_out, rc = probe["timeout"]
    assert timed_out and rc != 0
    assert probe["missing_file"] and "FileNotFoundError" in probe["missing_file"]


# -- the agent in the guest, the verifier on the host -------------------------------------------
#
# In every boot, after the evidence above, cima's agent runs in the guest (tests.vm.agent) and
# the host asks it for an evidence bundle with a fresh nonce, through the forwarded socket.
# Reference values are created from known-good bundles with create_references, then reviewed
# as a person would before using them (reviewed_references). The review names all that
# differs between boots of the same machine and configuration: the tests below show that
# nothing else does.


def _bundle(ev: BootEvidence) -> AgentEvidence:
    assert ev.agent is not None, f"{ev.name}: the agent did not run"
    return ev.agent


def _contraindications(result: AttestationResult) -> list[Failure]:
    return [f for f in result.failures if f.severity == "contraindicated"]


def test_agent_serves_node_evidence_signed_by_the_registered_ak(
    boot1: BootEvidence, boot2: BootEvidence, boot3: BootEvidence, vm_tpm: ProvisionedTPM
) -> None:
    """The agent quotes with the AK persisted before the first boot, binds the host's nonce,
    and serves the boot log, the IMA list and its runtime journal (pcr13/sha384)."""
    for ev in (boot1, boot2, boot3):
        a = _bundle(ev)
        b = a.bundle
        assert (b.platform, b.scope) == ("tpm", "node")
        assert a.info["scope"] == "node", "the host reaches the agent as a process on the node"
        assert b.nonce == a.nonce and b.user_data == b""
        b.verify_binding()
        assert isinstance(b.report, TPMQuoteReport)
        assert b.report.ak_pem == vm_tpm.ak_pem
        assert (b.runtime_register, b.runtime_algorithm) == ("pcr13", "sha384")
        assert b.runtime_start == bytes(48)
        assert b.boot_log is not None and len(b.boot_log) == len(ev.boot_log)
        # The agent read the same IMA list, and more of it (its own start is measured).
        assert b.ima_log is not None and len(b.ima_log) > len(_quoted_entries(ev))
    assert len({_bundle(ev).nonce for ev in (boot1, boot2, boot3)}) == 3


def test_agent_measures_the_guest_processes_its_container_and_itself(boot1: BootEvidence) -> None:
    a = _bundle(boot1)
    events = a.runtime_events()
    kinds = [e["kind"] for e in events]
    assert kinds[:2] == ["agent", "policy"], "the agent measures itself first"
    policy = events[1]["data"]
    assert policy["file_digest"] == "sha384:" + hashlib.sha384(agent.POLICY.encode()).hexdigest()
    processes = {tuple(e["data"]["cmdline"]): e for e in events if e["kind"] == "process"}
    # The guest's init (the control server), the bridge, the agent itself, the service.
    assert processes[tuple(agent.AGENT_ARGS)]["subject"] == build.GUEST_PYTHON
    assert processes[agent.SERVICE]["subject"] == agent.SERVICE[0]
    assert processes[agent.SERVICE]["data"]["exe"] == "/usr/bin/busybox"
    init = [e for e in events if e["kind"] == "process" and e["data"]["pid"] == 1]
    assert len(init) == 1 and init[0]["data"]["cmdline"][1].endswith("/vm/guest_server.py")
    bridge = [c for c in processes if c[-2:] == (agent.AGENT_SOCKET, str(agent.BRIDGE_PORT))]
    assert len(bridge) == 1
    assert len(processes) == 4
    (container,) = [e for e in events if e["kind"] == "container"]
    assert container["subject"] == build.CONTAINER_ID
    assert container["scope"] == f"container:{build.CONTAINER_ID}"
    data = container["data"]
    # crun keeps no runc state.json: the container is found through its cgroup.
    assert data["runtime"] == "cgroup"
    assert data["args"] == list(build.CONTAINER_ARGS)
    assert data["image"] is None and data["pod"] is None


def test_agent_journal_outlives_each_boot_on_the_state_disk(
    boot1: BootEvidence, boot2: BootEvidence, boot3: BootEvidence
) -> None:
    """The PCRs start over at each boot and the journal on the state disk does not: the
    agent archives the earlier boot's journal as an epoch and starts a new one from zeros."""
    for ev in (boot1, boot2, boot3):
        a = _bundle(ev)
        earlier = BOOT_ORDER.index(ev.name)
        archived = [f"journal.{n}.cima" for n in range(earlier)]
        assert a.journal_files == sorted([".lock", "journal.cima", *archived])
        if earlier:
            assert f"new epoch {earlier}" in a.agent_log
            assert f"archived as journal.{earlier - 1}.cima" in a.agent_log


def test_verifier_affirms_the_boot_its_reference_values_come_from(boot1: BootEvidence) -> None:
    a = _bundle(boot1)
    refs = reviewed_references(create_references([a.bundle]))
    result = appraise(a.bundle, refs, nonce=a.nonce)
    assert result.status == "affirming", [f.describe() for f in result.failures]
    for name in ("evidence", "boot", "kernel", "ima", "system"):
        assert result.submodule(name).status == "affirming", name
    assert result.submodule("ima").details["unverified_entries"] == 0
    # Another nonce: the same evidence is not fresh.
    stale = appraise(a.bundle, refs, nonce=bytes(32))
    assert stale.status == "contraindicated"
    assert {f.submodule for f in _contraindications(stale)} == {"evidence"}
    assert {f.step for f in _contraindications(stale)} == {3}


def test_verifier_names_the_other_kernel_command_line_of_boot2(
    boot1: BootEvidence, boot2: BootEvidence
) -> None:
    """Boot 2 has another command line (and IMA hashes with sha384): against boot 1's
    reference values the kernel's load options, measured by the EFI stub, are named."""
    refs = reviewed_references(create_references([_bundle(boot1).bundle]))
    a = _bundle(boot2)
    result = appraise(a.bundle, refs, nonce=a.nonce)
    assert result.status == "contraindicated"
    assert result.submodule("evidence").status == "affirming"
    assert result.submodule("system").status == "affirming"
    kernel = _contraindications(result)
    kernel = [f for f in kernel if f.submodule == "kernel"]
    assert [f.code for f in kernel] == ["load-options"]
    (failure,) = kernel
    assert (failure.log, failure.register) == ("boot", "pcr9")
    assert failure.event is not None and a.bundle.boot_log is not None
    record = a.bundle.boot_log[failure.event]
    for alg, digest in record.digests:
        assert digest == _load_options_digest(boot2.cmdline, alg)
    # The boot submodule names the same event, and only pcr9 differs.
    boot = [f for f in result.failures if f.submodule == "boot"]
    assert [f.event for f in boot if f.code == "boot-event"] == [failure.event]
    assert {f.register for f in boot} == {"pcr9"}


def test_verifier_names_the_changed_file_of_boot3(
    boot1: BootEvidence, boot2: BootEvidence, boot3: BootEvidence
) -> None:
    """Reference values from boots 1 and 2 (two known-good configurations); boot 3 runs
    another /payload/bin/hello: one contraindication, the IMA entry of that file, named by
    path and index; everything else of boot 3 (firmware, kernel, the other IMA files, the
    processes, the agent's code and policy) matches values taken at earlier boots."""
    refs = reviewed_references(create_references([_bundle(boot1).bundle, _bundle(boot2).bundle]))
    a = _bundle(boot3)
    result = appraise(a.bundle, refs, nonce=a.nonce)
    assert result.status == "contraindicated"
    hello = f"/payload/{HELLO}"
    (failure,) = _contraindications(result)
    assert (failure.submodule, failure.step, failure.log) == ("ima", 5, "ima")
    assert (failure.register, failure.subject) == ("pcr10", hello)
    assert failure.event is not None
    # The index is the entry's place in the kernel's own list (fetched from securityfs).
    entry = boot3.ima_log.entries[failure.event]
    assert entry.file_name == hello
    assert entry.file_digest == hashlib.sha256(PAYLOAD_V3[HELLO].encode()).digest()
    assert hashlib.sha256(PAYLOAD_V3[HELLO].encode()).hexdigest() in failure.reason
    assert result.failures == [failure], [f.describe() for f in result.failures]
    for name in ("evidence", "boot", "kernel", "system"):
        assert result.submodule(name).status == "affirming", name
    # A person approves the new version: boot 3 is then affirming.
    approved = reviewed_references(
        create_references([_bundle(boot1).bundle, _bundle(boot2).bundle]),
        approve={hello: PAYLOAD_V3[HELLO].encode()},
    )
    again = appraise(a.bundle, approved, nonce=a.nonce)
    assert again.status == "affirming", [f.describe() for f in again.failures]
    assert again.submodule("ima").details["excluded"] >= 1


def test_cima_verify_cli_gives_the_same_verdicts(
    boot1: BootEvidence,
    boot2: BootEvidence,
    boot3: BootEvidence,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``cima reference create`` and ``cima verify --json`` on the host, on the agent's
    bundles as files: exit 0 for affirming, 1 otherwise, the same failures."""
    b1, b2, b3 = (_bundle(ev) for ev in (boot1, boot2, boot3))
    created = tmp_path / "created.yaml"
    assert cima_main(["reference", "create", str(b1.bundle_file), "-o", str(created)]) == 0
    assert cima_main(["reference", "create", str(b1.bundle_file), str(b2.bundle_file),
                      "-o", str(tmp_path / "created12.yaml")]) == 0  # fmt: skip
    capsys.readouterr()
    refs1 = tmp_path / "refs1.yaml"
    refs1.write_text(reviewed_references(load_references(created)).to_yaml())
    refs12 = tmp_path / "refs12.yaml"
    refs12.write_text(reviewed_references(load_references(tmp_path / "created12.yaml")).to_yaml())
    approved = tmp_path / "approved.yaml"
    approved.write_text(
        reviewed_references(
            load_references(tmp_path / "created12.yaml"),
            approve={f"/payload/{HELLO}": PAYLOAD_V3[HELLO].encode()},
        ).to_yaml()
    )

    def verify(a: AgentEvidence, refs: Path) -> tuple[int, dict[str, Any]]:
        rc = cima_main(
            ["verify", str(a.bundle_file), "--reference", str(refs), "--nonce", a.nonce.hex(),
             "--json"]
        )  # fmt: skip
        doc: dict[str, Any] = json.loads(capsys.readouterr().out)
        return rc, doc

    for a, refs, rc_expected, status in (
        (b2, refs1, 1, "contraindicated"),
        (b3, refs12, 1, "contraindicated"),
        (b3, approved, 0, "affirming"),
    ):
        rc, doc = verify(a, refs)
        assert (rc, doc["status"]) == (rc_expected, status), (a.name, refs.name)
        library = appraise(a.bundle, load_references(refs), nonce=a.nonce)
        assert doc["status"] == library.status
        assert [(f["submodule"], f["code"], f.get("event")) for f in doc["failures"]] == [
            (f.submodule, f.code, f.event) for f in library.failures
        ]
    rc, doc = verify(b3, refs12)
    (failure,) = doc["failures"]
    assert failure["subject"] == f"/payload/{HELLO}" and failure["log"] == "ima"
