"""Linux IMA runtime measurement lists: the binary and ascii lists, templates, replay.

The kernel's Integrity Measurement Architecture appends one entry per
measurement to a list it exports in securityfs
(``/sys/kernel/security/ima/{binary,ascii}_runtime_measurements``) and extends
each entry's template hash into a PCR (``CONFIG_IMA_MEASURE_PCR_IDX``, 10 by
default). The layouts below are those of Linux ``security/integrity/ima``:
``ima_fs.c`` (``ima_measurements_show``, ``ima_ascii_measurements_show``),
``ima_template.c`` (the built-in templates), ``ima_template_lib.c`` (field
encodings) and ``ima_crypto.c`` (``ima_calc_field_array_hash``).

Binary list, one record per entry, little-endian (``ima_canonical_fmt``, or a
little-endian host)::

    u32   PCR index
    u8[20] template hash (SHA-1, TPM_DIGEST_SIZE)
    u32   template name length, then the name (not NUL-terminated)
    u32   template data length, then the template data   (every template but "ima")

The template data is the concatenation of the template's fields, each as a
``u32`` length and its bytes. The original ``ima`` template (fields ``d|n``) has
no template data length: its file digest follows the name directly (20 bytes)
and its file name is written as a ``u32`` length and the name without its NUL.
For that template :attr:`IMAEntry.template_data` holds exactly those bytes.
(The kernel also allowed MD5 for ``ima``, a 16-byte digest the binary list gives
no length for: only SHA-1 ``ima`` entries are read.)

Ascii list, one line per entry: ``PCR TEMPLATE-HASH TEMPLATE-NAME FIELD...``,
the PCR printed with ``%2d`` (so ``" 2"`` for PCR 2), each field after one
space, as its show function prints it: ``d-ng`` and ``d-modsig`` as
``ALGORITHM:HEX``, ``d-ngv2`` as ``TYPE:ALGORITHM:HEX``, ``d`` and the
signature and buffer fields as hex, strings (``n-ng``, ``dep``, ``cgn``,
``cg-path``) as they are, the inode fields in decimal. An empty field prints as
nothing after its space. The template data is rebuilt from the fields, so an
ascii list can be checked and replayed into any bank as well as a binary one.

Templates decoded (``ima_template.c`` and the ``ima-dep-cgn`` / ``ima-cgpath``
patches for container attestation):

===============  ===========================================================================
``ima``          ``d|n``
``ima-ng``       ``d-ng|n-ng``
``ima-ngv2``     ``d-ngv2|n-ng``
``ima-sig``      ``d-ng|n-ng|sig``
``ima-sigv2``    ``d-ngv2|n-ng|sig``
``ima-buf``      ``d-ng|n-ng|buf``
``ima-modsig``   ``d-ng|n-ng|sig|d-modsig|modsig``
``evm-sig``      ``d-ng|n-ng|evmsig|xattrnames|xattrlengths|xattrvalues|iuid|igid|imode``
``ima-dep-cgn``  ``dep|cgn|d-ng|n-ng``
``ima-cgpath``   ``dep|cg-path|d-ng|n-ng``
===============  ===========================================================================

A template named by its format string (``d-ng|n-ng|sig``, as the kernel names
a custom ``ima_template_fmt``) is decoded from that string. Any other template
is kept as it is: in a binary list its template data is known, so it replays
into every bank and its template hash is checked; in an ascii list its fields
cannot be turned back into template data (their encodings are unknown), so it
replays only into the bank of the logged template hash.

Template hash (``ima_calc_field_array_hash``): the hash of the template data,
i.e. of every field as ``u32`` length + bytes. For the ``ima`` template it is
the hash of the 20-byte digest followed by the file name zero-padded to 256
bytes (``IMA_EVENT_NAME_LEN_MAX + 1``), without lengths. The list carries the
SHA-1 hash; since Linux 5.8 every other PCR bank is extended with the template
data hashed by that bank's algorithm (the *per-bank* form, the default here).
Older kernels extended every bank with the SHA-1 hash zero-padded to the bank's
size: ``padded=True`` or :func:`padded` replays that form.

Violations (a file measured while open for writing, ``ima_add_violation``) are
logged with an all-zero template hash and extend all-ones (``0xff`` times the
digest size) into every bank.

Ascii ambiguities, resolved as follows:

- The kernel writes file names and other strings with their spaces replaced
  by ``_`` (``ima_write_template_field_data``), but lists from other producers
  or old kernels may keep them. Fields are split on single spaces; the
  file-name field (``n-ng`` or ``n``, else the last string field) takes
  whatever the fields on either side leave. Hex, digest and number fields
  never contain spaces.
- An empty field prints as nothing after its space, so an ``ima-sig`` line
  without a signature ends with a space. A tool that strips trailing spaces
  makes ``NAME`` and ``NAME SIGNATURE`` look alike when the name has spaces.
  The line is read as the kernel writes it; if that reading does not decode or
  does not hash to the logged template hash, the readings with one, two, ...
  trailing empty fields stripped are tried, and one is taken only if it hashes
  to the logged template hash. Otherwise the kernel's reading stands (and the
  template hash check reports the entry), or its decoding error is raised.
- A string field gets its terminating NUL back (the kernel stores ``n-ng`` and
  the other strings with it), so the template data, and with it the template
  hash, is rebuilt exactly. The kernel prints strings with ``%s``: a line
  holding a NUL byte is refused. Lines end at ``\n`` only.
- The template hash algorithm of an ascii list is taken from its length (40
  hex digits: SHA-1; 64: SHA-256; 96: SHA-384, as a TDX guest's IMA logs for an
  RTMR; 128: SHA-512). All lines of one list must agree.
- A violation's digest field holds 20 zero bytes (``IMA_DIGEST_SIZE``) whatever
  its algorithm; any other digest must have its algorithm's size.

:func:`replay_binary` and :func:`replay_ascii` are the streaming fast paths: they
read the list in chunks, never hold it whole, create no object per entry, and
check every template hash on the way.
"""

from __future__ import annotations

import binascii
import hmac
import io
import itertools
import operator
import struct
import sys
from array import array
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, BinaryIO, Final, Generic, TypeVar, overload

from cima.digests import HashAlgorithm, by_name
from cima.errors import (
    AlgorithmError,
    ParseError,
    ReplayError,
    TruncatedError,
    UnsupportedFormatError,
)
from cima.registers import PCR_COUNT, RegisterBank, pcr_name

__all__ = [
    "ASCII",
    "BINARY",
    "MAX_TEMPLATE_DATA_LEN",
    "TEMPLATES",
    "IMAAppended",
    "IMAEntries",
    "IMAEntry",
    "IMAFields",
    "IMALog",
    "IMAReplay",
    "IMAStore",
    "PaddedIMAEntry",
    "TemplateField",
    "TemplateHashMismatchError",
    "iter_ascii",
    "iter_binary",
    "looks_like_ascii",
    "looks_like_binary",
    "padded",
    "parse_ascii",
    "parse_binary",
    "replay_ascii",
    "replay_binary",
    "template_fields",
]

BINARY: Final = "ima-binary"
ASCII: Final = "ima-ascii"

#: Built-in templates and their fields (``ima_template.c``; ``ima-dep-cgn`` and
#: ``ima-cgpath`` from the container-attestation patches).
TEMPLATES: Final[Mapping[str, tuple[str, ...]]] = {
    "ima": ("d", "n"),
    "ima-ng": ("d-ng", "n-ng"),
    "ima-ngv2": ("d-ngv2", "n-ng"),
    "ima-sig": ("d-ng", "n-ng", "sig"),
    "ima-sigv2": ("d-ngv2", "n-ng", "sig"),
    "ima-buf": ("d-ng", "n-ng", "buf"),
    "ima-modsig": ("d-ng", "n-ng", "sig", "d-modsig", "modsig"),
    "evm-sig": (
        "d-ng",
        "n-ng",
        "evmsig",
        "xattrnames",
        "xattrlengths",
        "xattrvalues",
        "iuid",
        "igid",
        "imode",
    ),
    "ima-dep-cgn": ("dep", "cgn", "d-ng", "n-ng"),
    "ima-cgpath": ("dep", "cg-path", "d-ng", "n-ng"),
}

# How each field is encoded and shown (``ima_template.c`` supported_fields).
_DIGEST = "digest"  # raw digest, shown as hex                       (d)
_DIGEST_ALGO = "digest-algo"  # "ALGO:\0" + digest, shown ALGO:HEX    (d-ng, d-modsig)
_DIGEST_TYPE_ALGO = "digest-type-algo"  # "TYPE:ALGO:\0" + digest     (d-ngv2)
_STRING = "string"  # NUL-terminated string, shown as is               (n, n-ng, dep, ...)
_RAW_STRING = "raw-string"  # string without NUL, shown as is          (xattrnames)
_HEX = "hex"  # bytes shown as hex                                    (sig, buf, ...)
_UINT = "uint"  # little-endian unsigned number, shown in decimal      (iuid, igid, imode)

_FIELD_KINDS: Final[Mapping[str, str]] = {
    "d": _DIGEST,
    "n": _STRING,
    "d-ng": _DIGEST_ALGO,
    "d-ngv2": _DIGEST_TYPE_ALGO,
    "n-ng": _STRING,
    "sig": _HEX,
    "buf": _HEX,
    "d-modsig": _DIGEST_ALGO,
    "modsig": _HEX,
    "evmsig": _HEX,
    "iuid": _UINT,
    "igid": _UINT,
    "imode": _UINT,
    "xattrnames": _RAW_STRING,
    "xattrlengths": _HEX,
    "xattrvalues": _HEX,
    "cgn": _STRING,
    "dep": _STRING,
    "cg-path": _STRING,
}
_UINT_WIDTH: Final[Mapping[str, int]] = {"iuid": 4, "igid": 4, "imode": 2}
_STRING_KINDS = frozenset({_STRING, _RAW_STRING})
_NAME_FIELDS = ("n-ng", "n")

#: Digest sizes of the kernel's hash algorithm names (``hash_algo_name``).
_KERNEL_HASH_SIZES: Final[Mapping[bytes, int]] = {
    b"md4": 16,
    b"md5": 16,
    b"sha1": 20,
    b"rmd160": 20,
    b"rmd256": 32,
    b"rmd320": 40,
    b"sha224": 28,
    b"sha256": 32,
    b"sha384": 48,
    b"sha512": 64,
    b"wp256": 32,
    b"wp384": 48,
    b"wp512": 64,
    b"tgr128": 16,
    b"tgr160": 20,
    b"tgr192": 24,
    b"sm3": 32,
    b"streebog256": 32,
    b"streebog512": 64,
    b"sha3-256": 32,
    b"sha3-384": 48,
    b"sha3-512": 64,
}

#: Template hash algorithm by digest size (binary lists are SHA-1; ascii lists say by length).
_TEMPLATE_HASH_BY_SIZE: Final[Mapping[int, str]] = {
    20: "sha1",
    32: "sha256",
    48: "sha384",
    64: "sha512",
}

#: ``IMA_EVENT_NAME_LEN_MAX``: the ``ima`` template's file name limit; its hash pads to this + 1.
IMA_EVENT_NAME_LEN_MAX: Final = 255
#: Longest template name accepted (a format string of 15 fields of 16 characters fits).
MAX_TEMPLATE_NAME_LEN: Final = 255
#: Largest template data accepted in one entry. The kernel sets no explicit limit; its
#: largest entries (``ima-buf`` buffers, appended signatures) are a few kilobytes. The
#: bound keeps memory finite on a hostile list.
MAX_TEMPLATE_DATA_LEN: Final = 16 * 1024 * 1024
#: Longest ascii line accepted (hex doubles a field's size).
MAX_LINE_LEN: Final = 2 * MAX_TEMPLATE_DATA_LEN + 4096
#: How many mismatching entry indices a streaming replay keeps (it counts them all).
MAX_REPORTED_MISMATCHES: Final = 1000
#: Bytes read from a stream at a time.
CHUNK_SIZE: Final = 1 << 20

_U32 = struct.Struct("<I")
_IMA_NAME = b"ima"
#: An n-ng field's length (the name and its NUL) by name length, for the ascii fast path.
_NAME_LENS = tuple(_U32.pack(i + 1) for i in range(4096))


class TemplateHashMismatchError(ReplayError):
    """Entries whose logged template hash differs from the hash of their template data."""

    def __init__(self, message: str, indices: Sequence[int]) -> None:
        super().__init__(message)
        self.indices = tuple(indices)


def template_fields(name: str) -> tuple[str, ...] | None:
    """The field identifiers of template ``name``, or None if the template is unknown.

    A built-in name (``ima-ng``) or a format string of known fields (``d-ng|n-ng|sig``,
    the name the kernel gives a custom template).
    """
    fields = TEMPLATES.get(name)
    if fields is not None:
        return fields
    ids = tuple(name.split("|"))
    if all(i in _FIELD_KINDS for i in ids):
        return ids
    return None


# -- small helpers ---------------------------------------------------------------


def _entry_error(entry: IMAEntry, message: str, kind: type[ParseError] = ParseError) -> ParseError:
    return kind(f"IMA entry {entry.index}: {message}", offset=entry.offset, line=entry.line)


def _unhex(text: bytes, what: str, *, line: int | None, source: str | None) -> bytes:
    try:
        return binascii.unhexlify(text)
    except (binascii.Error, ValueError):
        shown = text[:40].decode("ascii", "backslashreplace")
        raise ParseError(f"{what}: not hex: {shown!r}", line=line, source=source) from None


def _is_zero(b: bytes) -> bool:
    return not b.strip(b"\x00")


def _text(b: bytes | bytearray) -> str:
    """Bytes from the list as text: UTF-8, anything else as backslash escapes."""
    return b.decode("utf-8", "backslashreplace")


def _valid_template_name(name: bytes | bytearray) -> bool:
    return bool(name) and all(0x21 <= c <= 0x7E for c in name)


def _split_framed(data: bytes) -> list[bytes] | None:
    """Split template data into its length-prefixed fields; None if they do not fill it exactly."""
    out: list[bytes] = []
    p = 0
    n = len(data)
    while p < n:
        if n - p < 4:
            return None
        (ln,) = _U32.unpack_from(data, p)
        p += 4
        if ln > n - p:
            return None
        out.append(data[p : p + ln])
        p += ln
    return out


def _framing_error(data: bytes | bytearray, count: int) -> tuple[int, str] | None:
    """Where and why ``data`` is not ``count`` length-prefixed fields filling it exactly."""
    p = 0
    n = len(data)
    for i in range(count):
        if n - p < 4:
            return p, f"template data ends before field {i + 1} of {count}"
        (ln,) = _U32.unpack_from(data, p)
        if ln > n - p - 4:
            return p, f"field {i + 1} length {ln} exceeds the {n - p - 4} bytes left"
        p += 4 + ln
    if p != n:
        return p, f"{n - p} bytes after the template's {count} fields"
    return None


def _ima_hash_input(digest: bytes, name: bytes) -> bytes:
    # ima_calc_field_array_hash_tfm: the "ima" template hashes its digest, then its name
    # copied into a zeroed buffer of IMA_EVENT_NAME_LEN_MAX + 1 bytes, without lengths.
    return digest + name + bytes(IMA_EVENT_NAME_LEN_MAX + 1 - len(name))


# -- template fields -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TemplateField:
    """One field of an entry's template data, as the kernel stores it.

    ``id`` is the kernel's field identifier (``d-ng``, ``n-ng``, ``sig`` ...), or
    ``""`` in an unknown template.
    """

    id: str
    data: bytes

    @property
    def kind(self) -> str | None:
        return _FIELD_KINDS.get(self.id)

    def to_ascii(self) -> bytes:
        """The field as the ascii list shows it (``ima_show_template_*``)."""
        return _field_to_ascii(self.id, self.data)

    def to_text(self) -> str:
        """:meth:`to_ascii` as text, non-UTF-8 bytes as backslash escapes."""
        return _text(self.to_ascii())

    def digest_parts(self) -> tuple[str | None, str | None, bytes] | None:
        """For a digest field: (digest type, algorithm, digest); None when empty or not one."""
        if not self.data:
            return None
        kind = self.kind
        if kind == _DIGEST:  # the "ima" template's digest (SHA-1)
            return None, "sha1" if len(self.data) == 20 else None, self.data
        if kind in (_DIGEST_ALGO, _DIGEST_TYPE_ALGO):
            prefix, digest = _split_digest_field(self.data)
            label = prefix.decode("ascii", "backslashreplace")
            if kind == _DIGEST_TYPE_ALGO:
                dtype, _, algo = label.partition(":")
                return dtype, algo, digest
            return None, label, digest
        return None


def _split_digest_field(data: bytes) -> tuple[bytes, bytes]:
    """``PREFIX:\\0DIGEST`` -> (PREFIX, DIGEST); raises ValueError if not of that form."""
    nul = data.find(b"\x00")
    if nul < 1 or data[nul - 1] != 0x3A:  # ':'
        raise ValueError("digest field is not 'ALGORITHM:' NUL DIGEST")
    return data[: nul - 1], data[nul + 1 :]


def _field_to_ascii(field_id: str, data: bytes) -> bytes:
    if not data:
        return b""
    kind = _FIELD_KINDS.get(field_id)
    if kind in (_DIGEST_ALGO, _DIGEST_TYPE_ALGO):
        prefix, digest = _split_digest_field(data)
        return prefix + b":" + binascii.hexlify(digest)
    if kind in _STRING_KINDS:
        nul = data.find(b"\x00")
        return data if nul < 0 else data[:nul]
    if kind == _UINT:
        if len(data) in (1, 2, 4, 8):
            return str(int.from_bytes(data, "little")).encode()
        return b""
    # d, hex fields, and unknown ones
    return binascii.hexlify(data)


def _check_digest_field(field_id: str, data: bytes) -> str | None:
    """Why a digest field's bytes are malformed, or None."""
    kind = _FIELD_KINDS.get(field_id)
    if not data or kind not in (_DIGEST_ALGO, _DIGEST_TYPE_ALGO):
        return None
    try:
        prefix, _ = _split_digest_field(data)
    except ValueError as e:
        return f"field {field_id}: {e}"
    colons = prefix.count(b":")
    if kind == _DIGEST_ALGO and colons != 0:
        return f"field {field_id}: prefix {_text(prefix)!r} is not one algorithm name"
    if kind == _DIGEST_TYPE_ALGO and colons != 1:
        return f"field {field_id}: prefix {_text(prefix)!r} is not TYPE:ALGORITHM"
    return None


@dataclass(frozen=True, slots=True)
class IMAFields:
    """The decoded fields of one entry.

    ``known`` is False for a template whose field list cannot be named: its
    ``fields`` are then the length-prefixed parts of the template data with
    ``id`` ``""`` (binary list), or empty with ``text`` holding the ascii
    fields as printed (ascii list).
    """

    template_name: str
    fields: tuple[TemplateField, ...]
    known: bool
    text: bytes | None = None

    def get(self, field_id: str) -> TemplateField | None:
        """The first field with identifier ``field_id``."""
        for f in self.fields:
            if f.id == field_id:
                return f
        return None

    def _data(self, field_id: str) -> bytes | None:
        f = self.get(field_id)
        return f.data if f is not None and f.data else None

    def _string(self, *ids: str) -> bytes | None:
        for i in ids:
            f = self.get(i)
            if f is not None:
                nul = f.data.find(b"\x00")
                return f.data if nul < 0 else f.data[:nul]
        return None

    def _digest(self, *ids: str) -> tuple[str | None, str | None, bytes] | None:
        for i in ids:
            f = self.get(i)
            if f is not None:
                return f.digest_parts()
        return None

    @property
    def digest_type(self) -> str | None:
        """``ima`` or ``verity`` for a ``d-ngv2`` digest."""
        d = self._digest("d-ngv2")
        return d[0] if d else None

    @property
    def digest_algorithm(self) -> str | None:
        """The file digest's algorithm, as the kernel names it (``sha256``)."""
        d = self._digest("d-ng", "d-ngv2", "d")
        return d[1] if d else None

    @property
    def file_digest(self) -> bytes | None:
        d = self._digest("d-ng", "d-ngv2", "d")
        return d[2] if d else None

    @property
    def file_name(self) -> bytes | None:
        """The file name (or the buffer's name for ``ima-buf``), as bytes."""
        return self._string(*_NAME_FIELDS)

    @property
    def signature(self) -> bytes | None:
        """The ``security.ima`` signature (``sig``), when the entry has one."""
        return self._data("sig")

    @property
    def buffer(self) -> bytes | None:
        """The measured buffer of an ``ima-buf`` entry."""
        return self._data("buf")

    @property
    def modsig_digest_algorithm(self) -> str | None:
        d = self._digest("d-modsig")
        return d[1] if d else None

    @property
    def modsig_digest(self) -> bytes | None:
        """The digest the appended signature covers (``d-modsig``)."""
        d = self._digest("d-modsig")
        return d[2] if d else None

    @property
    def modsig(self) -> bytes | None:
        """The appended (module-style) signature."""
        return self._data("modsig")

    @property
    def dependencies(self) -> tuple[bytes, ...] | None:
        """``dep``: executables of the measuring task and its ancestors, nearest first."""
        dep = self._string("dep")
        return None if dep is None else tuple(dep.split(b":"))

    @property
    def cgroup_name(self) -> bytes | None:
        """``cgn``: the measuring task's cgroup name (a container id under a runtime)."""
        return self._string("cgn")

    @property
    def cgroup_path(self) -> bytes | None:
        """``cg-path``: the measuring task's full cgroup path (pod and container ids)."""
        return self._string("cg-path")

    def to_list(self) -> list[dict[str, str]]:
        if not self.known and self.text is not None:
            return [{"id": "", "value": _text(t)} for t in self.text.split(b" ")]
        return [{"id": f.id, "value": f.to_text()} for f in self.fields]


# -- entries -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IMAEntry:
    """One entry of an IMA measurement list. Satisfies :class:`~cima.eventlog.event.Measurement`.

    ``offset`` is the entry's byte offset in a binary list and ``line`` its line
    number (from 1) in an ascii list; the other is None. ``template_data`` is
    what the binary list carries after the template name (see the module
    docstring for the ``ima`` template); for an unknown template read from an
    ascii list it cannot be rebuilt, is empty, and ``ascii_fields`` holds the
    fields as printed.
    """

    index: int
    pcr: int
    template_hash: bytes
    template_name: str
    template_data: bytes
    offset: int | None = None
    line: int | None = None
    ascii_fields: bytes | None = None
    _decoded: IMAFields | None = field(
        default=None, init=False, repr=False, compare=False, hash=False
    )

    # -- Measurement protocol ---------------------------------------------------
    @property
    def register(self) -> str:
        return pcr_name(self.pcr)

    @property
    def extends(self) -> bool:
        return True

    @property
    def startup_locality(self) -> int | None:
        return None

    def algorithms(self) -> tuple[str, ...]:
        """The bank of the logged template hash (``("sha1",)`` for a kernel's list)."""
        return (self.template_hash_algorithm,)

    def replay_digest(self, algorithm: str, *, padded: bool = False) -> bytes | None:
        """What this entry extends into bank ``algorithm``.

        The logged template hash for its own bank; for another bank the template
        data hashed with that bank's algorithm (Linux >= 5.8), or with
        ``padded=True`` the logged hash zero-padded to the bank's size (older
        kernels). A violation extends all-ones. Raises :class:`ReplayError` when
        the digest cannot be computed (an unknown template read from an ascii
        list, or a padded bank smaller than the logged hash).
        """
        alg = by_name(algorithm)
        if self.is_violation:
            return b"\xff" * alg.digest_size
        if alg.name == self.template_hash_algorithm:
            return self.template_hash
        if padded:
            if alg.digest_size < len(self.template_hash):
                raise ReplayError(
                    f"IMA entry {self.index}: a {len(self.template_hash)}-byte template hash "
                    f"cannot be padded to the {alg.digest_size}-byte {alg.name} bank"
                )
            return self.template_hash + bytes(alg.digest_size - len(self.template_hash))
        return alg.hash(self._require_hash_input(alg.name))

    # -- properties ---------------------------------------------------------------
    @property
    def template_hash_algorithm(self) -> str:
        return _TEMPLATE_HASH_BY_SIZE.get(len(self.template_hash), "sha1")

    @property
    def is_violation(self) -> bool:
        """An all-zero template hash: the kernel logged a measurement violation."""
        return _is_zero(self.template_hash)

    @property
    def has_template_data(self) -> bool:
        """False for an unknown template read from an ascii list."""
        return self.ascii_fields is None

    @property
    def fields(self) -> IMAFields:
        """The decoded template fields (decoded on first use)."""
        decoded = self._decoded
        if decoded is None:
            # Decoded on first use and kept: most entries of a long list are never asked.
            decoded = self._decode_fields()
            object.__setattr__(self, "_decoded", decoded)
        return decoded

    @property
    def file_name(self) -> str | None:
        """The file name as text; bytes that are not UTF-8 survive as surrogate escapes.

        ``os.fsencode(entry.file_name)`` gives back the bytes the kernel logged.
        """
        name = self.fields.file_name
        return None if name is None else name.decode("utf-8", "surrogateescape")

    @property
    def file_digest(self) -> bytes | None:
        return self.fields.file_digest

    @property
    def digest_algorithm(self) -> str | None:
        return self.fields.digest_algorithm

    # -- hashing ------------------------------------------------------------------
    def hash_input(self) -> bytes | None:
        """The bytes the template hash covers; None if the template data is unknown."""
        if self.ascii_fields is not None:
            return None
        if self.template_name == "ima":
            f = self.fields
            return _ima_hash_input(f.fields[0].data, f.fields[1].data)
        return self.template_data

    def _require_hash_input(self, bank: str) -> bytes:
        data = self.hash_input()
        if data is None:
            raise ReplayError(
                f"IMA entry {self.index}: template {self.template_name!r} is unknown and was "
                f"read from an ascii list, so its {bank} template hash cannot be computed"
            )
        return data

    def computed_template_hash(self, algorithm: str | None = None) -> bytes | None:
        """The template hash recomputed from the template data (the logged algorithm by default).

        None when the template data is unknown (an unknown template from an ascii list).
        """
        data = self.hash_input()
        if data is None:
            return None
        return by_name(algorithm or self.template_hash_algorithm).hash(data)

    def template_hash_matches(self) -> bool | None:
        """Whether the logged template hash is the hash of the template data.

        None for a violation (nothing to check) or when the template data is unknown.
        """
        if self.is_violation:
            return None
        computed = self.computed_template_hash()
        if computed is None:
            return None
        return hmac.compare_digest(computed, self.template_hash)

    # -- encoding -------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """This entry as a binary list record (little-endian)."""
        if self.ascii_fields is not None:
            raise _entry_error(
                self,
                f"template {self.template_name!r} read from an ascii list has no known "
                "template data, so it has no binary form",
                UnsupportedFormatError,
            )
        name = self.template_name.encode("ascii")
        head = _U32.pack(self.pcr) + self.template_hash + _U32.pack(len(name)) + name
        if self.template_name == "ima":
            return head + self.template_data
        return head + _U32.pack(len(self.template_data)) + self.template_data

    def to_ascii(self) -> bytes:
        """This entry as an ascii list line, without the newline."""
        head = b"%2d %s %s" % (
            self.pcr,
            binascii.hexlify(self.template_hash),
            self.template_name.encode("ascii"),
        )
        if self.ascii_fields is not None:
            return head + b" " + self.ascii_fields
        parts = [head]
        f = self.fields
        if not f.known:
            raise _entry_error(
                self,
                f"template {self.template_name!r} is unknown, so its fields have no ascii form",
                UnsupportedFormatError,
            )
        try:
            parts.extend(t.to_ascii() for t in f.fields)
        except ValueError as e:
            raise _entry_error(self, str(e)) from None
        return b" ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index}
        if self.offset is not None:
            out["offset"] = self.offset
        if self.line is not None:
            out["line"] = self.line
        out["register"] = self.register
        out["pcr"] = self.pcr
        out["template_name"] = self.template_name
        out["template_hash_algorithm"] = self.template_hash_algorithm
        out["template_hash"] = self.template_hash.hex()
        out["violation"] = self.is_violation
        out["template_data"] = self.template_data.hex() if self.has_template_data else None
        f = self.fields
        out["fields"] = f.to_list()
        if f.file_name is not None:
            out["file_name"] = _text(f.file_name)
        if f.file_digest is not None:
            out["file_digest"] = f.file_digest.hex()
            out["digest_algorithm"] = f.digest_algorithm
        return out

    # -- decoding -------------------------------------------------------------------
    def _decode_fields(self) -> IMAFields:
        name = self.template_name
        if self.ascii_fields is not None:
            return IMAFields(name, (), False, self.ascii_fields)
        data = self.template_data
        if name == "ima":
            digest = data[:20]
            nlen = _U32.unpack_from(data, 20)[0] if len(data) >= 24 else 0
            return IMAFields(
                name, (TemplateField("d", digest), TemplateField("n", data[24 : 24 + nlen])), True
            )
        ids = template_fields(name)
        parts = _split_framed(data)
        if ids is None:
            return IMAFields(name, tuple(TemplateField("", p) for p in (parts or ())), False)
        if parts is None or len(parts) != len(ids):
            raise _entry_error(
                self, f"template data does not hold the {len(ids)} fields of {name!r}"
            )
        fields = tuple(TemplateField(i, p) for i, p in zip(ids, parts, strict=True))
        for f in fields:
            why = _check_digest_field(f.id, f.data)
            if why is not None:
                raise _entry_error(self, why)
        return IMAFields(name, fields, True)


@dataclass(frozen=True, slots=True)
class PaddedIMAEntry:
    """An :class:`IMAEntry` replayed in the older kernels' form: the logged hash zero-padded."""

    entry: IMAEntry

    @property
    def register(self) -> str:
        return self.entry.register

    @property
    def extends(self) -> bool:
        return True

    @property
    def startup_locality(self) -> int | None:
        return None

    def algorithms(self) -> tuple[str, ...]:
        return self.entry.algorithms()

    def replay_digest(self, algorithm: str) -> bytes | None:
        return self.entry.replay_digest(algorithm, padded=True)


def padded(entries: Iterable[IMAEntry]) -> Iterator[PaddedIMAEntry]:
    """Wrap entries so that replay extends other banks with the zero-padded SHA-1 hash.

    Kernels before 5.8 extended every PCR bank with the SHA-1 template hash
    padded with zeros to the bank's digest size.
    """
    for e in entries:
        yield PaddedIMAEntry(e)


# -- the list ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IMALog:
    """A whole IMA measurement list."""

    entries: tuple[IMAEntry, ...]
    format: str
    source: str | None = None

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[IMAEntry]:
        return iter(self.entries)

    def template_names(self) -> tuple[str, ...]:
        """The template names in the list, in order of first appearance."""
        return tuple(dict.fromkeys(e.template_name for e in self.entries))

    def violations(self) -> tuple[IMAEntry, ...]:
        return tuple(e for e in self.entries if e.is_violation)

    def template_hash_mismatches(self) -> tuple[IMAEntry, ...]:
        """Entries whose logged template hash is not the hash of their template data.

        Violations are not checked (their hash is zero by definition), nor are
        unknown templates read from an ascii list (see :meth:`unverified`).
        """
        return tuple(e for e in self.entries if e.template_hash_matches() is False)

    def unverified(self) -> tuple[IMAEntry, ...]:
        """Entries whose template hash cannot be recomputed (unknown template, ascii list)."""
        return tuple(e for e in self.entries if not e.has_template_data)

    def verify_template_hashes(self) -> None:
        """Raise :class:`TemplateHashMismatchError` naming every mismatched entry."""
        bad = self.template_hash_mismatches()
        if bad:
            shown = ", ".join(str(e.index) for e in bad[:20])
            more = f" and {len(bad) - 20} more" if len(bad) > 20 else ""
            raise TemplateHashMismatchError(
                f"{len(bad)} IMA entries have a template hash that is not the hash of "
                f"their template data: {shown}{more}",
                [e.index for e in bad],
            )

    def replay(
        self,
        algorithms: Iterable[str] = ("sha1",),
        *,
        padded: bool = False,
        bank: RegisterBank | None = None,
    ) -> RegisterBank:
        """Replay every entry into ``bank`` (a new one by default) and return it."""
        out = RegisterBank() if bank is None else bank
        algs = [by_name(a).name for a in algorithms]
        for e in self.entries:
            for alg in algs:
                digest = e.replay_digest(alg, padded=padded)
                if digest is not None:
                    out.extend(e.register, alg, digest)
        return out

    def to_bytes(self) -> bytes:
        """The list as a binary list."""
        return b"".join(e.to_bytes() for e in self.entries)

    def to_ascii(self) -> bytes:
        """The list as an ascii list."""
        return b"".join(e.to_ascii() + b"\n" for e in self.entries)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "source": self.source,
            "entries": len(self.entries),
            "template_names": list(self.template_names()),
            "violations": len(self.violations()),
            "template_hash_mismatches": [e.index for e in self.template_hash_mismatches()],
            "events": [e.to_dict() for e in self.entries],
        }


# -- binary list --------------------------------------------------------------------


#: The buffer a record is decoded from (its fields are slices of the same type).
_Buf = TypeVar("_Buf", bytes, bytearray)


@dataclass(frozen=True, slots=True)
class _Record(Generic[_Buf]):
    pcr: int
    template_hash: _Buf
    name: _Buf
    data: _Buf
    end: int


def _parse_record(
    buf: _Buf,
    p: int,
    n: int,
    *,
    base: int,
    final: bool,
    th_size: int,
    source: str | None,
) -> _Record[_Buf] | None:
    """Decode the record at ``buf[p:n]``.

    Returns None if it is incomplete and more bytes may follow (``final`` False);
    with ``final`` a short record is a :class:`TruncatedError` naming the field.
    ``base`` is the list offset of ``buf[0]``.
    """

    def short(what: str, at: int, need: int) -> None:
        if final:
            raise TruncatedError(
                f"IMA record at offset {base + p}: {what} needs {need} bytes, "
                f"{max(n - at, 0)} left",
                offset=base + at,
                source=source,
            )

    def bad(what: str, at: int) -> ParseError:
        return ParseError(
            f"IMA record at offset {base + p}: {what}", offset=base + at, source=source
        )

    if n - p < 4:
        short("PCR index", p, 4)
        return None
    (pcr,) = _U32.unpack_from(buf, p)
    if pcr >= PCR_COUNT:
        raise bad(f"PCR index {pcr} out of range 0..{PCR_COUNT - 1}", p)
    q = p + 4
    if n - q < th_size:
        short("template hash", q, th_size)
        return None
    th = buf[q : q + th_size]
    q += th_size
    if n - q < 4:
        short("template name length", q, 4)
        return None
    (nlen,) = _U32.unpack_from(buf, q)
    if nlen == 0 or nlen > MAX_TEMPLATE_NAME_LEN:
        raise bad(f"template name length {nlen} out of range 1..{MAX_TEMPLATE_NAME_LEN}", q)
    q += 4
    if n - q < nlen:
        short("template name", q, nlen)
        return None
    name = buf[q : q + nlen]
    if not _valid_template_name(name):
        raise bad(f"template name {_text(name)!r} is not printable ASCII", q)
    q += nlen
    if name == _IMA_NAME:
        # "ima" template: 20-byte digest, u32 name length, name (ima_measurements_show)
        start = q
        if n - q < 20:
            short("'ima' template file digest", q, 20)
            return None
        q += 20
        if n - q < 4:
            short("'ima' template file name length", q, 4)
            return None
        (flen,) = _U32.unpack_from(buf, q)
        if flen > IMA_EVENT_NAME_LEN_MAX:
            raise bad(f"'ima' template file name length {flen} exceeds 255", q)
        q += 4
        if n - q < flen:
            short("'ima' template file name", q, flen)
            return None
        q += flen
        return _Record(pcr, th, name, buf[start:q], q)
    if n - q < 4:
        short("template data length", q, 4)
        return None
    (dlen,) = _U32.unpack_from(buf, q)
    if dlen > MAX_TEMPLATE_DATA_LEN:
        raise bad(f"template data length {dlen} exceeds the limit of {MAX_TEMPLATE_DATA_LEN}", q)
    q += 4
    if n - q < dlen:
        short(f"template data of {dlen} bytes", q, dlen)
        return None
    data = buf[q : q + dlen]
    ids = template_fields(name.decode("ascii"))
    if ids is not None:
        err = _framing_error(data, len(ids))
        if err is not None:
            at, why = err
            raise bad(f"template {_text(name)!r}: {why}", q + at)
    return _Record(pcr, th, name, data, q + dlen)


def _template_hash_size(algorithm: str) -> tuple[str, int]:
    alg = by_name(algorithm)
    if alg.digest_size not in _TEMPLATE_HASH_BY_SIZE or (
        _TEMPLATE_HASH_BY_SIZE[alg.digest_size] != alg.name
    ):
        raise AlgorithmError(f"{alg.name} cannot be an IMA template hash algorithm")
    return alg.name, alg.digest_size


def iter_binary(
    stream: BinaryIO | IO[bytes],
    *,
    source: str | None = None,
    offset: int = 0,
    index: int = 0,
    template_hash_algorithm: str = "sha1",
) -> Iterator[IMAEntry]:
    """Decode a binary list from ``stream``, one entry at a time, reading in chunks.

    ``offset`` is the list offset at which ``stream`` is positioned and ``index``
    the number of the first entry read (an incremental reader seeks past what it
    has read and passes both). ``template_hash_algorithm`` is ``sha1`` for every
    kernel list.
    """
    _, th_size = _template_hash_size(template_hash_algorithm)
    buf = b""
    p = 0
    base = offset
    eof = False
    while True:
        n = len(buf)
        if p == n and eof:
            return
        rec = (
            None
            if p == n
            else _parse_record(buf, p, n, base=base, final=eof, th_size=th_size, source=source)
        )
        if rec is None:
            chunk = stream.read(CHUNK_SIZE)
            if not chunk:
                eof = True
                continue
            base += p
            buf = buf[p:] + bytes(chunk)
            p = 0
            continue
        yield IMAEntry(
            index,
            rec.pcr,
            rec.template_hash,
            sys.intern(rec.name.decode("ascii")),
            rec.data,
            offset=base + p,
        )
        index += 1
        p = rec.end


def parse_binary(
    data: bytes, *, source: str | None = None, template_hash_algorithm: str = "sha1"
) -> IMALog:
    """Decode a whole binary list (``binary_runtime_measurements``)."""
    _, th_size = _template_hash_size(template_hash_algorithm)
    data = bytes(data)
    entries: list[IMAEntry] = []
    p = 0
    n = len(data)
    while p < n:
        rec = _parse_record(data, p, n, base=0, final=True, th_size=th_size, source=source)
        assert rec is not None  # final=True never returns None
        entries.append(
            IMAEntry(
                len(entries),
                rec.pcr,
                rec.template_hash,
                sys.intern(rec.name.decode("ascii")),
                rec.data,
                offset=p,
            )
        )
        p = rec.end
    return IMALog(tuple(entries), BINARY, source)


def looks_like_binary(data: bytes) -> bool:
    """Whether ``data`` starts like a binary IMA list (its first record decodes)."""
    if len(data) < 33:
        return False
    try:
        head = bytes(data[: 64 * 1024])
        rec = _parse_record(head, 0, len(head), base=0, final=False, th_size=20, source=None)
    except ParseError:
        return False
    if rec is None:
        # incomplete within the sample: accept a plausible header (a long first record)
        return len(head) == 64 * 1024
    return True


# -- ascii list ---------------------------------------------------------------------


def _ascii_field(
    field_id: str, token: bytes, *, violation: bool, line: int | None, source: str | None
) -> bytes:
    """A field's template-data bytes from its ascii text."""
    kind = _FIELD_KINDS[field_id]
    if kind in _STRING_KINDS:
        return token + b"\x00" if kind == _STRING else token
    if not token:
        return b""
    if kind in (_DIGEST_ALGO, _DIGEST_TYPE_ALGO):
        prefix, colon, hx = token.rpartition(b":")
        if not colon or not prefix:
            raise ParseError(
                f"field {field_id}: expected ALGORITHM:HEX, got {_text(token[:60])!r}",
                line=line,
                source=source,
            )
        digest = _unhex(hx, f"field {field_id}", line=line, source=source)
        algo = prefix
        if kind == _DIGEST_TYPE_ALGO:
            dtype, sep, algo = prefix.partition(b":")
            if not sep or not dtype or b":" in algo:
                raise ParseError(
                    f"field {field_id}: expected TYPE:ALGORITHM:HEX, got {_text(token[:60])!r}",
                    line=line,
                    source=source,
                )
        elif b":" in algo:
            raise ParseError(
                f"field {field_id}: expected ALGORITHM:HEX, got {_text(token[:60])!r}",
                line=line,
                source=source,
            )
        size = _KERNEL_HASH_SIZES.get(algo)
        # A violation's digest is IMA_DIGEST_SIZE (20) zero bytes whatever the algorithm.
        if size is not None and len(digest) != size and not (violation and _is_zero(digest)):
            raise ParseError(
                f"field {field_id}: {algo.decode()} digest of {len(digest)} bytes, expected {size}",
                line=line,
                source=source,
            )
        return prefix + b":\x00" + digest
    if kind == _UINT:
        width = _UINT_WIDTH[field_id]
        if not token.isdigit() or len(token) > 20 or int(token) >= 1 << (8 * width):
            raise ParseError(
                f"field {field_id}: {_text(token[:30])!r} is not a {8 * width}-bit number",
                line=line,
                source=source,
            )
        return int(token).to_bytes(width, "little")
    # d and the hex fields
    return _unhex(token, f"field {field_id}", line=line, source=source)


def _elastic_field(ids: Sequence[str]) -> int | None:
    for name in _NAME_FIELDS:
        if name in ids:
            return ids.index(name)
    strings = [i for i, f in enumerate(ids) if _FIELD_KINDS[f] in _STRING_KINDS]
    return strings[-1] if strings else None


def _tokenize(rest: bytes, count: int, elastic: int | None) -> list[bytes]:
    """Split ``rest`` into ``count`` fields; field ``elastic`` takes what is left over."""
    if elastic is None:
        toks = rest.split(b" ", count - 1)
        return toks + [b""] * (count - len(toks))
    nleft = elastic
    nright = count - elastic - 1
    left = rest.split(b" ", nleft) if nleft else [rest]
    if len(left) <= nleft:
        left += [b""] * (nleft + 1 - len(left))
    remainder = left[nleft]
    right = remainder.rsplit(b" ", nright) if nright else [remainder]
    if len(right) < nright + 1:
        right += [b""] * (nright + 1 - len(right))
    return left[:nleft] + right


def _ascii_template_data(
    ids: Sequence[str],
    rest: bytes,
    *,
    template_hash: bytes,
    line: int,
    source: str | None,
) -> bytes:
    """Rebuild template data from the ascii fields ``rest`` of a line.

    The line is read as the kernel writes it. When fields follow the file name
    and that reading fails to decode or does not hash to the logged template
    hash, the readings with the trailing empty fields stripped (1, 2, ...) are
    tried, and one is taken only if it hashes to the logged template hash.
    """
    violation = _is_zero(template_hash)
    elastic = _elastic_field(ids)
    nright = 0 if elastic is None else len(ids) - elastic - 1

    def reading(extra: int) -> bytes:
        toks = _tokenize(rest + b" " * extra, len(ids), elastic)
        out = []
        for fid, tok in zip(ids, toks, strict=True):
            fdata = _ascii_field(fid, tok, violation=violation, line=line, source=source)
            out.append(_U32.pack(len(fdata)))
            out.append(fdata)
        return b"".join(out)

    primary: bytes | None = None
    error: ParseError | None = None
    try:
        primary = reading(0)
    except ParseError as e:
        error = e
    if nright == 0 or violation:
        if primary is None:
            assert error is not None
            raise error
        return primary
    alg = by_name(_TEMPLATE_HASH_BY_SIZE[len(template_hash)])
    if primary is not None and hmac.compare_digest(alg.hash(primary), template_hash):
        return primary
    for extra in range(1, nright + 1):
        try:
            data = reading(extra)
        except ParseError:
            continue
        if hmac.compare_digest(alg.hash(data), template_hash):
            return data
    if primary is None:
        assert error is not None
        raise error
    return primary


def _parse_line(
    raw: bytes, lineno: int, index: int, th_size: int | None, source: str | None
) -> IMAEntry | None:
    """One ascii line as an entry; None for a blank line.

    ``th_size`` is the template hash size of earlier lines (None for the first).
    """
    if len(raw) > MAX_LINE_LEN:
        raise ParseError(f"line longer than {MAX_LINE_LEN} bytes", line=lineno, source=source)
    text = raw.lstrip(b" ")
    if not text.strip():
        return None
    if b"\x00" in raw:
        # The kernel prints every field with %s or as hex: a NUL cannot be part of a line.
        raise ParseError("NUL byte in an ascii line", line=lineno, source=source)
    parts = text.split(b" ", 3)
    if len(parts) < 3:
        raise ParseError(
            f"expected 'PCR TEMPLATE-HASH TEMPLATE-NAME FIELD...', got {_text(raw[:80])!r}",
            line=lineno,
            source=source,
        )
    ptok, htok, ntok = parts[0], parts[1], parts[2]
    rest = parts[3] if len(parts) == 4 else b""
    if not ptok.isdigit() or len(ptok) > 3:
        raise ParseError(f"PCR {_text(ptok[:20])!r} is not a number", line=lineno, source=source)
    pcr = int(ptok)
    if pcr >= PCR_COUNT:
        raise ParseError(
            f"PCR index {pcr} out of range 0..{PCR_COUNT - 1}", line=lineno, source=source
        )
    th = _unhex(htok, "template hash", line=lineno, source=source)
    if len(th) not in _TEMPLATE_HASH_BY_SIZE:
        raise ParseError(
            f"template hash of {len(th)} bytes (expected 20, 32, 48 or 64)",
            line=lineno,
            source=source,
        )
    if th_size is not None and len(th) != th_size:
        raise ParseError(
            f"template hash of {len(th)} bytes where earlier lines have {th_size}",
            line=lineno,
            source=source,
        )
    if not _valid_template_name(ntok) or len(ntok) > MAX_TEMPLATE_NAME_LEN:
        raise ParseError(
            f"template name {_text(ntok[:60])!r} is not printable ASCII",
            line=lineno,
            source=source,
        )
    name = sys.intern(ntok.decode("ascii"))
    if name == "ima":
        dtok, _, fname = rest.partition(b" ")
        digest = _unhex(dtok, "field d", line=lineno, source=source)
        if len(digest) != 20:
            raise ParseError(
                f"field d: digest of {len(digest)} bytes, expected 20 (SHA-1)",
                line=lineno,
                source=source,
            )
        if len(fname) > IMA_EVENT_NAME_LEN_MAX:
            raise ParseError(
                f"'ima' template file name of {len(fname)} bytes exceeds 255",
                line=lineno,
                source=source,
            )
        data = digest + _U32.pack(len(fname)) + fname
        return IMAEntry(index, pcr, th, name, data, line=lineno)
    ids = template_fields(name)
    if ids is None:
        return IMAEntry(index, pcr, th, name, b"", line=lineno, ascii_fields=rest)
    data = _ascii_template_data(ids, rest, template_hash=th, line=lineno, source=source)
    if len(data) > MAX_TEMPLATE_DATA_LEN:
        raise ParseError(
            f"template data of {len(data)} bytes exceeds {MAX_TEMPLATE_DATA_LEN}",
            line=lineno,
            source=source,
        )
    return IMAEntry(index, pcr, th, name, data, line=lineno)


def _read_chunks(stream: IO[bytes] | IO[str] | BinaryIO) -> Iterator[bytes]:
    while True:
        chunk = stream.read(CHUNK_SIZE)
        if not chunk:
            return
        if isinstance(chunk, str):
            yield chunk.encode("utf-8", "surrogateescape")
        else:
            yield bytes(chunk)


def _iter_lines(
    stream: IO[bytes] | IO[str] | BinaryIO, first_line: int, source: str | None
) -> Iterator[tuple[int, bytes]]:
    """(line number, line without its newline), reading in chunks, lines bounded in length."""
    lineno = first_line
    pending = b""
    for chunk in _read_chunks(stream):
        data = pending + chunk
        lines = data.split(b"\n")
        pending = lines.pop()
        if len(pending) > MAX_LINE_LEN:
            raise ParseError(
                f"line longer than {MAX_LINE_LEN} bytes",
                line=lineno + len(lines),
                source=source,
            )
        for raw in lines:
            yield lineno, raw
            lineno += 1
    if pending:
        yield lineno, pending


def iter_ascii(
    stream: IO[bytes] | IO[str] | BinaryIO,
    *,
    source: str | None = None,
    line: int = 1,
    index: int = 0,
) -> Iterator[IMAEntry]:
    """Decode an ascii list from ``stream`` (bytes or text), one entry at a time.

    ``line`` is the number of the stream's first line in the list and ``index``
    the number of its first entry (for an incremental reader). Blank lines are
    skipped.
    """
    th_size: int | None = None
    for lineno, raw in _iter_lines(stream, line, source):
        entry = _parse_line(raw, lineno, index, th_size, source)
        if entry is None:
            continue
        th_size = len(entry.template_hash)
        yield entry
        index += 1


def parse_ascii(data: bytes | str, *, source: str | None = None) -> IMALog:
    """Decode a whole ascii list (``ascii_runtime_measurements``)."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogateescape")
    return IMALog(tuple(iter_ascii(io.BytesIO(data), source=source)), ASCII, source)


def looks_like_ascii(data: bytes) -> bool:
    """Whether ``data`` starts like an ascii IMA list (its first line decodes)."""
    head = bytes(data[: 64 * 1024])
    end = head.find(b"\n")
    first = head if end < 0 else head[:end]
    try:
        return _parse_line(first, 1, 0, None, None) is not None
    except ParseError:
        return False


# -- a compact store of a list's entries -------------------------------------------------

_BINARY_HEAD = struct.Struct("<I20sI")  # PCR, SHA-1 template hash, template name length
_LIST_SERIALS = itertools.count(1)
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class IMAAppended:
    """What one :meth:`IMAStore.append_binary` or :meth:`IMAStore.append_ascii` took.

    The first ``taken`` bytes of the buffer were whole records (or lines) and
    ``last`` is where the last of them starts; ``lines`` counts the lines taken,
    blank ones included (ascii). ``error`` is the corrupt record or line the scan
    stopped at: the ``entries`` before it were appended.
    """

    entries: int
    taken: int
    last: int
    lines: int = 0
    error: ParseError | None = None


class _Records:
    """The records of one list in an :class:`IMAStore`: append-only blocks of bytes.

    Every append adds one immutable block holding whole records (binary: exactly
    as read; ascii: the lines of the entries, without their newlines).
    ``starts[i]`` is where entry ``i`` starts in the concatenation of the blocks
    and ``starts[i + 1]`` where it ends. An entry becomes visible to readers on
    other threads when its end is in ``starts``, which is extended last.
    """

    __slots__ = (
        "block_entry",
        "block_pos",
        "blocks",
        "format",
        "index",
        "lines",
        "names",
        "offset",
        "serial",
        "source",
        "starts",
        "th_size",
    )

    def __init__(self, fmt: str, source: str | None, index: int, offset: int) -> None:
        self.format = fmt
        self.source = source
        self.serial = next(_LIST_SERIALS)
        self.index = index  # the list index of the first entry
        self.offset = offset  # binary: the list offset of the first record
        self.blocks: list[bytes] = []
        self.block_entry = array("Q")  # the first entry of each block (from 0)
        self.block_pos = array("Q")  # where each block starts in the concatenation
        self.starts = array("Q", [0])
        self.lines = array("Q")  # ascii: the line number of each entry
        self.names: dict[bytes, str] = {}  # template names, interned
        self.th_size: int | None = None  # ascii: the template hash size of the list

    def count(self) -> int:
        return len(self.starts) - 1

    def next_offset(self) -> int:
        return self.offset + self.starts[-1]

    def commit(self, block: bytes, ends: array[int], lines: array[int] | None) -> None:
        if not ends:
            return
        pos = self.starts[-1]
        self.blocks.append(block)
        self.block_pos.append(pos)
        self.block_entry.append(len(self.starts) - 1)
        if lines is not None:
            self.lines.extend(lines)
        if pos:
            ends = array("Q", [pos + e for e in ends])
        self.starts.extend(ends)

    def scan_binary(self, buf: _Buf) -> IMAAppended:
        """Append the whole records at the start of ``buf`` (validated as parse_binary does)."""
        names = self.names
        n = len(buf)
        base = self.next_offset()
        p = 0
        last = 0
        ends = array("Q")
        error = None
        name = b""
        while p < n:
            try:
                rec = _parse_record(
                    buf, p, n, base=base, final=False, th_size=20, source=self.source
                )
            except ParseError as e:
                error = e
                break
            if rec is None:
                break
            if rec.name != name:
                name = bytes(rec.name)
                if name not in names:
                    names[name] = sys.intern(name.decode("ascii"))
            last = p
            p = rec.end
            ends.append(p)
        self.commit(bytes(buf[:p]), ends, None)
        return IMAAppended(len(ends), p, last, 0, error)

    def scan_ascii(self, buf: bytes | bytearray, line: int) -> IMAAppended:
        """Append the entries of the whole lines at the start of ``buf`` (``line``: the first)."""
        end = buf.rfind(b"\n") + 1
        index = self.index + self.count()
        th_size = self.th_size
        kept: list[bytes] = []
        ends = array("Q")
        lines = array("Q")
        total = 0
        p = 0
        last = 0
        lineno = line
        error = None
        while p < end:
            q = buf.index(b"\n", p)
            raw = bytes(buf[p:q])
            try:
                entry = _parse_line(raw, lineno, index, th_size, self.source)
            except ParseError as e:
                error = e
                break
            if entry is not None:
                th_size = len(entry.template_hash)
                kept.append(raw)
                total += len(raw)
                ends.append(total)
                lines.append(lineno)
                index += 1
            last = p
            p = q + 1
            lineno += 1
        self.th_size = th_size
        self.commit(b"".join(kept), ends, lines)
        return IMAAppended(len(ends), p, last, lineno - line, error)

    def entry(self, i: int) -> IMAEntry:
        b = bisect_right(self.block_entry, i) - 1
        pos = self.block_pos[b]
        return self.decode(self.blocks[b], self.starts[i] - pos, self.starts[i + 1] - pos, i)

    def decode(self, block: bytes, s: int, e: int, i: int) -> IMAEntry:
        """Entry ``i``, whose record is ``block[s:e]`` (validated when it was appended)."""
        if self.format == ASCII:
            entry = _parse_line(block[s:e], self.lines[i], self.index + i, None, self.source)
            assert entry is not None
            return entry
        pcr, th, nlen = _BINARY_HEAD.unpack_from(block, s)
        p = s + 28 + nlen
        raw_name = block[s + 28 : p]
        data = block[p:e] if raw_name == _IMA_NAME else block[p + 4 : e]
        return IMAEntry(
            self.index + i, pcr, th, self.names[raw_name], data, offset=self.offset + self.starts[i]
        )

    def name(self, block: bytes, s: int, e: int, i: int) -> str:
        """The template name of entry ``i`` (see :meth:`decode`), without decoding the rest."""
        if self.format == ASCII:
            raw = block[s:e].lstrip(b" ").split(b" ", 3)[2]
        else:
            (nlen,) = _U32.unpack_from(block, s + 24)
            raw = block[s + 28 : s + 28 + nlen]
        name = self.names.get(raw)
        if name is None:
            name = self.names.setdefault(raw, sys.intern(raw.decode("ascii")))
        return name

    def iterate(
        self, start: int, stop: int, decode: Callable[[bytes, int, int, int], _T]
    ) -> Iterator[_T]:
        """``decode(block, start, end, i)`` of each entry ``i`` in ``range(start, stop)``."""
        if start >= stop:
            return
        starts = self.starts
        b = bisect_right(self.block_entry, start) - 1
        i = start
        while i < stop:
            block = self.blocks[b]
            pos = self.block_pos[b]
            b += 1
            end = self.block_entry[b] if b < len(self.block_entry) else stop
            for j in range(i, min(end, stop)):
                yield decode(block, starts[j] - pos, starts[j + 1] - pos, j)
            i = end


class IMAStore:
    """The entries of one IMA list kept compactly; an :class:`IMAEntry` is built when asked for.

    A binary list is kept as its records, exactly as read, in blocks of bytes; an
    ascii list as the lines of its entries. Besides those bytes an entry costs 8
    bytes (16 for an ascii one, its line number). Records are validated when
    appended, as :func:`parse_binary` and :func:`parse_ascii` validate them, so
    building an entry later cannot fail.

    The store only grows: :meth:`entries` is an immutable snapshot that later
    appends do not change, and :meth:`clear` (a new list, after a reset) starts
    new blocks and leaves the snapshots already given as they were. One thread
    appends; any number may read snapshots meanwhile.
    """

    __slots__ = ("_records",)

    def __init__(self) -> None:
        self._records: _Records | None = None

    def __len__(self) -> int:
        r = self._records
        return 0 if r is None else r.count()

    def __repr__(self) -> str:
        return f"<IMAStore {self.format or 'empty'}, {len(self)} entries>"

    @property
    def format(self) -> str | None:
        """:data:`BINARY` or :data:`ASCII`; None while empty."""
        r = self._records
        return None if r is None else r.format

    @property
    def next_index(self) -> int | None:
        """The index the next entry appended must have; None while empty."""
        r = self._records
        return None if r is None else r.index + r.count()

    def entries(self) -> IMAEntries:
        """Every entry appended so far, in order (a snapshot)."""
        r = self._records
        return IMAEntries(r, 0, 0 if r is None else r.count())

    def clear(self) -> None:
        """Forget every entry (the snapshots already taken keep theirs)."""
        self._records = None

    def _target(self, fmt: str, index: int, offset: int, source: str | None) -> _Records:
        r = self._records
        if r is None:
            return _Records(fmt, source, index, offset)  # kept once an entry is appended
        if r.format != fmt:
            raise ValueError(f"cannot append {fmt} records to a store of {r.format} records")
        if index != r.index + r.count() or (fmt == BINARY and offset != r.next_offset()):
            raise ValueError(
                f"entry {index} at offset {offset} does not continue the store "
                f"(next entry {r.index + r.count()} at offset {r.next_offset()})"
            )
        return r

    def append_binary(
        self,
        buf: _Buf,
        *,
        offset: int = 0,
        index: int = 0,
        source: str | None = None,
    ) -> IMAAppended:
        """Append the whole binary records at the start of ``buf``.

        ``offset`` and ``index`` are the list offset and entry index of ``buf[0]``
        (those following the last record appended, unless the store is empty).
        A record not all there yet ends the scan; a corrupt one too, and is
        returned as :attr:`IMAAppended.error`, so that the caller can account for
        the records before it. Only SHA-1 template hashes (every kernel's list).
        """
        records = self._target(BINARY, index, offset, source)
        return self._kept(records, records.scan_binary(buf))

    def append_ascii(
        self,
        buf: bytes | bytearray,
        *,
        line: int = 1,
        index: int = 0,
        source: str | None = None,
    ) -> IMAAppended:
        """Append the entries of the whole lines at the start of ``buf``.

        As :meth:`append_binary`; ``line`` is the line number of ``buf``'s first
        line, and blank lines are skipped.
        """
        records = self._target(ASCII, index, 0, source)
        return self._kept(records, records.scan_ascii(buf, line))

    def _kept(self, records: _Records, done: IMAAppended) -> IMAAppended:
        if done.entries and self._records is None:
            self._records = records
        return done


class IMAEntries(Sequence[IMAEntry]):
    """An immutable run of an :class:`IMAStore`'s entries; each built when it is read.

    Indexing and iterating build new :class:`IMAEntry` objects (equal, not
    identical, from one read to the next); a slice is another run over the same
    records (a list with a step). It compares equal to any sequence of the same
    entries. :attr:`list_id` tells runs of the same list (the same store between
    two :meth:`IMAStore.clear`) from runs of another.
    """

    __slots__ = ("_records", "_start", "_stop")

    def __init__(self, records: _Records | None, start: int, stop: int) -> None:
        self._records = records
        self._start = start
        self._stop = stop

    def __len__(self) -> int:
        return self._stop - self._start

    @property
    def list_id(self) -> int:
        """The same number for runs of the same list, another for another list (0: empty)."""
        return 0 if self._records is None else self._records.serial

    @overload
    def __getitem__(self, key: int) -> IMAEntry: ...

    @overload
    def __getitem__(self, key: slice) -> Sequence[IMAEntry]: ...

    def __getitem__(self, key: int | slice) -> IMAEntry | Sequence[IMAEntry]:
        n = self._stop - self._start
        if isinstance(key, slice):
            lo, hi, step = key.indices(n)
            if step != 1:
                return [self[i] for i in range(lo, hi, step)]
            return IMAEntries(self._records, self._start + lo, self._start + max(lo, hi))
        i = operator.index(key)
        if i < 0:
            i += n
        if not 0 <= i < n or self._records is None:
            raise IndexError("IMA entry index out of range")
        return self._records.entry(self._start + i)

    def __iter__(self) -> Iterator[IMAEntry]:
        r = self._records
        if r is None:
            return iter(())
        return r.iterate(self._start, self._stop, r.decode)

    def template_names(self) -> Iterator[str]:
        """The template name of each entry, in order, without building the entries."""
        r = self._records
        if r is None:
            return iter(())
        return r.iterate(self._start, self._stop, r.name)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, (str, bytes, bytearray)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        first = 0 if self._records is None else self._records.index + self._start
        return f"<IMAEntries {len(self)} entries from index {first}>"


# -- streaming replay ----------------------------------------------------------------


@dataclass(slots=True)
class IMAReplay:
    """What a streaming replay found.

    ``template_hash_mismatches`` lists the indices of the first
    :data:`MAX_REPORTED_MISMATCHES` entries whose template hash is not the hash
    of their template data; ``template_hash_mismatch_count`` counts them all.
    ``unverified`` counts entries whose template hash could not be recomputed
    (unknown templates in an ascii list). ``end_offset`` is the list offset after
    the last entry read and ``end_line`` the next line number (ascii): an
    incremental reader continues from there.
    """

    bank: RegisterBank
    format: str
    algorithms: tuple[str, ...]
    padded: bool
    checked: bool
    entries: int = 0
    violations: int = 0
    template_hash_mismatch_count: int = 0
    template_hash_mismatches: list[int] = field(default_factory=list)
    unverified: int = 0
    template_names: list[str] = field(default_factory=list)
    end_offset: int = 0
    end_line: int | None = None

    def raise_for_mismatch(self) -> None:
        """Raise :class:`TemplateHashMismatchError` if any template hash did not verify."""
        if self.template_hash_mismatch_count:
            shown = ", ".join(str(i) for i in self.template_hash_mismatches[:20])
            raise TemplateHashMismatchError(
                f"{self.template_hash_mismatch_count} IMA entries have a template hash that "
                f"is not the hash of their template data (first: {shown})",
                self.template_hash_mismatches,
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "entries": self.entries,
            "violations": self.violations,
            "template_hash_checked": self.checked,
            "template_hash_mismatch_count": self.template_hash_mismatch_count,
            "template_hash_mismatches": list(self.template_hash_mismatches),
            "unverified": self.unverified,
            "template_names": list(self.template_names),
            "bank_form": "padded" if self.padded else "per-bank",
            "registers": self.bank.to_list(),
            "end_offset": self.end_offset,
            **({"end_line": self.end_line} if self.end_line is not None else {}),
        }


class _Replay:
    """Register state of a streaming replay; entries arrive in batches of one register."""

    def __init__(
        self,
        fmt: str,
        algorithms: Sequence[str],
        *,
        logged: str,
        check: bool,
        padded: bool,
        bank: RegisterBank | None,
        registers: Mapping[int, str] | None,
    ) -> None:
        algs: list[HashAlgorithm] = []
        for a in algorithms:
            alg = by_name(a)
            if alg.name not in [x.name for x in algs]:
                algs.append(alg)
        if not algs:
            raise ReplayError("no bank to replay into")
        self.logged = by_name(logged)
        lsize = self.logged.digest_size
        for alg in algs:
            if padded and alg.name != self.logged.name and alg.digest_size < lsize:
                raise ReplayError(
                    f"a {lsize}-byte template hash cannot be padded to the "
                    f"{alg.digest_size}-byte {alg.name} bank"
                )
        self.algs = algs
        self.check = check
        self.padded = padded
        self.start = bank
        self.names = registers
        self.lctor = self.logged.constructor()
        # per bank: (name, constructor, all-ones, zero padding, is the logged bank)
        self.banks = [
            (
                a.name,
                a.constructor(),
                b"\xff" * a.digest_size,
                bytes(max(a.digest_size - lsize, 0)),
                a.name == self.logged.name,
            )
            for a in algs
        ]
        self.values: dict[str, list[bytes]] = {}  # by register: several PCRs may map to one
        self.result = IMAReplay(RegisterBank(), fmt, tuple(a.name for a in algs), padded, check)

    def register(self, pcr: int) -> str:
        if self.names is not None and pcr in self.names:
            return self.names[pcr]
        return pcr_name(pcr)

    def _current(self, pcr: int) -> list[bytes]:
        reg = self.register(pcr)
        vals = self.values.get(reg)
        if vals is None:
            if self.start is not None:
                vals = [self.start.get(reg, a.name) for a in self.algs]
            else:
                vals = [a.zero for a in self.algs]
            self.values[reg] = vals
        return vals

    def _mismatch(self, index: int) -> None:
        r = self.result
        r.template_hash_mismatch_count += 1
        if len(r.template_hash_mismatches) < MAX_REPORTED_MISMATCHES:
            r.template_hash_mismatches.append(index)

    def flush(self, pcr: int, inputs: list[bytes], logged_joined: bytes, first: int) -> None:
        """Replay a batch: ``inputs`` are the hash inputs, ``logged_joined`` their logged hashes."""
        n = len(inputs)
        if not n:
            return
        size = self.logged.digest_size
        lctor = self.lctor
        violations: list[int] = []
        logged: list[bytes]
        if self.check:
            computed = [lctor(x).digest() for x in inputs]
            if hmac.compare_digest(b"".join(computed), logged_joined):
                logged = computed
            else:
                logged = [logged_joined[i : i + size] for i in range(0, n * size, size)]
                zero = bytes(size)
                for i in range(n):
                    t = logged[i]
                    if t == zero:
                        violations.append(i)
                    elif not hmac.compare_digest(t, computed[i]):
                        self._mismatch(first + i)
        else:
            logged = [logged_joined[i : i + size] for i in range(0, n * size, size)]
            zero = bytes(size)
            at = logged_joined.find(zero)
            while at >= 0:
                if at % size == 0:
                    violations.append(at // size)
                    at = logged_joined.find(zero, at + size)
                else:
                    at = logged_joined.find(zero, at + 1)
        vals = self._current(pcr)
        for k, (_name, ctor, ones, pad, is_logged) in enumerate(self.banks):
            if is_logged:
                ext = logged
            elif self.padded:
                ext = [t + pad for t in logged]
            else:
                ext = [ctor(x).digest() for x in inputs]
            if violations:
                ext = list(ext)
                for i in violations:
                    ext[i] = ones
            c = vals[k]
            for d in ext:
                c = ctor(c + d).digest()
            vals[k] = c
        self.result.violations += len(violations)
        self.result.entries += n

    def single(self, pcr: int, th: bytes, index: int) -> None:
        """Replay one entry whose template data is unknown: only its logged bank."""
        vals = self._current(pcr)
        violation = _is_zero(th)
        for k, (name, ctor, ones, pad, is_logged) in enumerate(self.banks):
            if violation:
                d = ones
            elif is_logged:
                d = th
            elif self.padded:
                d = th + pad
            else:
                raise ReplayError(
                    f"IMA entry {index}: unknown template in an ascii list: its {name} "
                    "template hash cannot be computed (replay the sha1 bank, or padded)"
                )
            vals[k] = ctor(vals[k] + d).digest()
        if violation:
            self.result.violations += 1
        elif self.check:
            self.result.unverified += 1
        self.result.entries += 1

    def seen(self, name: str) -> None:
        if name not in self.result.template_names:
            self.result.template_names.append(name)

    def finish(self) -> IMAReplay:
        bank = self.result.bank
        if self.start is not None:
            for v in self.start:
                bank.set(v.register, v.algorithm, v.digest)
        for reg, vals in self.values.items():
            for a, value in zip(self.algs, vals, strict=True):
                bank.set(reg, a.name, value)
        return self.result


def replay_binary(
    stream: BinaryIO | IO[bytes],
    algorithms: Sequence[str] = ("sha1", "sha256"),
    *,
    check_template_hash: bool = True,
    padded: bool = False,
    source: str | None = None,
    bank: RegisterBank | None = None,
    registers: Mapping[int, str] | None = None,
    offset: int = 0,
    index: int = 0,
    template_hash_algorithm: str = "sha1",
    chunk_size: int = CHUNK_SIZE,
) -> IMAReplay:
    """Replay a binary list from ``stream`` into ``algorithms``, checking template hashes.

    Reads in chunks of ``chunk_size``; decodes and validates every record as
    :func:`parse_binary` does (the same errors, at the same offsets) without
    creating an object per entry. ``bank`` holds starting values (what a boot
    log replayed into the same registers; it is not modified). ``registers``
    maps a PCR index to the register to extend instead (``{10: "rtmr2"}`` in a
    TD). ``offset`` and ``index`` are those of the stream's position (see
    :func:`iter_binary`). ``padded`` selects the older kernels' bank form.
    """
    logged, th_size = _template_hash_size(template_hash_algorithm)
    st = _Replay(
        BINARY,
        algorithms,
        logged=logged,
        check=check_template_hash,
        padded=padded,
        bank=bank,
        registers=registers,
    )
    res = st.result
    read = stream.read
    hbase = 4 + th_size  # offset of the template name length within a record
    buf = b""
    p = 0
    base = offset
    eof = False
    inputs: list[bytes] = []
    hashes: list[bytes] = []
    bpcr = -1  # register of the current batch
    first = index  # index of the batch's first entry
    count = index  # index of the next entry
    # Hot-loop state: the record head "<PCR hash len+name dlen len1 ... len2>" of the
    # current template, for templates of two or three fields (ima-ng, ima-sig, ...).
    head: struct.Struct | None = None
    hsize = 0  # bytes of a record before its template data
    cname = b""  # template name length + name, as in the record
    cl1 = -1  # length of the first field (fixed: the digest field)
    three = False
    u32 = _U32.unpack_from
    while True:
        n = len(buf)
        if head is not None:
            unpack = head.unpack_from
            put = inputs.append
            puth = hashes.append
            last = n - head.size  # the last offset a record head fits at
            two = cl1 + 8  # template data length less the second field's, for two fields
            if three:
                while p <= last:
                    pcr, th, nm, dl, l1, l2 = unpack(buf, p)
                    start = p + hsize
                    e = start + dl
                    q = start + two + l2  # the third field's length
                    if nm != cname or pcr != bpcr or l1 != cl1 or e > n or q + 4 > e:
                        break
                    if q + 4 + u32(buf, q)[0] != e:
                        break
                    put(buf[start:e])
                    puth(th)
                    p = e
            else:
                while p <= last:
                    pcr, th, nm, dl, l1, l2 = unpack(buf, p)
                    start = p + hsize
                    e = start + dl
                    if nm != cname or pcr != bpcr or l1 != cl1 or e > n or dl != two + l2:
                        break
                    put(buf[start:e])
                    puth(th)
                    p = e
            count = first + len(inputs)
        # The general path: one record, validated as parse_binary does.
        rec = None
        if p < n:
            rec = _parse_record(buf, p, n, base=base, final=eof, th_size=th_size, source=source)
        if rec is None:
            if eof:
                break
            if inputs:
                st.flush(bpcr, inputs, b"".join(hashes), first)
                first = count
                inputs = []
                hashes = []
            chunk = read(chunk_size)
            if not chunk:
                eof = True
                continue
            base += p
            buf = buf[p:] + bytes(chunk)
            p = 0
            continue
        if rec.pcr != bpcr:
            if inputs:
                st.flush(bpcr, inputs, b"".join(hashes), first)
                first = count
                inputs = []
                hashes = []
            bpcr = rec.pcr
        name = rec.name
        if name == _IMA_NAME:
            flen = len(rec.data) - 24
            inputs.append(_ima_hash_input(rec.data[:20], rec.data[24 : 24 + flen]))
        else:
            inputs.append(rec.data)
        hashes.append(rec.template_hash)
        count += 1
        p = rec.end
        sname = name.decode("ascii")
        st.seen(sname)
        # Prepare the hot loop for this template when it has two or three fields.
        ids = template_fields(sname)
        head = None
        if (
            name != _IMA_NAME
            and ids is not None
            and len(ids) in (2, 3)
            and len(rec.data) >= 4
            and not _is_zero(rec.template_hash)
        ):
            (l1,) = u32(rec.data, 0)
            if len(rec.data) >= 8 + l1:
                nlen = len(name)
                head = struct.Struct(f"<I{th_size}s{4 + nlen}sII{l1}xI")
                hsize = hbase + 4 + nlen + 4
                cname = _U32.pack(nlen) + name
                cl1 = l1
                three = len(ids) == 3
    if inputs:
        st.flush(bpcr, inputs, b"".join(hashes), first)
    res.end_offset = base + p
    return st.finish()


def replay_ascii(
    stream: IO[bytes] | IO[str] | BinaryIO,
    algorithms: Sequence[str] = ("sha1", "sha256"),
    *,
    check_template_hash: bool = True,
    padded: bool = False,
    source: str | None = None,
    bank: RegisterBank | None = None,
    registers: Mapping[int, str] | None = None,
    line: int = 1,
    index: int = 0,
    offset: int = 0,
) -> IMAReplay:
    """Replay an ascii list from ``stream`` into ``algorithms``, checking template hashes.

    Reads in chunks; decodes and validates every line as :func:`parse_ascii`
    does (the same errors, on the same lines), rebuilding each entry's template
    data for the template hash check and the other banks, without creating an
    object per entry. ``line``, ``index`` and ``offset`` are those of the stream's
    position (an incremental reader). See :func:`replay_binary` for the rest.
    """
    st: _Replay | None = None
    kwargs: dict[str, Any] = {
        "check": check_template_hash,
        "padded": padded,
        "bank": bank,
        "registers": registers,
    }
    unhexlify = binascii.unhexlify
    join = b"".join
    lens = _NAME_LENS
    nlens = len(lens)
    nul = b"\x00"
    th_size: int | None = None
    thl = -1  # hex length of a template hash
    cpt = b"\x00"  # the current PCR as its ascii token
    ctn = b"\x00"  # the current template name token (ima-ng or ima-ngv2)
    prefixes: dict[bytes, dict[bytes, tuple[bytes, int]]] = {}
    pres: dict[bytes, tuple[bytes, int]] = {}  # digest prefix -> (field head, hex length)
    bpcr = -1
    first = index
    inputs: list[bytes] = []
    hexes: list[bytes] = []
    lineno = line
    pos = offset
    pending = b""
    names_seen: list[str] = []

    def state(th_len: int) -> _Replay:
        nonlocal st
        if st is None:
            st = _Replay(
                ASCII,
                algorithms,
                logged=_TEMPLATE_HASH_BY_SIZE[th_len],
                **kwargs,
            )
        return st

    def rescan(lines: list[bytes], start: int, th: int | None) -> ParseError:
        # A chunk failed in the fast path: find its first bad line the careful way.
        size = th
        for k, raw in enumerate(lines):
            e = _parse_line(raw, start + k, 0, size, source)
            if e is not None:
                size = len(e.template_hash)
        return ParseError("undecodable chunk", line=start, source=source)

    chunks = _read_chunks(stream)
    eof = False
    while not eof:
        chunk = next(chunks, None)
        if chunk is None:
            eof = True
            if not pending:
                break
            lines = [pending]
            pending = b""
            if b"\x00" in lines[0]:
                raise rescan(lines, lineno, th_size)
        else:
            data = pending + chunk
            lines = data.split(b"\n")
            pending = lines.pop()
            if len(pending) > MAX_LINE_LEN:
                raise ParseError(
                    f"line longer than {MAX_LINE_LEN} bytes",
                    line=lineno + len(lines),
                    source=source,
                )
            if data.find(b"\x00", 0, len(data) - len(pending)) >= 0:
                raise rescan(lines, lineno, th_size)
        start_line = lineno
        start_th = th_size
        put = inputs.append
        puth = hexes.append
        try:
            for k, raw in enumerate(lines):
                parts = raw.split(b" ", 4)
                if len(parts) == 5:
                    pt, th, tn, dg, nm = parts
                    if pt == cpt and tn == ctn and len(th) == thl:
                        pre, _, hx = dg.rpartition(b":")
                        h = pres.get(pre)
                        ln = len(nm)
                        if h is not None and len(hx) == h[1] and ln < nlens:
                            put(join((h[0], unhexlify(hx), lens[ln], nm, nul)))
                            puth(th)
                            continue
                # The general path: one line, validated as parse_ascii does.
                no = start_line + k
                try:
                    entry = _parse_line(raw, no, 0, th_size, source)
                except ParseError:
                    # Template hashes taken by the fast path are checked only at the end of
                    # the batch: an earlier bad one must be reported first.
                    unhexlify(b"".join(hexes))
                    raise
                if entry is None:
                    continue
                if th_size is None:
                    th_size = len(entry.template_hash)
                    thl = 2 * th_size
                s = state(th_size)
                if entry.template_name not in names_seen:
                    names_seen.append(entry.template_name)
                    s.seen(entry.template_name)
                if entry.pcr != bpcr:
                    if inputs:
                        s.flush(bpcr, inputs, unhexlify(b"".join(hexes)), first)
                        first += len(inputs)
                        inputs = []
                        hexes = []
                        put = inputs.append
                        puth = hexes.append
                    bpcr = entry.pcr
                cpt = str(bpcr).encode() if parts[0] == str(bpcr).encode() else b"\x00"
                hin = entry.hash_input()
                if hin is None:
                    if inputs:
                        s.flush(bpcr, inputs, unhexlify(b"".join(hexes)), first)
                        first += len(inputs)
                        inputs = []
                        hexes = []
                        put = inputs.append
                        puth = hexes.append
                    s.single(bpcr, entry.template_hash, first)
                    first += 1
                    continue
                put(hin)
                puth(binascii.hexlify(entry.template_hash))
                # Let the fast path take the next lines of this ima-ng / ima-ngv2 shape.
                tname = entry.template_name
                dfield = entry.fields.fields[0].data if tname in ("ima-ng", "ima-ngv2") else b""
                if dfield and not entry.is_violation:
                    tn_b = tname.encode()
                    pres = prefixes.setdefault(tn_b, {})
                    ctn = tn_b
                    dprefix, digest = _split_digest_field(dfield)
                    size = _KERNEL_HASH_SIZES.get(dprefix.rpartition(b":")[2])
                    if size is None or size == len(digest):
                        pres[dprefix] = (
                            _U32.pack(len(dfield)) + dprefix + b":\x00",
                            2 * len(digest),
                        )
                else:
                    ctn = b"\x00"
            if inputs:
                assert st is not None
                st.flush(bpcr, inputs, unhexlify(b"".join(hexes)), first)
                first += len(inputs)
                inputs = []
                hexes = []
        except (binascii.Error, ValueError) as e:
            if isinstance(e, ParseError):
                raise
            raise rescan(lines, start_line, start_th) from None
        lineno += len(lines)
        if chunk is not None:
            pos += len(chunk)
    res = state(th_size or 20).finish()
    res.end_line = lineno
    res.end_offset = pos
    return res
