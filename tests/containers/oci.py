"""OCI image layout tarballs built from a directory tree, for importing into containerd.

An OCI image layout (OCI image-spec, ``image-layout.md``) is a directory with
``oci-layout``, ``index.json`` and content-addressed ``blobs/sha256/<hex>``.
The images built here have one gzip layer; the index names the manifest with
the ``org.opencontainers.image.ref.name`` annotation (and containerd's own
``io.containerd.image.name``, which ``ctr images import`` takes verbatim), so
``ctr -n k8s.io images import --snapshotter native FILE`` registers the image
under that reference for the CRI plugin.

The digests of the manifest, the config and the layer are computed here, from
the bytes written, so tests compare what the runtime reports with an
independent computation.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BUSYBOX = Path("/bin/busybox")

MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_MEDIA_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"


@dataclass(frozen=True, slots=True)
class Image:
    """A built image: its reference and the digests of what was written."""

    ref: str
    archive: Path
    manifest_digest: str  # "sha256:<hex>"
    config_digest: str  # "sha256:<hex>" (the image id)
    layer_digest: str  # compressed layer
    diff_id: str  # uncompressed layer
    config: dict[str, Any]

    @property
    def repository(self) -> str:
        return self.ref.rsplit(":", 1)[0]


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _layer_tar(rootfs: Path) -> bytes:
    """A deterministic tar of ``rootfs`` (sorted, owned by root, fixed times)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for dirpath, dirnames, filenames in os.walk(rootfs):
            dirnames.sort()
            for name in sorted([*dirnames, *filenames]):
                full = Path(dirpath) / name
                arcname = str(full.relative_to(rootfs))
                info = tar.gettarinfo(str(full), arcname)
                info.uid = info.gid = 0
                info.uname = info.gname = "root"
                info.mtime = 0
                if info.isreg():
                    with full.open("rb") as f:
                        tar.addfile(info, f)
                else:
                    tar.addfile(info)
    return buf.getvalue()


def build_image(
    rootfs: Path,
    ref: str,
    out: Path,
    *,
    entrypoint: list[str] | None = None,
    cmd: list[str] | None = None,
    env: list[str] | None = None,
    working_dir: str = "/",
    digest_ref: bool = True,
) -> Image:
    """Write an OCI image layout tarball of ``rootfs`` named ``ref`` to ``out``.

    With ``digest_ref`` the index also names the manifest ``<repository>@<digest>``,
    so that the runtime knows the image by its repo digest, as after a pull.
    """
    layer_tar = _layer_tar(rootfs)
    diff_id = _sha256(layer_tar)
    layer = gzip.compress(layer_tar, mtime=0)
    config: dict[str, Any] = {
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": env or ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "WorkingDir": working_dir,
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created_by": "tests/containers/oci.py"}],
    }
    if entrypoint is not None:
        config["config"]["Entrypoint"] = entrypoint
    if cmd is not None:
        config["config"]["Cmd"] = cmd
    config_bytes = json.dumps(config, sort_keys=True).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": {
            "mediaType": CONFIG_MEDIA_TYPE,
            "digest": _sha256(config_bytes),
            "size": len(config_bytes),
        },
        "layers": [{"mediaType": LAYER_MEDIA_TYPE, "digest": _sha256(layer), "size": len(layer)}],
    }
    manifest_bytes = json.dumps(manifest, sort_keys=True).encode()
    names = [ref]
    if digest_ref:
        # What a registry pull records too: the repository at the manifest's digest.
        names.append(f"{ref.rsplit(':', 1)[0]}@{_sha256(manifest_bytes)}")
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": MANIFEST_MEDIA_TYPE,
                "digest": _sha256(manifest_bytes),
                "size": len(manifest_bytes),
                "annotations": {
                    "io.containerd.image.name": name,
                    "org.opencontainers.image.ref.name": name,
                },
            }
            for name in names
        ],
    }
    blobs = {_sha256(b): b for b in (layer, config_bytes, manifest_bytes)}
    with tarfile.open(out, "w") as tar:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))

        add("oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        add("index.json", json.dumps(index).encode())
        for digest, data in blobs.items():
            add("blobs/sha256/" + digest.removeprefix("sha256:"), data)
    return Image(
        ref=ref,
        archive=out,
        manifest_digest=_sha256(manifest_bytes),
        config_digest=_sha256(config_bytes),
        layer_digest=_sha256(layer),
        diff_id=diff_id,
        config=config,
    )


def busybox_rootfs(dest: Path) -> Path:
    """A complete small root file system: static busybox with a symlink per applet.

    Applets live in ``/bin`` and ``/sbin`` (real directories), so that a host
    ``/usr`` bind-mounted over the image's (empty) ``/usr`` does not hide them;
    ``/lib`` and ``/lib64`` are symlinks into ``/usr`` as on a merged-/usr host,
    so a host ``/usr`` mount brings the dynamic loader and libraries with it.
    """
    if not BUSYBOX.is_file():
        raise FileNotFoundError(f"{BUSYBOX} is missing (Debian package busybox-static)")
    for d in ("bin", "sbin", "usr", "etc", "dev", "proc", "sys", "tmp", "run", "root", "var"):
        (dest / d).mkdir(parents=True, exist_ok=True)
    (dest / "tmp").chmod(0o1777)
    for name, target in (("lib", "usr/lib"), ("lib64", "usr/lib64")):
        if not (dest / name).is_symlink():
            (dest / name).symlink_to(target)
    shutil.copy2(BUSYBOX, dest / "bin" / "busybox")
    applets = subprocess.run(
        [str(BUSYBOX), "--list-full"], check=True, capture_output=True, text=True
    ).stdout.split()
    for applet in applets:
        # "--list-full" names each applet with its install directory (bin/ls, usr/bin/env).
        name = applet.rsplit("/", 1)[-1]
        where = "sbin" if "sbin/" in applet else "bin"
        link = dest / where / name
        if name != "busybox" and not link.exists() and not link.is_symlink():
            link.symlink_to("/bin/busybox")
    (dest / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (dest / "etc" / "group").write_text("root:x:0:\n")
    return dest


def busybox_image(work: Path, ref: str = "localhost/test/busybox:1") -> tuple[Image, Path]:
    """The busybox image (default command ``sh``) and its extracted rootfs directory."""
    rootfs = busybox_rootfs(work / "busybox-rootfs")
    return build_image(rootfs, ref, work / "busybox.tar", cmd=["sh"]), rootfs


def pause_image(work: Path, ref: str = "localhost/test/pause:1") -> Image:
    """The sandbox ("pause") image: busybox whose entrypoint sleeps forever."""
    rootfs = busybox_rootfs(work / "pause-rootfs")
    return build_image(rootfs, ref, work / "pause.tar", entrypoint=["/bin/sleep", "infinity"])
