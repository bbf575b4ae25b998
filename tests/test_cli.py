"""The command line as a user runs it: check, once and run, in real processes."""

from __future__ import annotations

import asyncio
import hashlib
import signal
import ssl
import sys
from pathlib import Path

from tests.conftest import ConfigWriter, strip_received
from tests.support.dovecot import Dovecot
from tests.support.sink import Sink

REPO = Path(__file__).parent.parent


async def fetchd(*args: str, deadline: float = 60) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fetchd",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), deadline)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_check_accepts_a_valid_file_and_rejects_a_broken_one(
    dovecot: Dovecot, mailbox_user: str, configs: ConfigWriter
) -> None:
    account = configs.account(dovecot, mailbox_user, protocol="imap", mode="implicit", sink_port=25)
    good = configs.write([account])
    status, out, _ = await fetchd("check", "-c", str(good))
    assert status == 0 and "ok, 1 account(s)" in out
    assert account["password"] not in out

    account["tls"]["mode"] = "ssl"
    bad = configs.write([account], name="bad.yaml")
    status, out, err = await fetchd("check", "-c", str(bad))
    assert status == 2
    assert f"{bad}:" in err and "accounts[0].tls.mode: must be one of" in err

    status, _, err = await fetchd("once", "-c", str(REPO / "nonexistent.yaml"))
    assert status == 2 and "cannot read the configuration" in err


async def test_run_polls_at_its_interval_and_stops_cleanly_on_sigterm(
    dovecot: Dovecot, mailbox_user: str, sink: Sink, configs: ConfigWriter
) -> None:
    dovecot.deliver(mailbox_user, [b"Subject: before start\n\none\n"])
    account = configs.account(
        dovecot, mailbox_user, protocol="pop3", mode="starttls", sink_port=sink.port, interval=1
    )
    config = configs.write([account])
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fetchd",
        "run",
        "-c",
        str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(30):
            await sink.wait_for(1)
            dovecot.save(mailbox_user, b"Subject: while running\r\n\r\ntwo\r\n")
            await sink.wait_for(2)
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 10)
    finally:
        if proc.returncode is None:
            proc.kill()
    assert proc.returncode == 0, err.decode()
    assert "fetchd stopped" in err.decode()
    bodies = [strip_received(a.data)[1] for a in sink.accepted]
    assert bodies == [
        b"Subject: before start\r\n\r\none\r\n",
        b"Subject: while running\r\n\r\ntwo\r\n",
    ]
    assert dovecot.count(mailbox_user) == 0
    assert account["password"] not in err.decode()
    assert (configs.directory / "state.sqlite3").exists()


async def test_probe_shows_chain_fingerprints_and_verdict(dovecot: Dovecot, ca_file: Path) -> None:
    imaps = f"localhost:{dovecot.ports['imaps']}"
    status, out, err = await fetchd("probe", imaps, "--ca-file", str(ca_file))
    assert status == 0, out + err
    assert "verdict: OK: trusted" in out
    assert "names:    localhost, 127.0.0.1" in out
    leaf_pem = (
        dovecot.cert_pem.split(b"-----END CERTIFICATE-----")[0] + b"-----END CERTIFICATE-----\n"
    )
    der = ssl.PEM_cert_to_DER_cert(leaf_pem.decode())
    sha256 = hashlib.sha256(der).hexdigest().upper()
    assert ":".join(sha256[i : i + 2] for i in range(0, 64, 2)) in out
    assert "pin-sha256:" in out and "mode: implicit" in out

    status, out, _ = await fetchd(
        "probe", f"127.0.0.1:{dovecot.ports['pop3']}", "--starttls", "pop3"
    )
    assert status == 1
    assert "STARTTLS pop3" in out and "NOT TRUSTED" in out and "unknown CA" in out
    assert "mode: starttls" in out

    status, out, _ = await fetchd(
        "probe",
        f"127.0.0.1:{dovecot.ports['imap']}",
        "--starttls",
        "imap",
        "--ca-file",
        str(ca_file),
        "--server-name",
        "mail.example.net",
    )
    assert status == 1 and "not for mail.example.net" in out
