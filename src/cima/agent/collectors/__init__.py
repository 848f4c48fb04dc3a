"""What the agent measures: system processes (procfs), containers (CRI, runc, cgroups), pods."""
