"""How a report binds the caller's nonce and user data (DESIGN.md section 4).

- TDX: REPORTDATA (64 bytes) = SHA-512(nonce || user_data), the convention of
  Intel Trust Authority and the CC Trusted API. Some tools put the nonce in
  REPORTDATA directly (zero-padded); :data:`BindingMode` ``"raw"`` checks that form.
- TPM: qualifyingData (extraData) = H(nonce || user_data), H the quote's hash
  algorithm.
- Container scope: H(container_register || nonce || user_data).

One check per platform: :func:`check_tdx_binding` and :func:`check_tpm_binding`.
Both raise :class:`~cima.errors.FreshnessError`; neither returns a bool.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Literal

from cima.digests import by_name
from cima.errors import FreshnessError

MAX_NONCE = 64
MAX_USER_DATA = 1024
TDX_REPORT_DATA_SIZE = 64

BindingMode = Literal["hash", "raw"]

#: What the agent quotes as user data for a container-scoped request or a batch
#: (the container binding or the batch root as the nonce). A node-scoped request
#: whose ``nonce || user_data`` ends with it is refused by the agent and by the
#: verifier, so no caller of the node view can obtain a report that reads as
#: another scope's: the scopes' report inputs are disjoint.
SCOPED_BINDING_TAG = b"\x00cima/scoped-binding/v1"


def is_reserved(nonce: bytes, user_data: bytes) -> bool:
    """True when ``nonce || user_data`` ends with :data:`SCOPED_BINDING_TAG`."""
    tag = SCOPED_BINDING_TAG
    if len(user_data) >= len(tag):
        return user_data.endswith(tag)
    cut = len(tag) - len(user_data)
    return nonce.endswith(tag[:cut]) and tag[cut:] == user_data


def _check_sizes(nonce: bytes, user_data: bytes) -> None:
    if len(nonce) > MAX_NONCE:
        raise FreshnessError(f"nonce is {len(nonce)} bytes, at most {MAX_NONCE} allowed")
    if len(user_data) > MAX_USER_DATA:
        raise FreshnessError(
            f"user data is {len(user_data)} bytes, at most {MAX_USER_DATA} allowed"
        )


def container_binding(
    container_register: bytes, nonce: bytes, user_data: bytes, algorithm: str
) -> bytes:
    """H(container_register || nonce || user_data): what a container-scoped report binds."""
    _check_sizes(nonce, user_data)
    return by_name(algorithm).hash(container_register + nonce + user_data)


def tdx_report_data(nonce: bytes, user_data: bytes = b"", mode: BindingMode = "hash") -> bytes:
    """The 64-byte REPORTDATA that binds ``nonce`` and ``user_data``."""
    _check_sizes(nonce, user_data)
    if mode == "hash":
        return hashlib.sha512(nonce + user_data).digest()
    raw = nonce + user_data
    if len(raw) > TDX_REPORT_DATA_SIZE:
        raise FreshnessError(
            f"raw binding holds at most {TDX_REPORT_DATA_SIZE} bytes of nonce and user data, "
            f"got {len(raw)}"
        )
    return raw + bytes(TDX_REPORT_DATA_SIZE - len(raw))


def tpm_qualifying_data(nonce: bytes, user_data: bytes, algorithm: str) -> bytes:
    """qualifyingData = H(nonce || user_data) with the quote's hash algorithm."""
    _check_sizes(nonce, user_data)
    return by_name(algorithm).hash(nonce + user_data)


def check_tdx_binding(
    report_data: bytes, nonce: bytes, user_data: bytes = b"", mode: BindingMode = "hash"
) -> None:
    """Raise :class:`FreshnessError` unless ``report_data`` binds ``nonce`` and ``user_data``."""
    expected = tdx_report_data(nonce, user_data, mode)
    if not hmac.compare_digest(report_data, expected):
        raise FreshnessError(
            f"TDX REPORTDATA does not bind the expected nonce and user data ({mode} binding): "
            f"expected {expected.hex()}, report has {report_data.hex()}"
        )


def check_tpm_binding(extra_data: bytes, nonce: bytes, user_data: bytes, algorithm: str) -> None:
    """Raise :class:`FreshnessError` unless extraData binds ``nonce`` and ``user_data``."""
    expected = tpm_qualifying_data(nonce, user_data, algorithm)
    if not hmac.compare_digest(extra_data, expected):
        raise FreshnessError(
            f"TPM quote extraData does not bind the expected nonce and user data: "
            f"expected {expected.hex()} ({algorithm}), quote has {extra_data.hex()}"
        )
