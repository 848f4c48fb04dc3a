"""``cima verifier serve|openapi``: the HTTP verifier service.

``serve`` runs one verifier instance (uvicorn, one process) over a store:
SQLite by default, PostgreSQL by URL; any number of instances may share a
PostgreSQL store. ``openapi`` prints the API's OpenAPI description (the file
``docs/verifier-openapi.json`` is its output).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from datetime import timedelta
from pathlib import Path

from cima.cli._util import UsageError, read_input

_DEFAULT_LISTEN = "127.0.0.1:8080"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from cima.verifier.store import DEFAULT_URL

    p = sub.add_parser("verifier", help="run the HTTP verifier service")
    s = p.add_subparsers(dest="verifier_command", metavar="SUBCOMMAND")
    s.required = True

    serve = s.add_parser(
        "serve",
        help="serve challenges, attestations, reference values and results over HTTP",
        description=(
            "Serve the verifier API (GET /openapi.json describes it). Instances that share "
            "a PostgreSQL store form one cluster: a nonce from any of them is accepted once."
        ),
    )
    serve.add_argument(
        "--store",
        metavar="URL",
        default=DEFAULT_URL,
        help=(
            f"the database: sqlite:///FILE (default {DEFAULT_URL}) or "
            "postgresql+psycopg://USER[:PASSWORD]@HOST:PORT/DB"
        ),
    )
    serve.add_argument(
        "--listen",
        metavar="ADDR",
        default=_DEFAULT_LISTEN,
        help=f"HOST:PORT to listen on ([::1]:PORT for IPv6; default {_DEFAULT_LISTEN})",
    )
    serve.add_argument(
        "--jwt-key",
        metavar="PEM",
        help="sign every result as a JWT with this private key (EC, RSA or Ed25519 PEM)",
    )
    serve.add_argument(
        "--max-body",
        metavar="BYTES",
        type=_size,
        default=None,
        help="largest request body accepted, e.g. 64M (default 64 MiB); larger gets 413",
    )
    serve.add_argument(
        "--challenge-ttl",
        metavar="SECONDS",
        type=float,
        default=300.0,
        help="how long a challenge's nonce stays usable (default 300)",
    )
    serve.add_argument(
        "--reference",
        metavar="NAME",
        default=None,
        help="the reference set an attestation uses unless it names one (default 'default')",
    )
    serve.add_argument(
        "--instance", metavar="NAME", help="this instance's name in what it stores (host-pid)"
    )
    serve.add_argument(
        "--threads",
        metavar="N",
        type=int,
        default=4,
        help="threads per process for appraisal and database work (default 4)",
    )
    serve.add_argument(
        "--workers",
        metavar="N",
        type=int,
        default=1,
        help=(
            "worker processes sharing the address (default 1); each is like one more "
            "instance on the same store, so use it with PostgreSQL"
        ),
    )
    serve.add_argument("--tls-cert", metavar="PEM", help="serve HTTPS with this certificate")
    serve.add_argument("--tls-key", metavar="PEM", help="the certificate's private key")
    serve.add_argument(
        "--log-level",
        default="warning",
        choices=("critical", "error", "warning", "info", "debug"),
        help="server log level (default warning; info logs every request)",
    )
    serve.set_defaults(handler=cmd_serve)

    oa = s.add_parser("openapi", help="print the service's OpenAPI description (JSON)")
    oa.add_argument("-o", "--output", metavar="FILE", help="write here instead of stdout")
    oa.set_defaults(handler=cmd_openapi)


def _size(text: str) -> int:
    units = {"k": 1024, "m": 1024**2, "g": 1024**3}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    factor = 1
    if t and t[-1] in units:
        factor = units[t[-1]]
        t = t[:-1]
    try:
        value = int(t) * factor
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 65536, 64M)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"a size must be positive, not {text!r}")
    return value


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT``) -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise UsageError(f"--listen {text}: expected HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        number = int(port)
    except ValueError:
        raise UsageError(f"--listen {text}: port {port!r} is not a number") from None
    if not 0 <= number <= 65535:
        raise UsageError(f"--listen {text}: port {number} is out of range")
    return host, number


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from cima.verifier.service import (
        DEFAULT_MAX_BODY,
        DEFAULT_REFERENCE,
        SETTINGS_VARIABLE,
        ServiceConfig,
        VerifierService,
        create_app,
        instance_name,
        load_jwt_key,
    )
    from cima.verifier.store import Store, check_name

    host, port = parse_listen(args.listen)
    if args.challenge_ttl <= 0:
        raise UsageError(f"--challenge-ttl {args.challenge_ttl}: must be positive")
    if args.workers < 1 or args.threads < 1:
        raise UsageError("--workers and --threads must be at least 1")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise UsageError("--tls-cert and --tls-key go together")
    reference = args.reference or DEFAULT_REFERENCE
    try:
        check_name(reference)
    except ValueError as e:
        raise UsageError(f"--reference: {e}") from None
    key = None
    if args.jwt_key:
        try:
            key = load_jwt_key(read_input(args.jwt_key, limit=1024 * 1024))
        except UsageError:
            raise
        except Exception as e:
            raise UsageError(f"{args.jwt_key}: {e}") from None
    config = ServiceConfig(
        max_body=args.max_body or DEFAULT_MAX_BODY,
        challenge_ttl=timedelta(seconds=args.challenge_ttl),
        default_reference=reference,
        jwt_key=key,
        threads=args.threads,
    )
    level = getattr(logging, args.log_level.upper())
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    instance = args.instance or instance_name()
    store = Store(args.store, instance=instance)  # creates the schema, checks the URL
    scheme = "https" if args.tls_cert else "http"
    sys.stderr.write(
        f"cima verifier {instance}: store {store.url}, listening on {scheme}://{args.listen}"
        + (f" ({args.workers} worker processes)\n" if args.workers > 1 else "\n")
    )
    sys.stderr.flush()
    server_options: dict[str, object] = {
        "host": host,
        "port": port,
        "log_level": args.log_level,
        "access_log": level <= logging.INFO,
        "ssl_certfile": args.tls_cert,
        "ssl_keyfile": args.tls_key,
        "server_header": False,
    }
    if args.workers == 1:
        try:
            uvicorn.run(create_app(VerifierService(store, config)), **server_options)  # type: ignore[arg-type]
        finally:
            store.close()
        return 0
    # Worker processes: each opens the store and builds the app from the settings.
    store.close()
    os.environ[SETTINGS_VARIABLE] = json.dumps(
        {
            "store": args.store,
            "instance": instance,
            "jwt_key": str(Path(args.jwt_key).resolve()) if args.jwt_key else None,
            "max_body": config.max_body,
            "challenge_ttl": args.challenge_ttl,
            "reference": reference,
            "threads": args.threads,
        }
    )
    uvicorn.run(
        "cima.verifier.service:app_from_environment",
        factory=True,
        workers=args.workers,
        **server_options,  # type: ignore[arg-type]
    )
    return 0


def cmd_openapi(args: argparse.Namespace) -> int:
    from cima.verifier.service import openapi_json

    text = openapi_json()
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m cima.cli.verifier serve|openapi ...``: this command group on its own."""
    from cima.cli._util import fail_line
    from cima.errors import CimaError

    parser = argparse.ArgumentParser(prog="cima")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    register(sub)
    args = parser.parse_args(["verifier", *(sys.argv[1:] if argv is None else argv)])
    try:
        return int(args.handler(args))
    except CimaError as e:
        if args.verbose:
            raise
        fail_line(f"cima: error: {e}")
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
