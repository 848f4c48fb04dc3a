"""``cima verifier serve|openapi``: the HTTP verifier service.

``serve`` runs one verifier instance over a store: SQLite by default,
PostgreSQL by URL; any number of instances may share a PostgreSQL store. An
instance is one uvicorn worker process per CPU by default (``--workers``),
each with its own listening socket on Linux (``SO_REUSEPORT``: the kernel
spreads connections over them); the workers share the store as instances do.
``openapi`` prints the API's OpenAPI description (the file
``docs/verifier-openapi.json`` is its output).

Reference values are stored only with an operator token (``PUT
/v1/references/NAME`` with ``Authorization: Bearer TOKEN``): the tokens are
in the file ``--operator-token-file`` names; without it the instance takes
none (403). ``--client-ca`` makes every connection present a client
certificate from those CAs (mutual TLS). ``--ek-ca`` names the TPM
manufacturers' root certificates that an EK certificate must lead to for its
TPM's attestation key to be enrolled (``POST /v1/enrollments``; ``cima client
enroll``); without it the instance enrolls no key (403).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

from cima.cli._util import UsageError, read_input

_DEFAULT_LISTEN = "127.0.0.1:8080"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from cima.verifier.service import DEFAULT_THREADS
    from cima.verifier.store import DEFAULT_URL

    p = sub.add_parser("verifier", help="run the HTTP verifier service")
    s = p.add_subparsers(dest="verifier_command", metavar="SUBCOMMAND")
    s.required = True

    serve = s.add_parser(
        "serve",
        help="serve challenges, attestations, reference values and results over HTTP",
        description=(
            "Serve the verifier API (GET /openapi.json describes it). Instances that share "
            "a PostgreSQL store form one cluster: a nonce from any of them is accepted once. "
            "Reference values are stored only with an operator token (--operator-token-file)."
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
        help="sign every result as a JWT (ES256) with this private key (EC P-256 PEM)",
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
        default=None,
        help=(
            f"threads per worker process for the store's work (default {DEFAULT_THREADS}: on "
            "the worker's event loop; more for a distant or slow database)"
        ),
    )
    serve.add_argument(
        "--workers",
        metavar="N",
        type=int,
        default=None,
        help=(
            "worker processes serving the address (default: one per CPU); they share the "
            "store as instances do, so a nonce is accepted once across all of them"
        ),
    )
    serve.add_argument(
        "--operator-token-file",
        metavar="FILE",
        help=(
            "bearer tokens that authorize storing reference values (PUT /v1/references/NAME "
            "with 'Authorization: Bearer TOKEN'): one a line, each at least 32 printable ASCII "
            "characters without spaces; blank lines and # comments ignored; several lines let "
            "a token be rotated; the file must not be readable by others. Without it the "
            "instance takes no reference values (403 read_only)"
        ),
    )
    serve.add_argument(
        "--ek-ca",
        metavar="FILE",
        action="append",
        default=[],
        help=(
            "PEM file of TPM manufacturers' root CA certificates (one or more): an attestation "
            "key is enrolled by EK certificate (POST /v1/enrollments, cima client enroll) when "
            "its TPM's EK certificate leads to one of them, through intermediate CAs the node "
            "sends. Repeatable. Without it the instance enrolls no key (403 no_ek_roots)"
        ),
    )
    serve.add_argument(
        "--enrollment-ttl",
        metavar="SECONDS",
        type=float,
        default=300.0,
        help="how long an enrollment's credential can be activated (default 300)",
    )
    serve.add_argument("--tls-cert", metavar="PEM", help="serve HTTPS with this certificate")
    serve.add_argument("--tls-key", metavar="PEM", help="the certificate's private key")
    serve.add_argument(
        "--client-ca",
        metavar="PEM",
        help=(
            "mutual TLS: every connection must present a client certificate issued by a CA "
            "in this file (needs --tls-cert and --tls-key)"
        ),
    )
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
    import ssl

    import uvicorn

    from cima.verifier.service import (
        DEFAULT_MAX_BODY,
        DEFAULT_REFERENCE,
        DEFAULT_THREADS,
        SETTINGS_VARIABLE,
        EKRootError,
        OperatorTokenError,
        ServiceConfig,
        VerifierService,
        create_app,
        instance_name,
        listening_socket,
        load_ek_roots,
        load_jwt_key,
        load_operator_tokens,
        tune_gc,
    )
    from cima.verifier.store import Store, check_name

    host, port = parse_listen(args.listen)
    if args.challenge_ttl <= 0:
        raise UsageError(f"--challenge-ttl {args.challenge_ttl}: must be positive")
    if args.enrollment_ttl <= 0:
        raise UsageError(f"--enrollment-ttl {args.enrollment_ttl}: must be positive")
    workers = default_workers() if args.workers is None else args.workers
    threads = DEFAULT_THREADS if args.threads is None else args.threads
    if workers < 1:
        raise UsageError(f"--workers {workers}: must be at least 1")
    if threads < 0:
        raise UsageError(f"--threads {threads}: must be 0 or more")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise UsageError("--tls-cert and --tls-key go together")
    if args.tls_cert:
        _check_tls(args.tls_cert, args.tls_key)
    if args.client_ca:
        if not args.tls_cert:
            raise UsageError("--client-ca needs --tls-cert and --tls-key: mutual TLS is TLS")
        _check_client_ca(args.client_ca)
    operator_tokens: tuple[bytes, ...] = ()
    if args.operator_token_file:
        try:
            operator_tokens = load_operator_tokens(args.operator_token_file)
        except OperatorTokenError as e:
            raise UsageError(f"--operator-token-file {e}") from None
    ek_roots: tuple[Any, ...] = ()
    for path in args.ek_ca:
        try:
            found = load_ek_roots([path])
        except EKRootError as e:
            raise UsageError(f"--ek-ca {e}") from None
        if not found:
            raise UsageError(f"--ek-ca {path}: no PEM certificate in it")
        ek_roots += found
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
        operator_tokens=operator_tokens,
        ek_roots=ek_roots,
        enrollment_ttl=timedelta(seconds=args.enrollment_ttl),
        threads=threads,
    )
    level = getattr(logging, args.log_level.upper())
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    instance = args.instance or instance_name()
    store = Store(args.store, instance=instance)  # creates the schema, checks the URL
    scheme = "https" if args.tls_cert else "http"
    writes = (
        f"reference values from {len(operator_tokens)} operator "
        f"token{'s' if len(operator_tokens) > 1 else ''}"
        if operator_tokens
        else "no reference values taken (no --operator-token-file)"
    )
    sys.stderr.write(
        f"cima verifier {instance}: store {store.url}, listening on {scheme}://{args.listen}"
        + (" (client certificates required)" if args.client_ca else "")
        + (f" ({workers} worker processes)" if workers > 1 else "")
        + f"; {writes}"
        + (
            f"; attestation keys enrolled by EK certificates of {len(ek_roots)} root"
            f"{'s' if len(ek_roots) > 1 else ''}"
            if ek_roots
            else ""
        )
        + "\n"
    )
    if operator_tokens and not args.tls_cert and not _loopback(host):
        sys.stderr.write(
            f"cima verifier: warning: operator tokens cross the network in clear text on "
            f"{args.listen}: serve HTTPS (--tls-cert, --tls-key)\n"
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
    if args.client_ca:
        server_options["ssl_ca_certs"] = str(Path(args.client_ca).resolve())
        server_options["ssl_cert_reqs"] = ssl.CERT_REQUIRED
    if workers == 1:
        try:
            try:
                sock = listening_socket(host, port)
            except OSError as e:
                raise UsageError(f"--listen {args.listen}: {e.strerror or e}") from None
            server = uvicorn.Server(
                uvicorn.Config(create_app(VerifierService(store, config)), **server_options)  # type: ignore[arg-type]
            )
            tune_gc()
            server.run(sockets=[sock])
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
            # The file, not the tokens: each worker reads it (load_operator_tokens).
            "operator_token_file": (
                str(Path(args.operator_token_file).resolve()) if args.operator_token_file else None
            ),
            # The EK roots' files too.
            "ek_ca": [str(Path(p).resolve()) for p in args.ek_ca],
            "max_body": config.max_body,
            "challenge_ttl": args.challenge_ttl,
            "enrollment_ttl": args.enrollment_ttl,
            "reference": reference,
            "threads": threads,
        }
    )
    if hasattr(socket, "SO_REUSEPORT") and sys.platform.startswith("linux"):
        return run_workers(host, port, workers, server_options)
    uvicorn.run(
        "cima.verifier.service:app_from_environment",
        factory=True,
        workers=workers,
        **server_options,  # type: ignore[arg-type]
    )
    return 0


def _check_tls(cert: str, key: str) -> None:
    """Refuse a certificate and key that do not load (before any worker starts)."""
    import ssl

    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)
    except FileNotFoundError as e:
        raise UsageError(f"--tls-cert/--tls-key {e.filename}: no such file") from None
    except (ssl.SSLError, OSError) as e:
        raise UsageError(f"--tls-cert {cert}, --tls-key {key}: {e}") from None


def _check_client_ca(cafile: str) -> None:
    """Refuse a ``--client-ca`` file that does not load as CA certificates (before any worker)."""
    import ssl

    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_verify_locations(cafile=cafile)
    except FileNotFoundError:
        raise UsageError(f"--client-ca {cafile}: no such file") from None
    except ssl.SSLError as e:
        raise UsageError(
            f"--client-ca {cafile}: not PEM CA certificates: {e.reason or e}"
        ) from None
    except OSError as e:
        raise UsageError(f"--client-ca {cafile}: cannot read: {e.strerror or e}") from None


def _loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) is this machine's loopback."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def default_workers() -> int:
    """One worker process per CPU this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def run_workers(host: str, port: int, workers: int, options: dict[str, object]) -> int:
    """Run ``workers`` worker processes, each listening on ``host:port`` (``SO_REUSEPORT``).

    This process holds the address (bound, not listening, so that it is not
    taken by another program while a worker restarts), starts the workers
    (:func:`cima.verifier.service.serve_worker`), starts a worker again when
    one dies after it started serving, and stops them all on SIGTERM or
    SIGINT (a worker whose parent is gone stops by itself). A worker that
    fails before it serves (its store cannot be opened) stops the instance: 1.
    """
    import multiprocessing
    import signal
    import threading

    from cima.verifier.service import listening_socket, serve_worker

    try:
        if port:  # in use by another program (or instance): refused, as one socket would be
            listening_socket(host, port, listen=False).close()
        anchor = listening_socket(host, port, listen=False, reuse_port=True)
    except OSError as e:
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        raise UsageError(f"--listen {address}: {e.strerror or e}") from None
    port = int(anchor.getsockname()[1])
    ctx = multiprocessing.get_context("spawn")
    stop = threading.Event()
    log = logging.getLogger("cima.verifier")

    def start() -> tuple[multiprocessing.process.BaseProcess, Any]:
        ready = ctx.Event()
        proc = ctx.Process(
            target=serve_worker,
            args=(host, port, options, ready, os.getpid()),
            name="cima-verifier-worker",
        )
        proc.start()
        return proc, ready

    def on_signal(_signum: int, _frame: object) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    status = 0
    running = [start() for _ in range(workers)]
    try:
        while not stop.wait(0.25):
            for i, (proc, ready) in enumerate(running):
                if proc.is_alive():
                    continue
                if not ready.is_set():
                    sys.stderr.write(
                        f"cima verifier: a worker process failed to start (exit code "
                        f"{proc.exitcode})\n"
                    )
                    status = 1
                    stop.set()
                    break
                log.warning(
                    "worker process %s exited (%s): starting another", proc.pid, proc.exitcode
                )
                running[i] = start()
    finally:
        for proc, _ in running:
            if proc.is_alive():
                proc.terminate()
        for proc, _ in running:
            proc.join(20)
            if proc.is_alive():
                proc.kill()
                proc.join()
        anchor.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return status


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
