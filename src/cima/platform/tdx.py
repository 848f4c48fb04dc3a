"""Intel TDX, seen from inside the guest: reports, RTMRs and the CC event log.

Interfaces, in the order this module prefers them (every path comes from
:class:`~cima.platform.base.PlatformPaths`, so a container that mounts the host's
``/sys`` elsewhere works):

configfs-tsm (Linux >= 6.7, ``Documentation/ABI/testing/configfs-tsm``,
``drivers/virt/coco/guest/report.c``)
    A report is requested by creating an entry directory under
    ``/sys/kernel/config/tsm/report``; the kernel fills it with attributes.
    The guest writes up to 64 bytes to ``inblob`` (for TDX exactly the 64-byte
    REPORTDATA), reads the quote from ``outblob`` and reads ``provider``
    (``tdx_guest``: the outblob is an Intel TDX DCAP quote). ``generation``
    counts the writes to the entry: a writer that reads it before its write
    and after reading ``outblob`` and finds it moved by more than its one write
    knows that another writer changed the request in between, and retries.
    Writes to a binary attribute are committed when the file is closed.

TDX measurement sysfs (Linux >= 6.16, ``Documentation/ABI/testing/
sysfs-devices-virtual-misc-tdx_guest``, ``drivers/virt/coco/guest/tsm-mr.c``)
    ``/sys/class/misc/tdx_guest/measurements/{mrtd,rtmr0..3}:sha384`` hold the
    48-byte register values (raw bytes, refreshed from a TDREPORT on read). A
    single 48-byte write at offset 0 to ``rtmrN:sha384`` extends RTMR N.

The ``/dev/tdx_guest`` device (``include/uapi/linux/tdx-guest.h``)
    ``TDX_CMD_GET_REPORT0`` returns the 1024-byte TDREPORT for a REPORTDATA
    (upstream since Linux 6.2). Out-of-tree guest kernels of the TDX 1.0/1.5
    era (Intel's ``tdx`` trees, distribution TDX kernels) also had
    ``TDX_CMD_EXTEND_RTMR`` (``_IOW('T', 3, struct tdx_extend_rtmr_req)``) and
    ``TDX_CMD_GET_QUOTE`` (``_IOR('T', 4, struct tdx_quote_req)``). The quote
    path passes a GHCI ``TDG.VP.VMCALL<GetQuote>`` buffer (header ``u64
    version = 1, u64 status, u32 in_len, u32 out_len``, then data) whose data
    is a 4-byte big-endian length and a Quote Generation Service (QGS)
    ``GET_QUOTE_REQ`` message that carries the TDREPORT, as Intel's DCAP
    ``libtdx_attest`` sends it; the VMM returns a ``GET_QUOTE_RESP`` message
    that carries the quote. This legacy path is implemented from those
    sources, best effort: it only exists on kernels that upstream Linux never
    had, and the ioctl numbers differ between driver generations (both known
    variants are tried).

CCEL (the ACPI 6.5 "CC Event Log" table, ``/sys/firmware/acpi/tables/CCEL`` and
``/sys/firmware/acpi/tables/data/CCEL``)
    The firmware's event log of mrtd and rtmr0..rtmr2, decoded by
    :mod:`cima.eventlog.ccel`.

The TDREPORT layout (Intel TDX Module ABI specification, ``TDREPORT_STRUCT``;
the same offsets are in the kernel's ``tdx-guest.c``): REPORTMACSTRUCT (256
bytes, REPORTDATA at offset 128), TEE_TCB_INFO (239 bytes and 17 reserved),
TDINFO_STRUCT (512 bytes: ATTRIBUTES, XFAM, MRTD, MRCONFIGID, MROWNER,
MROWNERCONFIG, RTMR[4], SERVTD_HASH, reserved). :class:`TDReport` decodes it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hmac
import os
import secrets
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from cima.errors import ParseError, PlatformError, TruncatedError, UnsupportedFormatError
from cima.eventlog.event import Measurement
from cima.platform.base import Platform, PlatformPaths, Report
from cima.registers import TD_NAMES, RegisterBank

if TYPE_CHECKING:
    from cima.evidence.tdx import TDXQuote

__all__ = [
    "EXTENDABLE_REGISTERS",
    "QUOTE_BUFFER_SIZE",
    "ConfigfsItems",
    "OSConfigfs",
    "TDReport",
    "TDXPlatform",
    "configfs_provider",
    "decode_get_quote_response",
    "encode_get_quote_request",
]

TDX_PROVIDER = "tdx_guest"
ALGORITHM = "sha384"
REPORT_DATA_SIZE = 64
TDREPORT_SIZE = 1024
MR_SIZE = 48

#: The registers a guest may extend: rtmr0 and rtmr1 hold the firmware's and
#: the boot loader's measurements (replayed from the CCEL); cima extends only
#: rtmr2 (the kernel's, IMA) and rtmr3 (the runtime register).
EXTENDABLE_REGISTERS: tuple[str, ...] = ("rtmr2", "rtmr3")

#: Largest outblob accepted (the kernel's TSM_REPORT_OUTBLOB_MAX is 32 KiB).
MAX_OUTBLOB = 1 << 20
MAX_GENERATION_TEXT = 32

# --- ioctl numbers (include/uapi/asm-generic/ioctl.h: dir << 30 | size << 16 | type << 8 | nr)
_IOC_WRITE = 1
_IOC_READ = 2


def _ioc(direction: int, kind: str, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (ord(kind) << 8) | nr


_REPORT_REQ = struct.Struct("<64s1024s")  # struct tdx_report_req
_EXTEND_REQ = struct.Struct("<48sB")  # struct tdx_extend_rtmr_req
_QUOTE_REQ = struct.Struct("<QQ")  # struct tdx_quote_req {u64 buf; u64 len;}

TDX_CMD_GET_REPORT0 = _ioc(_IOC_READ | _IOC_WRITE, "T", 1, _REPORT_REQ.size)
#: ``_IOW('T', 3, ...)`` in the kernel header; DCAP's default build uses ``_IOR``.
TDX_CMD_EXTEND_RTMR = (
    _ioc(_IOC_WRITE, "T", 3, _EXTEND_REQ.size),
    _ioc(_IOC_READ, "T", 3, _EXTEND_REQ.size),
)
#: ``_IOR('T', 4, ...)``; the "v3" guest drivers declared it ``_IOWR``.
TDX_CMD_GET_QUOTE = (
    _ioc(_IOC_READ, "T", 4, _QUOTE_REQ.size),
    _ioc(_IOC_READ | _IOC_WRITE, "T", 4, _QUOTE_REQ.size),
)

# --- GHCI GetQuote buffer and QGS messages (DCAP qgs_msg_lib.h)
QUOTE_BUFFER_SIZE = 16 * 1024
_GHCI_HEADER = struct.Struct("<QQII")  # version, status, in_len, out_len
_GHCI_VERSION = 1
GET_QUOTE_SUCCESS = 0
GET_QUOTE_IN_FLIGHT = 0xFFFF_FFFF_FFFF_FFFF
GET_QUOTE_ERROR = 0x8000_0000_0000_0000
GET_QUOTE_SERVICE_UNAVAILABLE = 0x8000_0000_0000_0001
_QGS_LENGTH = struct.Struct(">I")  # the 4-byte big-endian message length before the message
_QGS_HEADER = struct.Struct("<HHIII")  # major, minor, type, size (whole message), error_code
_QGS_QUOTE_FIELDS = struct.Struct(
    "<II"
)  # req: report_size, id_list_size; resp: id size, quote size
_QGS_MAJOR = 1
_QGS_MINOR = 0
_QGS_GET_QUOTE_REQ = 0
_QGS_GET_QUOTE_RESP = 1

_GHCI_STATUS_NAMES = {
    GET_QUOTE_IN_FLIGHT: "still in flight (the VMM did not complete the request)",
    GET_QUOTE_ERROR: "error",
    GET_QUOTE_SERVICE_UNAVAILABLE: "quote service unavailable",
}


def _os_error(action: str, path: Path | str, e: OSError) -> PlatformError:
    """A PlatformError that names the path and the errno."""
    code = e.errno
    name = errno.errorcode.get(code, "unknown") if code is not None else "unknown"
    reason = e.strerror or str(e)
    return PlatformError(f"{action} {path}: {reason} ({name}, errno {code})")


# ---------------------------------------------------------------------------
# TDREPORT


_REPORTMAC = struct.Struct("<4s12s16s48s48s64s32s32s")
_TEE_TCB_INFO = struct.Struct("<8s16s48s48s8s16s95s17s")
_TDINFO = struct.Struct("<8s8s48s48s48s48s48s48s48s48s48s64s")
_TDX_REPORT_TYPE = 0x81
assert _REPORTMAC.size + _TEE_TCB_INFO.size + _TDINFO.size == TDREPORT_SIZE


@dataclass(frozen=True, slots=True)
class TDReport:
    """``TDREPORT_STRUCT``, the 1024-byte output of ``TDG.MR.REPORT``.

    REPORTMACSTRUCT: REPORTTYPE (type 0x81 = TDX, subtype, version, reserved),
    reserved, CPUSVN, TEE_TCB_INFO_HASH, TEE_INFO_HASH, REPORTDATA, reserved,
    MAC. TEE_TCB_INFO: VALID, TEE_TCB_SVN, MRSEAM, MRSIGNERSEAM, ATTRIBUTES,
    TEE_TCB_SVN2 (TDX 1.5), reserved; then 17 reserved bytes. TDINFO_STRUCT:
    ATTRIBUTES, XFAM, MRTD, MRCONFIGID, MROWNER, MROWNERCONFIG, RTMR[0..3],
    SERVTD_HASH (TDX 1.5), reserved. Reserved areas are kept so that
    :meth:`to_bytes` gives back the bytes decoded.
    """

    report_type: bytes
    reserved_mac1: bytes
    cpu_svn: bytes
    tee_tcb_info_hash: bytes
    tee_info_hash: bytes
    report_data: bytes
    reserved_mac2: bytes
    mac: bytes
    tee_tcb_valid: bytes
    tee_tcb_svn: bytes
    mrseam: bytes
    mrsignerseam: bytes
    seam_attributes: bytes
    tee_tcb_svn2: bytes
    reserved_tcb: bytes
    reserved_after_tcb: bytes
    td_attributes: bytes
    xfam: bytes
    mrtd: bytes
    mrconfigid: bytes
    mrowner: bytes
    mrownerconfig: bytes
    rtmr: tuple[bytes, bytes, bytes, bytes]
    servtd_hash: bytes
    reserved_tdinfo: bytes

    @classmethod
    def from_bytes(cls, data: bytes, *, source: str | None = None) -> TDReport:
        """Decode exactly 1024 bytes."""
        if len(data) < TDREPORT_SIZE:
            raise TruncatedError(
                f"TDREPORT is {len(data)} bytes, expected {TDREPORT_SIZE}",
                offset=len(data),
                source=source,
            )
        if len(data) > TDREPORT_SIZE:
            raise ParseError(
                f"TDREPORT is {len(data)} bytes, expected {TDREPORT_SIZE}",
                offset=TDREPORT_SIZE,
                source=source,
            )
        if data[0] != _TDX_REPORT_TYPE:
            raise UnsupportedFormatError(
                f"REPORTTYPE.TYPE is 0x{data[0]:02x}, expected 0x81 (TDX)", offset=0, source=source
            )
        (rtype, res1, cpu_svn, tcb_hash, info_hash, report_data, res2, mac) = (
            _REPORTMAC.unpack_from(data, 0)
        )
        (valid, tcb_svn, mrseam, mrsignerseam, seam_attrs, tcb_svn2, res_tcb, res_after) = (
            _TEE_TCB_INFO.unpack_from(data, _REPORTMAC.size)
        )
        (attrs, xfam, mrtd, configid, owner, ownerconfig, r0, r1, r2, r3, servtd, res_td) = (
            _TDINFO.unpack_from(data, _REPORTMAC.size + _TEE_TCB_INFO.size)
        )
        return cls(
            report_type=rtype,
            reserved_mac1=res1,
            cpu_svn=cpu_svn,
            tee_tcb_info_hash=tcb_hash,
            tee_info_hash=info_hash,
            report_data=report_data,
            reserved_mac2=res2,
            mac=mac,
            tee_tcb_valid=valid,
            tee_tcb_svn=tcb_svn,
            mrseam=mrseam,
            mrsignerseam=mrsignerseam,
            seam_attributes=seam_attrs,
            tee_tcb_svn2=tcb_svn2,
            reserved_tcb=res_tcb,
            reserved_after_tcb=res_after,
            td_attributes=attrs,
            xfam=xfam,
            mrtd=mrtd,
            mrconfigid=configid,
            mrowner=owner,
            mrownerconfig=ownerconfig,
            rtmr=(r0, r1, r2, r3),
            servtd_hash=servtd,
            reserved_tdinfo=res_td,
        )

    def to_bytes(self) -> bytes:
        return (
            _REPORTMAC.pack(
                self.report_type,
                self.reserved_mac1,
                self.cpu_svn,
                self.tee_tcb_info_hash,
                self.tee_info_hash,
                self.report_data,
                self.reserved_mac2,
                self.mac,
            )
            + _TEE_TCB_INFO.pack(
                self.tee_tcb_valid,
                self.tee_tcb_svn,
                self.mrseam,
                self.mrsignerseam,
                self.seam_attributes,
                self.tee_tcb_svn2,
                self.reserved_tcb,
                self.reserved_after_tcb,
            )
            + _TDINFO.pack(
                self.td_attributes,
                self.xfam,
                self.mrtd,
                self.mrconfigid,
                self.mrowner,
                self.mrownerconfig,
                *self.rtmr,
                self.servtd_hash,
                self.reserved_tdinfo,
            )
        )

    def registers(self) -> dict[str, bytes]:
        """``mrtd`` and ``rtmr0``..``rtmr3`` by canonical name."""
        out = {"mrtd": self.mrtd}
        for i, value in enumerate(self.rtmr):
            out[f"rtmr{i}"] = value
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "report_type": self.report_type.hex(),
            "cpu_svn": self.cpu_svn.hex(),
            "report_data": self.report_data.hex(),
            "tee_tcb_svn": self.tee_tcb_svn.hex(),
            "mrseam": self.mrseam.hex(),
            "mrsignerseam": self.mrsignerseam.hex(),
            "seam_attributes": self.seam_attributes.hex(),
            "td_attributes": self.td_attributes.hex(),
            "xfam": self.xfam.hex(),
            "mrconfigid": self.mrconfigid.hex(),
            "mrowner": self.mrowner.hex(),
            "mrownerconfig": self.mrownerconfig.hex(),
            "servtd_hash": self.servtd_hash.hex(),
            **{k: v.hex() for k, v in self.registers().items()},
        }


# ---------------------------------------------------------------------------
# GHCI GetQuote buffer (legacy TDX_CMD_GET_QUOTE)


def encode_get_quote_request(tdreport: bytes, buffer_size: int = QUOTE_BUFFER_SIZE) -> bytes:
    """The GetQuote buffer for ``tdreport``: GHCI header, then a framed QGS GET_QUOTE_REQ.

    The returned bytes are ``buffer_size`` long (the space the VMM may fill).
    """
    if len(tdreport) != TDREPORT_SIZE:
        raise PlatformError(f"a TDREPORT is {TDREPORT_SIZE} bytes, got {len(tdreport)}")
    msg_size = _QGS_HEADER.size + _QGS_QUOTE_FIELDS.size + len(tdreport)
    message = (
        _QGS_HEADER.pack(_QGS_MAJOR, _QGS_MINOR, _QGS_GET_QUOTE_REQ, msg_size, 0)
        + _QGS_QUOTE_FIELDS.pack(len(tdreport), 0)
        + tdreport
    )
    payload = _QGS_LENGTH.pack(msg_size) + message
    header = _GHCI_HEADER.pack(_GHCI_VERSION, 0, len(payload), 0)
    if len(header) + len(payload) > buffer_size:
        raise PlatformError(f"GetQuote buffer of {buffer_size} bytes cannot hold the request")
    return (header + payload).ljust(buffer_size, b"\0")


def decode_get_quote_response(buf: bytes) -> bytes:
    """The quote in a completed GetQuote buffer.

    Raises :class:`PlatformError` for a status other than success and
    :class:`ParseError` for a buffer whose lengths do not add up.
    """
    if len(buf) < _GHCI_HEADER.size:
        raise TruncatedError("GetQuote buffer shorter than its header", offset=len(buf))
    version, status, _in_len, out_len = _GHCI_HEADER.unpack_from(buf, 0)
    if status != GET_QUOTE_SUCCESS:
        what = _GHCI_STATUS_NAMES.get(status, "failed")
        raise PlatformError(f"GetQuote status 0x{status:016x}: {what}")
    if version != _GHCI_VERSION:
        raise UnsupportedFormatError(f"GetQuote buffer version {version}, expected 1", offset=0)
    data_at = _GHCI_HEADER.size
    if out_len > len(buf) - data_at:
        raise ParseError(
            f"GetQuote out_len {out_len} exceeds the {len(buf) - data_at} bytes of the buffer",
            offset=20,
        )
    if out_len < _QGS_LENGTH.size + _QGS_HEADER.size + _QGS_QUOTE_FIELDS.size:
        raise TruncatedError(f"GetQuote out_len {out_len} is too small for a response", offset=20)
    (msg_size,) = _QGS_LENGTH.unpack_from(buf, data_at)
    if msg_size != out_len - _QGS_LENGTH.size:
        raise ParseError(
            f"QGS message length {msg_size} does not match out_len {out_len} - 4", offset=data_at
        )
    msg_at = data_at + _QGS_LENGTH.size
    major, _minor, kind, size, error_code = _QGS_HEADER.unpack_from(buf, msg_at)
    if major != _QGS_MAJOR or kind != _QGS_GET_QUOTE_RESP:
        raise UnsupportedFormatError(
            f"QGS message version {major}, type {kind}: expected version 1, GET_QUOTE_RESP (1)",
            offset=msg_at,
        )
    if size != msg_size:
        raise ParseError(f"QGS header size {size} differs from framed {msg_size}", offset=msg_at)
    if error_code != 0:
        raise PlatformError(f"the quote generation service answered error 0x{error_code:x}")
    fields_at = msg_at + _QGS_HEADER.size
    id_size, quote_size = _QGS_QUOTE_FIELDS.unpack_from(buf, fields_at)
    body_at = fields_at + _QGS_QUOTE_FIELDS.size
    room = msg_at + msg_size - body_at
    if id_size > room or quote_size > room - id_size:
        raise ParseError(
            f"QGS response holds {room} bytes, selected id {id_size} + quote {quote_size} claimed",
            offset=fields_at,
        )
    if quote_size == 0:
        raise PlatformError("the quote generation service returned an empty quote")
    start = body_at + id_size
    return bytes(buf[start : start + quote_size])


# ---------------------------------------------------------------------------
# configfs-tsm


class ConfigfsItems(Protocol):
    """Creation and removal of a configfs item (the ``mkdir`` and ``rmdir`` of an entry).

    These two are the only configfs operations a plain filesystem cannot
    imitate (the kernel's ``make_item`` populates the new directory with its
    attributes; ``drop_item`` removes a directory that still shows them), so
    they are the one seam: by default :func:`os.mkdir` and :func:`os.rmdir`.
    Every attribute is read and written with ordinary file I/O.
    """

    def make_item(self, path: Path) -> None: ...

    def drop_item(self, path: Path) -> None: ...


class OSConfigfs:
    """The real configfs: ``mkdir`` and ``rmdir``."""

    def make_item(self, path: Path) -> None:
        os.mkdir(path, 0o700)

    def drop_item(self, path: Path) -> None:
        os.rmdir(path)


def _read_attr(path: Path, limit: int) -> bytes:
    """Read a whole attribute (configfs and sysfs attributes are read from offset 0)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise _os_error("open", path, e) from e
    try:
        chunks: list[bytes] = []
        total = 0
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError as e:
                raise _os_error("read", path, e) from e
            if not chunk:
                return b"".join(chunks)
            total += len(chunk)
            if total > limit:
                raise PlatformError(f"read {path}: more than {limit} bytes")
            chunks.append(chunk)
    finally:
        os.close(fd)


def _write_attr(path: Path, data: bytes) -> None:
    """Write ``data`` from offset 0 in one write (sysfs and configfs want a single write)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as e:
        raise _os_error("open", path, e) from e
    try:
        written = os.write(fd, data)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise _os_error("write", path, e) from e
    try:
        os.close(fd)  # configfs commits a binary attribute when it is closed
    except OSError as e:
        raise _os_error("close", path, e) from e
    if written != len(data):
        raise PlatformError(f"write {path}: wrote {written} of {len(data)} bytes")


def _read_text(path: Path) -> str:
    raw = _read_attr(path, MAX_GENERATION_TEXT)
    try:
        return raw.decode("ascii").strip()
    except UnicodeDecodeError as e:
        raise PlatformError(f"read {path}: not ASCII text: {raw!r}") from e


def _read_generation(path: Path) -> int:
    text = _read_text(path)
    if not text.isdigit():
        raise PlatformError(f"read {path}: generation {text!r} is not a decimal number")
    return int(text)


class _NoTDXProvider(PlatformError):
    """configfs-tsm is there, but no TDX provider answers it."""


def _make_entry(root: Path, configfs: ConfigfsItems, purpose: str) -> Path:
    for _ in range(8):
        entry = root / f"cima-{purpose}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            configfs.make_item(entry)
        except FileExistsError:
            continue
        except OSError as e:
            if e.errno == errno.ENXIO:
                raise _NoTDXProvider(
                    f"create {entry}: no attestation provider is registered with configfs-tsm "
                    f"(ENXIO, errno {e.errno})"
                ) from e
            raise _os_error("create report entry", entry, e) from e
        return entry
    raise PlatformError(f"create report entry under {root}: every name tried already exists")


def configfs_provider(root: Path, configfs: ConfigfsItems | None = None) -> str:
    """The provider behind configfs-tsm at ``root`` (``tdx_guest`` on a TDX guest).

    The ``provider`` attribute lives in each entry, so this creates one and
    removes it again.
    """
    items = configfs if configfs is not None else OSConfigfs()
    entry = _make_entry(root, items, "probe")
    try:
        return _read_text(entry / "provider")
    finally:
        # A probe entry left behind is harmless; the read's outcome stands.
        with contextlib.suppress(OSError):
            items.drop_item(entry)


@dataclass(frozen=True, slots=True)
class _Attempt:
    quote: bytes | None
    race: str | None


# ---------------------------------------------------------------------------
# The platform


class TDXPlatform(Platform):
    """An Intel TDX guest: mrtd and rtmr0..rtmr3 in one sha384 bank, TDX quotes as reports.

    ``configfs`` replaces the creation and removal of configfs-tsm entries
    (see :class:`ConfigfsItems`); ``max_attempts`` bounds the retries of a
    report request that another writer raced.
    """

    name = "tdx"

    def __init__(
        self,
        paths: PlatformPaths = PlatformPaths(),  # noqa: B008 - frozen, immutable default
        *,
        configfs: ConfigfsItems | None = None,
        max_attempts: int = 3,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.paths = paths
        self.configfs: ConfigfsItems = configfs if configfs is not None else OSConfigfs()
        self.max_attempts = max_attempts

    # -- what the platform is

    def default_algorithm(self) -> str:
        return ALGORITHM

    def algorithms(self) -> list[str]:
        return [ALGORITHM]

    def register_names(self) -> list[str]:
        return list(TD_NAMES)

    def info(self) -> dict[str, Any]:
        paths = self.paths
        tsm: dict[str, Any] = {
            "path": str(paths.configfs_tsm),
            "present": paths.configfs_tsm.is_dir(),
            "provider": None,
        }
        if tsm["present"]:
            try:
                tsm["provider"] = configfs_provider(paths.configfs_tsm, self.configfs)
            except PlatformError as e:
                tsm["error"] = str(e)
        sysfs = paths.tdx_rtmr_sysfs
        files = sorted(p.name for p in sysfs.iterdir()) if sysfs.is_dir() else []
        if tsm["provider"] == TDX_PROVIDER:
            report_source: str | None = "configfs-tsm"
        elif paths.tdx_guest_device.exists():
            report_source = "tdx_guest device"
        else:
            report_source = None
        return {
            "platform": self.name,
            "default_algorithm": ALGORITHM,
            "algorithms": self.algorithms(),
            "registers": self.register_names(),
            "extendable": list(EXTENDABLE_REGISTERS),
            "report_source": report_source,
            "configfs_tsm": tsm,
            "measurements": {"path": str(sysfs), "present": sysfs.is_dir(), "files": files},
            "device": {
                "path": str(paths.tdx_guest_device),
                "present": paths.tdx_guest_device.exists(),
            },
            "ccel": {
                "table": str(paths.ccel_table),
                "data": str(paths.ccel_data),
                "present": paths.ccel_data.exists(),
            },
        }

    # -- registers

    def _check(self, register: str, algorithm: str) -> None:
        if register not in TD_NAMES:
            raise PlatformError(f"TDX has no register {register!r} (it has {', '.join(TD_NAMES)})")
        if algorithm.lower().replace("-", "") != ALGORITHM:
            raise PlatformError(f"TDX registers have only a sha384 bank, not {algorithm}")

    def _sysfs_file(self, register: str) -> Path:
        return self.paths.tdx_rtmr_sysfs / f"{register}:{ALGORITHM}"

    def _read_sysfs(self, register: str) -> bytes:
        path = self._sysfs_file(register)
        value = _read_attr(path, 4096)
        if len(value) != MR_SIZE:
            raise PlatformError(f"read {path}: {len(value)} bytes, expected {MR_SIZE}")
        return value

    def _snapshot(self, registers: Sequence[str]) -> dict[str, bytes]:
        """Values of ``registers`` from the best source present, one TDREPORT or quote at most."""
        if all(self._sysfs_file(r).exists() for r in registers):
            return {r: self._read_sysfs(r) for r in registers}
        if self.paths.tdx_guest_device.exists():
            return self.td_report().registers()
        if self.paths.configfs_tsm.is_dir():
            return _quote_registers(
                self.quote(bytes(REPORT_DATA_SIZE)), str(self.paths.configfs_tsm)
            )
        raise PlatformError(
            "cannot read TDX registers: none of "
            f"{self.paths.tdx_rtmr_sysfs} (measurement files), {self.paths.tdx_guest_device} "
            f"(TDREPORT) or {self.paths.configfs_tsm} (quote) exists"
        )

    def read(self, register: str, algorithm: str) -> bytes:
        self._check(register, algorithm)
        return self._snapshot([register])[register]

    def read_all(self, algorithm: str | None = None) -> RegisterBank:
        alg = algorithm or ALGORITHM
        self._check("mrtd", alg)
        values = self._snapshot(TD_NAMES)
        bank = RegisterBank()
        for reg in TD_NAMES:
            bank.set(reg, ALGORITHM, values[reg])
        return bank

    def extend(self, register: str, algorithm: str, digest: bytes) -> None:
        self._check(register, algorithm)
        if register not in EXTENDABLE_REGISTERS:
            raise PlatformError(
                f"{register} is not extendable from the guest "
                f"(only {' and '.join(EXTENDABLE_REGISTERS)})"
            )
        if len(digest) != MR_SIZE:
            raise PlatformError(f"an RTMR extend takes {MR_SIZE} bytes, got {len(digest)}")
        path = self._sysfs_file(register)
        if path.exists():
            _write_attr(path, digest)
            return
        device = self.paths.tdx_guest_device
        if device.exists():
            request = bytearray(_EXTEND_REQ.pack(digest, int(register[4:])))
            fd = self._open_device()
            try:
                self._ioctl(fd, TDX_CMD_EXTEND_RTMR, request, "TDX_CMD_EXTEND_RTMR")
            finally:
                os.close(fd)
            return
        raise PlatformError(
            f"cannot extend {register}: neither {path} (Linux >= 6.16 measurement files) "
            f"nor {device} (the tdx_guest device) exists"
        )

    # -- the device

    def _open_device(self) -> int:
        device = self.paths.tdx_guest_device
        try:
            return os.open(device, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise _os_error("open the TDX guest device", device, e) from e

    def _ioctl(self, fd: int, requests: Sequence[int], buf: bytearray, what: str) -> None:
        device = self.paths.tdx_guest_device
        for request in requests:
            try:
                fcntl.ioctl(fd, request, buf, True)
            except OSError as e:
                if e.errno == errno.ENOTTY:
                    continue
                raise _os_error(f"ioctl {what} on", device, e) from e
            return
        raise PlatformError(f"ioctl {what} on {device}: the driver does not implement it (ENOTTY)")

    def td_report(self, report_data: bytes = bytes(REPORT_DATA_SIZE)) -> TDReport:
        """A fresh TDREPORT from ``TDX_CMD_GET_REPORT0`` on the tdx_guest device."""
        if len(report_data) != REPORT_DATA_SIZE:
            raise PlatformError(f"REPORTDATA is {REPORT_DATA_SIZE} bytes, got {len(report_data)}")
        buf = bytearray(_REPORT_REQ.pack(report_data, bytes(TDREPORT_SIZE)))
        fd = self._open_device()
        try:
            self._ioctl(fd, (TDX_CMD_GET_REPORT0,), buf, "TDX_CMD_GET_REPORT0")
        finally:
            os.close(fd)
        return TDReport.from_bytes(
            bytes(buf[REPORT_DATA_SIZE:]), source=str(self.paths.tdx_guest_device)
        )

    def _legacy_quote(self, report_data: bytes) -> bytes:
        tdreport = self.td_report(report_data).to_bytes()
        request = encode_get_quote_request(tdreport, QUOTE_BUFFER_SIZE)
        buf = ctypes.create_string_buffer(request, QUOTE_BUFFER_SIZE)
        req = bytearray(_QUOTE_REQ.pack(ctypes.addressof(buf), QUOTE_BUFFER_SIZE))
        fd = self._open_device()
        try:
            self._ioctl(fd, TDX_CMD_GET_QUOTE, req, "TDX_CMD_GET_QUOTE")
        finally:
            os.close(fd)
        try:
            return decode_get_quote_response(buf.raw)
        except ParseError as e:
            raise e.with_source(f"{self.paths.tdx_guest_device} GetQuote buffer") from None

    # -- reports

    def _configfs_attempt(self, entry: Path, report_data: bytes) -> _Attempt:
        generation = entry / "generation"
        before = _read_generation(generation)
        _write_attr(entry / "inblob", report_data)
        quote = _read_attr(entry / "outblob", MAX_OUTBLOB)
        after = _read_generation(generation)
        if after == before + 1:
            if not quote:
                raise PlatformError(f"read {entry / 'outblob'}: empty report")
            return _Attempt(quote, None)
        if after > before + 1:
            return _Attempt(None, f"generation went from {before} to {after} across one write")
        raise PlatformError(
            f"{generation}: generation went from {before} to {after} across a write of inblob "
            "(the write was not counted)"
        )

    def _configfs_quote(self, report_data: bytes) -> bytes:
        entry = _make_entry(self.paths.configfs_tsm, self.configfs, "report")
        done = False
        try:
            provider = _read_text(entry / "provider")
            if provider != TDX_PROVIDER:
                raise _NoTDXProvider(
                    f"{entry / 'provider'}: the provider is {provider!r}, not {TDX_PROVIDER!r}"
                )
            races: list[str] = []
            for _ in range(self.max_attempts):
                attempt = self._configfs_attempt(entry, report_data)
                if attempt.quote is not None:
                    done = True
                    return attempt.quote
                races.append(attempt.race or "")
            raise PlatformError(
                f"{entry}: another writer changed the report request during each of "
                f"{self.max_attempts} attempts ({'; '.join(races)})"
            )
        finally:
            try:
                self.configfs.drop_item(entry)
            except OSError as e:
                if done:
                    raise _os_error("remove report entry", entry, e) from e

    def quote(self, report_data: bytes) -> bytes:
        """A TDX quote whose REPORTDATA is ``report_data`` (64 bytes).

        configfs-tsm where present, else the legacy device. The quote is
        checked to carry ``report_data`` before it is returned.
        """
        if len(report_data) != REPORT_DATA_SIZE:
            raise PlatformError(f"REPORTDATA is {REPORT_DATA_SIZE} bytes, got {len(report_data)}")
        root = self.paths.configfs_tsm
        device = self.paths.tdx_guest_device
        if root.is_dir():
            try:
                quote = self._configfs_quote(report_data)
                source = str(root)
            except _NoTDXProvider:
                if not device.exists():
                    raise
                quote = self._legacy_quote(report_data)
                source = str(device)
        elif device.exists():
            quote = self._legacy_quote(report_data)
            source = str(device)
        else:
            raise PlatformError(
                f"no TDX report interface: neither {root} (configfs-tsm, Linux >= 6.7) "
                f"nor {device} (the tdx_guest device) exists"
            )
        _check_quote_binding(quote, report_data, source)
        return quote

    def report(
        self, nonce: bytes, user_data: bytes = b"", registers: list[str] | None = None
    ) -> Report:
        """A TDX quote binding SHA-512(nonce || user_data) (DESIGN.md section 4).

        ``registers`` is ignored: a TDX quote always carries mrtd and every RTMR.
        """
        from cima.evidence.reportdata import tdx_report_data

        quote = self.quote(tdx_report_data(nonce, user_data))
        return Report(
            kind="tdx-quote",
            body=quote,
            signature=b"",
            nonce=nonce,
            user_data=user_data,
            verification={},
        )

    # -- logs

    def boot_log(self) -> list[Measurement] | None:
        """The CCEL's records, or None where the firmware published none.

        The ACPI table's log area minimum length (LAML) bounds the data read,
        best effort: a table that is missing or does not decode is ignored.
        """
        data_path = self.paths.ccel_data
        if not data_path.exists():
            return None
        try:
            data = data_path.read_bytes()
        except OSError as e:
            raise _os_error("read", data_path, e) from e
        from cima.eventlog import ccel

        table_path = self.paths.ccel_table
        if table_path.exists():
            try:
                table = ccel.CCELTable.from_bytes(table_path.read_bytes())
                laml = int(table.log_area_minimum_length)
            except (OSError, ParseError):
                laml = 0
            if 0 < laml < len(data):
                data = data[:laml]
        log = ccel.parse(data, source=str(data_path))
        return list(log.events)


def _decode_quote(quote: bytes, source: str) -> TDXQuote:
    from cima.evidence.tdx import TDXQuote

    try:
        return TDXQuote.from_bytes(quote, source=source)
    except ParseError as e:
        raise PlatformError(f"{source}: the report does not decode as a TDX quote: {e}") from e


def _quote_registers(quote: bytes, source: str) -> dict[str, bytes]:
    return _decode_quote(quote, source).body.registers()


def _check_quote_binding(quote: bytes, report_data: bytes, source: str) -> None:
    got = _decode_quote(quote, source).body.report_data
    if not hmac.compare_digest(got, report_data):
        raise PlatformError(
            f"{source}: the quote carries REPORTDATA {got.hex()}, not the {report_data.hex()} "
            "written (another writer changed the request)"
        )
