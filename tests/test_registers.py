from __future__ import annotations

import hashlib

import pytest

from cima import digests, registers
from cima.errors import AlgorithmError, RegisterError
from cima.registers import RegisterBank


def test_extend_is_hash_of_old_and_digest() -> None:
    bank = RegisterBank()
    d = hashlib.sha256(b"x").digest()
    assert bank.extend("pcr10", "sha256", d) == hashlib.sha256(bytes(32) + d).digest()
    assert bank.get("pcr10", "sha256") == hashlib.sha256(bytes(32) + d).digest()
    assert bank.get("pcr11", "sha256") == bytes(32)


def test_extend_rejects_wrong_digest_size() -> None:
    with pytest.raises(RegisterError, match="20 bytes, expected 32"):
        RegisterBank().extend("pcr0", "sha256", bytes(20))


def test_unknown_register_and_algorithm() -> None:
    with pytest.raises(RegisterError, match="pcr24"):
        RegisterBank().extend("pcr24", "sha1", bytes(20))
    with pytest.raises(AlgorithmError, match="md5"):
        RegisterBank().extend("pcr0", "md5", bytes(16))


def test_cc_index_mapping_round_trips() -> None:
    assert [registers.cc_name(i) for i in range(5)] == ["mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3"]
    for i in range(5):
        assert registers.cc_index(registers.cc_name(i)) == i
    with pytest.raises(RegisterError):
        registers.cc_name(5)


def test_pcr_to_td_mapping() -> None:
    assert registers.td_register_for_pcr("pcr0") == "mrtd"
    assert registers.td_register_for_pcr("pcr7") == "rtmr0"
    assert registers.td_register_for_pcr("pcr4") == "rtmr1"
    assert registers.td_register_for_pcr("pcr10") == "rtmr2"
    with pytest.raises(RegisterError):
        registers.td_register_for_pcr("pcr16")


def test_algorithm_lookup() -> None:
    assert digests.by_name("SHA-256") is digests.SHA256
    assert digests.by_id(0x000C) is digests.SHA384
    with pytest.raises(AlgorithmError, match="0x9999"):
        digests.by_id(0x9999)
