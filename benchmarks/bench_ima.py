"""IMA list replay speed: cima's streaming replay against the hashing floor.

One run generates (deterministically, into a temporary directory) an IMA list of
``ima-ng`` entries with SHA-256 file digests and realistic paths, as the binary
and as the ascii list the kernel exports. It then measures:

- the hashing floor: hashlib alone, the template data of every entry already in
  memory (a list of bytes): SHA-1 and SHA-256 of each entry's template data and
  the extends of both banks. It is measured as a plain loop and as a batched
  loop (list comprehensions per bank); the faster of the two is the floor;
- cima: :func:`cima.eventlog.ima.replay_binary` and
  :func:`cima.eventlog.ima.replay_ascii` reading the FILE in chunks, decoding and
  validating every entry, checking every template hash and replaying the sha1
  and sha256 banks;
- the peak RSS of a fresh process that runs only that replay.

Usage: ``python benchmarks/bench_ima.py [--entries N] [--repeat K] [--json]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

from cima.eventlog.ima import replay_ascii, replay_binary  # noqa: E402

DEFAULT_ENTRIES = 1_000_000
BANKS = ("sha1", "sha256")

_DIRS = (
    "/usr/bin",
    "/usr/sbin",
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/systemd",
    "/usr/lib/python3/dist-packages/{pkg}",
    "/usr/lib/python3/dist-packages/{pkg}/{sub}",
    "/usr/lib/modules/6.8.0-51-generic/kernel/drivers/{sub}",
    "/usr/libexec/{pkg}",
    "/etc/{pkg}",
    "/opt/{pkg}/lib",
    "/var/lib/containerd/io.containerd.snapshotter.v1.overlayfs/snapshots/{n}/fs/usr/lib",
    "/var/lib/kubelet/pods/{uuid}/volumes/kubernetes.io~projected/kube-api-access",
)
_SYLLABLES = (
    "lib", "sys", "net", "core", "ssl", "crypt", "util", "conf", "kube", "proxy",
    "contain", "er", "d", "run", "c", "py", "thon", "gnu", "x", "64", "io", "uring",
    "ctl", "pod", "man", "zst", "json", "yaml", "grpc", "proto", "http", "2", "3",
)  # fmt: skip
_SUFFIXES = ("", "", ".so", ".so.1", ".so.6", ".py", ".pyc", ".ko.zst", ".conf", ".sh")


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4)))


def _path(rng: random.Random) -> bytes:
    d = rng.choice(_DIRS).format(
        pkg=_word(rng),
        sub=_word(rng),
        n=rng.randint(1, 4000),
        uuid=f"{rng.getrandbits(32):08x}-{rng.getrandbits(16):04x}-{rng.getrandbits(16):04x}-"
        f"{rng.getrandbits(16):04x}-{rng.getrandbits(48):012x}",
    )
    return f"{d}/{_word(rng)}{rng.choice(_SUFFIXES)}".encode()


def generate(
    directory: Path,
    entries: int,
    *,
    seed: int = 1,
    violation_every: int = 0,
    keep_template_data: bool = False,
) -> tuple[Path, Path, list[bytes]]:
    """Write ``ima.bin`` and ``ima.txt`` (the same ``ima-ng`` list) into ``directory``.

    Entry 0 is boot_aggregate. When ``violation_every`` is set, every such entry
    (after the first) is a violation: zero template hash, a d-ng digest of 20 zero
    bytes, as the kernel logs one. Returns the two paths and, with
    ``keep_template_data``, the template data of every entry (else an empty list).
    """
    rng = random.Random(seed)
    pack = struct.Struct("<I").pack
    sha1 = hashlib.sha1
    bin_path = directory / "ima.bin"
    txt_path = directory / "ima.txt"
    kept: list[bytes] = []
    head = pack(6) + b"ima-ng"
    dng_head = pack(7 + 1 + 32) + b"sha256:\x00"
    viol_dng = pack(7 + 1 + 20) + b"sha256:\x00" + bytes(20)
    pcr = pack(10)
    zero = bytes(20)
    with bin_path.open("wb") as fb, txt_path.open("wb") as ft:
        bparts: list[bytes] = []
        tparts: list[bytes] = []
        for i in range(entries):
            name = b"boot_aggregate" if i == 0 else _path(rng)
            digest = rng.randbytes(32)
            violation = bool(violation_every) and i > 0 and i % violation_every == 0
            if violation:
                dng = viol_dng
                shown = b"sha256:" + zero.hex().encode()
            else:
                dng = dng_head + digest
                shown = b"sha256:" + digest.hex().encode()
            data = dng + pack(len(name) + 1) + name + b"\x00"
            th = zero if violation else sha1(data).digest()
            bparts.append(pcr + th + head + pack(len(data)) + data)
            tparts.append(b"10 %s ima-ng %s %s\n" % (th.hex().encode(), shown, name))
            if keep_template_data:
                kept.append(data)
            if len(bparts) >= 4096:
                fb.write(b"".join(bparts))
                ft.write(b"".join(tparts))
                bparts.clear()
                tparts.clear()
        fb.write(b"".join(bparts))
        ft.write(b"".join(tparts))
    return bin_path, txt_path, kept


def floor_loop(datas: Sequence[bytes]) -> tuple[bytes, bytes]:
    """Hashing floor, plain loop: hash each template data with both banks and extend both."""
    s1 = hashlib.sha1
    s2 = hashlib.sha256
    c1 = bytes(20)
    c2 = bytes(32)
    for d in datas:
        c1 = s1(c1 + s1(d).digest()).digest()
        c2 = s2(c2 + s2(d).digest()).digest()
    return c1, c2


def floor_batched(datas: Sequence[bytes]) -> tuple[bytes, bytes]:
    """Hashing floor, batched: one comprehension per bank, then one extend loop per bank."""
    s1 = hashlib.sha1
    s2 = hashlib.sha256
    h1 = [s1(d).digest() for d in datas]
    h2 = [s2(d).digest() for d in datas]
    c1 = bytes(20)
    for d in h1:
        c1 = s1(c1 + d).digest()
    c2 = bytes(32)
    for d in h2:
        c2 = s2(c2 + d).digest()
    return c1, c2


_CHILD = """
import resource, sys
from cima.eventlog.ima import replay_ascii, replay_binary

def peak_kib():
    # VmHWM: the high-water RSS of this address space. ru_maxrss is not used on its own:
    # Linux carries the parent's high-water mark into an exec'd child's ru_maxrss.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

fmt, path = sys.argv[1], sys.argv[2]
base = peak_kib()
fn = replay_binary if fmt == "binary" else replay_ascii
with open(path, "rb") as f:
    r = fn(f, ["sha1", "sha256"])
print(base, peak_kib(), r.entries)
"""


def peak_rss_mb(fmt: str, path: Path) -> tuple[float, float, int]:
    """(RSS after imports, peak RSS) in MB of a fresh process that only replays ``path``,
    and the number of entries it replayed."""
    code = f"import sys; sys.path.insert(0, {str(ROOT / 'src')!r})\n" + _CHILD
    out = subprocess.run(
        [sys.executable, "-c", code, fmt, str(path)], check=True, capture_output=True, text=True
    ).stdout.split()
    return int(out[0]) / 1024, int(out[1]) / 1024, int(out[2])


def _interleaved(fns: dict[str, Any], repeat: int) -> tuple[dict[str, float], dict[str, Any]]:
    """Best time of each function, run round by round so that all see the same machine load."""
    best = {k: float("inf") for k in fns}
    values: dict[str, Any] = {}
    for _ in range(repeat):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            values[k] = fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best, values


def _replay_file(fn: Any, path: Path) -> Any:
    with path.open("rb") as f:
        return fn(f, list(BANKS))


def run(*, entries: int | None = None, repeat: int = 3, seed: int = 1) -> list[dict[str, Any]]:
    """Run the IMA benchmark; one dict per measurement."""
    n = DEFAULT_ENTRIES if entries is None else entries
    with tempfile.TemporaryDirectory(prefix="cima-bench-ima-") as tmp:
        t0 = time.perf_counter()
        bin_path, txt_path, datas = generate(Path(tmp), n, seed=seed, keep_template_data=True)
        gen_s = time.perf_counter() - t0
        best, values = _interleaved(
            {
                "floor_loop": lambda: floor_loop(datas),
                "floor_batched": lambda: floor_batched(datas),
                "binary": lambda: _replay_file(replay_binary, bin_path),
                "ascii": lambda: _replay_file(replay_ascii, txt_path),
            },
            repeat,
        )
        datas.clear()
        expect = values["floor_loop"]
        assert values["floor_batched"] == expect
        floor_s = min(best["floor_loop"], best["floor_batched"])
        rows: list[dict[str, Any]] = []
        for key, label in (
            ("floor_loop", "ima floor: hashlib, plain loop"),
            ("floor_batched", "ima floor: hashlib, batched"),
        ):
            rows.append(
                {
                    "name": label,
                    "entries": n,
                    "seconds": best[key],
                    "entries_per_s": n / best[key],
                    "ratio_to_floor": best[key] / floor_s,
                }
            )
        for fmt, path in (("binary", bin_path), ("ascii", txt_path)):
            res = values[fmt]
            got = (res.bank.get("pcr10", "sha1"), res.bank.get("pcr10", "sha256"))
            if got != expect or res.entries != n or res.template_hash_mismatch_count:
                raise AssertionError(f"cima {fmt} replay disagrees with the floor's")
            base_mb, peak_mb, replayed = peak_rss_mb(fmt, path)
            if replayed != n:
                raise AssertionError(f"the {fmt} replay child replayed {replayed} of {n} entries")
            secs = best[fmt]
            rows.append(
                {
                    "name": f"ima cima replay_{fmt} (parse + check + sha1/sha256 from file)",
                    "entries": n,
                    "seconds": secs,
                    "entries_per_s": n / secs,
                    "ratio_to_floor": secs / floor_s,
                    "peak_rss_mb": round(peak_mb, 1),
                    "rss_after_import_mb": round(base_mb, 1),
                    "file_mb": round(path.stat().st_size / 1e6, 1),
                }
            )
        rows.append({"name": "ima list generation", "entries": n, "seconds": gen_s})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--entries", type=int, default=DEFAULT_ENTRIES)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    rows = run(entries=args.entries, repeat=args.repeat, seed=args.seed)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        for r in rows:
            print(r)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
