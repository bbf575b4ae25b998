"""A private Postfix on 127.0.0.1 for interoperability tests: fetchd → Postfix → SMTP sink.

Its own configuration and queue live in one directory; it relays everything it accepts to a
sink, so the test sees what a real MTA made of fetchd's SMTP (8BITMIME, SMTPUTF8, dot-stuffing).
Header rewriting and line splitting are turned off, so what arrives can be compared with what
was sent. Postfix needs root (CI runs as root) and Debian's postfix package.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tests.support.dovecot import free_port

MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {root}/queue
data_directory = {root}/data
mail_owner = postfix
setgid_group = postdrop
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = mta.test
mydestination =
relay_domains =
local_recipient_maps =
alias_maps =
alias_database =
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
relayhost = [127.0.0.1]:{relay_port}
smtputf8_enable = yes
message_size_limit = 0
local_header_rewrite_clients =
smtp_line_length_limit = 0
smtp_tls_security_level = none
smtpd_tls_security_level = none
maillog_file = {root}/maillog
maillog_file_prefixes = {root}
biff = no
message_drop_headers =
header_size_limit = 10240000
"""

MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n - n 60 1 pickup
cleanup   unix  n - n -  0 cleanup
qmgr      unix  n - n 300 1 qmgr
rewrite   unix  - - n -  - trivial-rewrite
bounce    unix  - - n -  0 bounce
defer     unix  - - n -  0 bounce
trace     unix  - - n -  0 bounce
verify    unix  - - n -  1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n -  - proxymap
smtp      unix  - - n -  - smtp
relay     unix  - - n -  - smtp
showq     unix  n - n -  - showq
error     unix  - - n -  - error
retry     unix  - - n -  - error
discard   unix  - - n -  - discard
anvil     unix  - - n -  1 anvil
scache    unix  - - n -  1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


def available() -> str | None:
    """Why this machine cannot run the test Postfix, or None if it can."""
    if shutil.which("postfix") is None:
        return "Debian's postfix package is not installed (scripts/bootstrap installs it)"
    if os.geteuid() != 0:
        return "Postfix needs root"
    return None


def _postfix(root: Path, *args: str) -> None:
    # Postfix reports fatal errors to stderr only when it is a terminal: keep its log instead.
    result = subprocess.run(["postfix", "-c", str(root), *args], capture_output=True)
    if result.returncode != 0:
        log = (root / "maillog").read_text(errors="replace") if (root / "maillog").exists() else ""
        raise RuntimeError(f"postfix {' '.join(args)} failed: {result.stderr!r} {log[-2000:]}")


@contextlib.contextmanager
def running_postfix(relay_port: int) -> Iterator[int]:
    """Postfix listening on a free loopback port, relaying everything to ``relay_port``."""
    root = Path(tempfile.mkdtemp(prefix="fetchd-postfix-"))
    port = free_port()
    try:
        (root / "queue").mkdir()
        (root / "data").mkdir()
        shutil.chown(root / "data", "postfix")
        (root / "main.cf").write_text(MAIN_CF.format(root=root, relay_port=relay_port))
        (root / "master.cf").write_text(MASTER_CF.format(port=port))
        _postfix(root, "set-permissions")
        _postfix(root, "start")
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("Postfix did not start listening") from None
                time.sleep(0.1)
        yield port
    finally:
        subprocess.run(["postfix", "-c", str(root), "abort"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
