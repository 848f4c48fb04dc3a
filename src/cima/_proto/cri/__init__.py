"""Kubernetes CRI v1 (runtime.v1) generated code; see README.md."""
