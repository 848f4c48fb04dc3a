"""The containerd, image, pod and runc fixtures, shared from tests/containers."""

from tests.containers.conftest import containerd, images, pod_factory, runc_factory

__all__ = ["containerd", "images", "pod_factory", "runc_factory"]
