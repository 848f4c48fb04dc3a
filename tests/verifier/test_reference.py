"""Reference values: creation from known-good bundles, the YAML file, and bad files by name."""

from __future__ import annotations

import pytest

from cima.verifier.reference import (
    ReferenceFileError,
    ReferenceValues,
    create_references,
    load_references,
    merge,
    parse_digest,
)
from tests.verifier import evidence_sets as es

ZERO256 = "sha256:" + "00" * 32

# Each bad file, the key path its error must name, and the line.
BAD_FILES: dict[str, tuple[str, str | None, int | None]] = {
    "unknown top-level key": ("version: 1\nbogus: 1\n", "bogus", 2),
    "unknown nested key": ("version: 1\nima:\n  files: {}\n  colour: red\n", "ima.colour", 4),
    "unknown key in a boot event": (
        "version: 1\nboot:\n  - events:\n"
        f"      - {{register: pcr0, type: EV_IPL, data: '{ZERO256}', x: 1}}\n",
        "boot[0].events[0].x",
        4,
    ),
    "files is a list": ("version: 1\nima:\n  files: [1, 2]\n", "ima.files", 3),
    "name is a boolean": ("version: 1\nname: true\n", "name", 2),
    "version is a string": ("version: '1'\n", "version", 1),
    "allow_debug is a string": ("version: 1\ntdx:\n  allow_debug: 'yes'\n", "tdx.allow_debug", 3),
    "cmdline is a string": (
        "version: 1\nsystem:\n  processes:\n    /usr/bin/x:\n      cmdlines: [a]\n",
        "system.processes./usr/bin/x.cmdlines[0]",
        5,
    ),
    "bad hex in a register": (
        "version: 1\nboot:\n  - registers:\n      pcr0: {sha256: zz}\n",
        "boot[0].registers.pcr0.sha256",
        4,
    ),
    "odd hex in a TD field": ("version: 1\ntdx:\n  mrseam: ['abc']\n", "tdx.mrseam[0]", 3),
    "digest of the wrong size": (
        "version: 1\nima:\n  files:\n    /bin/sh: [sha256:abcd]\n",
        "ima.files./bin/sh[0]",
        4,
    ),
    "digest without algorithm": (
        "version: 1\nkernel:\n  images: ['" + "00" * 32 + "']\n",
        "kernel.images[0]",
        3,
    ),
    "unknown digest algorithm": (
        "version: 1\nagent:\n  code_digests: ['md9:00']\n",
        "agent.code_digests[0]",
        3,
    ),
    "digest that is not hex": (
        "version: 1\nima:\n  files:\n    /x: ['sha1:" + "g" * 40 + "']\n",
        "ima.files./x[0]",
        4,
    ),
    "unknown register": (
        "version: 1\nboot:\n  - registers:\n      pcr99: {sha256: '00'}\n",
        "boot[0].registers.pcr99",
        4,
    ),
    "unknown bank": (
        "version: 1\nboot:\n  - registers:\n      pcr0: {sha7: '00'}\n",
        "boot[0].registers.pcr0.sha7",
        4,
    ),
    "unknown event type": (
        "version: 1\nboot:\n  - events:\n"
        f"      - {{register: pcr0, type: EV_BOGUS, data: '{ZERO256}'}}\n",
        "boot[0].events[0].type",
        4,
    ),
    "boot event without data": (
        "version: 1\nboot:\n  - events:\n      - {register: pcr0, type: EV_IPL}\n",
        "boot[0].events[0].data",
        4,
    ),
    "unknown severity": ("version: 1\nima:\n  unknown: maybe\n", "ima.unknown", 3),
    "trusted key with neither key nor name": (
        "version: 1\ntrusted_keys:\n  - name: x\n",
        "trusted_keys[0]",
        3,
    ),
    "trusted key that is not PEM": (
        "version: 1\ntrusted_keys:\n  - public_key: hello\n",
        "trusted_keys[0].public_key",
        3,
    ),
    "trusted key that does not load": (
        'version: 1\ntrusted_keys:\n  - public_key: "-----BEGIN PUBLIC KEY-----\\nAAAA\\n'
        '-----END PUBLIC KEY-----\\n"\n',
        "trusted_keys[0]",
        3,
    ),
    "TDX root that does not load": (
        'version: 1\ntdx:\n  trusted_roots: ["-----BEGIN CERTIFICATE-----\\nAAAA\\n'
        '-----END CERTIFICATE-----\\n"]\n',
        "tdx.trusted_roots[0]",
        3,
    ),
    "IMA key that does not load": (
        'version: 1\nima:\n  keys: ["-----BEGIN CERTIFICATE-----\\nAAAA\\n'
        '-----END CERTIFICATE-----\\n"]\n',
        "ima.keys[0]",
        3,
    ),
    "a key written twice": ("version: 1\nima: {}\nima: {}\n", "ima", 3),
    "no version": ("ima: {}\n", "version", 1),
    "version 2": ("version: 2\n", "version", 1),
    "not a mapping": ("- 1\n", None, 1),
    "empty file": ("", None, 1),
    "not YAML": ("version: 1\n  bad: [\n", None, 2),
}


@pytest.mark.parametrize("name", BAD_FILES)
def test_bad_reference_file_names_the_key(name: str) -> None:
    text, key, line = BAD_FILES[name]
    with pytest.raises(ReferenceFileError) as info:
        load_references(text, source="refs.yaml")
    err = info.value
    assert err.key == key
    assert err.line == line
    assert str(err).startswith(f"refs.yaml, line {line}: " + (f"{key}: " if key else ""))


def test_bad_utf8_is_named() -> None:
    with pytest.raises(ReferenceFileError, match="not UTF-8"):
        load_references(b"version: 1\nname: \xff\n", source="refs.yaml")


def test_parse_digest() -> None:
    assert parse_digest("SHA-256:" + "AB" * 32) == ("sha256", bytes.fromhex("ab" * 32))
    for bad in ("sha256", "sha256:zz", "sha256:00", "nope:00"):
        with pytest.raises(ValueError):
            parse_digest(bad)


def test_minimal_file() -> None:
    refs = load_references("version: 1\n")
    assert refs.boot == [] and refs.ima is None
    assert refs.to_dict() == {"version": 1}


# -- creation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [es.keylime, es.cos113, es.evidence_api], ids=lambda f: f.__name__)
def test_create_round_trips_through_yaml(make) -> None:  # type: ignore[no-untyped-def]
    vb = make()
    refs = create_references([vb.bundle], name=vb.name)
    again = load_references(refs.to_yaml(), source=vb.name)
    assert again.digest() == refs.digest()
    assert again.to_yaml() == refs.to_yaml()


def test_keylime_reference_content() -> None:
    refs = create_references([es.keylime().bundle])
    (key,) = refs.trusted_keys
    assert key.tpm_name == "000b64ecd2b8e6b6cbd81c5a1f4a309ecf837fd13192cbe73860d8a7a2668e0f55c2"
    (boot,) = refs.boot
    assert len(boot.events) == 153
    # the registers the boot log explains, and pcr16, which no log explains (quoted value)
    assert boot.registers["pcr0"]["sha256"] == (
        "2ddcc62896c1bddd24a2b381ed091c988a2f01a2a95b04b6c3d404ddb9b5d7f9"
    )
    assert "sha384" in boot.registers["pcr0"]
    assert boot.registers["pcr16"]["sha256"].startswith("0bc4267b")
    assert "pcr10" not in boot.registers and "pcr13" not in boot.registers
    assert boot.events[1].note == "A55 v1.62 (05/22/2024)"
    assert refs.kernel is not None
    assert refs.kernel.cmdlines == [
        "/vmlinuz-6.8.0-51-generic root=/dev/mapper/ubuntu--vg-ubuntu--lv ro"
    ]
    assert refs.ima is not None
    assert len(refs.ima.files) == 779  # 780 entries, boot_aggregate included
    assert refs.ima.files["/usr/bin/sqlite3"] == [
        "sha256:9df15b6603ac0b6a7255ee89424ca6379b5e89d78ba8a8b2090a8f7bf3f05eff"
    ]


def test_cos113_reference_content() -> None:
    refs = create_references([es.cos113().bundle])
    assert refs.trusted_keys == []
    assert refs.tdx is not None and refs.tdx.mrseam is not None
    (boot,) = refs.boot
    assert boot.registers["mrtd"]["sha384"].startswith("dae67181")
    assert set(boot.registers) == {"mrtd", "rtmr0", "rtmr1", "rtmr2"}
    assert refs.kernel is not None and refs.kernel.cmdlines[0].startswith("/syslinux/vmlinuz.A")


def test_runtime_sections_from_journal_events() -> None:
    node = es.SoftwareNode.new()
    bundle = node.bundle(boot=es.synthetic_boot(), ima_log=None, runtime=es.runtime_events())
    refs = create_references([bundle])
    assert refs.system is not None
    assert refs.system.processes["/usr/bin/containerd"].cmdlines == [["/usr/bin/containerd"]]
    assert refs.kubernetes is not None and "kube-apiserver-node1" in refs.kubernetes.pods
    assert refs.containers is not None and refs.containers.images == ["sha256:" + "55" * 32]
    assert refs.agent is not None and refs.agent.code_digests == ["sha256:" + "11" * 32]


def test_several_bundles_several_boots_and_digests() -> None:
    a, b = es.SoftwareNode.new(), es.SoftwareNode.new()
    boot2 = es.synthetic_boot()[:-1]
    ba = a.bundle(boot=es.synthetic_boot(), ima_log=[es.ima_ng_entry(0, b"/bin/x", bytes(32))])
    bb = b.bundle(boot=boot2, ima_log=[es.ima_ng_entry(0, b"/bin/x", b"\x01" * 32)])
    refs = create_references([ba, bb, ba])
    assert len(refs.trusted_keys) == 2
    assert len(refs.boot) == 2
    assert refs.ima is not None and len(refs.ima.files["/bin/x"]) == 2
    merged = merge([create_references([ba]), create_references([bb])])
    assert len(merged.boot) == 2 and len(merged.trusted_keys) == 2


def test_create_needs_a_bundle() -> None:
    with pytest.raises(ValueError):
        create_references([])


def test_reference_values_are_strict() -> None:
    with pytest.raises(ValueError):
        ReferenceValues.model_validate({"version": 1, "ima": {"files": {"/x": "sha256:00"}}})
