from __future__ import annotations

import itertools
import os
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml

from tests.support.dovecot import Dovecot, running_dovecot
from tests.support.sink import Sink, smtp_sink

CORPUS = Path(__file__).parent / "corpus"
_users = itertools.count(1)


def corpus_messages() -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(CORPUS.glob("*.eml"))}


def as_delivered(original: bytes, *, imap: bool = False) -> bytes:
    """What an MTA receives for a message fetchd relayed, minus the Received header.

    Line ends become CRLF (POP3/IMAP servers serve CRLF; SMTP requires it) and a final CRLF is
    added. POP3 cannot tell an empty message from one empty line, so Dovecot serves the empty
    message as CRLF. Dovecot serves NUL as 0x80 over IMAP (it has no BINARY extension enabled).
    """
    data = re.sub(rb"\r\n|\r|\n", b"\r\n", original)
    if (data or not imap) and not data.endswith(b"\r\n"):
        data += b"\r\n"
    if imap:
        data = data.replace(b"\x00", b"\x80")
    return data


def strip_received(data: bytes) -> tuple[bytes, bytes]:
    """Split the Received header fetchd added from the rest of the delivered message."""
    # Matched up to the date that ends fetchd's header, not by folding rules: a message whose
    # first line starts with a blank would otherwise look like part of the header.
    m = re.match(
        rb"Received: from [^;]*;\r\n\t\w{3}, \d{2} \w{3} \d{4} \d{2}:\d{2}:\d{2} [+-]\d{4}\r\n",
        data,
    )
    assert m, f"no Received header at the top: {data[:200]!r}"
    return data[: m.end()], data[m.end() :]


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture(scope="session")
def dovecot(ca: trustme.CA) -> Iterator[Dovecot]:
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    chain = b"".join(p.bytes() for p in leaf.cert_chain_pems)
    with running_dovecot(chain, leaf.private_key_pem.bytes()) as server:
        yield server


@pytest.fixture
def mailbox_user(dovecot: Dovecot) -> str:
    """A fresh, empty mailbox for this test."""
    user = f"user{next(_users)}"
    dovecot.add_user(user, f"pw-{user}")
    return user


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    async with smtp_sink() as s:
        yield s


class ConfigWriter:
    """Writes fetchd configs for tests, mode 0600 as a real one would be."""

    def __init__(self, directory: Path, ca_file: Path) -> None:
        self.directory = directory
        self.ca_file = ca_file

    def account(
        self,
        dovecot: Dovecot,
        user: str,
        *,
        protocol: str,
        mode: str,
        sink_port: int,
        **extra: Any,
    ) -> dict[str, Any]:
        port_key = {("imap", "implicit"): "imaps", ("imap", "starttls"): "imap"}.get(
            (protocol, mode), "pop3s" if mode == "implicit" else "pop3"
        )
        account: dict[str, Any] = {
            "name": f"{user}-{protocol}-{mode}",
            "protocol": protocol,
            "host": "localhost",
            "port": dovecot.ports[port_key],
            "user": user,
            "password": dovecot.users[user],
            "tls": {"mode": mode, "ca_file": str(self.ca_file)},
            "deliver": {"smtp": f"127.0.0.1:{sink_port}", "to": [f"{user}@localhost"]},
        }
        account.update(extra)
        return account

    def write(self, accounts: list[dict[str, Any]], name: str = "fetchd.yaml", **top: Any) -> Path:
        path = self.directory / name
        doc = {
            "state_file": str(self.directory / "state.sqlite3"),
            "startup_window": 0,
            **top,
            "accounts": accounts,
        }
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        os.chmod(path, 0o600)
        return path


@pytest.fixture
def configs(tmp_path: Path, ca_file: Path) -> ConfigWriter:
    return ConfigWriter(tmp_path, ca_file)
