"""A software platform: PCR-like registers and a signing key, for demos and machines without a TPM.

It behaves like a TPM to its callers: registers ``pcr0``..``pcr23`` in each bank,
extended as ``new = H(old || digest)``, and reports in the TPM quote format, a
TPMS_ATTEST (magic, TPM_ST_ATTEST_QUOTE, extraData = H(nonce || user_data),
clockInfo, PCR selection, pcrDigest) signed into a TPMT_SIGNATURE, so that
:func:`cima.evidence.tpm.verify_quote` verifies it like any quote.

It proves nothing about the machine: the key and the registers are ordinary files
(``state_dir``) that anyone with write access can change. Tests of TPM behaviour
use swtpm, never this.

State in ``state_dir`` (when given): ``registers.json`` (the register values,
written atomically: temporary file, fsync, rename, fsync of the directory) and
``key.pem`` (the PKCS#8 private key, mode 0600). Without ``state_dir`` everything
lives in memory. Registers persist across instances like a TPM's across a resume:
each new instance on the same state counts one more ``restartCount``. The
quote's qualifiedSigner is the key's name (there is no hierarchy to qualify it).
A report's ``verification`` has the keys of a TPM report (``ak_pem``, ``ak_public``,
``ak_name``, ``hash_algorithm``, ``pcrs``) and ``platform: "software"``.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from cima.digests import by_name
from cima.errors import AlgorithmError, PlatformError, RegisterError
from cima.eventlog.event import Measurement
from cima.evidence.reportdata import tpm_qualifying_data
from cima.evidence.tpm import PCRSelection, PCRValues, PublicArea, Quote, Signature, pcr_digest
from cima.platform.base import Platform, Report
from cima.registers import PCR_NAMES, RegisterBank, check_name

STATE_FILE = "registers.json"
KEY_FILE = "key.pem"
STATE_VERSION = 1
#: The signing hash: SHA-256 for ECDSA P-256 and for RSASSA-2048, as a TPM AK uses.
SIGNING_HASH = "sha256"
#: firmwareVersion in the quotes: "cima" in ASCII, so no one mistakes them for a TPM's.
FIRMWARE_VERSION = int.from_bytes(b"cima\x00\x00\x00\x01", "big")

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


class SoftwarePlatform(Platform):
    """Registers and a key in software; quotes in the TPM format (see the module docstring)."""

    name = "software"

    def __init__(
        self,
        state_dir: Path | str | None = None,
        *,
        algorithms: Sequence[str] = ("sha256", "sha384"),
        key_type: Literal["ecc", "rsa"] = "ecc",
    ) -> None:
        if key_type not in ("ecc", "rsa"):
            raise PlatformError(f"key_type must be 'ecc' or 'rsa', not {key_type!r}")
        try:
            self._algorithms = [by_name(a).name for a in algorithms]
        except AlgorithmError as e:
            raise PlatformError(str(e)) from e
        if not self._algorithms:
            raise PlatformError("a software platform needs at least one bank")
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.key_type = key_type
        self._lock = threading.RLock()
        self._bank = RegisterBank()
        self._started = time.monotonic()
        self._restart_count = 0
        self._key = self._load_or_create_key()
        self._public = PublicArea.from_public_key(self._key.public_key(), algorithm=SIGNING_HASH)
        self._load_state()

    # -- persistence ---------------------------------------------------------------------------
    def _load_or_create_key(self) -> PrivateKey:
        path = self.state_dir / KEY_FILE if self.state_dir is not None else None
        if path is not None and path.exists():
            try:
                key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            except (ValueError, TypeError) as e:
                raise PlatformError(f"{path}: not a usable private key: {e}") from e
            want = ec.EllipticCurvePrivateKey if self.key_type == "ecc" else rsa.RSAPrivateKey
            if not isinstance(key, want):
                raise PlatformError(f"{path}: holds a key of another type than {self.key_type}")
            return key
        new: PrivateKey = (
            ec.generate_private_key(ec.SECP256R1())
            if self.key_type == "ecc"
            else rsa.generate_private_key(public_exponent=65537, key_size=2048)
        )
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            pem = new.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            _atomic_write(path, pem, 0o600)
        return new

    def _load_state(self) -> None:
        if self.state_dir is None:
            return
        path = self.state_dir / STATE_FILE
        if not path.exists():
            self._save_state()
            return
        try:
            doc = json.loads(path.read_text())
            if doc.get("version") != STATE_VERSION:
                raise PlatformError(f"{path}: unknown state version {doc.get('version')!r}")
            stored = list(doc["algorithms"])
            if stored != self._algorithms:
                raise PlatformError(
                    f"{path}: state holds banks {stored}, the platform was asked for "
                    f"{self._algorithms}"
                )
            self._restart_count = int(doc.get("restart_count", 0)) + 1
            for alg, regs in doc["registers"].items():
                for reg, value in regs.items():
                    self._bank.set(reg, alg, bytes.fromhex(value))
        except PlatformError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError, RegisterError) as e:
            raise PlatformError(f"{path}: damaged software platform state: {e}") from e
        self._save_state()

    def _save_state(self) -> None:
        if self.state_dir is None:
            return
        self.state_dir.mkdir(parents=True, exist_ok=True)
        registers: dict[str, dict[str, str]] = {alg: {} for alg in self._algorithms}
        for v in self._bank:
            registers[v.algorithm][v.register] = v.digest.hex()
        doc = {
            "version": STATE_VERSION,
            "algorithms": self._algorithms,
            "restart_count": self._restart_count,
            "registers": registers,
        }
        _atomic_write(self.state_dir / STATE_FILE, json.dumps(doc, indent=1).encode())

    # -- Platform interface -------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        return {
            "platform": self.name,
            "algorithms": self.algorithms(),
            "default_algorithm": self.default_algorithm(),
            "registers": self.register_names(),
            "key_type": self.key_type,
            "ak_pem": self.ak_pem(),
            "ak_name": self._public.name.hex(),
            "state_dir": str(self.state_dir) if self.state_dir is not None else None,
        }

    def default_algorithm(self) -> str:
        return self._algorithms[0]

    def algorithms(self) -> list[str]:
        return list(self._algorithms)

    def register_names(self) -> list[str]:
        return list(PCR_NAMES)

    def _bank_name(self, algorithm: str) -> str:
        try:
            name = by_name(algorithm).name
        except AlgorithmError as e:
            raise PlatformError(str(e)) from e
        if name not in self._algorithms:
            raise PlatformError(f"no {name} bank (banks: {', '.join(self._algorithms)})")
        return name

    def _register(self, register: str) -> str:
        try:
            check_name(register)
        except RegisterError as e:
            raise PlatformError(str(e)) from e
        if register not in PCR_NAMES:
            raise PlatformError(f"the software platform has pcr0..pcr23, not {register}")
        return register

    def read(self, register: str, algorithm: str) -> bytes:
        alg = self._bank_name(algorithm)
        with self._lock:
            return self._bank.get(self._register(register), alg)

    def extend(self, register: str, algorithm: str, digest: bytes) -> None:
        alg = by_name(self._bank_name(algorithm))
        reg = self._register(register)
        if len(digest) != alg.digest_size:
            raise PlatformError(
                f"a {alg.name} digest is {alg.digest_size} bytes, got {len(digest)}"
            )
        with self._lock:
            self._bank.extend(reg, alg.name, bytes(digest))
            self._save_state()

    def boot_log(self) -> list[Measurement] | None:
        return None

    # -- keys and reports ---------------------------------------------------------------------
    def ak_public(self) -> PublicArea:
        return self._public

    def ak_pem(self) -> str:
        return self._public.to_pem().decode()

    def _sign(self, message: bytes) -> Signature:
        if isinstance(self._key, ec.EllipticCurvePrivateKey):
            der = self._key.sign(message, ec.ECDSA(hashes.SHA256()))
            return Signature.ecdsa_from_der(SIGNING_HASH, der, 32)
        value = self._key.sign(message, padding.PKCS1v15(), hashes.SHA256())
        return Signature.rsassa(SIGNING_HASH, value)

    def report(
        self,
        nonce: bytes,
        user_data: bytes = b"",
        registers: list[str] | None = None,
        *,
        algorithms: Sequence[str] | None = None,
    ) -> Report:
        """A quote over ``registers`` (all by default) of ``algorithms`` (the default bank)."""
        regs = [self._register(r) for r in (registers or PCR_NAMES)]
        banks = [self._bank_name(a) for a in (algorithms or [self.default_algorithm()])]
        selections = [PCRSelection.of(b, regs) for b in banks]
        qualifying = tpm_qualifying_data(nonce, user_data, SIGNING_HASH)
        with self._lock:
            values = PCRValues.from_values(
                selections,
                {(r, b): self._bank.get(r, b) for b in banks for r in regs},
            )
            quote = Quote.new(
                qualified_signer=self._public.name,
                extra_data=qualifying,
                clock=int((time.monotonic() - self._started) * 1000),
                reset_count=0,
                restart_count=self._restart_count,
                safe=True,
                firmware_version=FIRMWARE_VERSION,
                pcr_selection=selections,
                pcr_digest=pcr_digest(selections, values.to_bank(), SIGNING_HASH),
            )
        signature = self._sign(quote.raw)
        return Report(
            kind="tpm-quote",
            body=quote.raw,
            signature=signature.to_bytes(),
            nonce=bytes(nonce),
            user_data=bytes(user_data),
            verification={
                "ak_pem": self.ak_pem(),
                "ak_public": self._public.to_bytes().hex(),
                "ak_name": self._public.name.hex(),
                "hash_algorithm": SIGNING_HASH,
                "pcrs": [v.to_dict() for v in values.items()],
                "platform": self.name,
            },
        )
