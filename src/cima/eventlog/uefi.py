"""Decoders of common event data in TCG PC Client and CC event logs.

The event data of a TCG PC Client record is typed by its event type (TCG PC
Client Platform Firmware Profile (PFP) section 10.4, "Event Types" and the
structures of section 10.2-10.4). This module turns the common ones into
JSON-able dictionaries for display, conversion and appraisal:

- ``EV_EFI_VARIABLE_DRIVER_CONFIG``, ``EV_EFI_VARIABLE_BOOT``, ``EV_EFI_VARIABLE_BOOT2``,
  ``EV_EFI_VARIABLE_AUTHORITY``: ``UEFI_VARIABLE_DATA`` (PFP 10.4.4), with the
  variable's value decoded where its layout is known: ``SecureBoot`` as a bool,
  ``PK``/``KEK``/``db``/``dbx`` as ``EFI_SIGNATURE_LIST`` entries (UEFI 2.10
  section 32.4.1), ``BootOrder`` as its list of option numbers, ``Boot####`` as an
  ``EFI_LOAD_OPTION`` (UEFI 2.10 section 3.1.3);
- ``EV_EFI_BOOT_SERVICES_APPLICATION``/``_DRIVER``, ``EV_EFI_RUNTIME_SERVICES_DRIVER``:
  ``UEFI_IMAGE_LOAD_EVENT`` (PFP 10.2.3) with its device path rendered as text
  (UEFI 2.10 chapter 10, the text forms of section 10.6);
- ``EV_EFI_GPT_EVENT`` (``UEFI_GPT_DATA``), ``EV_EFI_PLATFORM_FIRMWARE_BLOB``/``BLOB2``,
  ``EV_EFI_HANDOFF_TABLES``/``TABLES2``, ``EV_EVENT_TAG`` (``TCG_PCClientTaggedEvent``),
  ``EV_SEPARATOR``, and the string events (``EV_IPL`` of shim and GRUB,
  ``EV_EFI_ACTION``, ``EV_ACTION``, ``EV_S_CRTM_VERSION``, ``EV_POST_CODE``);
- ``EV_NO_ACTION``: the Spec ID header, ``StartupLocality`` and the SP800-155
  platform identity events (PFP 10.4.5).

:func:`decode` never raises: data that does not decode gives
``{"error": "<reason>", "data": "<hex>"}``.
"""

from __future__ import annotations

import enum
import functools
import struct
import uuid
import warnings
from collections.abc import Callable
from typing import Any

from cima.errors import ParseError

Json = dict[str, Any]


class EventType(enum.IntEnum):
    """TCG PC Client event types (PFP section 10.4.1, Table 9)."""

    EV_PREBOOT_CERT = 0x00000000
    EV_POST_CODE = 0x00000001
    EV_UNUSED = 0x00000002
    EV_NO_ACTION = 0x00000003
    EV_SEPARATOR = 0x00000004
    EV_ACTION = 0x00000005
    EV_EVENT_TAG = 0x00000006
    EV_S_CRTM_CONTENTS = 0x00000007
    EV_S_CRTM_VERSION = 0x00000008
    EV_CPU_MICROCODE = 0x00000009
    EV_PLATFORM_CONFIG_FLAGS = 0x0000000A
    EV_TABLE_OF_DEVICES = 0x0000000B
    EV_COMPACT_HASH = 0x0000000C
    EV_IPL = 0x0000000D
    EV_IPL_PARTITION_DATA = 0x0000000E
    EV_NONHOST_CODE = 0x0000000F
    EV_NONHOST_CONFIG = 0x00000010
    EV_NONHOST_INFO = 0x00000011
    EV_OMIT_BOOT_DEVICE_EVENTS = 0x00000012
    EV_POST_CODE2 = 0x00000013
    EV_EFI_EVENT_BASE = 0x80000000
    EV_EFI_VARIABLE_DRIVER_CONFIG = 0x80000001
    EV_EFI_VARIABLE_BOOT = 0x80000002
    EV_EFI_BOOT_SERVICES_APPLICATION = 0x80000003
    EV_EFI_BOOT_SERVICES_DRIVER = 0x80000004
    EV_EFI_RUNTIME_SERVICES_DRIVER = 0x80000005
    EV_EFI_GPT_EVENT = 0x80000006
    EV_EFI_ACTION = 0x80000007
    EV_EFI_PLATFORM_FIRMWARE_BLOB = 0x80000008
    EV_EFI_HANDOFF_TABLES = 0x80000009
    EV_EFI_PLATFORM_FIRMWARE_BLOB2 = 0x8000000A
    EV_EFI_HANDOFF_TABLES2 = 0x8000000B
    EV_EFI_VARIABLE_BOOT2 = 0x8000000C
    EV_EFI_GPT_EVENT2 = 0x8000000D
    EV_EFI_HCRTM_EVENT = 0x80000010
    EV_EFI_VARIABLE_AUTHORITY = 0x800000E0
    EV_EFI_SPDM_FIRMWARE_BLOB = 0x800000E1
    EV_EFI_SPDM_FIRMWARE_CONFIG = 0x800000E2
    EV_EFI_SPDM_DEVICE_POLICY = 0x800000E3
    EV_EFI_SPDM_DEVICE_AUTHORITY = 0x800000E4


_EVENT_TYPE_NAMES: dict[int, str] = {int(t): t.name for t in EventType}


def event_type_name(event_type: int) -> str:
    """``EV_*`` name of ``event_type``; ``EV_UNKNOWN_0x...`` for a value the PFP does not name."""
    name = _EVENT_TYPE_NAMES.get(event_type)
    return name if name is not None else f"EV_UNKNOWN_0x{event_type:08x}"


# -- GUIDs --------------------------------------------------------------------

EFI_GLOBAL_VARIABLE = "8be4df61-93ca-11d2-aa0d-00e098032b8c"
EFI_IMAGE_SECURITY_DATABASE = "d719b2cb-3d3a-4596-a3bc-dad00e67656f"
SHIM_LOCK = "605dab50-e046-4300-abb6-3dd810dd8b23"

#: Signature types of EFI_SIGNATURE_LIST (UEFI 2.10 section 32.4.1), by GUID.
SIGNATURE_TYPES: dict[str, str] = {
    "c1c41626-504c-4092-aca9-41f936934328": "sha256",
    "3c5766e8-269c-4e34-aa14-ed776e85b3b6": "rsa2048",
    "e2b36190-879b-4a3d-ad8d-f2e7bba32784": "rsa2048_sha256",
    "826ca512-cf10-4ac9-b187-be01496631bd": "sha1",
    "67f8444f-8743-48f1-a328-1eaab8736080": "rsa2048_sha1",
    "a5c059a1-94e4-4aa7-87b5-ab155c2bf072": "x509",
    "0b6e5233-a65c-44c9-9407-d9ab83bfc8bd": "sha224",
    "ff3e5307-9fd0-48c9-85f1-8ad56c701e01": "sha384",
    "093e0fae-a6c4-4f50-9f1b-d41e2b89c19a": "sha512",
    "3bd2a638-e3a4-4f46-b5b2-6fd7a44d75f3": "x509_sha256",
    "7076876e-80c2-4ee6-aad2-28b349a6865b": "x509_sha384",
    "446dbf63-2502-4cda-bcfa-2465d2b0fe9d": "x509_sha512",
    "4aafd29d-68df-49ee-8aa9-347d375665a7": "pkcs7",
}

#: Vendor GUIDs of common variables.
VARIABLE_VENDORS: dict[str, str] = {
    EFI_GLOBAL_VARIABLE: "EFI_GLOBAL_VARIABLE",
    EFI_IMAGE_SECURITY_DATABASE: "EFI_IMAGE_SECURITY_DATABASE",
    SHIM_LOCK: "SHIM_LOCK",
}

#: Linux EFI stub tagged-event ids (drivers/firmware/efi/libstub) and others seen in logs.
TAGGED_EVENT_IDS: dict[int, str] = {
    0x8F3B22EC: "linux_initrd",
    0x8F3B22ED: "linux_load_options",
    0x4141454C: "attestation_agent_event_log",  # bytes "LEAA": "AAEL" read big-endian
}


def guid_text(raw: bytes) -> str:
    """The registry form of an EFI_GUID stored in its mixed-endian wire layout."""
    return str(uuid.UUID(bytes_le=bytes(raw)))


# -- a bounded reader -----------------------------------------------------------


class _Reader:
    """Sequential little-endian reads that raise ParseError past the end."""

    __slots__ = ("data", "pos")

    _U8 = struct.Struct("<B")
    _U16 = struct.Struct("<H")
    _U32 = struct.Struct("<I")
    _U64 = struct.Struct("<Q")

    def __init__(self, data: bytes, pos: int = 0) -> None:
        self.data = data
        self.pos = pos

    @property
    def left(self) -> int:
        return len(self.data) - self.pos

    def _need(self, n: int, what: str) -> None:
        if n < 0 or n > self.left:
            raise ParseError(f"{what}: needs {n} bytes, {self.left} left", offset=self.pos)

    def take(self, n: int, what: str = "field") -> bytes:
        self._need(n, what)
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def _unpack(self, s: struct.Struct, what: str) -> int:
        self._need(s.size, what)
        (v,) = s.unpack_from(self.data, self.pos)
        self.pos += s.size
        return int(v)

    def u8(self, what: str = "u8") -> int:
        return self._unpack(self._U8, what)

    def u16(self, what: str = "u16") -> int:
        return self._unpack(self._U16, what)

    def u32(self, what: str = "u32") -> int:
        return self._unpack(self._U32, what)

    def u64(self, what: str = "u64") -> int:
        return self._unpack(self._U64, what)

    def guid(self, what: str = "GUID") -> str:
        return guid_text(self.take(16, what))

    def rest(self) -> bytes:
        out = self.data[self.pos :]
        self.pos = len(self.data)
        return out


# -- text helpers ---------------------------------------------------------------


def _printable(text: str) -> bool:
    return all(c.isprintable() or c in "\t\r\n" for c in text)


def _utf16_end(data: bytes) -> int:
    """Offset of the first UTF-16 NUL (two zero bytes at an even offset), or len(data)."""
    pos = data.find(b"\x00\x00")
    while pos >= 0 and pos % 2:
        pos = data.find(b"\x00\x00", pos + 1)
    return len(data) if pos < 0 else pos


def _utf16_ascii(data: bytes) -> str | None:
    """UTF-16LE text whose code units are all below 0x100 (what firmware logs), else None.

    The text ends at its NUL; only NUL bytes may follow (systemd-boot logs one odd
    trailing zero byte).
    """
    end = _utf16_end(data)
    body = data[:end]
    if len(body) % 2 and body[-1] == 0:
        body = body[:-1]
    if len(body) < 2 or len(body) % 2 or data[end:].strip(b"\x00"):
        return None
    if body[1::2].count(0) != len(body) // 2:
        return None
    text = body.decode("utf-16-le")
    return text if _printable(text) else None


def _ascii(data: bytes) -> str | None:
    """UTF-8 / ASCII text up to its first NUL, or None if it is not text."""
    try:
        text = data.split(b"\x00", 1)[0].decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text if _printable(text) else None


def text_of(data: bytes) -> str | None:
    """The string an event holds: UTF-16LE (systemd, the EFI stub) or ASCII (GRUB, shim).

    Strings end at their first NUL (some GRUB builds log a stray byte after it).
    None when the data is not text.
    """
    if not data:
        return ""
    text = _utf16_ascii(data)
    if text is not None:
        return text
    text = _ascii(data)
    if text == "" and data.strip(b"\x00"):
        return None  # a NUL-led binary blob
    return text


def _utf16z(r: _Reader, what: str) -> str:
    """A NUL-terminated UTF-16LE string (CHAR16 *) read from ``r``."""
    start = r.pos
    rest = r.data[start:]
    end = _utf16_end(rest)
    if end + 2 > len(rest):
        raise ParseError(f"{what}: no terminating NUL", offset=start)
    r.pos = start + end + 2
    return rest[:end].decode("utf-16-le", errors="replace")


# -- device paths (UEFI 2.10 chapter 10) -------------------------------------------

_ACPI_PNP_TEXT = {
    0x0A03: "PciRoot",
    0x0A08: "PcieRoot",
    0x0604: "Floppy",
    0x0301: "Keyboard",
    0x0501: "Serial",
    0x0401: "ParallelPort",
}
_BBS_TYPES = {1: "Floppy", 2: "HD", 3: "CDROM", 4: "PCMCIA", 5: "USB", 6: "Network"}
_IP_PROTOCOLS = {6: "TCP", 17: "UDP"}


def _vendor(prefix: str, body: bytes) -> str:
    r = _Reader(body)
    guid = r.guid()
    extra = r.rest()
    return f"{prefix}({guid},{extra.hex()})" if extra else f"{prefix}({guid})"


def _ipv4(b: bytes) -> str:
    return ".".join(str(x) for x in b)


def _node_text(dtype: int, sub: int, body: bytes) -> str:
    """Text form of one device path node (UEFI 2.10 section 10.6.1.6); raises on short bodies."""
    r = _Reader(body)
    if dtype == 1:  # hardware
        if sub == 1:
            func = r.u8()
            dev = r.u8()
            return f"Pci(0x{dev:x},0x{func:x})"
        if sub == 2:
            return f"PcCard(0x{r.u8():x})"
        if sub == 3:
            mem_type, start, end = r.u32(), r.u64(), r.u64()
            return f"MemoryMapped(0x{mem_type:x},0x{start:x},0x{end:x})"
        if sub == 4:
            return _vendor("VenHw", body)
        if sub == 5:
            return f"Ctrl(0x{r.u32():x})"
        if sub == 6:
            itype, base = r.u8(), r.u64()
            return f"BMC({itype},0x{base:x})"
    elif dtype == 2:  # ACPI
        if sub == 1:
            hid, uid = r.u32(), r.u32()
            if hid & 0xFFFF == 0x41D0:
                pnp = hid >> 16
                label = _ACPI_PNP_TEXT.get(pnp)
                if label is not None:
                    return f"{label}(0x{uid:x})"
                return f"Acpi(PNP{pnp:04x},0x{uid:x})"
            return f"Acpi(0x{hid:08x},0x{uid:x})"
        if sub == 2:
            hid, uid, cid = r.u32(), r.u32(), r.u32()
            strings = r.rest().split(b"\x00")
            texts = [s.decode("ascii", errors="replace") for s in strings[:3]]
            texts += [""] * (3 - len(texts))
            return f"AcpiEx(0x{hid:08x},0x{cid:08x},0x{uid:x},{texts[0]},{texts[2]},{texts[1]})"
        if sub == 3:
            adrs = [r.u32()]
            while r.left >= 4:
                adrs.append(r.u32())
            return "AcpiAdr(" + ",".join(f"0x{a:x}" for a in adrs) + ")"
    elif dtype == 3:  # messaging
        if sub == 1:
            primary, slave, lun = r.u8(), r.u8(), r.u16()
            return (
                f"Ata({'Secondary' if primary else 'Primary'},"
                f"{'Slave' if slave else 'Master'},{lun})"
            )
        if sub == 2:
            pun, lun = r.u16(), r.u16()
            return f"SCSI({pun},{lun})"
        if sub == 3:
            r.u32()
            wwn, lun = r.u64(), r.u64()
            return f"Fibre(0x{wwn:x},0x{lun:x})"
        if sub == 5:
            port, iface = r.u8(), r.u8()
            return f"USB({port},{iface})"
        if sub == 10:
            return _vendor("VenMsg", body)
        if sub == 11:
            mac = r.take(32)
            iftype = r.u8()
            size = 6 if iftype in (0, 1) else 32
            return f"MAC({mac[:size].hex()},{iftype})"
        if sub == 12:
            local, remote = r.take(4), r.take(4)
            r.u16()  # local port
            r.u16()  # remote port
            proto = r.u16()
            static = r.u8()
            parts = [
                _ipv4(remote),
                _IP_PROTOCOLS.get(proto, f"0x{proto:x}"),
                "Static" if static else "DHCP",
                _ipv4(local),
            ]
            if r.left >= 8:
                parts += [_ipv4(r.take(4)), _ipv4(r.take(4))]
            return "IPv4(" + ",".join(parts) + ")"
        if sub == 13:
            local, remote = r.take(16), r.take(16)
            r.u16()
            r.u16()
            proto = r.u16()
            return f"IPv6({remote.hex()},{_IP_PROTOCOLS.get(proto, f'0x{proto:x}')},{local.hex()})"
        if sub == 15:
            vid, pid, cls, subcls, proto = r.u16(), r.u16(), r.u8(), r.u8(), r.u8()
            return f"UsbClass(0x{vid:x},0x{pid:x},0x{cls:x},0x{subcls:x},0x{proto:x})"
        if sub == 17:
            return f"Unit({r.u8()})"
        if sub == 18:
            hba, pm, lun = r.u16(), r.u16(), r.u16()
            return f"Sata({hba},{pm},{lun})"
        if sub == 20:
            return f"Vlan({r.u16()})"
        if sub == 23:
            nsid = r.u32()
            eui = r.take(8)
            return f"NVMe(0x{nsid:x},{'-'.join(f'{b:02X}' for b in eui)})"
        if sub == 24:
            return f"Uri({r.rest().decode('ascii', errors='replace')})"
        if sub == 26:
            return f"SD({r.u8()})"
        if sub == 29:
            return f"eMMC({r.u8()})"
    elif dtype == 4:  # media
        if sub == 1:
            part, start, size = r.u32(), r.u64(), r.u64()
            sig = r.take(16)
            r.u8()  # partition format (1 MBR, 2 GPT)
            sig_type = r.u8()
            if sig_type == 1:
                (mbr,) = struct.unpack_from("<I", sig)
                return f"HD({part},MBR,0x{mbr:08x},0x{start:x},0x{size:x})"
            if sig_type == 2:
                return f"HD({part},GPT,{guid_text(sig)},0x{start:x},0x{size:x})"
            return f"HD({part},{sig_type},0,0x{start:x},0x{size:x})"
        if sub == 2:
            entry, start, size = r.u32(), r.u64(), r.u64()
            return f"CDROM(0x{entry:x},0x{start:x},0x{size:x})"
        if sub == 3:
            return _vendor("VenMedia", body)
        if sub == 4:
            path = body.decode("utf-16-le", errors="replace").split("\x00", 1)[0]
            return f"File({path})"
        if sub == 5:
            return f"Media({r.guid()})"
        if sub == 6:
            return f"FvFile({r.guid()})"
        if sub == 7:
            return f"FvVol({r.guid()})"
        if sub == 8:
            r.u32()
            start, end = r.u64(), r.u64()
            return f"Offset(0x{start:x},0x{end:x})"
        if sub == 9:
            start, end = r.u64(), r.u64()
            disk_type = r.guid()
            instance = r.u16()
            return f"RamDisk(0x{start:x},0x{end:x},{instance},{disk_type})"
    elif dtype == 5 and sub == 1:  # BIOS boot specification
        dev_type, flags = r.u16(), r.u16()
        desc = r.rest().split(b"\x00", 1)[0].decode("ascii", errors="replace")
        return f"BBS({_BBS_TYPES.get(dev_type, f'0x{dev_type:x}')},{desc},0x{flags:x})"
    return f"Path({dtype},{sub},{body.hex()})"


def device_paths(data: bytes) -> list[str]:
    """Every device path (instance list) in ``data``, each as its text form.

    A device path is a sequence of nodes (type u8, subtype u8, length u16
    including the 4-byte node header) ending with End Entire (0x7f, 0xff);
    End Instance (0x7f, 0x01) separates instances, written ``,``. A node this
    module does not know, or one too short for its type, is written
    ``Path(type,subtype,hex)``. Bytes after the last End node that do not form
    another path raise :class:`ParseError`.
    """
    out: list[str] = []
    instances: list[str] = []
    nodes: list[str] = []
    pos = 0
    n = len(data)
    while pos < n:
        if n - pos < 4:
            raise ParseError(f"device path node header needs 4 bytes, {n - pos} left", offset=pos)
        dtype, sub, length = struct.unpack_from("<BBH", data, pos)
        if length < 4 or length > n - pos:
            raise ParseError(f"device path node length {length} is invalid", offset=pos)
        body = data[pos + 4 : pos + length]
        pos += length
        if dtype == 0x7F:  # End of Hardware Device Path
            instances.append("/".join(nodes))
            nodes = []
            if sub != 0x01:  # End Entire (0xff); 0x01 ends one instance
                out.append(",".join(instances))
                instances = []
            continue
        try:
            nodes.append(_node_text(dtype, sub, body))
        except ParseError:
            nodes.append(f"Path({dtype},{sub},{body.hex()})")
    if nodes or instances:
        out.append(",".join([*instances, "/".join(nodes)]) if nodes else ",".join(instances))
    return out


def device_path_to_text(data: bytes) -> str:
    """Text form of the first device path in ``data`` ("" for no bytes)."""
    paths = device_paths(data)
    return paths[0] if paths else ""


def _device_path_fields(raw: bytes) -> Json:
    try:
        paths = device_paths(raw)
    except ParseError as e:
        return {"device_path": None, "device_path_error": e.reason, "device_path_hex": raw.hex()}
    out: Json = {"device_path": paths[0] if paths else ""}
    if len(paths) > 1:
        out["device_paths"] = paths
    return out


# -- certificates -----------------------------------------------------------------


def certificate_summary(der: bytes) -> Json:
    """Subject, issuer and serial number of a DER X.509 certificate; {} if it does not parse."""
    try:
        from cryptography import x509

        with warnings.catch_warnings():
            # Firmware certificates often bend RFC 5280 (negative serials, long country codes).
            warnings.simplefilter("ignore")
            cert = x509.load_der_x509_certificate(der)
            return {
                "subject": cert.subject.rfc4514_string(),
                "issuer": cert.issuer.rfc4514_string(),
                "serial_number": f"{cert.serial_number:x}",
            }
    except Exception:  # any malformed certificate: no summary
        return {}


def _signature_data(body: bytes, type_name: str | None) -> Json:
    r = _Reader(body)
    entry: Json = {"owner": r.guid("SignatureOwner")}
    data = r.rest()
    entry["data"] = data.hex()
    if type_name == "x509" or (type_name is None and data[:1] == b"\x30"):
        entry.update(certificate_summary(data))
    return entry


def signature_lists(data: bytes) -> list[Json]:
    """Decode concatenated EFI_SIGNATURE_LIST structures (an authenticated variable's value)."""
    r = _Reader(data)
    lists: list[Json] = []
    while r.left:
        start = r.pos
        sig_type = r.guid("SignatureType")
        list_size = r.u32("SignatureListSize")
        header_size = r.u32("SignatureHeaderSize")
        sig_size = r.u32("SignatureSize")
        if list_size < 28 or list_size - 28 > r.left:
            raise ParseError(f"SignatureListSize {list_size} is invalid", offset=start)
        if header_size > list_size - 28:
            raise ParseError(f"SignatureHeaderSize {header_size} is invalid", offset=start)
        body = list_size - 28 - header_size
        if sig_size < 16 or body % sig_size:
            raise ParseError(f"SignatureSize {sig_size} does not divide the list", offset=start)
        header = r.take(header_size)
        type_name = SIGNATURE_TYPES.get(sig_type)
        entries = [_signature_data(r.take(sig_size), type_name) for _ in range(body // sig_size)]
        item: Json = {
            "signature_type": sig_type,
            "signature_type_name": type_name,
            "signature_list_size": list_size,
            "signature_header_size": header_size,
            "signature_size": sig_size,
            "signatures": entries,
        }
        if header:
            item["signature_header"] = header.hex()
        lists.append(item)
    return lists


# -- UEFI variables (PFP 10.4.4 UEFI_VARIABLE_DATA) -----------------------------------

_BOOLEAN_VARIABLES = frozenset(
    {"SecureBoot", "SetupMode", "AuditMode", "DeployedMode", "MokListTrusted", "MokSBState"}
)
_SIGNATURE_DB_VARIABLES = frozenset({"PK", "KEK", "db", "dbx", "dbt", "dbr", "MokList", "MokListX"})
_LOAD_OPTION_PREFIXES = ("Boot", "Driver", "SysPrep", "PlatformRecovery")


def load_option(data: bytes) -> Json:
    """Decode an EFI_LOAD_OPTION (UEFI 2.10 section 3.1.3)."""
    r = _Reader(data)
    attributes = r.u32("Attributes")
    fpl_len = r.u16("FilePathListLength")
    description = _utf16z(r, "Description")
    paths = r.take(fpl_len, "FilePathList")
    out: Json = {
        "attributes": attributes,
        "active": bool(attributes & 1),
        "file_path_list_length": fpl_len,
        "description": description,
    }
    out.update(_device_path_fields(paths))
    optional = r.rest()
    if optional:
        out["optional_data"] = optional.hex()
    return out


def _is_load_option_name(name: str) -> bool:
    for prefix in _LOAD_OPTION_PREFIXES:
        tail = name[len(prefix) :]
        if name.startswith(prefix) and len(tail) == 4:
            try:
                int(tail, 16)
            except ValueError:
                return False
            return True
    return False


def _variable_value(event_type: int, name: str, value: bytes) -> Json:
    """The decoded value of a logged variable, as extra keys; {} when it is not decoded."""
    if name in _BOOLEAN_VARIABLES and len(value) <= 1:
        # An absent variable is logged with no data: the feature is off.
        return {"enabled": value not in (b"", b"\x00")}
    if event_type == EventType.EV_EFI_VARIABLE_AUTHORITY:
        return _authority_value(value)
    if name in _SIGNATURE_DB_VARIABLES:
        return {"signature_lists": signature_lists(value)}
    if name in {"BootOrder", "DriverOrder"}:
        if len(value) % 2:
            raise ParseError(f"{name} has an odd length {len(value)}")
        return {"boot_order": [v for (v,) in struct.iter_unpack("<H", value)]}
    if name in {"BootNext", "BootCurrent"}:
        if len(value) != 2:
            raise ParseError(f"{name} is {len(value)} bytes, expected 2")
        return {"boot_option": struct.unpack("<H", value)[0]}
    if _is_load_option_name(name):
        return {"load_option": load_option(value)}
    text = _ascii(value) if value else None
    if text:
        return {"string": text}
    return {}


def _authority_value(value: bytes) -> Json:
    """EV_EFI_VARIABLE_AUTHORITY data: the EFI_SIGNATURE_DATA that authorised an image.

    Firmware logs the db entry (owner GUID + certificate); shim logs its vendor
    certificate bare (variable "Shim") and SBAT levels as text.
    """
    if value[:2] == b"\x30\x82":
        summary = certificate_summary(value)
        if summary:
            return {"certificate": {"data": value.hex(), **summary}}
    if len(value) > 16 and value[16:18] == b"\x30\x82":
        return {"signature": _signature_data(value, "x509")}
    if len(value) == 1:
        return {"enabled": value != b"\x00"}
    text = _ascii(value) if value else None
    if text:
        return {"string": text}
    if len(value) >= 16:
        return {"signature": _signature_data(value, None)}
    return {}


def decode_variable(event_type: int, data: bytes) -> Json:
    """Decode UEFI_VARIABLE_DATA: VariableName (GUID), lengths, UTF-16 name and the value."""
    r = _Reader(data)
    guid = r.guid("VariableName")
    name_len = r.u64("UnicodeNameLength")
    data_len = r.u64("VariableDataLength")
    if name_len > r.left // 2:
        raise ParseError(f"UnicodeNameLength {name_len} exceeds the event", offset=16)
    name = r.take(2 * name_len).decode("utf-16-le", errors="replace")
    if data_len > r.left:
        raise ParseError(f"VariableDataLength {data_len} exceeds the event", offset=24)
    value = r.take(data_len)
    out: Json = {
        "variable_guid": guid,
        "variable_vendor": VARIABLE_VENDORS.get(guid),
        "variable_name": name,
        "unicode_name_length": name_len,
        "variable_data_length": data_len,
        "variable_data": value.hex(),
    }
    try:
        out.update(_variable_value(event_type, name, value))
    except ParseError as e:
        out["value_error"] = e.reason
    trailing = r.rest()
    if trailing:
        out["trailing_data"] = trailing.hex()
    return out


# -- the other event types -------------------------------------------------------


def decode_image_load(data: bytes) -> Json:
    """UEFI_IMAGE_LOAD_EVENT (PFP 10.2.3): location, length, link-time address, device path."""
    r = _Reader(data)
    location = r.u64("ImageLocationInMemory")
    length = r.u64("ImageLengthInMemory")
    link = r.u64("ImageLinkTimeAddress")
    dp_len = r.u64("LengthOfDevicePath")
    if dp_len > r.left:
        raise ParseError(f"LengthOfDevicePath {dp_len} exceeds the event", offset=24)
    out: Json = {
        "image_location": location,
        "image_length": length,
        "image_link_time_address": link,
        "device_path_length": dp_len,
    }
    out.update(_device_path_fields(r.take(dp_len)))
    return out


def decode_string(data: bytes) -> Json:
    """An event whose data is a string (ASCII or UTF-16LE); hex when it is not text."""
    text = text_of(data)
    if text is None:
        return {"data": data.hex()}
    out: Json = {"string": text}
    if _utf16_ascii(data) is None:
        rest = data[len(text.encode("utf-8")) :]
        if rest.strip(b"\x00"):
            out["trailing_data"] = rest.hex()
    return out


def decode_ipl(data: bytes) -> Json:
    """EV_IPL: GRUB (``grub_cmd: ...``, ``kernel_cmdline: ...``, file names), shim, systemd."""
    out = decode_string(data)
    text = out.get("string")
    if isinstance(text, str):
        for prefix, key in (
            ("grub_cmd: ", "grub_cmd"),
            ("kernel_cmdline: ", "kernel_cmdline"),
            ("grub_kernel_cmdline ", "kernel_cmdline"),
        ):
            if text.startswith(prefix):
                out[key] = text[len(prefix) :]
                break
    return out


def decode_separator(data: bytes) -> Json:
    """EV_SEPARATOR: 0x00000000, or 0xFFFFFFFF when firmware hit an error (PFP 10.4.1)."""
    if len(data) != 4:
        return decode_string(data)
    (value,) = struct.unpack("<I", data)
    return {"separator": f"0x{value:08x}", "firmware_error": value == 0xFFFFFFFF}


def decode_blob(data: bytes) -> Json:
    """UEFI_PLATFORM_FIRMWARE_BLOB: base and length."""
    r = _Reader(data)
    out: Json = {"blob_base": r.u64("BlobBase"), "blob_length": r.u64("BlobLength")}
    if r.left:
        raise ParseError(f"{r.left} bytes after UEFI_PLATFORM_FIRMWARE_BLOB", offset=16)
    return out


def decode_blob2(data: bytes) -> Json:
    """UEFI_PLATFORM_FIRMWARE_BLOB2: description (ASCII, sized), base and length."""
    r = _Reader(data)
    size = r.u8("BlobDescriptionSize")
    desc = r.take(size, "BlobDescription").rstrip(b"\x00").decode("ascii", errors="replace")
    return {"description": desc, "blob_base": r.u64("BlobBase"), "blob_length": r.u64("BlobLength")}


def decode_post_code(data: bytes) -> Json:
    """EV_POST_CODE: a UEFI_PLATFORM_FIRMWARE_BLOB (16 bytes) or a POST code string."""
    if len(data) == 16 and text_of(data) is None:
        return decode_blob(data)
    return decode_string(data)


def _handoff_tables(r: _Reader) -> list[Json]:
    count = r.u64("NumberOfTables")
    if count > r.left // 24:
        raise ParseError(f"NumberOfTables {count} exceeds the event", offset=r.pos - 8)
    tables: list[Json] = []
    for _ in range(count):
        guid = r.guid("VendorGuid")
        tables.append({"vendor_guid": guid, "vendor_table": r.u64("VendorTable")})
    return tables


def decode_handoff_tables(data: bytes) -> Json:
    """UEFI_HANDOFF_TABLE_POINTERS: the EFI configuration tables handed to the OS."""
    return {"tables": _handoff_tables(_Reader(data))}


def decode_handoff_tables2(data: bytes) -> Json:
    """UEFI_HANDOFF_TABLE_POINTERS2: description, then the table pointers."""
    r = _Reader(data)
    size = r.u8("TableDescriptionSize")
    desc = r.take(size, "TableDescription").rstrip(b"\x00").decode("ascii", errors="replace")
    return {"description": desc, "tables": _handoff_tables(r)}


def decode_gpt(data: bytes) -> Json:
    """UEFI_GPT_DATA (PFP 10.2.6): the partition table header and the used partitions."""
    r = _Reader(data)
    sig = r.take(8, "Signature")
    header: Json = {
        "signature": sig.decode("ascii", errors="replace"),
        "revision": r.u32("Revision"),
        "header_size": r.u32("HeaderSize"),
        "header_crc32": r.u32("HeaderCRC32"),
    }
    r.u32("Reserved")
    header.update(
        {
            "my_lba": r.u64("MyLBA"),
            "alternate_lba": r.u64("AlternateLBA"),
            "first_usable_lba": r.u64("FirstUsableLBA"),
            "last_usable_lba": r.u64("LastUsableLBA"),
            "disk_guid": r.guid("DiskGUID"),
            "partition_entry_lba": r.u64("PartitionEntryLBA"),
            "number_of_partition_entries": r.u32("NumberOfPartitionEntries"),
            "size_of_partition_entry": r.u32("SizeOfPartitionEntry"),
            "partition_entry_array_crc32": r.u32("PartitionEntryArrayCRC32"),
        }
    )
    count = r.u64("NumberOfPartitions")
    entry_size = int(header["size_of_partition_entry"])
    if entry_size < 128:
        raise ParseError(f"SizeOfPartitionEntry {entry_size} is below 128", offset=84)
    if count > r.left // entry_size:
        raise ParseError(f"NumberOfPartitions {count} exceeds the event", offset=92)
    partitions: list[Json] = []
    for _ in range(count):
        e = _Reader(r.take(entry_size))
        partitions.append(
            {
                "partition_type_guid": e.guid(),
                "unique_partition_guid": e.guid(),
                "starting_lba": e.u64(),
                "ending_lba": e.u64(),
                "attributes": e.u64(),
                "partition_name": e.take(72)
                .decode("utf-16-le", errors="replace")
                .split("\x00", 1)[0],
            }
        )
    return {"header": header, "number_of_partitions": count, "partitions": partitions}


def decode_event_tag(data: bytes) -> Json:
    """TCG_PCClientTaggedEvent: taggedEventID, taggedEventDataSize, taggedEventData.

    The Linux EFI stub tags its initrd measurement 0x8F3B22EC and its load
    options (the command line) 0x8F3B22ED.
    """
    r = _Reader(data)
    tag = r.u32("taggedEventID")
    size = r.u32("taggedEventDataSize")
    if size > r.left:
        raise ParseError(f"taggedEventDataSize {size} exceeds the event", offset=4)
    body = r.take(size)
    out: Json = {
        "tagged_event_id": tag,
        "tagged_event_id_hex": f"0x{tag:08x}",
        "tagged_event_name": TAGGED_EVENT_IDS.get(tag),
        "tagged_event_data": body.hex(),
    }
    text = text_of(body)
    if text is not None:
        out["string"] = text
    trailing = r.rest()
    if trailing:
        out["trailing_data"] = trailing.hex()
    return out


# -- EV_NO_ACTION (PFP 10.4.5) ----------------------------------------------------------

SPEC_ID_EVENT03 = b"Spec ID Event03\x00"
STARTUP_LOCALITY = b"StartupLocality\x00"


def _sized_string(r: _Reader, what: str) -> str:
    size = r.u8(what + "Size")
    return r.take(size, what).rstrip(b"\x00").decode("utf-8", errors="replace")


def _locator(r: _Reader, what: str) -> Json:
    kind = r.u32(what + "Type")
    size = r.u32(what + "Length")
    raw = r.take(size, what)
    text = _ascii(raw)
    return {"type": kind, "value": text if text is not None else raw.hex()}


def decode_sp800_155(data: bytes) -> Json:
    """TCG_Sp800_155_PlatformId_Event (``SP800-155 Event``) and Event3 (with the locators)."""
    r = _Reader(data)
    signature = r.take(16).decode("ascii", errors="replace").rstrip("\x00")
    out: Json = {"signature": signature, "vendor_id": r.u32("VendorId")}
    out["reference_manifest_guid"] = r.guid("ReferenceManifestGuid")
    out["platform_manufacturer"] = _sized_string(r, "PlatformManufacturerStr")
    out["platform_model"] = _sized_string(r, "PlatformModel")
    out["platform_version"] = _sized_string(r, "PlatformVersion")
    out["firmware_manufacturer"] = _sized_string(r, "FirmwareManufacturerStr")
    out["firmware_manufacturer_id"] = r.u32("FirmwareManufacturerId")
    out["firmware_version"] = _sized_string(r, "FirmwareVersion")
    if signature == "SP800-155 Event3":
        out["rim_locator"] = _locator(r, "RIMLocator")
        out["platform_cert_locator"] = _locator(r, "PlatformCertLocator")
    if r.left:
        out["trailing_data"] = r.rest().hex()
    return out


def _legacy_spec_id(data: bytes) -> Json:
    """TCG_EfiSpecIdEventStruct (``Spec ID Event00``/``02``) of a TCG 1.2 style log."""
    r = _Reader(data)
    out: Json = {"signature": r.take(16).decode("ascii", errors="replace").rstrip("\x00")}
    out["platform_class"] = r.u32("platformClass")
    out["spec_version_minor"] = r.u8("specVersionMinor")
    out["spec_version_major"] = r.u8("specVersionMajor")
    out["spec_errata"] = r.u8("specErrata")
    out["uintn_size"] = r.u8("uintnSize")
    size = r.u8("vendorInfoSize")
    out["vendor_info"] = r.take(size, "vendorInfo").hex()
    return out


def decode_no_action(data: bytes) -> Json:
    """EV_NO_ACTION: informational records told apart by their 16-byte signature."""
    sig = data[:16]
    if sig == SPEC_ID_EVENT03:
        from cima.eventlog.tcg import SpecIdEvent

        return SpecIdEvent.from_bytes(data).to_dict()
    if sig in (b"Spec ID Event00\x00", b"Spec ID Event02\x00"):
        return _legacy_spec_id(data)
    if sig == STARTUP_LOCALITY:
        if len(data) != 17:
            raise ParseError(f"StartupLocality event is {len(data)} bytes, expected 17")
        return {"signature": "StartupLocality", "startup_locality": data[16]}
    if sig in (b"SP800-155 Event\x00", b"SP800-155 Event3"):
        return decode_sp800_155(data)
    if sig in (b"NvIndexInstance\x00", b"NvIndexDynamic\x00\x00"):
        return {"signature": sig.rstrip(b"\x00").decode(), "data": data[16:].hex()}
    return decode_string(data)


def decode_hcrtm(data: bytes) -> Json:
    """EV_EFI_HCRTM_EVENT: the string "HCRTM"."""
    return decode_string(data)


_DECODERS: dict[int, Callable[[bytes], Json]] = {
    EventType.EV_POST_CODE: decode_post_code,
    EventType.EV_POST_CODE2: decode_post_code,
    EventType.EV_NO_ACTION: decode_no_action,
    EventType.EV_SEPARATOR: decode_separator,
    EventType.EV_ACTION: decode_string,
    EventType.EV_EVENT_TAG: decode_event_tag,
    EventType.EV_S_CRTM_CONTENTS: decode_post_code,
    EventType.EV_S_CRTM_VERSION: decode_string,
    EventType.EV_IPL: decode_ipl,
    EventType.EV_OMIT_BOOT_DEVICE_EVENTS: decode_string,
    EventType.EV_EFI_BOOT_SERVICES_APPLICATION: decode_image_load,
    EventType.EV_EFI_BOOT_SERVICES_DRIVER: decode_image_load,
    EventType.EV_EFI_RUNTIME_SERVICES_DRIVER: decode_image_load,
    EventType.EV_EFI_GPT_EVENT: decode_gpt,
    EventType.EV_EFI_GPT_EVENT2: decode_gpt,
    EventType.EV_EFI_ACTION: decode_string,
    EventType.EV_EFI_PLATFORM_FIRMWARE_BLOB: decode_blob,
    EventType.EV_EFI_PLATFORM_FIRMWARE_BLOB2: decode_blob2,
    EventType.EV_EFI_HANDOFF_TABLES: decode_handoff_tables,
    EventType.EV_EFI_HANDOFF_TABLES2: decode_handoff_tables2,
    EventType.EV_EFI_HCRTM_EVENT: decode_hcrtm,
}
for _variable_type in (
    EventType.EV_EFI_VARIABLE_DRIVER_CONFIG,
    EventType.EV_EFI_VARIABLE_BOOT,
    EventType.EV_EFI_VARIABLE_BOOT2,
    EventType.EV_EFI_VARIABLE_AUTHORITY,
):
    _DECODERS[_variable_type] = functools.partial(decode_variable, int(_variable_type))


def decode(event_type: int, data: bytes) -> Json:
    """Decode the event data of a record of type ``event_type``; JSON-able, never raises.

    Event types without a decoder give ``{"string": ...}`` when the data is text
    and ``{"data": "<hex>"}`` otherwise. Data that does not match its type's
    structure gives ``{"error": "<reason>", "data": "<hex>"}``.
    """
    data = bytes(data)
    decoder = _DECODERS.get(event_type, decode_string)
    try:
        return decoder(data)
    except ParseError as e:
        return {"error": str(e), "data": data.hex()}
    except Exception as e:  # a decoder of display data must not fail its caller
        return {"error": f"{type(e).__name__}: {e}", "data": data.hex()}


__all__ = [
    "EFI_GLOBAL_VARIABLE",
    "EFI_IMAGE_SECURITY_DATABASE",
    "SHIM_LOCK",
    "SIGNATURE_TYPES",
    "TAGGED_EVENT_IDS",
    "VARIABLE_VENDORS",
    "EventType",
    "certificate_summary",
    "decode",
    "decode_variable",
    "device_path_to_text",
    "device_paths",
    "event_type_name",
    "guid_text",
    "load_option",
    "signature_lists",
    "text_of",
]
