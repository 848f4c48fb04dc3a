"""Fixtures of the virtual-machine tests: the built guest, one TPM and one writable disk
across reboots, boots.

The guest is built once per cache (``$CIMA_VM_CACHE``, default ``~/.cache/cima-vm``); a
second run builds nothing. Every boot is stopped by a finalizer (qemu powered off or killed,
swtpm stopped) whatever the test did; its console log stays in the pytest temporary folder
and a failed test's report names it. The build and boot times are printed at the end of the
session.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.platform.swtpm import ManufacturedTPM
from tests.vm import build
from tests.vm.evidence import TIMINGS
from tests.vm.guest import (
    BootConfig,
    GuestSession,
    ProvisionedTPM,
    VirtualMachine,
    provision_tpm,
)

#: Work folders of the boots of the running test (for the failure report).
_BOOTS: list[Path] = []


@pytest.fixture(scope="session")
def vm_images() -> build.GuestImages:
    reason = build.available()
    if reason:
        pytest.skip(reason)
    start = time.monotonic()
    images = build.build()
    TIMINGS["build"] = {
        "seconds": round(time.monotonic() - start, 2),
        "cached": not images.built,
        "steps": {k: round(v, 2) for k, v in images.timings.items()},
        "cache": str(build.cache_dir()),
    }
    return images


@pytest.fixture(scope="module")
def vm_tpm(
    swtpm_manufactured: ManufacturedTPM, tmp_path_factory: pytest.TempPathFactory
) -> ProvisionedTPM:
    """One TPM for the module's boots, a machine that reboots (NV and keys stay), with its
    attestation key registered before the first boot."""
    pytest.importorskip("tpm2_pytss")
    return provision_tpm(swtpm_manufactured, tmp_path_factory.mktemp("vm-tpm"))


@pytest.fixture(scope="module")
def vm_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The machine's writable disk (``/var/lib/cima`` in the guest), kept across its boots."""
    return build.state_image(tmp_path_factory.mktemp("vm-state") / "state.ext4")


BootFactory = Callable[..., tuple[VirtualMachine, GuestSession]]


@pytest.fixture(scope="module")
def boot_guest(
    vm_images: build.GuestImages,
    vm_tpm: ProvisionedTPM,
    vm_state: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[BootFactory]:
    """``boot_guest(name, config, payload=None)`` -> (vm, session); stopped at the latest
    when the module ends. Every boot has the module's TPM and state disk."""
    with contextlib.ExitStack() as stack:

        def boot(
            name: str, config: BootConfig, payload: Path | None = None
        ) -> tuple[VirtualMachine, GuestSession]:
            workdir = tmp_path_factory.mktemp(f"vm-{name}")
            _BOOTS.append(workdir)
            vm = VirtualMachine(vm_images, vm_tpm.state, workdir, config, payload, state=vm_state)
            stack.callback(vm.stop)
            session = vm.start()
            TIMINGS.setdefault("boots", {})[name] = {"boot_seconds": round(vm.boot_seconds or 0, 2)}
            return vm, session

        yield boot


def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> None:
    if call.excinfo is not None and _BOOTS:
        logs = "\n".join(f"{d / 'console.log'}" for d in _BOOTS)
        item.add_report_section(call.when, "cima-vm console logs", logs)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not TIMINGS:
        return
    terminalreporter.section("cima-vm timings")
    build_t = TIMINGS.get("build")
    if build_t:
        terminalreporter.write_line(
            f"guest image: {build_t['seconds']} s "
            f"({'cached' if build_t['cached'] else 'built: ' + str(build_t['steps'])}) "
            f"in {build_t['cache']}"
        )
    for name, t in TIMINGS.get("boots", {}).items():
        terminalreporter.write_line(f"{name}: " + ", ".join(f"{k} {v}" for k, v in t.items()))
