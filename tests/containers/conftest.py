"""Fixtures: a containerd of its own (once per module), its images, pods and runc containers.

- ``containerd``: a running :class:`~tests.containers.containerd.Containerd`; stopped
  and cleaned up (pods, tasks, shims, mounts, cgroups) when the module ends.
- ``images``: the busybox and pause images, built as OCI tarballs and imported.
- ``pod_factory``: a :class:`~tests.containers.pods.PodFactory` (CRI, as kubelet);
  every pod it made is removed at the end of the module.
- ``runc_factory``: a :class:`~tests.containers.pods.RuncFactory` (runc alone, its
  own root); every container it made is deleted at the end of the module.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.containers.containerd import Containerd, missing
from tests.containers.oci import busybox_image, pause_image
from tests.containers.pods import Images, PodFactory, RuncFactory


@pytest.fixture(scope="module")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    reason = missing()
    if reason:
        pytest.skip(reason)
    daemon = Containerd(tmp_path_factory.mktemp("containerd"))
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture(scope="module")
def images(containerd: Containerd, tmp_path_factory: pytest.TempPathFactory) -> Images:
    work = tmp_path_factory.mktemp("images")
    busybox, rootfs = busybox_image(work)
    pause = pause_image(work, containerd.sandbox_image)
    containerd.import_image(busybox.archive)
    containerd.import_image(pause.archive)
    return Images(busybox=busybox, pause=pause, rootfs=rootfs)


@pytest.fixture(scope="module")
def pod_factory(containerd: Containerd, images: Images) -> Iterator[PodFactory]:
    factory = PodFactory(containerd, images)
    try:
        yield factory
    finally:
        factory.cleanup()


@pytest.fixture(scope="module")
def runc_factory(
    containerd: Containerd, images: Images, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RuncFactory]:
    # containerd is not used by runc; depending on it orders the clean-ups (runc first).
    factory = RuncFactory(tmp_path_factory.mktemp("runc"), images.rootfs)
    try:
        yield factory
    finally:
        factory.cleanup()
