"""What the agent measures about itself, first: its own code and the policy it runs with.

A verifier reading the runtime log must be able to tell which agent, with which
policy, vouched for the events after these two.

Agent code (event kind ``agent``): the installed ``cima`` package directory is
walked; every regular file except byte-code caches (``__pycache__``, ``*.pyc``,
``*.pyo``) is hashed with the policy's algorithm. The code digest is the hash
of the canonical JSON document ``{"name": "cima", "version": V, "files":
[[relative path, hex digest], ...]}``, files sorted by their relative POSIX
path. :func:`package_manifest` gives that document, so that a reference value
can be computed from a known-good installation.

Policy (event kind ``policy``): the digest of the policy file's bytes as read
(when it came from a file) and the digest of the normalised policy (canonical
JSON of :meth:`cima.agent.policy.Policy.to_dict`), with the normalised policy
itself, which is short and tells a verifier what was measured.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import cima
from cima.agent.events import canonical
from cima.agent.policy import Policy
from cima.digests import by_name
from cima.errors import CimaError

__all__ = ["agent_measurement", "package_manifest", "package_root", "policy_measurement"]

_SKIP_DIRS = frozenset({"__pycache__"})
_SKIP_SUFFIXES = (".pyc", ".pyo")
_CHUNK = 1 << 20


def package_root() -> Path:
    """The directory the running ``cima`` package was imported from."""
    return Path(cima.__file__).resolve().parent


def _hash_file(path: Path, algorithm: str) -> str:
    h = by_name(algorithm).new()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return str(h.hexdigest())


def package_manifest(algorithm: str, root: Path | None = None) -> dict[str, Any]:
    """The document whose hash is the code digest (see the module docstring)."""
    base = package_root() if root is None else root
    files: list[tuple[str, str]] = []
    try:
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
            for name in filenames:
                if name.endswith(_SKIP_SUFFIXES):
                    continue
                path = Path(dirpath) / name
                if not path.is_file():
                    continue
                files.append((path.relative_to(base).as_posix(), _hash_file(path, algorithm)))
    except OSError as e:
        raise CimaError(f"cannot measure the agent's code under {base}: {e}") from e
    files.sort()
    return {
        "name": "cima",
        "version": cima.__version__,
        "files": [[rel, digest] for rel, digest in files],
    }


def agent_measurement(algorithm: str, root: Path | None = None) -> dict[str, Any]:
    """The ``agent`` event's data: version, file count and code digest (``alg:hex``)."""
    manifest = package_manifest(algorithm, root)
    alg = by_name(algorithm)
    return {
        "name": "cima",
        "version": manifest["version"],
        "files": len(manifest["files"]),
        "code_digest": f"{alg.name}:{alg.hash(canonical(manifest)).hex()}",
    }


def policy_measurement(policy: Policy, algorithm: str) -> dict[str, Any]:
    """The ``policy`` event's data: file and policy digests (``alg:hex``) and the policy.

    ``file_digest`` hashes the bytes the policy was parsed from (never a second read
    of the file, which may have changed since).
    """
    alg = by_name(algorithm)
    return {
        "source": policy.source,
        "file_digest": f"{alg.name}:{alg.hash(policy.raw).hex()}",
        "policy_digest": f"{alg.name}:{alg.hash(policy.canonical_bytes()).hex()}",
        "policy": policy.to_dict(),
    }
