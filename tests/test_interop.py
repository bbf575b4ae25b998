"""End to end against a real Dovecot and an SMTP sink: the main job of fetchd."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest
import trustme

from fetchd.config import load
from fetchd.errors import DeliveryDeferred, PermanentError
from fetchd.state import State
from fetchd.supervisor import Outcome, Supervisor
from tests.conftest import ConfigWriter, as_delivered, corpus_messages, strip_received
from tests.support.dovecot import Dovecot, running_dovecot
from tests.support.sink import Sink, smtp_sink

MODES = [
    ("imap", "implicit"),
    ("imap", "starttls"),
    ("pop3", "implicit"),
    ("pop3", "starttls"),
]


async def poll_once(config: Path) -> list[Outcome]:
    cfg = load(config)
    state = await State.open(cfg.state_file)
    try:
        return await Supervisor(cfg, state).run_once()
    finally:
        await state.close()


def logins(dovecot: Dovecot, user: str) -> int:
    return dovecot.log().count(f"Login: user=<{user}>")


@pytest.mark.parametrize(("protocol", "mode"), MODES)
async def test_corpus_arrives_byte_for_byte_and_mailbox_is_emptied(
    dovecot: Dovecot,
    mailbox_user: str,
    sink: Sink,
    configs: ConfigWriter,
    protocol: str,
    mode: str,
) -> None:
    messages = corpus_messages()
    dovecot.deliver(mailbox_user, messages.values())
    config = configs.write(
        [configs.account(dovecot, mailbox_user, protocol=protocol, mode=mode, sink_port=sink.port)]
    )

    (outcome,) = await poll_once(config)

    assert outcome.ok, outcome.line()
    assert len(sink.accepted) == len(messages)
    received = {}
    for got in sink.accepted:
        header, body = strip_received(got.data)
        assert b"by " in header and f"with {protocol.upper()}".encode() in header
        assert b"TLSv1." in header, "the trace header names the TLS version"
        assert got.rcpt_tos == (f"{mailbox_user}@localhost",)
        received[body] = got
    for name, original in messages.items():
        expected = as_delivered(original, imap=protocol == "imap")
        assert expected in received, f"{name} did not arrive byte for byte"
    assert dovecot.count(mailbox_user) == 0


async def test_envelope_sender_comes_from_return_path(
    dovecot: Dovecot, mailbox_user: str, sink: Sink, configs: ConfigWriter
) -> None:
    dovecot.deliver(
        mailbox_user,
        [
            b"Return-Path: <bounce@example.org>\nSubject: one\n\nbody\n",
            b"Return-Path: <>\nSubject: two\n\nbody\n",
            b"Subject: three\n\nbody\n",
        ],
    )
    config = configs.write(
        [
            configs.account(
                dovecot, mailbox_user, protocol="pop3", mode="implicit", sink_port=sink.port
            )
        ]
    )
    (outcome,) = await poll_once(config)
    assert outcome.ok, outcome.line()
    senders = {
        strip_received(a.data)[1].split(b"Subject: ")[1][:5]: a.mail_from for a in sink.accepted
    }
    assert senders == {b"one\r\n": "bounce@example.org", b"two\r\n": "<>", b"three": "<>"}


@pytest.mark.parametrize("protocol", ["imap", "pop3"])
async def test_keep_delivers_only_new_mail(
    dovecot: Dovecot, mailbox_user: str, sink: Sink, configs: ConfigWriter, protocol: str
) -> None:
    dovecot.deliver(mailbox_user, [b"Subject: first\n\none\n", b"Subject: second\n\ntwo\n"])
    config = configs.write(
        [
            configs.account(
                dovecot,
                mailbox_user,
                protocol=protocol,
                mode="implicit",
                sink_port=sink.port,
                keep=True,
            )
        ]
    )

    (first,) = await poll_once(config)
    assert first.ok and len(sink.accepted) == 2
    assert dovecot.count(mailbox_user) == 2, "keep: true leaves the messages on the server"

    (second,) = await poll_once(config)
    assert second.ok and len(sink.accepted) == 2, "a second poll delivers nothing"

    dovecot.save(mailbox_user, b"Subject: third\r\n\r\nthree\r\n")
    (third,) = await poll_once(config)
    assert third.ok
    assert len(sink.accepted) == 3
    assert strip_received(sink.accepted[-1].data)[1] == b"Subject: third\r\n\r\nthree\r\n"
    assert dovecot.count(mailbox_user) == 3


@pytest.mark.parametrize(("protocol", "mode"), MODES)
async def test_untrusted_certificate_means_no_login_and_nothing_delivered(
    dovecot: Dovecot,
    mailbox_user: str,
    sink: Sink,
    configs: ConfigWriter,
    tmp_path: Path,
    protocol: str,
    mode: str,
) -> None:
    dovecot.deliver(mailbox_user, [b"Subject: secret\n\nbody\n"])
    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    account = configs.account(
        dovecot, mailbox_user, protocol=protocol, mode=mode, sink_port=sink.port
    )
    account["tls"]["ca_file"] = str(other_ca)
    config = configs.write([account])

    (outcome,) = await poll_once(config)

    assert isinstance(outcome.error, PermanentError)
    assert "certificate" in str(outcome.error) and "localhost" in str(outcome.error)
    assert logins(dovecot, mailbox_user) == 0
    assert sink.accepted == []
    assert dovecot.count(mailbox_user) == 1


async def test_wrong_host_name_is_refused(
    dovecot: Dovecot, mailbox_user: str, sink: Sink, configs: ConfigWriter
) -> None:
    dovecot.deliver(mailbox_user, [b"Subject: x\n\nbody\n"])
    account = configs.account(
        dovecot, mailbox_user, protocol="imap", mode="implicit", sink_port=sink.port
    )
    account["tls"]["server_name"] = "mail.example.net"  # the certificate is for localhost
    (outcome,) = await poll_once(configs.write([account]))
    assert isinstance(outcome.error, PermanentError)
    assert "mail.example.net" in str(outcome.error)
    assert logins(dovecot, mailbox_user) == 0


@pytest.mark.parametrize("protocol", ["imap", "pop3"])
async def test_mta_down_deletes_nothing_and_a_later_poll_delivers(
    dovecot: Dovecot, mailbox_user: str, configs: ConfigWriter, protocol: str
) -> None:
    dovecot.deliver(mailbox_user, [b"Subject: a\n\none\n", b"Subject: b\n\ntwo\n"])
    async with smtp_sink() as probe:
        dead_port = probe.port  # closed when the block ends: nothing listens there any more
    config = configs.write(
        [
            configs.account(
                dovecot, mailbox_user, protocol=protocol, mode="implicit", sink_port=dead_port
            )
        ]
    )
    (outcome,) = await poll_once(config)
    assert isinstance(outcome.error, DeliveryDeferred)
    assert "MTA" in str(outcome.error)
    assert dovecot.count(mailbox_user) == 2

    async with smtp_sink() as sink:
        config = configs.write(
            [
                configs.account(
                    dovecot, mailbox_user, protocol=protocol, mode="implicit", sink_port=sink.port
                )
            ]
        )
        (outcome,) = await poll_once(config)
        assert outcome.ok, outcome.line()
        assert len(sink.accepted) == 2
    assert dovecot.count(mailbox_user) == 0


@pytest.mark.parametrize("protocol", ["imap", "pop3"])
async def test_temporary_refusal_keeps_messages(
    dovecot: Dovecot, mailbox_user: str, configs: ConfigWriter, protocol: str
) -> None:
    dovecot.deliver(mailbox_user, [b"Subject: a\n\none\n"])
    async with smtp_sink(data_reply="451 4.3.0 try again later") as sink:
        config = configs.write(
            [
                configs.account(
                    dovecot, mailbox_user, protocol=protocol, mode="implicit", sink_port=sink.port
                )
            ]
        )
        (outcome,) = await poll_once(config)
    assert isinstance(outcome.error, DeliveryDeferred)
    assert "451" in str(outcome.error)
    assert dovecot.count(mailbox_user) == 1


@pytest.mark.parametrize("protocol", ["imap", "pop3"])
async def test_permanent_refusal_keeps_message_and_others_go_on(
    dovecot: Dovecot, mailbox_user: str, configs: ConfigWriter, protocol: str
) -> None:
    dovecot.deliver(mailbox_user, [b"Subject: spam\n\nbad\n", b"Subject: ham\n\ngood\n"])

    class Picky(Sink):
        async def handle_DATA(self, server, session, envelope):  # type: ignore[no-untyped-def]
            if b"spam" in envelope.original_content:
                return "554 5.7.1 rejected as spam"
            return await super().handle_DATA(server, session, envelope)

    sink = Picky()
    loop = asyncio.get_running_loop()
    from tests.support.sink import _SMTP

    server = await loop.create_server(lambda: _SMTP(sink, hostname="mta.test"), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        config = configs.write(
            [
                configs.account(
                    dovecot, mailbox_user, protocol=protocol, mode="implicit", sink_port=port
                )
            ]
        )
        (outcome,) = await poll_once(config)
    finally:
        server.close()
    assert outcome.ok
    assert outcome.result is not None and outcome.result.rejected == 1
    assert [b"good" in a.data for a in sink.accepted] == [True]
    assert dovecot.count(mailbox_user) == 1, "the refused message stays on the server"


async def test_ten_accounts_of_real_mail_through_the_cli_exactly_once(
    dovecot: Dovecot, sink: Sink, configs: ConfigWriter
) -> None:
    messages = list(corpus_messages().values())
    accounts = []
    expected: dict[str, list[bytes]] = {}
    for i in range(10):
        user = f"ten{i}"
        dovecot.add_user(user, f"pw-{user}")
        mine = [*messages[i::10], f"Subject: account {i}\n\nhello {i}\n".encode()]
        dovecot.deliver(user, mine)
        protocol, mode = MODES[i % 4]
        accounts.append(
            configs.account(dovecot, user, protocol=protocol, mode=mode, sink_port=sink.port)
        )
        expected[f"{user}@localhost"] = [as_delivered(m, imap=protocol == "imap") for m in mine]
    config = configs.write(accounts)

    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fetchd",
        "once",
        "-c",
        str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, (out + err).decode()
    assert out.decode().count(": ok: ") == 10

    got: dict[str, list[bytes]] = {}
    for accepted in sink.accepted:
        (rcpt,) = accepted.rcpt_tos
        got.setdefault(rcpt, []).append(strip_received(accepted.data)[1])
    assert sorted(got) == sorted(expected)
    for rcpt, bodies in expected.items():
        assert sorted(got[rcpt]) == sorted(bodies), f"{rcpt}: not exactly once, byte for byte"
    for i in range(10):
        assert dovecot.count(f"ten{i}") == 0


async def test_cli_once_reports_a_failed_account_and_exits_non_zero(
    dovecot: Dovecot, mailbox_user: str, sink: Sink, configs: ConfigWriter
) -> None:
    good = configs.account(
        dovecot, mailbox_user, protocol="imap", mode="implicit", sink_port=sink.port
    )
    bad = configs.account(
        dovecot, mailbox_user, protocol="pop3", mode="implicit", sink_port=sink.port
    )
    bad["password"] = "wrong"
    config = configs.write([good, bad])
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fetchd",
        "once",
        "-c",
        str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    lines = out.decode().splitlines()
    assert proc.returncode == 1
    assert any(line.startswith(f"{good['name']}: ok") for line in lines)
    failed = [line for line in lines if line.startswith(f"{bad['name']}: FAILED")]
    assert len(failed) == 1 and "login failed" in failed[0] and "localhost" in failed[0]
    assert "wrong" not in out.decode()


async def test_dovecot_with_an_expired_certificate_is_refused(
    ca: trustme.CA, ca_file: Path, tmp_path: Path
) -> None:
    import datetime

    now = datetime.datetime.now(datetime.UTC)
    leaf = ca.issue_cert(
        "localhost",
        "127.0.0.1",
        not_before=now - datetime.timedelta(days=30),
        not_after=now - datetime.timedelta(days=1),
    )
    chain = b"".join(p.bytes() for p in leaf.cert_chain_pems)
    with running_dovecot(chain, leaf.private_key_pem.bytes()) as server:
        server.add_user("old", "pw-old")
        server.deliver("old", [b"Subject: x\n\ny\n"])
        async with smtp_sink() as sink:
            writer = ConfigWriter(tmp_path, ca_file)
            config = writer.write(
                [
                    writer.account(
                        server, "old", protocol="imap", mode="implicit", sink_port=sink.port
                    )
                ]
            )
            (outcome,) = await poll_once(config)
        assert isinstance(outcome.error, PermanentError)
        assert "expired" in str(outcome.error)
        assert logins(server, "old") == 0


async def test_delivery_over_verified_starttls_when_configured(
    dovecot: Dovecot, mailbox_user: str, configs: ConfigWriter, ca: trustme.CA, tmp_path: Path
) -> None:
    import ssl

    dovecot.deliver(mailbox_user, [b"Subject: over TLS\n\nbody\n"])
    mta = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(mta)
    account = configs.account(dovecot, mailbox_user, protocol="imap", mode="implicit", sink_port=0)
    stranger = tmp_path / "stranger.pem"
    trustme.CA().cert_pem.write_to_path(str(stranger))
    async with smtp_sink(tls_context=mta, require_starttls=True) as sink:
        account["deliver"]["smtp"] = f"localhost:{sink.port}"
        account["deliver"]["tls"] = {"mode": "starttls", "ca_file": str(stranger)}
        (outcome,) = await poll_once(configs.write([account]))
        assert isinstance(outcome.error, DeliveryDeferred), outcome.line()
        assert "not trusted" in str(outcome.error) or "unknown CA" in str(outcome.error)
        assert sink.accepted == [] and dovecot.count(mailbox_user) == 1

        account["deliver"]["tls"] = {"mode": "starttls", "ca_file": str(configs.ca_file)}
        (outcome,) = await poll_once(configs.write([account]))
        assert outcome.ok, outcome.line()
        assert [a.tls for a in sink.accepted] == [True]
    assert dovecot.count(mailbox_user) == 0


async def test_no_opportunistic_starttls_to_the_local_mta(
    dovecot: Dovecot, mailbox_user: str, configs: ConfigWriter, ca: trustme.CA
) -> None:
    import ssl

    dovecot.deliver(mailbox_user, [b"Subject: plain\n\nbody\n"])
    mta = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert("somewhere.else").configure_cert(mta)  # would fail verification
    async with smtp_sink(tls_context=mta) as sink:
        account = configs.account(
            dovecot, mailbox_user, protocol="pop3", mode="implicit", sink_port=sink.port
        )
        (outcome,) = await poll_once(configs.write([account]))
    assert outcome.ok, outcome.line()
    assert [a.tls for a in sink.accepted] == [False]


@pytest.mark.parametrize(
    ("protocol", "auth", "method"),
    [
        ("imap", "login", "PLAIN"),  # Dovecot logs the LOGIN command as PLAIN
        ("imap", "plain", "PLAIN"),
        ("imap", "cram-md5", "CRAM-MD5"),
        ("pop3", "any", "CRAM-MD5"),
        ("pop3", "user", "PLAIN"),
        ("pop3", "login", "LOGIN"),
    ],
)
async def test_authentication_methods_with_dovecot(
    dovecot: Dovecot,
    mailbox_user: str,
    sink: Sink,
    configs: ConfigWriter,
    protocol: str,
    auth: str,
    method: str,
) -> None:
    dovecot.deliver(mailbox_user, [b"Subject: auth\n\nbody\n"])
    account = configs.account(
        dovecot, mailbox_user, protocol=protocol, mode="starttls", sink_port=sink.port, auth=auth
    )
    (outcome,) = await poll_once(configs.write([account]))
    assert outcome.ok, outcome.line()
    assert len(sink.accepted) == 1
    # Dovecot logs USER/PASS and IMAP LOGIN as PLAIN.
    assert f"Login: user=<{mailbox_user}>, method={method}" in dovecot.log()
