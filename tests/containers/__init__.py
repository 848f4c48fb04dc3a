"""Container runtime tests: a containerd and runc of their own, pods made as kubelet makes them."""
