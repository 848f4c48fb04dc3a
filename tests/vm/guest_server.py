"""The guest side of the control channel: PID 1 of the test virtual machine after the boot.

It speaks on a virtio-serial port (found by name under ``/sys/class/virtio-ports``), one JSON
document per line in each direction; binary data travels base64-encoded. The host writes
requests ``{"id": N, "op": ..., ...}`` and reads answers ``{"id": N, ...}`` (or
``{"id": N, "error": "..."}``); the guest also writes one ``{"event": "ready", ...}`` line
when it starts. Requests are served one at a time, in order.

Operations:

- ``ping``: ``{"pong": true}``.
- ``run``: ``argv``, optional ``env`` (added to the server's environment), ``cwd``,
  ``stdin`` (base64) and ``timeout`` (seconds) -> ``rc``, ``stdout``, ``stderr`` (base64),
  ``seconds``; ``timed_out`` when the command was killed at its timeout.
- ``read``: ``path`` -> ``data`` (base64). ``write``: ``path``, ``data``, ``mode``.
- ``spawn``: like ``run`` but returns at once with the ``pid``; output goes to ``log``
  (default ``/tmp/spawn-<pid>.log``). ``poll``: ``pid`` -> ``running``, ``rc``.
  ``signal``: ``pid``, ``signal``.
- ``poweroff``: answers, then powers the machine off.

This file runs inside the guest on the guest's Python, with the standard library only.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_children: dict[int, subprocess.Popen[bytes]] = {}


def find_port(name: str, wait: float = 60.0) -> str:
    deadline = time.monotonic() + wait
    while True:
        for entry in sorted(Path("/sys/class/virtio-ports").glob("*")):
            try:
                if (entry / "name").read_text().strip() == name:
                    return f"/dev/{entry.name}"
            except OSError:
                continue
        if time.monotonic() > deadline:
            raise SystemExit(f"no virtio-serial port named {name}")
        time.sleep(0.1)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _env(extra: dict[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra or {})
    return env


def op_run(req: dict[str, Any]) -> dict[str, Any]:
    start = time.monotonic()
    stdin = base64.b64decode(req["stdin"]) if req.get("stdin") else b""
    proc = subprocess.Popen(
        req["argv"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(req.get("env")),
        cwd=req.get("cwd"),
        start_new_session=True,
    )
    timed_out = False
    try:
        out, err = proc.communicate(stdin, timeout=req.get("timeout"))
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    return {
        "rc": proc.returncode,
        "stdout": _b64(out),
        "stderr": _b64(err),
        "seconds": round(time.monotonic() - start, 3),
        "timed_out": timed_out,
    }


def op_spawn(req: dict[str, Any]) -> dict[str, Any]:
    log_path = req.get("log")
    log = open(log_path or os.devnull, "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(
        req["argv"],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=_env(req.get("env")),
        cwd=req.get("cwd"),
        start_new_session=True,
    )
    log.close()
    _children[proc.pid] = proc
    return {"pid": proc.pid, "log": log_path}


def op_poll(req: dict[str, Any]) -> dict[str, Any]:
    proc = _children.get(int(req["pid"]))
    if proc is None:
        return {"error": f"no spawned process {req['pid']}"}
    rc = proc.poll()
    return {"running": rc is None, "rc": rc}


def op_signal(req: dict[str, Any]) -> dict[str, Any]:
    pid = int(req["pid"])
    sig = int(req.get("signal", signal.SIGTERM))
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)
    return {"sent": sig}


def op_read(req: dict[str, Any]) -> dict[str, Any]:
    with open(req["path"], "rb") as f:
        data = f.read()
    return {"data": _b64(data), "size": len(data)}


def op_write(req: dict[str, Any]) -> dict[str, Any]:
    path = Path(req["path"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(base64.b64decode(req["data"]))
    path.chmod(int(req.get("mode", 0o644)))
    return {"size": path.stat().st_size}


OPS = {
    "ping": lambda req: {"pong": True},
    "run": op_run,
    "spawn": op_spawn,
    "poll": op_poll,
    "signal": op_signal,
    "read": op_read,
    "write": op_write,
}


class Channel:
    def __init__(self, device: str) -> None:
        self.fd = os.open(device, os.O_RDWR)
        self.buffer = b""

    def send(self, message: dict[str, Any]) -> None:
        data = json.dumps(message, separators=(",", ":")).encode() + b"\n"
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]

    def lines(self) -> Iterator[bytes]:
        while True:
            while b"\n" in self.buffer:
                line, self.buffer = self.buffer.split(b"\n", 1)
                if line.strip():
                    yield line
            chunk = os.read(self.fd, 1 << 16)
            if not chunk:
                # The host end is not connected: nothing to read until it is.
                time.sleep(0.05)
                continue
            self.buffer += chunk


def _reap() -> None:
    # PID 1 adopts orphans: collect the ones that are not our own children.
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        proc = _children.get(pid)
        if proc is not None and proc.returncode is None:
            proc.returncode = -1


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", required=True)
    args = parser.parse_args()
    channel = Channel(find_port(args.port))
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    with open("/proc/cmdline") as f:
        cmdline = f.read().strip()
    channel.send({"event": "ready", "uptime": uptime, "cmdline": cmdline, "python": sys.version})
    for line in channel.lines():
        try:
            req = json.loads(line)
        except ValueError as e:
            channel.send({"id": None, "error": f"not JSON: {e}"})
            continue
        rid = req.get("id")
        op = req.get("op")
        if op == "poweroff":
            channel.send({"id": rid, "poweroff": True})
            os.sync()
            os.execv("/bin/busybox", ["poweroff", "-f"])
        handler = OPS.get(str(op))
        try:
            answer = handler(req) if handler else {"error": f"unknown op {op!r}"}
        except Exception as e:  # the host learns of every failure
            answer = {"error": f"{type(e).__name__}: {e}"}
        answer["id"] = rid
        channel.send(answer)
        if len(_children) or os.getpid() == 1:
            _reap()
    return 0


if __name__ == "__main__":
    sys.exit(main())
