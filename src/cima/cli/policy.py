"""``cima policy check FILE [--json]``: validate an agent policy without starting anything.

Exit 0 when the policy is valid (duplicate entries are accepted, with a warning
logged on stderr); exit 2 with one line naming the file, the line and the key when it
is not. ``--json`` prints the normalised policy (every key with its value or
default, duplicates removed) as one JSON document.
"""

from __future__ import annotations

import argparse

from cima.agent.policy import PolicyFileError, load_policy
from cima.cli._util import add_json_flag, emit_json, fail_line, out


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("policy", help="validate agent policy files")
    s = p.add_subparsers(dest="policy_command", metavar="SUBCOMMAND")
    s.required = True
    check = s.add_parser("check", help="validate a policy file (the agent's own checks)")
    check.add_argument("file", metavar="FILE")
    add_json_flag(check)
    check.set_defaults(handler=cmd_check)


def cmd_check(args: argparse.Namespace) -> int:
    try:
        policy = load_policy(args.file)
    except PolicyFileError as e:
        if getattr(args, "verbose", False):
            raise
        fail_line(f"cima: error: {e}")
        return 2
    if args.json:
        emit_json(policy.to_dict())
        return 0
    m = policy.measure
    parts = [f"backend {policy.backend}", f"hashAlgorithm {policy.hash_algorithm}"]
    if m.system is not None:
        parts.append(f"{len(m.system.processes)} processes")
    if m.container is not None:
        parts.append("containers " + ("isolated" if m.container.isolated else "not isolated"))
    if m.kubernetes is not None:
        parts.append(f"{len(m.kubernetes.pods)} pods")
    out.print(f"{args.file}: valid policy ({', '.join(parts)})", highlight=False, markup=False)
    return 0
