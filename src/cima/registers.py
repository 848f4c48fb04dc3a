"""Register names, the foreign numberings, and a bank of registers to replay into.

Register names are canonical strings everywhere in cima: ``pcr0``..``pcr23``,
``mrtd``, ``rtmr0``..``rtmr3``. Numbers are used only where a foreign format
dictates them, and converted here:

- the CC measurement-register index of the UEFI CC measurement protocol and of
  CCEL logs: 0 = mrtd, 1 = rtmr0, 2 = rtmr1, 3 = rtmr2, 4 = rtmr3;
- the TPM PCR index;
- the TDX virtual firmware's mapping of PCRs to TD registers.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from cima.digests import HashAlgorithm, by_name
from cima.errors import RegisterError

PCR_COUNT = 24
RTMR_COUNT = 4

PCR_NAMES: tuple[str, ...] = tuple(f"pcr{i}" for i in range(PCR_COUNT))
TD_NAMES: tuple[str, ...] = ("mrtd", *(f"rtmr{i}" for i in range(RTMR_COUNT)))
REGISTER_NAMES: tuple[str, ...] = PCR_NAMES + TD_NAMES

#: CC measurement-register index (UEFI CC measurement protocol, CCEL) -> name.
CC_INDEX_TO_NAME: Mapping[int, str] = {0: "mrtd", 1: "rtmr0", 2: "rtmr1", 3: "rtmr2", 4: "rtmr3"}
NAME_TO_CC_INDEX: Mapping[str, int] = {v: k for k, v in CC_INDEX_TO_NAME.items()}

#: The TDX virtual firmware's mapping of a TPM PCR to the TD register that holds it.
#: rtmr3 has no PCR: it is free for the runtime register.
PCR_TO_TD: Mapping[str, str] = {
    "pcr0": "mrtd",
    "pcr1": "rtmr0",
    "pcr7": "rtmr0",
    **{f"pcr{i}": "rtmr1" for i in range(2, 7)},
    **{f"pcr{i}": "rtmr2" for i in range(8, 16)},
}

_NAME_SET = frozenset(REGISTER_NAMES)


def check_name(name: str) -> str:
    """Return ``name`` if it is a register name, else raise :class:`RegisterError`."""
    if name not in _NAME_SET:
        raise RegisterError(
            f"unknown register {name!r} (expected pcr0..pcr{PCR_COUNT - 1}, mrtd or rtmr0..rtmr3)"
        )
    return name


def pcr_name(index: int) -> str:
    """``pcrN`` for a TPM PCR index."""
    if not 0 <= index < PCR_COUNT:
        raise RegisterError(f"PCR index {index} out of range 0..{PCR_COUNT - 1}")
    return PCR_NAMES[index]


def pcr_index(name: str) -> int:
    """The TPM PCR index of ``pcrN``."""
    if not name.startswith("pcr") or check_name(name) != name:
        raise RegisterError(f"{name!r} is not a PCR")
    return int(name[3:])


def cc_name(index: int) -> str:
    """Register name for a CC measurement-register index (0 = mrtd, 1..4 = rtmr0..3)."""
    try:
        return CC_INDEX_TO_NAME[index]
    except KeyError:
        raise RegisterError(f"CC measurement-register index {index} out of range 0..4") from None


def cc_index(name: str) -> int:
    """CC measurement-register index of ``mrtd`` or ``rtmrN``."""
    try:
        return NAME_TO_CC_INDEX[name]
    except KeyError:
        raise RegisterError(f"{name!r} is not a TD measurement register") from None


def td_register_for_pcr(name: str) -> str:
    """The TD register the TDX virtual firmware measures ``pcrN`` into."""
    try:
        return PCR_TO_TD[check_name(name)]
    except KeyError:
        raise RegisterError(f"{name} has no TD register in the TDX firmware's mapping") from None


def sort_key(name: str) -> tuple[int, int]:
    """Order registers as people read them: pcr0..pcr23, then mrtd, rtmr0..rtmr3."""
    if name.startswith("pcr"):
        return (0, int(name[3:]))
    if name == "mrtd":
        return (1, -1)
    return (1, int(name[4:]))


@dataclass(frozen=True, slots=True)
class RegisterValue:
    """One register's value in one bank."""

    register: str
    algorithm: str
    digest: bytes

    def to_dict(self) -> dict[str, str]:
        return {"register": self.register, "algorithm": self.algorithm, "digest": self.digest.hex()}


@dataclass(slots=True)
class RegisterBank:
    """Registers by (name, algorithm), extended as the hardware does: ``new = H(old || digest)``.

    A register that was never extended or initialised is absent; :meth:`get`
    returns its reset value (all zeros).
    """

    _values: dict[tuple[str, str], bytes] = field(default_factory=dict)
    _algs: dict[str, HashAlgorithm] = field(default_factory=dict)

    def _alg(self, algorithm: str) -> HashAlgorithm:
        alg = self._algs.get(algorithm)
        if alg is None:
            alg = by_name(algorithm)
            self._algs[algorithm] = alg
            self._algs[alg.name] = alg
        return alg

    def initialise(self, register: str, algorithm: str, value: bytes) -> None:
        """Set a register's starting value (TPM StartupLocality for pcr0)."""
        alg = self._alg(algorithm)
        if len(value) != alg.digest_size:
            raise RegisterError(
                f"initial value for {register}/{alg.name} is {len(value)} bytes, "
                f"expected {alg.digest_size}"
            )
        self._values[(check_name(register), alg.name)] = bytes(value)

    def extend(self, register: str, algorithm: str, digest: bytes) -> bytes:
        """Extend ``register`` in bank ``algorithm`` with ``digest``; return the new value."""
        alg = self._alg(algorithm)
        if len(digest) != alg.digest_size:
            raise RegisterError(
                f"digest for {register}/{alg.name} is {len(digest)} bytes, "
                f"expected {alg.digest_size}"
            )
        key = (register, alg.name)
        old = self._values.get(key)
        if old is None:
            check_name(register)
            old = alg.zero
        new = alg.hash(old + digest)
        self._values[key] = new
        return new

    def set(self, register: str, algorithm: str, value: bytes) -> None:
        """Store a value as read from hardware (no extend)."""
        self.initialise(register, algorithm, value)

    def get(self, register: str, algorithm: str) -> bytes:
        alg = self._alg(algorithm)
        value = self._values.get((check_name(register), alg.name))
        return alg.zero if value is None else value

    def __contains__(self, key: object) -> bool:
        return key in self._values

    def __iter__(self) -> Iterator[RegisterValue]:
        for (reg, alg), value in sorted(
            self._values.items(), key=lambda kv: (kv[0][1], sort_key(kv[0][0]))
        ):
            yield RegisterValue(reg, alg, value)

    def __len__(self) -> int:
        return len(self._values)

    def algorithms(self) -> list[str]:
        return sorted({alg for _, alg in self._values})

    def registers(self, algorithm: str | None = None) -> list[str]:
        regs = {r for r, a in self._values if algorithm is None or a == algorithm}
        return sorted(regs, key=sort_key)

    def to_list(self) -> list[dict[str, str]]:
        return [v.to_dict() for v in self]

    @classmethod
    def from_values(cls, values: Iterable[RegisterValue]) -> RegisterBank:
        bank = cls()
        for v in values:
            bank.set(v.register, v.algorithm, v.digest)
        return bank

    def equals(self, register: str, algorithm: str, value: bytes) -> bool:
        """Constant-time comparison of one register with ``value``."""
        return hmac.compare_digest(self.get(register, algorithm), value)
