"""A virtual machine with measured boot, kernel IMA and a virtual TPM, for end-to-end tests.

- :mod:`tests.vm.build`: the guest (Debian's kernel, busybox, this machine's Python with
  cima's run-time dependencies, ``src/cima``), built into a cache and reused.
- :mod:`tests.vm.guest`: one boot (qemu with OVMF and swtpm), a :class:`GuestSession` to run
  commands, move files, start long-running processes and forward TCP ports to them.
- :mod:`tests.vm.guest_server`: the guest's side of the control channel (its PID 1).
- :mod:`tests.vm.evidence`: the fixed sequence that collects a boot's logs and quotes.
- :mod:`tests.vm.checks`: cima, tpm2-tools and ima-evm-utils on that evidence.
- :mod:`tests.vm.agent`: cima's agent in the guest (a service, a crun container, IMA, the
  TPM), asked for evidence bundles from the host, and reference values reviewed for them.
- :mod:`tests.vm.demo`: the same chain for a person (``make demo-vm``).
"""
