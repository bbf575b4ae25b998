"""A private, self-contained Dovecot on 127.0.0.1 for tests, the demo and benchmarks.

It has its own configuration, run directory, passwd file, Maildirs and TLS certificate in one
directory, listens on free loopback ports (IMAP, IMAPS, POP3, POP3S), and never touches
/etc/dovecot or Debian's service. As root, mail is owned by an unprivileged user (Dovecot
refuses to serve mail as root); as another user, everything runs as that user.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

MAIL_USER = "fetchd-test"  # created by scripts/bootstrap when running as root

CONFIG = """\
instance_name = {name}
base_dir = {root}/run
state_dir = {root}/state
listen = 127.0.0.1
protocols = {protocols}
log_path = {root}/dovecot.log
info_log_path = {root}/dovecot.log
auth_verbose = yes
ssl = yes
ssl_cert = <{root}/tls/cert.pem
ssl_key = <{root}/tls/key.pem
ssl_min_protocol = TLSv1.2
disable_plaintext_auth = no
auth_mechanisms = plain login cram-md5
auth_failure_delay = 0
mail_location = maildir:~/Maildir
mail_uid = {uid}
mail_gid = {gid}
first_valid_uid = {uid}
last_valid_uid = {uid}
first_valid_gid = {gid}
last_valid_gid = {gid}
{privileges}
mail_max_userip_connections = 2000
default_process_limit = 2000
default_client_limit = 7000
pop3_uidl_format = %08Xu%08Xv
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {root}/passwd.d/%u
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={root}/home/%u
}}
service imap-login {{
  service_count = 0
  inet_listener imap {{
    port = {imap}
  }}
  inet_listener imaps {{
    port = {imaps}
    ssl = yes
  }}
}}
service pop3-login {{
  service_count = 0
  inet_listener pop3 {{
    port = {pop3}
  }}
  inet_listener pop3s {{
    port = {pop3s}
    ssl = yes
  }}
}}
{lmtp_service}
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
{extra}
"""


LMTP_SERVICE = """\
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {port}
  }}
}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mail_owner() -> tuple[int, int, str]:
    """The uid, gid and name that own the Maildirs."""
    if os.geteuid() != 0:
        me = pwd.getpwuid(os.geteuid())
        return me.pw_uid, me.pw_gid, me.pw_name
    try:
        entry = pwd.getpwnam(MAIL_USER)
    except KeyError:
        raise RuntimeError(
            f"user {MAIL_USER!r} is missing: run scripts/bootstrap (it creates it)"
        ) from None
    return entry.pw_uid, entry.pw_gid, entry.pw_name


@dataclass
class Dovecot:
    """A running Dovecot. Use :func:`running_dovecot` or call start()/stop()."""

    root: Path
    cert_pem: bytes
    key_pem: bytes
    extra_config: str = ""
    ports: dict[str, int] = field(default_factory=dict)
    users: dict[str, str] = field(default_factory=dict)

    def start(self) -> None:
        uid, gid, _ = mail_owner()
        for sub in ("run", "state", "home", "tls"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)  # noqa: S103 - Dovecot's unprivileged users need it
        (self.root / "tls" / "cert.pem").write_bytes(self.cert_pem)
        (self.root / "tls" / "key.pem").write_bytes(self.key_pem)
        os.chmod(self.root / "tls" / "key.pem", 0o600)
        (self.root / "passwd.d").mkdir(exist_ok=True)
        names = ["imap", "imaps", "pop3", "pop3s"]
        lmtp = os.path.exists("/usr/lib/dovecot/lmtp")  # package dovecot-lmtpd
        if lmtp:
            names.append("lmtp")
        self.ports = {p: free_port() for p in names}
        lmtp_service = LMTP_SERVICE.format(port=self.ports["lmtp"]) if lmtp else ""
        if os.geteuid() == 0:
            privileges = ""
        else:
            me = pwd.getpwuid(os.geteuid()).pw_name
            privileges = f"default_internal_user = {me}\ndefault_login_user = {me}\n"
        (self.root / "dovecot.conf").write_text(
            CONFIG.format(
                name=f"fetchd-test-{uuid.uuid4().hex[:8]}",
                root=self.root,
                uid=uid,
                gid=gid,
                privileges=privileges,
                extra=self.extra_config,
                protocols="imap pop3 lmtp" if lmtp else "imap pop3",
                lmtp_service=lmtp_service,
                **self.ports,
            )
        )
        os.chown(self.root / "home", uid, gid)
        # The daemon keeps inherited descriptors: give it a file, not a pipe we would wait on.
        with open(self.root / "startup.log", "wb") as out:
            result = subprocess.run(["dovecot", "-c", str(self.conf)], stdout=out, stderr=out)
        if result.returncode != 0:
            raise RuntimeError(
                "Dovecot failed to start: "
                + (self.root / "startup.log").read_text(errors="replace")
            )
        self._wait_listening()

    @property
    def conf(self) -> Path:
        return self.root / "dovecot.conf"

    def _wait_listening(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        for port in self.ports.values():
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"Dovecot did not start; see {self.log_path}") from None
                    time.sleep(0.05)

    def stop(self) -> None:
        subprocess.run(["doveadm", "-c", str(self.conf), "stop"], capture_output=True)
        pidfile = self.root / "run" / "master.pid"
        deadline = time.monotonic() + 10
        while pidfile.exists() and time.monotonic() < deadline:
            time.sleep(0.05)

    @property
    def log_path(self) -> Path:
        return self.root / "dovecot.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # -- mailboxes ----------------------------------------------------------------------------

    def add_user(self, user: str, password: str) -> None:
        self.users[user] = password
        # One passwd file per user: Dovecot re-reads a changed file at most once a second,
        # so a user added to a shared file could stay unknown for that long.
        (self.root / "passwd.d" / user).write_text(f"{user}:{password}\n")
        for sub in ("cur", "new", "tmp"):
            self.maildir(user).joinpath(sub).mkdir(parents=True, exist_ok=True)
        self._chown_tree(self.root / "home" / user)

    def maildir(self, user: str, folder: str = "INBOX") -> Path:
        base = self.root / "home" / user / "Maildir"
        return base if folder == "INBOX" else base / f".{folder}"

    def add_folder(self, user: str, folder: str) -> None:
        for sub in ("cur", "new", "tmp"):
            self.maildir(user, folder).joinpath(sub).mkdir(parents=True, exist_ok=True)
        self._chown_tree(self.root / "home" / user)

    def deliver(self, user: str, messages: Iterable[bytes], folder: str = "INBOX") -> None:
        """Put messages straight into the Maildir (stored with LF line ends, as Dovecot wants),
        then let Dovecot index them."""
        uid, gid, _ = mail_owner()
        target = self.maildir(user, folder) / "new"
        for data in messages:
            name = f"{time.time_ns()}.{uuid.uuid4().hex}.fetchd-test"
            path = target / name
            path.write_bytes(data.replace(b"\r\n", b"\n"))
            os.chown(path, uid, gid)
        self.doveadm("mailbox", "status", "-u", user, "messages", folder)

    def save(self, user: str, message: bytes, folder: str = "INBOX") -> None:
        """Deliver through doveadm save, as a new message arriving would."""
        self.doveadm("save", "-u", user, "-m", folder, input=message)

    def count(self, user: str, folder: str = "INBOX") -> int:
        out = self.doveadm("mailbox", "status", "-u", user, "messages", folder)
        return int(out.split("=")[1])

    def doveadm(self, *args: str, input: bytes | None = None) -> str:
        result = subprocess.run(
            ["doveadm", "-c", str(self.conf), *args],
            input=input,
            capture_output=True,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"doveadm {' '.join(args)}: {result.stderr.decode(errors='replace')}"
            )
        return result.stdout.decode(errors="replace")

    def _chown_tree(self, top: Path) -> None:
        uid, gid, _ = mail_owner()
        for dirpath, _, filenames in os.walk(top):
            os.chown(dirpath, uid, gid)
            for name in filenames:
                os.chown(os.path.join(dirpath, name), uid, gid)


@contextlib.contextmanager
def running_dovecot(cert_pem: bytes, key_pem: bytes, extra_config: str = "") -> Iterator[Dovecot]:
    """A Dovecot for the duration of the block, in a fresh directory removed afterwards.

    The directory is world-traversable (not under pytest's private tmp) because Dovecot's
    unprivileged processes must reach the Maildirs and sockets in it.
    """
    root = Path(tempfile.mkdtemp(prefix="fetchd-dovecot-"))
    dovecot = Dovecot(root, cert_pem, key_pem, extra_config)
    try:
        dovecot.start()
        yield dovecot
    finally:
        dovecot.stop()
        shutil.rmtree(root, ignore_errors=True)
