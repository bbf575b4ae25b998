"""The command line: ``fetchd once``, ``run``, ``check``, ``status``, ``health``, ``probe``,
``oauth2 login`` and ``import-fetchmailrc``.

Exit status: 0 when everything worked, 1 when an account failed (one line per account says
why), 2 when the configuration is invalid.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from fetchd import __version__
from fetchd.config import Config, load, state_file_of
from fetchd.daemon import Daemon
from fetchd.errors import ConfigError, FetchdError, StateBusy
from fetchd.logs import FORMATS, setup_logging
from fetchd.state import State
from fetchd.supervisor import Supervisor
from fetchd.tls import context_for

DEFAULT_CONFIG = "/etc/fetchd/fetchd.yaml"
EXIT_OK, EXIT_ACCOUNT_FAILED, EXIT_CONFIG = 0, 1, 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["import-fetchmailrc"]:  # its own argument parser, its own help
        from fetchd.fetchmailrc import main as import_fetchmailrc

        return import_fetchmailrc(argv[1:])
    args = _parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    setup_logging(level, args.log_format)
    if args.command == "probe":
        return _probe(args)
    if args.command in ("status", "health"):
        return _status(args.command, args.config)
    if args.command == "release":
        return _release(args.config, args.accounts)
    try:
        config = _load(args.config)
    except ConfigError as e:
        print(f"fetchd: configuration error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "check":
        for account in config.accounts:
            print(
                f"{account.name}: {account.protocol} {account.user} at {account.host}:"
                f"{account.port} tls={account.tls.mode} -> {account.deliver.target()}"
                + (f" for {', '.join(account.deliver.to)}" if account.deliver.to else "")
            )
        print(f"{config.path}: ok, {len(config.accounts)} account(s)")
        return EXIT_OK
    if args.command == "oauth2":
        from fetchd.oauth2 import login_command

        return login_command(config, args.account, args.flow)
    try:
        if args.command == "once":
            return asyncio.run(_once(config))
        # Until the daemon's handlers are in place, a reload or poll-now signal must not
        # kill it (systemd queues reloads until READY=1; docker kill does not).
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        asyncio.run(Daemon(config, _load).run())
        return EXIT_OK
    except ConfigError as e:
        print(f"fetchd: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except StateBusy as e:
        print(f"fetchd: {e}", file=sys.stderr)
        return EXIT_ACCOUNT_FAILED
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fetchd", description="Fetch mail from POP3/IMAP servers into the local MTA."
    )
    parser.add_argument("--version", action="version", version=f"fetchd {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-c",
        "--config",
        default=os.environ.get("FETCHD_CONFIG", DEFAULT_CONFIG),
        help=f"configuration file (default: $FETCHD_CONFIG or {DEFAULT_CONFIG})",
    )
    common.add_argument("-v", "--verbose", action="store_true", help="log more detail")
    common.add_argument("-q", "--quiet", action="store_true", help="log only problems")
    common.add_argument(
        "--log-format",
        choices=FORMATS,
        default=os.environ.get("FETCHD_LOG_FORMAT", "auto"),
        help="auto (default: journald-aware text), text, or json (one object per line)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("once", parents=[common], help="poll every account once, then exit")
    sub.add_parser("run", parents=[common], help="poll every account at its interval")
    sub.add_parser("check", parents=[common], help="validate the configuration and exit")
    sub.add_parser(
        "status", parents=[common], help="show each account's last poll, errors and kept mail"
    )
    sub.add_parser(
        "health", parents=[common], help="exit 0 if the daemon for this configuration is alive"
    )
    r = sub.add_parser(
        "release",
        parents=[common],
        help="fetch again, at the next poll, the mail `status` lists as kept on the server",
        description="Forget why mail was kept on the server (refused by the MTA, held after it "
        "went silent, sent broken by the server), so that the next poll fetches it again. For "
        "after the cause was dealt with. Run it as the user the daemon runs as.",
    )
    r.add_argument("accounts", nargs="+", metavar="ACCOUNT", help="account names")
    sub.add_parser(
        "import-fetchmailrc",
        help="turn a .fetchmailrc into a fetchd configuration (see its --help)",
        add_help=False,
    )
    o = sub.add_parser("oauth2", help="OAuth2 sign-in for accounts whose token fetchd refreshes")
    o_sub = o.add_subparsers(dest="oauth2_command", required=True, metavar="ACTION")
    login = o_sub.add_parser(
        "login",
        parents=[common],
        help="sign in once and store the account's refresh token",
        description="Sign in to the account's provider (device code or browser) and store the "
        "refresh token in its oauth2.refresh_token_file.",
    )
    login.add_argument("account", metavar="ACCOUNT", help="the account's name")
    login.add_argument(
        "--flow",
        choices=("device", "browser"),
        help="device: enter a code on any device; browser: sign in on this machine "
        "(default: device when the provider has it)",
    )
    p = sub.add_parser(
        "probe",
        help="show a server's certificate, fingerprints and TLS verdict",
        description="Connect to HOST[:PORT], show the certificate chain, its fingerprints "
        "and whether fetchd would trust it, and print a tls: block to paste.",
    )
    p.add_argument("target", metavar="HOST[:PORT]")
    p.add_argument("--starttls", choices=("pop3", "imap", "smtp"), help="upgrade in-band")
    p.add_argument("--ca-file", help="trust this PEM bundle instead of the system store")
    p.add_argument("--server-name", help="check the certificate for this name instead of HOST")
    p.add_argument("--timeout", type=float, default=20.0, help="seconds (default 20)")
    p.add_argument("-v", "--verbose", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("-q", "--quiet", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--log-format", choices=FORMATS, default="auto", help=argparse.SUPPRESS)
    return parser


def _probe(args: argparse.Namespace) -> int:
    from fetchd.config import TLSSettings, split_host_port
    from fetchd.probe import default_port, probe, report

    try:
        host, port = split_host_port(args.target, default_port(args.starttls))
    except ValueError as e:
        print(f"fetchd probe: {e}", file=sys.stderr)
        return EXIT_CONFIG
    settings = TLSSettings(
        mode="starttls" if args.starttls else "implicit",
        ca_file=os.path.abspath(args.ca_file) if args.ca_file else None,
        system_ca=not args.ca_file,
        server_name=args.server_name,
    )
    try:
        result = asyncio.run(
            probe(host, port, starttls=args.starttls, settings=settings, deadline=args.timeout)
        )
    except (FetchdError, ValueError) as e:
        print(f"fetchd probe: {e}", file=sys.stderr)
        return EXIT_ACCOUNT_FAILED
    print(report(host, port, args.starttls, result, settings))
    return EXIT_OK if result.ok else EXIT_ACCOUNT_FAILED


def _status(command: str, path: str) -> int:
    """status and health need only the state file: they work without the daemon's password
    variables, and while the configuration is being edited."""
    from fetchd.status import health, status

    try:
        state_file = state_file_of(path)
    except ConfigError as e:
        print(f"fetchd: configuration error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    if command == "health":
        return health(state_file)
    try:
        names: list[str] | None = [a.name for a in load(path).accounts]
        problem = None
    except ConfigError as e:
        names, problem = None, str(e)
    return status(state_file, names, problem)


def _release(path: str, accounts: list[str]) -> int:
    from fetchd.state import release

    accounts = list(dict.fromkeys(accounts))
    try:
        names = {a.name for a in load(path).accounts}
    except ConfigError:
        names = None  # a file being edited: the state alone decides
    unknown = [a for a in accounts if names is not None and a not in names]
    if unknown:
        print(f"fetchd release: no account {', '.join(unknown)} in {path}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        released = release(state_file_of(path), accounts)
    except ConfigError as e:
        print(f"fetchd release: {e}", file=sys.stderr)
        return EXIT_CONFIG
    for account, count in released.items():
        if count:
            print(f"{account}: {count} kept on the server, fetched again at the next poll")
        else:
            print(f"{account}: nothing was kept on the server")
    return EXIT_OK


def _load(path: str) -> Config:
    config = load(path)
    for warning in config.warnings:
        logging.getLogger("fetchd").warning("%s", warning)
    for account in config.accounts:  # bad CA files are configuration errors, found now
        context_for(account.tls)
    return config


async def _once(config: Config) -> int:
    state = await State.open(config.state_file, lock=True)
    try:
        outcomes = await Supervisor(config, state, log_outcomes=False).run_once()
    finally:
        await state.close()
    for outcome in outcomes:
        print(outcome.line())
    return EXIT_OK if all(o.ok for o in outcomes) else EXIT_ACCOUNT_FAILED
