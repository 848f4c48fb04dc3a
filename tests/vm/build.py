"""Build the guest of the measured-boot virtual machine, and cache what was built.

The guest is made of Debian packages and of this machine's Python:

- the kernel: Debian's ``linux-image-amd64`` (6.1), fetched with ``apt-get download`` and
  unpacked with ``dpkg -x``, never installed. It has the TPM drivers (TIS, CRB) and IMA built
  in; virtio, ext4 and the SHA-384 code are modules, loaded by the initramfs.
- the initramfs: ``busybox-static``, those modules with their ``modules.dep`` and
  ``modules.alias`` (``busybox depmod``), and an ``/init`` that mounts the root disk and
  switches to it. IMA's ``tcb`` policy measures nothing on the initramfs (a ramfs): everything
  measured comes from the ext4 disks below. The kernel's own ``/sbin/modprobe`` request for
  ``crypto-sha384`` (IMA with ``ima_hash=sha384`` and every TPM bank's hash, at late init) is
  answered from the initramfs.
- the root disk (ext4, read-only): busybox with its applets, the Python interpreter this
  project's virtual environment runs on (its standard library, without tests and tools), the
  distributions ``cima[tpm]`` needs at run time (copied from the virtual environment, file list
  from their ``RECORD``), ``crun`` (Debian), and every shared library they load (``ldd``, plus
  the TPM device TCTI that tpm2-tss opens with ``dlopen``); an OCI bundle for crun at
  ``/opt/container`` (:func:`container_spec`). Its ``/sbin/init`` mounts the unified cgroup
  hierarchy (cgroup v2) at ``/sys/fs/cgroup``, where crun makes the container's cgroup.
- the code disk (ext4, read-only, mounted at ``/opt/cima``): ``src/cima``, compiled to
  unchecked-hash ``.pyc``, the guest's control server and the ``cima`` launcher. It is small
  and rebuilt in a second when the code changes; the rest is rebuilt only when the kernel,
  busybox, the interpreter, a distribution or this file changes.
- a payload disk per boot (``payload_image``): files a test puts in front of IMA, with
  extended attributes (``security.ima`` signatures) set through ``debugfs``.
- a state disk (``state_image``, optional, read-write, mounted at ``/var/lib/cima``): the
  machine's persistent storage, attached to every boot of one machine (the agent's journal).

Cache (``$CIMA_VM_CACHE``, default ``~/.cache/cima-vm``)::

    debs/             the downloaded .deb files and index.json (package -> file)
    base-<key>/       vmlinuz, initrd.img, root.ext4, manifest.json
    code-<key>/       code.ext4

Keys hash everything that goes into a layer; a layer whose directory exists is reused as is
(directories are renamed into place only when complete). ``apt-get`` runs only when a package
is not in ``debs/`` yet.
"""

from __future__ import annotations

import compileall
import contextlib
import fcntl
import hashlib
import json
import os
import py_compile
import re
import shutil
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src" / "cima"
GUEST_SERVER = Path(__file__).with_name("guest_server.py")

#: Bump to rebuild every cached layer after a change to what goes in it.
FORMAT = 3

KERNEL_META_PACKAGE = "linux-image-amd64"
PACKAGES_TOOLS = ("busybox-static",)
PACKAGES_CRUN = ("crun", "libyajl2")

#: Kernel modules the initramfs loads (their dependencies come along from modules.dep).
MODULES = (
    "virtio_pci",
    "virtio_blk",
    "virtio_console",
    "virtio_net",
    "virtio-rng",
    "crc32c_generic",
    "ext4",
    "sha512_generic",
)
#: Serial numbers of the virtio disks, as the guest finds them in /sys/block/vd*/serial.
DISK_ROOT = "cima-root"
DISK_CODE = "cima-code"
DISK_PAYLOAD = "cima-payload"
DISK_STATE = "cima-state"
#: Name of the virtio-serial port of the control channel.
CONTROL_PORT = "org.cima.control"
#: Where things live in the guest.
GUEST_CODE = "/opt/cima"
GUEST_PAYLOAD = "/payload"
GUEST_PYLIB = "/opt/pylib"
GUEST_PYTHON = "/usr/local/bin/python3"
#: The writable state disk (the agent's journal), mounted read-write when a boot has one.
GUEST_STATE = "/var/lib/cima"
#: An OCI bundle that ``crun`` runs in the guest: a read-only root with the guest's ``/usr``.
GUEST_CONTAINER = "/opt/container"
#: The container's id: 64 hex digits, as container runtimes name them, and its cgroup.
CONTAINER_ID = hashlib.sha256(b"cima-vm container").hexdigest()
CONTAINER_CGROUP = f"/cima-vm/{CONTAINER_ID}"
CONTAINER_ARGS = ("/usr/bin/sleep", "1000000")

#: Standard library parts the guest never needs.
STDLIB_SKIP = {
    "site-packages",
    "dist-packages",
    "test",
    "idlelib",
    "tkinter",
    "turtledemo",
    "ensurepip",
    "lib2to3",
    "pydoc_data",
    "distutils",
    "venv",
}

# The initramfs's /init: load the modules, mount the disks, switch to the root disk.
INIT_RAMFS = f"""#!/bin/busybox sh
export PATH=/bin
busybox mkdir -p /proc /sys /dev /newroot
busybox mount -t proc proc /proc
busybox mount -t sysfs sysfs /sys
busybox mount -t devtmpfs devtmpfs /dev
busybox echo "cima-vm: initramfs" > /dev/kmsg
for m in $(busybox cat /etc/modules); do
    busybox modprobe "$m" || busybox echo "cima-vm: cannot load module $m" > /dev/kmsg
done
disk() {{
    for s in /sys/block/vd*/serial; do
        if [ "$(busybox cat "$s" 2>/dev/null)" = "$1" ]; then
            d=${{s%/serial}}; busybox echo "/dev/${{d##*/}}"; return 0
        fi
    done
    return 1
}}
n=0
while ! root=$(disk {DISK_ROOT}); do
    n=$((n + 1)); [ $n -gt 200 ] && break; busybox usleep 50000
done
if [ -z "$root" ]; then
    busybox echo "cima-vm: no root disk (serial {DISK_ROOT})" > /dev/kmsg
    busybox poweroff -f
fi
busybox mount -t ext4 -o ro "$root" /newroot
code=$(disk {DISK_CODE}) && busybox mount -t ext4 -o ro "$code" /newroot{GUEST_CODE}
payload=$(disk {DISK_PAYLOAD}) && busybox mount -t ext4 -o ro "$payload" /newroot{GUEST_PAYLOAD}
state=$(disk {DISK_STATE}) && busybox mount -t ext4 -o rw "$state" /newroot{GUEST_STATE}
busybox mount --move /dev /newroot/dev
busybox umount /proc /sys
exec busybox switch_root /newroot /sbin/init
"""

# The root disk's /sbin/init: file systems, network, then the control server as PID 1.
INIT_ROOT = f"""#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t securityfs securityfs /sys/kernel/security
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=755 tmpfs /run
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
hostname cima-guest
ip link set lo up
if ip link set eth0 up 2>/dev/null; then
    ip addr add 10.0.2.15/24 dev eth0
    ip route add default via 10.0.2.2
fi
export HOME=/root PATH={GUEST_CODE}/bin:/usr/local/bin:/usr/bin:/usr/sbin
export PYTHONPATH={GUEST_CODE}/src:{GUEST_PYLIB} PYTHONDONTWRITEBYTECODE=1 PYTHONHOME=@PYTHONHOME@
# The same imports in the same order at every boot: IMA lists of two boots line up.
export PYTHONHASHSEED=0
echo "cima-vm: starting the control server" > /dev/kmsg
exec {GUEST_PYTHON} {GUEST_CODE}/vm/guest_server.py --port {CONTROL_PORT}
"""

CIMA_LAUNCHER = f"""#!{GUEST_PYTHON}
import sys

from cima.cli.main import main

sys.exit(main())
"""


class BuildError(RuntimeError):
    """The guest could not be built; the message says which step and why."""


@dataclass(frozen=True)
class GuestImages:
    """What a boot needs, all in the cache (read-only to the virtual machine)."""

    kernel: Path
    initrd: Path
    rootfs: Path
    code: Path
    kernel_release: str
    python_home: str
    #: Seconds spent per step in this call; empty when everything came from the cache.
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def built(self) -> bool:
        return bool(self.timings)


def cache_dir() -> Path:
    return Path(os.environ.get("CIMA_VM_CACHE") or Path.home() / ".cache" / "cima-vm")


def available() -> str | None:
    """None when the host can build and boot the guest, else the reason it cannot."""
    if os.geteuid() != 0:
        return "building the guest needs root (dpkg -x ownership, debugfs on images)"
    needed = {
        "qemu-system-x86_64": "qemu-system-x86",
        "swtpm": "swtpm",
        "swtpm_setup": "swtpm-tools",
        "mkfs.ext4": "e2fsprogs",
        "debugfs": "e2fsprogs",
        "dpkg": "dpkg",
        "apt-get": "apt",
        "ldd": "libc-bin",
    }
    missing = sorted({pkg for tool, pkg in needed.items() if shutil.which(tool) is None})
    if missing:
        return f"missing Debian packages: {' '.join(missing)}"
    if ovmf_code() is None:
        return "missing Debian package: ovmf (/usr/share/OVMF/OVMF_CODE_4M.fd)"
    return None


def ovmf_code() -> tuple[Path, Path] | None:
    """OVMF's code and variable-template flash images (Debian's ``ovmf``), without Secure Boot."""
    base = Path("/usr/share/OVMF")
    for code, vars_ in (("OVMF_CODE_4M.fd", "OVMF_VARS_4M.fd"), ("OVMF_CODE.fd", "OVMF_VARS.fd")):
        if (base / code).is_file() and (base / vars_).is_file():
            return base / code, base / vars_
    return None


def _run(
    cmd: list[str],
    what: str,
    *,
    cwd: Path | None = None,
    timeout: float | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        cmd, capture_output=True, text=True, check=False, cwd=cwd, timeout=timeout, env=env
    )
    if done.returncode != 0:
        raise BuildError(
            f"{what}: {' '.join(cmd)} exited {done.returncode}: "
            f"{(done.stderr or done.stdout).strip()[-2000:]}"
        )
    return done


@contextlib.contextmanager
def _locked(cache: Path) -> Iterator[None]:
    """One builder at a time per cache (another test run may be building the same layer)."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _digest(parts: Iterable[bytes | str]) -> str:
    h = hashlib.sha256()
    for p in parts:
        b = p.encode() if isinstance(p, str) else p
        h.update(len(b).to_bytes(8, "big") + b)
    return h.hexdigest()[:20]


# -- Debian packages -----------------------------------------------------------------------------


class Debs:
    """Debian packages in the cache, downloaded once with ``apt-get download``."""

    def __init__(self, folder: Path, log: Callable[[str], None]) -> None:
        self.folder = folder
        self.log = log
        self.index_file = folder / "index.json"
        folder.mkdir(parents=True, exist_ok=True)
        try:
            self.index: dict[str, str] = json.loads(self.index_file.read_text())
        except (OSError, ValueError):
            self.index = {}
        self._updated = False

    def _apt(self, cmd: list[str], what: str) -> subprocess.CompletedProcess[str]:
        try:
            return _run(cmd, what, cwd=self.folder, timeout=600)
        except BuildError:
            if self._updated:
                raise
            # A machine whose package lists were never fetched knows no candidate yet.
            self.log("apt-get update (package lists are missing or stale)")
            _run(["apt-get", "update", "-qq"], "apt-get update", timeout=600)
            self._updated = True
            return _run(cmd, what, cwd=self.folder, timeout=600)

    def kernel_package(self) -> str:
        """The versioned kernel package ``linux-image-amd64`` depends on (resolved once)."""
        key = f"resolve:{KERNEL_META_PACKAGE}"
        if key in self.index:
            return self.index[key]
        out = self._apt(
            ["apt-cache", "depends", KERNEL_META_PACKAGE], "resolving the kernel"
        ).stdout
        m = re.search(r"Depends:\s*(linux-image-[0-9][^\s]*)", out)
        if not m:
            raise BuildError(f"apt-cache depends {KERNEL_META_PACKAGE} names no kernel: {out}")
        self.index[key] = m.group(1)
        self._save()
        return m.group(1)

    def get(self, package: str) -> Path:
        """The .deb of ``package`` (downloaded on first use)."""
        name = self.index.get(package)
        if name and (self.folder / name).is_file():
            return self.folder / name
        before = set(self.folder.glob("*.deb"))
        self.log(f"apt-get download {package}")
        self._apt(["apt-get", "download", "-q", package], f"downloading {package}")
        new = sorted(set(self.folder.glob("*.deb")) - before)
        candidates = new or sorted(self.folder.glob(f"{package}_*.deb"))
        if not candidates:
            raise BuildError(f"apt-get download {package} left no .deb in {self.folder}")
        self.index[package] = candidates[-1].name
        self._save()
        return candidates[-1]

    def _save(self) -> None:
        tmp = self.index_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.index, indent=2, sort_keys=True) + "\n")
        tmp.replace(self.index_file)


# -- initramfs (cpio "newc", written here: deterministic, no tool needed) ------------------------


def _cpio_entry(out: list[bytes], ino: int, name: str, mode: int, data: bytes = b"") -> None:
    namez = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(namez), 0)
    head = b"070701" + b"".join(f"{v:08x}".encode() for v in fields)
    out.append(head + namez + b"\0" * (-(len(head) + len(namez)) % 4))
    out.append(data + b"\0" * (-len(data) % 4))


def cpio_newc(tree: Path) -> bytes:
    """A cpio archive (SVR4 ``newc``, as the kernel reads an initramfs) of ``tree``.

    Entries are sorted, owned by root, dated 0: the same tree gives the same bytes, so the
    initrd digest the EFI stub measures into pcr9 depends only on the content.
    """
    out: list[bytes] = []
    ino = 1
    for path in sorted(tree.rglob("*")):
        rel = path.relative_to(tree).as_posix()
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            _cpio_entry(out, ino, rel, 0o120777, os.readlink(path).encode())
        elif stat.S_ISDIR(st.st_mode):
            _cpio_entry(out, ino, rel, 0o040755)
        else:
            perm = 0o755 if st.st_mode & 0o111 else 0o644
            _cpio_entry(out, ino, rel, 0o100000 | perm, path.read_bytes())
        ino += 1
    _cpio_entry(out, ino, "TRAILER!!!", 0)
    data = b"".join(out)
    return data + b"\0" * (-len(data) % 512)


# -- ext4 images -----------------------------------------------------------------------------


def _tree_size(tree: Path) -> int:
    total = 0
    for p in tree.rglob("*"):
        with contextlib.suppress(OSError):
            total += p.lstat().st_size
    return total


def make_ext4(
    tree: Path, image: Path, label: str, xattrs: dict[str, dict[str, bytes]] | None = None
) -> None:
    """An ext4 image of ``tree`` (``mkfs.ext4 -d``), without a journal (it is mounted read-only).

    ``xattrs`` maps a path inside the image (``bin/hello``) to extended attributes
    (``{"security.ima": b"..."}``), set with ``debugfs ea_set`` so that they do not depend on
    the host file system's support for ``security.*`` attributes.
    """
    size = max(_tree_size(tree) * 13 // 10 + (48 << 20), 64 << 20)
    image.unlink(missing_ok=True)
    with open(image, "wb") as f:
        f.truncate(size)
    _run(
        [
            "mkfs.ext4", "-q", "-F", "-L", label, "-O", "^has_journal",
            "-E", "root_owner=0:0", "-I", "256", "-d", str(tree), str(image),
        ],
        f"mkfs.ext4 of {tree}",
        timeout=300,
    )  # fmt: skip
    if xattrs:
        with tempfile.TemporaryDirectory() as tmp:
            script = []
            for n, (rel, attrs) in enumerate(sorted(xattrs.items())):
                for m, (name, value) in enumerate(sorted(attrs.items())):
                    vfile = Path(tmp) / f"v{n}-{m}"
                    vfile.write_bytes(value)
                    script.append(f'ea_set -f {vfile} "/{rel.lstrip("/")}" {name}')
            cmds = Path(tmp) / "cmds"
            cmds.write_text("\n".join(script) + "\n")
            done = _run(["debugfs", "-w", "-f", str(cmds), str(image)], "debugfs ea_set")
            if "rror" in done.stderr or "not found" in done.stderr:
                raise BuildError(f"debugfs ea_set on {image}: {done.stderr.strip()}")


def payload_image(
    tree: Path, image: Path, xattrs: dict[str, dict[str, bytes]] | None = None
) -> Path:
    """The payload disk of one boot: ``tree`` as ext4, mounted read-only at ``/payload``."""
    make_ext4(tree, image, "cima-payload", xattrs)
    return image


def state_image(image: Path) -> Path:
    """An empty ext4 disk the guest mounts read-write at ``/var/lib/cima``.

    Attached to every boot of one machine it is the machine's persistent storage: what the
    agent writes there (its journal) is there at the next boot.
    """
    with tempfile.TemporaryDirectory() as tmp:
        make_ext4(Path(tmp), image, "cima-state")
    return image


# -- the root file system -----------------------------------------------------------------------


_MERGED = {"bin": "usr/bin", "sbin": "usr/sbin", "lib": "usr/lib", "lib64": "usr/lib64"}


class Stage:
    """A root file system being assembled in ``root`` (merged /usr, as Debian 12).

    Paths are guest paths. Nothing is ever written through a symbolic link: the guest's links
    (absolute ones included) mean something in the guest, not on this host, so a folder on
    the way that is a link is an error and a link in the place of a file is replaced.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        for d in ("usr/bin", "usr/sbin", "usr/lib", "usr/lib64"):
            (root / d).mkdir(parents=True, exist_ok=True)
        for link, target in _MERGED.items():
            (root / link).symlink_to(target)
        self.installed: set[str] = set()

    def dest(self, guest_path: str) -> Path:
        """Where ``guest_path`` lies in the stage; its folders are created, never followed."""
        parts = list(Path(os.path.normpath("/" + guest_path.lstrip("/")).lstrip("/")).parts)
        if not parts:
            raise BuildError(f"not a file path: {guest_path!r}")
        if parts[0] in _MERGED:
            parts = [*_MERGED[parts[0]].split("/"), *parts[1:]]
        cur = self.root
        for part in parts[:-1]:
            cur = cur / part
            if cur.is_symlink():
                raise BuildError(f"{guest_path}: {cur} is a symbolic link in the guest tree")
            cur.mkdir(exist_ok=True)
        return cur / parts[-1]

    def _fresh(self, guest_path: str) -> Path:
        d = self.dest(guest_path)
        if d.is_symlink():
            d.unlink()
        return d

    def write(self, guest_path: str, data: bytes | str, mode: int = 0o644) -> None:
        d = self._fresh(guest_path)
        d.write_bytes(data.encode() if isinstance(data, str) else data)
        d.chmod(mode)
        self.installed.add(str(d))

    def mkdir(self, guest_path: str) -> None:
        """A folder (and its parents); a link in its place is an error."""
        d = self.dest(guest_path)
        if d.is_symlink():
            raise BuildError(f"{guest_path}: {d} is a symbolic link in the guest tree")
        d.mkdir(exist_ok=True)

    def symlink(self, guest_path: str, target: str) -> None:
        """A link, unless something is there already."""
        d = self.dest(guest_path)
        if not d.is_symlink() and not d.exists():
            d.symlink_to(target)

    def copy(self, source: Path, guest_path: str | None = None) -> None:
        """Copy a host file (a symlink stays a symlink, its target is copied too)."""
        guest = guest_path or str(source)
        d = self.dest(guest)
        if str(d) in self.installed or d.is_symlink() or d.exists():
            return
        self.installed.add(str(d))
        if source.is_symlink():
            target = os.readlink(source)
            d.symlink_to(target)
            if target.startswith("/"):
                self.copy(Path(target), target)
            else:
                self.copy(source.parent / target, os.path.normpath(Path(guest).parent / target))
        else:
            shutil.copy2(source, d)

    def copy_tree(
        self, source: Path, guest_path: str, skip: Callable[[Path], bool] | None = None
    ) -> None:
        for dirpath, dirnames, filenames in os.walk(source):
            base = Path(dirpath)
            if skip is not None:
                dirnames[:] = [n for n in dirnames if not skip(base / n)]
            for name in filenames:
                p = base / name
                if skip is not None and skip(p):
                    continue
                rel = p.relative_to(source)
                self.copy(p, f"{guest_path}/{rel.as_posix()}")


def _is_elf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def _needed_libraries(binaries: Iterable[Path], extra_dirs: Iterable[Path] = ()) -> dict[str, Path]:
    """Guest path -> host path of every shared library ``binaries`` load (``ldd``, transitively).

    ``extra_dirs`` are library folders of unpacked packages, searched first.
    """
    env = dict(os.environ)
    extra = [str(d) for d in extra_dirs]
    if extra:
        env["LD_LIBRARY_PATH"] = ":".join(extra)
    found: dict[str, Path] = {}
    for binary in binaries:
        done = subprocess.run(
            ["ldd", str(binary)], capture_output=True, text=True, env=env, check=False
        )
        if (
            "not a dynamic executable" in done.stdout + done.stderr
            or "statically linked" in done.stdout
        ):
            continue
        for raw in done.stdout.splitlines():
            line = raw.strip()
            if "=> not found" in line:
                raise BuildError(f"{binary}: a shared library is missing on this host: {line}")
            m = re.match(r"(\S+) => (\S+) \(0x[0-9a-f]+\)", line) or re.match(
                r"(/\S+) \(0x[0-9a-f]+\)", line
            )
            if not m:
                continue
            host = Path(m.group(2) if m.lastindex == 2 else m.group(1))
            guest = str(host)
            for d in extra:
                if guest.startswith(d + "/"):
                    guest = "/usr/lib/x86_64-linux-gnu/" + host.name
            found.setdefault(guest, host)
    return found


def _runtime_distributions() -> list[metadata.Distribution]:
    """The installed distributions ``cima[tpm]`` needs at run time (the dependency closure)."""
    wanted: list[tuple[str, frozenset[str]]] = [("cima", frozenset({"tpm"}))]
    done: set[tuple[str, frozenset[str]]] = set()
    found: dict[str, metadata.Distribution] = {}
    while wanted:
        name, extras = wanted.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if (key, extras) in done:
            continue
        done.add((key, extras))
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError as e:
            raise BuildError(f"{name} is not installed in {sys.prefix} (make setup)") from e
        found[key] = dist
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is not None and not any(
                req.marker.evaluate({"extra": e}) for e in (extras or {""})
            ):
                continue
            wanted.append((req.name, frozenset(req.extras)))
    return [d for k, d in sorted(found.items()) if k != "cima"]


def _python_layout() -> dict[str, str]:
    base = Path(sys.base_prefix)
    executable = Path(getattr(sys, "_base_executable", sys.executable)).resolve()
    stdlib = Path(
        sysconfig.get_paths(vars={"base": str(base), "installed_base": str(base)})["stdlib"]
    )
    return {
        "version": sys.version,
        "prefix": str(base),
        "executable": str(executable),
        "stdlib": str(stdlib),
    }


def _base_key(debs: list[Path], dists: list[metadata.Distribution], python: dict[str, str]) -> str:
    return _digest(
        [
            f"format {FORMAT}",
            *(f"{d.name}:{d.stat().st_size}" for d in debs),
            json.dumps(python, sort_keys=True),
            *(f"{d.metadata['Name']}=={d.version}" for d in dists),
            Path(__file__).read_bytes(),
        ]
    )


def _code_key() -> str:
    parts: list[bytes | str] = [f"format {FORMAT}", GUEST_SERVER.read_bytes(), CIMA_LAUNCHER]
    for p in sorted(SRC.rglob("*")):
        if "__pycache__" in p.parts or not p.is_file() or p.suffix == ".pyc":
            continue
        parts += [p.relative_to(SRC).as_posix(), p.read_bytes()]
    return _digest(parts)


def _unpack(deb: Path, into: Path) -> None:
    into.mkdir(parents=True, exist_ok=True)
    _run(["dpkg", "-x", str(deb), str(into)], f"dpkg -x {deb.name}", timeout=600)


def _build_initramfs(kernel_root: Path, release: str, busybox: Path, out: Path, work: Path) -> None:
    """Modules with their dependencies, busybox, /init; modules.dep/alias for the subset."""
    moddir = kernel_root / "lib" / "modules" / release
    _run([str(busybox), "depmod", "-b", str(kernel_root), release], "busybox depmod", timeout=300)
    deps: dict[str, list[str]] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        if ":" in line:
            mod, rest = line.split(":", 1)
            deps[mod] = rest.split()
    by_name = {Path(m).name.removesuffix(".ko").replace("-", "_"): m for m in deps}
    chosen: list[str] = []

    def add(mod: str) -> None:
        if mod in chosen:
            return
        for dep in deps.get(mod, []):
            add(dep)
        chosen.append(mod)

    for name in MODULES:
        module = by_name.get(name.replace("-", "_"))
        if module is None:
            raise BuildError(f"kernel {release} has no module {name}")
        add(module)
    tree = work / "initramfs"
    tmod = tree / "lib" / "modules" / release
    for mod in chosen:
        (tmod / mod).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(moddir / mod, tmod / mod)
    (tmod / "modules.dep").write_text("".join(f"{m}: {' '.join(deps[m])}\n" for m in chosen))
    names = {Path(m).name.removesuffix(".ko") for m in chosen}
    aliases = [
        line
        for line in (moddir / "modules.alias").read_text().splitlines()
        if len(line.split()) == 3 and line.split()[2] in names
    ]
    (tmod / "modules.alias").write_text("\n".join(aliases) + "\n")
    for f in ("modules.builtin", "modules.order"):
        if (moddir / f).exists():
            shutil.copy2(moddir / f, tmod / f)
    (tree / "bin").mkdir(parents=True)
    shutil.copy2(busybox, tree / "bin" / "busybox")
    (tree / "sbin").symlink_to("bin")
    for applet in ("sh", "modprobe", "insmod", "mount"):
        (tree / "bin" / applet).symlink_to("busybox")
    (tree / "etc").mkdir()
    (tree / "etc" / "modules").write_text("\n".join(MODULES) + "\n")
    (tree / "init").write_text(INIT_RAMFS)
    (tree / "init").chmod(0o755)
    out.write_bytes(cpio_newc(tree))


def container_spec() -> dict[str, object]:
    """The OCI runtime spec (``config.json``) of the guest's container.

    Its root is an empty read-only folder in which the guest's ``/usr`` is bound read-only
    (``bin``, ``sbin`` and ``lib`` are links into it, as in the merged-/usr guest); its own
    pid, mount, ipc and uts namespaces; a cgroup named after its id (cgroupfs, cgroup v2).
    """
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": list(CONTAINER_ARGS),
            "env": ["PATH=/usr/bin:/usr/sbin"],
            "cwd": "/",
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": True},
        "hostname": "cima-container",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {
                "destination": "/dev",
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
            },
            {
                "destination": "/tmp",
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "nodev", "mode=1777"],
            },
            {"destination": "/usr", "type": "bind", "source": "/usr", "options": ["rbind", "ro"]},
        ],
        "linux": {
            "namespaces": [{"type": t} for t in ("pid", "mount", "ipc", "uts")],
            "cgroupsPath": CONTAINER_CGROUP,
        },
    }


def _stage_container(stage: Stage) -> None:
    stage.write(f"{GUEST_CONTAINER}/config.json", json.dumps(container_spec(), indent=2) + "\n")
    rootfs = f"{GUEST_CONTAINER}/rootfs"
    for d in ("proc", "dev", "tmp", "usr"):
        stage.mkdir(f"{rootfs}/{d}")
    for link, target in _MERGED.items():
        stage.symlink(f"{rootfs}/{link}", target)


def _build_rootfs(
    busybox: Path,
    crun_roots: list[Path],
    python: dict[str, str],
    dists: list[metadata.Distribution],
    out: Path,
    work: Path,
) -> None:
    stage = Stage(work / "rootfs")
    # configuration and mount points
    stage.write("/etc/passwd", "root:x:0:0:root:/root:/bin/sh\n")
    stage.write("/etc/group", "root:x:0:\n")
    stage.write("/etc/hosts", "127.0.0.1 localhost cima-guest\n")
    stage.write("/etc/hostname", "cima-guest\n")
    stage.write(
        "/etc/ld.so.conf", "/usr/local/lib\n/usr/lib/x86_64-linux-gnu\n/lib/x86_64-linux-gnu\n"
    )
    stage.write("/etc/nsswitch.conf", "passwd: files\ngroup: files\nhosts: files\n")
    for d in (
        "proc",
        "sys",
        "dev",
        "tmp",
        "run",
        "root",
        "var/tmp",
        "opt/cima",
        "payload",
        GUEST_STATE.lstrip("/"),
        GUEST_PYLIB.lstrip("/"),
    ):
        (stage.root / d).mkdir(parents=True, exist_ok=True)
    stage.write("/sbin/init", INIT_ROOT.replace("@PYTHONHOME@", python["prefix"]), 0o755)
    _stage_container(stage)
    # busybox and its applets (after the files above: an applet link never replaces a file)
    stage.copy(busybox, "/usr/bin/busybox")
    applets = _run([str(busybox), "--list-full"], "busybox --list-full").stdout.split()
    for applet in applets:
        if applet not in ("bin/busybox", "usr/bin/busybox"):
            stage.symlink("/" + applet, "/usr/bin/busybox")
    # the Python interpreter and its standard library
    executable = Path(python["executable"])
    stage.copy(executable)
    stage.symlink(GUEST_PYTHON, str(executable))
    stage.symlink("/usr/local/bin/python", str(executable))
    stdlib = Path(python["stdlib"])

    def skip_stdlib(p: Path) -> bool:
        rel = p.relative_to(stdlib)
        if rel.parts[0] in STDLIB_SKIP or rel.parts[0].startswith("config-"):
            return True
        return p.name.endswith((".opt-1.pyc", ".opt-2.pyc"))

    stage.copy_tree(stdlib, str(stdlib), skip_stdlib)
    # the run-time distributions
    for dist in dists:
        for f in dist.files or []:
            rel = Path(str(f))
            if rel.parts[0] == ".." or rel.suffix == ".pth":
                continue
            src = Path(str(dist.locate_file(f)))
            if src.is_file():
                stage.copy(src, f"{GUEST_PYLIB}/{rel.as_posix()}")
    # crun
    crun = crun_roots[0] / "usr" / "bin" / "crun"
    stage.copy(crun, "/usr/bin/crun")
    # shared libraries of every ELF file, and the TCTI tpm2-tss opens with dlopen
    elves = [p for p in stage.root.rglob("*") if p.is_file() and not p.is_symlink() and _is_elf(p)]
    tcti = sorted(Path("/usr/lib/x86_64-linux-gnu").glob("libtss2-tcti-device.so*"))
    if not tcti:
        raise BuildError(
            "libtss2-tcti-device is not installed (Debian package libtss2-tcti-device0)"
        )
    for t in tcti:
        stage.copy(t)
    elves += [t for t in tcti if not t.is_symlink()]
    libdirs = [r / sub / "x86_64-linux-gnu" for r in crun_roots for sub in ("usr/lib", "lib")]
    for guest, host in sorted(_needed_libraries(elves, [d for d in libdirs if d.is_dir()]).items()):
        stage.copy(host, guest)
    _run(["ldconfig", "-r", str(stage.root)], "ldconfig -r", timeout=120)
    make_ext4(stage.root, out, "cima-root")


def _build_code(out: Path, work: Path) -> None:
    tree = work / "code"
    shutil.copytree(
        SRC, tree / "src" / "cima", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    compileall.compile_dir(
        str(tree / "src"),
        quiet=1,
        stripdir=str(tree),
        prependdir=GUEST_CODE,
        invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
    )
    (tree / "vm").mkdir()
    shutil.copy2(GUEST_SERVER, tree / "vm" / "guest_server.py")
    (tree / "bin").mkdir()
    (tree / "bin" / "cima").write_text(CIMA_LAUNCHER)
    (tree / "bin" / "cima").chmod(0o755)
    make_ext4(tree, out, "cima-code")


def _prune(cache: Path, prefix: str, keep: Path, count: int = 3) -> None:
    """Remove all but the ``count`` most recently used layers of one kind."""
    layers = sorted(cache.glob(f"{prefix}-*"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in layers:
        if old != keep and old.is_dir() and old not in layers[:count]:
            shutil.rmtree(old, ignore_errors=True)


def build(cache: Path | None = None, *, log: Callable[[str], None] | None = None) -> GuestImages:
    """The guest's images, built where the cache lacks them (see the module docstring)."""
    say = log or (lambda _msg: None)
    cache = cache or cache_dir()
    timings: dict[str, float] = {}
    with _locked(cache):
        t0 = time.monotonic()
        debs = Debs(cache / "debs", say)
        kernel_pkg = debs.kernel_package()
        kernel_deb = debs.get(kernel_pkg)
        tool_debs = [debs.get(p) for p in PACKAGES_TOOLS]
        crun_debs = [debs.get(p) for p in PACKAGES_CRUN]
        if time.monotonic() - t0 > 0.5:
            timings["download"] = time.monotonic() - t0
        dists = _runtime_distributions()
        python = _python_layout()
        base = cache / f"base-{_base_key([kernel_deb, *tool_debs, *crun_debs], dists, python)}"
        if not (base / "manifest.json").is_file():
            say(f"building the guest base image {base.name}")
            with tempfile.TemporaryDirectory(dir=cache, prefix=".build-") as tmp:
                work = Path(tmp)
                t = time.monotonic()
                kroot = work / "kernel"
                _unpack(kernel_deb, kroot)
                tools_root = work / "tools"
                (busybox_deb,) = tool_debs
                _unpack(busybox_deb, tools_root)
                crun_roots = [work / f"crun-{n}" for n in range(len(crun_debs))]
                for d, r in zip(crun_debs, crun_roots, strict=True):
                    _unpack(d, r)
                timings["unpack"] = time.monotonic() - t
                releases = sorted(p.name for p in (kroot / "lib" / "modules").iterdir())
                if len(releases) != 1:
                    raise BuildError(f"{kernel_deb.name} holds modules of {releases}")
                release = releases[0]
                busybox = tools_root / "bin" / "busybox"
                if not busybox.is_file():
                    busybox = tools_root / "usr" / "bin" / "busybox"
                out = work / "out"
                out.mkdir()
                shutil.copy2(kroot / "boot" / f"vmlinuz-{release}", out / "vmlinuz")
                t = time.monotonic()
                _build_initramfs(kroot, release, busybox, out / "initrd.img", work)
                timings["initramfs"] = time.monotonic() - t
                t = time.monotonic()
                _build_rootfs(busybox, crun_roots, python, dists, out / "root.ext4", work)
                timings["rootfs"] = time.monotonic() - t
                (out / "manifest.json").write_text(
                    json.dumps(
                        {
                            "kernel_package": kernel_deb.name,
                            "kernel_release": release,
                            "python": python,
                            "distributions": [f"{d.metadata['Name']}=={d.version}" for d in dists],
                            "packages": [d.name for d in [*tool_debs, *crun_debs]],
                            "timings": timings,
                        },
                        indent=2,
                    )
                    + "\n"
                )
                out.rename(base)
            _prune(cache, "base", base, count=2)
        else:
            os.utime(base)
        manifest = json.loads((base / "manifest.json").read_text())
        code = cache / f"code-{_code_key()}"
        if not (code / "code.ext4").is_file():
            say(f"building the guest code image {code.name}")
            t = time.monotonic()
            with tempfile.TemporaryDirectory(dir=cache, prefix=".build-") as tmp:
                out = Path(tmp) / "out"
                out.mkdir()
                _build_code(out / "code.ext4", Path(tmp))
                out.rename(code)
            timings["code"] = time.monotonic() - t
            _prune(cache, "code", code, count=4)
        else:
            os.utime(code)
    return GuestImages(
        kernel=base / "vmlinuz",
        initrd=base / "initrd.img",
        rootfs=base / "root.ext4",
        code=code / "code.ext4",
        kernel_release=manifest["kernel_release"],
        python_home=manifest["python"]["prefix"],
        timings=timings,
    )


def main() -> int:
    t = time.monotonic()
    images = build(log=lambda m: print(m, file=sys.stderr))
    total = time.monotonic() - t
    print(
        json.dumps(
            {
                "images": {k: str(v) for k, v in vars(images).items() if isinstance(v, Path)},
                "kernel_release": images.kernel_release,
                "timings": images.timings,
                "seconds": round(total, 2),
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
