"""``cima client attest-peer BUNDLE --nonce HEX --reference REFS.yaml``: local attestation.

A workload appraises the evidence of a peer workload on the same node
(:func:`cima.verifier.local.attest_peer`): it gives the peer a fresh nonce, the
peer runs ``cima client evidence --nonce HEX -o PEER.json`` and hands the
bundle back, and::

    cima client attest-peer PEER.json --nonce HEX --reference REFS.yaml \\
        [--expect-container ID] [--expect-image REF] [--json]

appraises it as ``cima verify`` does, checks it is a container's evidence (of
the expected container and image when named), and that its report is from
this node (the agent's attestation key, or the TD's identity).

Exit status: 0 affirming, 1 not affirming, 2 bad input (an unreadable or
undecodable bundle or reference file, a bad argument, an unreachable agent).
"""

from __future__ import annotations

import argparse

from cima.cli._util import (
    UsageError,
    add_json_flag,
    emit_json,
    fail_line,
    hex_arg,
    read_input,
)


def _container_id(value: str) -> str:
    v = value.strip().lower().removeprefix("container:")
    if len(v) != 64 or any(c not in "0123456789abcdef" for c in v):
        raise argparse.ArgumentTypeError(f"not a container id (64 hex digits): {value!r}")
    return v


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``attest-peer`` to the ``client`` command group's subcommands."""
    p = sub.add_parser(
        "attest-peer",
        help="appraise a peer workload's evidence from this node (local attestation)",
        description=(
            "Appraise the evidence bundle of a peer workload on this node, bound to the "
            "nonce this workload gave it (exit 0: affirming)."
        ),
    )
    p.add_argument("bundle", metavar="BUNDLE", help="the peer's evidence bundle (JSON)")
    p.add_argument(
        "--nonce", type=hex_arg, required=True, metavar="HEX", help="the nonce given to the peer"
    )
    p.add_argument(
        "--reference", "-r", required=True, metavar="REFS.yaml", help="the reference values"
    )
    p.add_argument(
        "--expect-container",
        type=_container_id,
        metavar="ID",
        help="the peer's container id (64 hex digits)",
    )
    p.add_argument(
        "--expect-image", metavar="REF", help="an image identifier the peer's container must name"
    )
    p.add_argument(
        "--socket",
        metavar="PATH",
        help="the agent's socket (default $CIMA_SOCKET or /run/cima/cima.sock)",
    )
    p.add_argument("--timeout", type=float, default=60.0, metavar="S")
    add_json_flag(p)
    p.set_defaults(handler=cmd_attest_peer)


def cmd_attest_peer(args: argparse.Namespace) -> int:
    from cima.client import CimaClient
    from cima.evidence.bundle import EvidenceBundle
    from cima.verifier.local import attest_peer
    from cima.verifier.reference import load_references

    if not args.nonce:
        raise UsageError("--nonce: give the nonce this workload gave its peer")
    bundle = EvidenceBundle.from_json(read_input(args.bundle), source=args.bundle)
    refs = load_references(read_input(args.reference, limit=256 << 20), source=args.reference)
    with CimaClient(args.socket, timeout=args.timeout) as client:
        result = attest_peer(
            bundle,
            nonce=args.nonce,
            references=refs,
            client=client,
            expect_container=args.expect_container,
            expect_image=args.expect_image,
        )
    if args.json:
        emit_json({"peer": bundle.scope, **result.to_dict()})
    else:
        from cima.cli.verify import show

        show(result)
    if result.affirming:
        return 0
    first = result.failures[0].describe() if result.failures else "nothing was appraised"
    fail_line(f"cima: local attestation {result.status}: {first}")
    return 1
