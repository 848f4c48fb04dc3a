"""containerd events API generated code; see README.md."""
