"""The demo behind scripts/demo: fetchd's main job on real messages, on this machine only.

A private Dovecot on 127.0.0.1 (certificate from a throw-away CA made with trustme) holds two
mailboxes filled from tests/corpus; an SMTP sink stands in for the local MTA. fetchd polls
alice over IMAPS and bob over POP3 with STLS, both with certificate verification, then the demo
shows what the MTA received and that the mailboxes are empty. A second poll shows that nothing
is delivered twice.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import sys
from email.header import decode_header, make_header
from pathlib import Path

import trustme
import yaml

from tests.support.dovecot import running_dovecot
from tests.support.sink import Sink, smtp_sink

REPO = Path(__file__).resolve().parent.parent.parent
CORPUS = REPO / "tests" / "corpus"
WORK = REPO / "demo-run"


def subject_of(message: bytes) -> str:
    m = re.search(rb"(?im)^Subject:[ \t]*(.*(?:\r?\n[ \t].*)*)", message.split(b"\r\n\r\n")[0])
    if not m:
        return "(no subject)"
    folded = re.sub(rb"\r?\n[ \t]+", b" ", m.group(1))
    try:
        raw = folded.decode("utf-8")
    except UnicodeDecodeError:  # undeclared 8-bit text: most often Latin-1
        raw = folded.decode("latin-1")
    try:
        text = str(make_header(decode_header(raw)))
    except Exception:
        text = raw
    return text if len(text) <= 48 else text[:45] + "..."


async def run_fetchd(*args: str) -> int:
    fetchd = shutil.which("fetchd", path=str(Path(sys.executable).parent)) or "fetchd"
    print(f"\n$ fetchd {' '.join(args)}", flush=True)
    proc = await asyncio.create_subprocess_exec(fetchd, *args)
    return await proc.wait()


def show(sink: Sink, start: int) -> None:
    print(f"\n{'to':<20} {'envelope sender':<28} {'bytes':>7}  subject")
    for accepted in sink.accepted[start:]:
        sender = accepted.mail_from if accepted.mail_from != "<>" else "<> (null sender)"
        print(
            f"{', '.join(accepted.rcpt_tos):<20} {sender[:28]:<28} {len(accepted.data):>7}  "
            f"{subject_of(accepted.data)}"
        )


async def main() -> int:
    shutil.rmtree(WORK, ignore_errors=True)
    (WORK / "delivered").mkdir(parents=True)
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(WORK / "ca.pem"))
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    chain = b"".join(p.bytes() for p in leaf.cert_chain_pems)
    messages = sorted(p for p in CORPUS.glob("*.eml") if p.stat().st_size < 100_000)

    with running_dovecot(chain, leaf.private_key_pem.bytes()) as dovecot:
        print(f"Dovecot running on 127.0.0.1, ports {dovecot.ports}")
        for user, mine in (("alice", messages[0::2]), ("bob", messages[1::2])):
            dovecot.add_user(user, f"{user}-demo-password")
            dovecot.deliver(user, [p.read_bytes() for p in mine])
            print(f"  {user}: {dovecot.count(user)} real-world messages from tests/corpus")
        async with smtp_sink() as sink:
            print(f"SMTP sink (the 'local MTA') on 127.0.0.1:{sink.port}")
            accounts = []
            for user, protocol, mode, port in (
                ("alice", "imap", "implicit", dovecot.ports["imaps"]),
                ("bob", "pop3", "starttls", dovecot.ports["pop3"]),
            ):
                secret = WORK / f"{user}.password"
                secret.write_text(dovecot.users[user] + "\n")
                os.chmod(secret, 0o600)
                accounts.append(
                    {
                        "name": f"{user}-{protocol}",
                        "protocol": protocol,
                        "host": "127.0.0.1",  # needs no name resolution
                        "port": port,
                        "user": user,
                        "password_file": secret.name,
                        "tls": {"mode": mode},
                        "deliver": {"to": [f"{user}@localhost"]},
                    }
                )
            config = WORK / "fetchd.yaml"
            config.write_text(
                "# Written by scripts/demo.\n"
                + yaml.safe_dump(
                    {
                        "state_file": "state.sqlite3",
                        "defaults": {
                            # The certificate names localhost and 127.0.0.1; check by name.
                            "tls": {"ca_file": "ca.pem", "server_name": "localhost"},
                            "deliver": {"smtp": f"127.0.0.1:{sink.port}"},
                        },
                        "accounts": accounts,
                    },
                    sort_keys=False,
                )
            )
            os.chmod(config, 0o600)
            print(f"\nConfiguration: {config.relative_to(REPO)}\n" + config.read_text())

            status = await run_fetchd("check", "-c", str(config))
            status = status or await run_fetchd("once", "-c", str(config))
            show(sink, 0)
            for i, accepted in enumerate(sink.accepted, 1):
                (WORK / "delivered" / f"{i:03d}.eml").write_bytes(accepted.data)
            left = {user: dovecot.count(user) for user in ("alice", "bob")}
            print(
                f"\nDelivered {len(sink.accepted)} of {len(messages)} messages; "
                f"left on the server: {left}"
            )
            print(
                f"Each delivered message is in {(WORK / 'delivered').relative_to(REPO)}/, "
                "with the Received: header fetchd added on top."
            )

            before = len(sink.accepted)
            dovecot.save("bob", b"Subject: one more for bob\r\n\r\nHello again.\r\n")
            print("\nA new message arrives for bob; polling again delivers only that one:")
            status = status or await run_fetchd("once", "-c", str(config))
            show(sink, before)

    ok = status == 0 and len(sink.accepted) == len(messages) + 1 and not any(left.values())
    print("\ndemo: " + ("OK, every message delivered exactly once" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
