"""Handing messages to the local mail system: SMTP, LMTP (aiosmtplib) or an MDA command.

The contract with the poller: :meth:`Deliverer.deliver` returns one reply per recipient,
``(code, text)``: 2xx accepted, 4xx not now, 5xx refused for good. A failure that concerns the
whole connection (cannot connect, disconnect, timeout) raises DeliveryDeferred instead. The
poller decides what the replies mean for the message.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
import signal
import socket
import ssl
from collections.abc import Sequence

import aiosmtplib
import aiosmtplib.email
import aiosmtplib.protocol
import aiosmtplib.smtp

from fetchd.config import Delivery
from fetchd.errors import DeliveryDeferred, DeliveryUncertain
from fetchd.message import DotFree, has_8bit
from fetchd.tls import CertificateError, Security, context_for, describe_tls_error

Replies = dict[str, tuple[int, str]]
EX_TEMPFAIL = 75  # sysexits.h: "try again later", as MDAs use it


def make_deliverer(settings: Delivery, *, connect_timeout: float, where: str) -> Deliverer:
    if settings.kind == "mda":
        return MDADeliverer(settings, where=where)
    return SMTPDeliverer(settings, connect_timeout=connect_timeout, where=where)


class Deliverer:
    """One delivery channel for the messages of one poll."""

    def __init__(self, settings: Delivery, where: str) -> None:
        self.settings = settings
        self.where = where
        self.local_hostname = socket.gethostname() or "localhost"

    @property
    def target(self) -> str:
        return self.settings.target()

    async def deliver(
        self, message: bytes, sender: str, recipients: Sequence[str], *, prefix: bytes = b""
    ) -> Replies:
        """``prefix`` (header lines ending with CRLF) goes before ``message``, without making
        a copy of it."""
        raise NotImplementedError

    async def close(self) -> None:
        return None

    def _deferred(self, reason: str) -> DeliveryDeferred:
        return DeliveryDeferred(f"{self.where}: delivery to {self.target} failed: {reason}")


_slow_normalize = aiosmtplib.protocol.normalize_message_line_endings
_slow_period = aiosmtplib.protocol.PERIOD_REGEX


_NOT_LINE_ENDS = bytes(sorted(set(range(256)) - {0x0D, 0x0A}))
_LONE_CR = re.compile(rb"\r(?!\n)")


def normalize_line_endings(message: bytes) -> bytes:
    """aiosmtplib's line-end normalisation, minus the regex pass when the message is already
    CRLF throughout, as mail from IMAP and POP3 servers is: the regex was a quarter of the
    delivery CPU. The result is the same bytes either way (tested).

    CRLF throughout: its CRs and LFs alternate, CR first, and every CR is followed by an LF
    (then every LF follows a CR). Two passes at C speed, twice as fast as counting each kind.
    """
    if message.endswith(b"\r\n"):
        ends = message.translate(None, _NOT_LINE_ENDS)
        if ends == b"\r\n" * (len(ends) // 2) and not _LONE_CR.search(message):
            return message
    return _slow_normalize(message)


_LINE_DOT = re.compile(rb"\n\.")  # a regex finds this two-byte needle faster than ``in``


class _PeriodStuffing:
    """aiosmtplib's dot-stuffing (``PERIOD_REGEX.sub``), skipped when no line starts with a dot."""

    def sub(self, replacement: bytes, message: bytes) -> bytes:
        if type(message) is DotFree:  # the POP3 reader looked at every line start
            return message
        if not message.startswith(b".") and not _LINE_DOT.search(message):
            return message
        return _slow_period.sub(replacement, message)


# Installed once, for every connection: same bytes on the wire, a fraction of the CPU.
aiosmtplib.protocol.normalize_message_line_endings = normalize_line_endings
aiosmtplib.smtp.normalize_message_line_endings = normalize_line_endings  # type: ignore[attr-defined]
_STUFFING = _PeriodStuffing()
aiosmtplib.protocol.PERIOD_REGEX = _STUFFING  # type: ignore[assignment]


class _Protocol(aiosmtplib.protocol.SMTPProtocol):
    """aiosmtplib's protocol, able to read the replies to commands written at once (RFC 2920
    PIPELINING): aiosmtplib parses one reply per read and drops what comes while a parsed
    reply waits, which is right for one command at a time and loses replies otherwise."""

    _expected = 0  # replies still to come to pipelined commands

    def data_received(self, data: bytes) -> None:
        if not self._expected:
            super().data_received(data)
            return
        self._buffer.extend(data)
        waiter = self._response_waiter
        if len(self._buffer) > aiosmtplib.protocol.MAX_RESPONSE_LENGTH * self._expected:
            del self._buffer[:]
            if waiter is not None and not waiter.done():
                self._set_response_exception(
                    waiter, aiosmtplib.SMTPResponseException(-1, "Response too long")
                )
            elif self.transport is not None:
                self.transport.close()  # the reply read next finds the line gone
            return
        if waiter is None or waiter.done():
            return  # pipeline() takes it from the buffer
        try:
            reply = self._read_response_from_buffer()
        except Exception as e:
            self._set_response_exception(waiter, e)
        else:
            if reply is not None:
                waiter.set_result(reply)

    async def pipeline(
        self, commands: Sequence[bytes], reply_timeout: float
    ) -> list[aiosmtplib.SMTPResponse]:
        """Write the commands in one go and return their replies, in order."""
        for command in commands:
            if _CONTROL.search(command.removesuffix(b"\r\n")):
                raise ValueError("Command arg contains a prohibited control character")
        if self._command_lock is None:
            raise aiosmtplib.SMTPServerDisconnected("Server not connected")
        replies: list[aiosmtplib.SMTPResponse] = []
        async with self._command_lock:
            if self._buffer:  # a reply nobody asked for would be taken for the first one
                raise aiosmtplib.SMTPResponseException(-1, "unexpected data from the MTA")
            self._expected = len(commands)
            try:
                self._response_pending = True
                self.write(b"".join(commands))
                while self._expected:
                    reply = self._read_response_from_buffer()
                    if reply is None:  # not all here yet: wait for more
                        reply = await self.read_response(timeout=reply_timeout)
                    replies.append(reply)
                    self._expected -= 1
            finally:
                self._expected = 0
            if self._buffer:
                raise aiosmtplib.SMTPResponseException(-1, "more replies than commands")
        return replies


_CONTROL = aiosmtplib.protocol.COMMAND_INJECTION_REGEX
aiosmtplib.smtp.SMTPProtocol = _Protocol  # type: ignore[attr-defined]

_CHUNK = 256 * 1024  # written at a time: the socket's send buffer, not a copy, holds the rest


def _wire(parts: Sequence[bytes]) -> list[bytes]:
    """The parts as they go after DATA: CRLF line ends, dot-stuffed, ending with CRLF.

    Every part but the last must end with CRLF, so no line end and no line start spans two
    parts and each can be prepared alone. Clean mail, as servers send it, is not copied.
    """
    for part in parts[:-1]:
        if not part.endswith(b"\r\n"):
            raise ValueError("a message part that is not the last must end with CRLF")
    return [_STUFFING.sub(b"..", normalize_line_endings(p)) for p in parts if p] or [b"\r\n"]


def _quoted(address: str) -> str:
    """aiosmtplib's checked and quoted address, remembered: an account sends to the same
    recipients, and often from the same senders, message after message. Only addresses of
    a sane length are remembered: a sender comes from the message's Return-Path."""
    if len(address) > 320:
        return aiosmtplib.email.quote_address(address)
    return _quoted_cached(address)


_quoted_cached = functools.lru_cache(maxsize=1024)(aiosmtplib.email.quote_address)


class _SMTP(aiosmtplib.SMTP):
    """aiosmtplib with a DATA phase that sends the message in parts and slices, under flow
    control, so a 25 MiB message is never copied whole (aiosmtplib appends the final dot to a
    copy and hands the socket everything at once, whose buffer then copies the rest), and that
    remembers whether DATA was started, to tell "not sent" from "sent, reply lost"."""

    data_started = False

    async def transact(
        self,
        sender: str,
        recipients: Sequence[str],
        parts: Sequence[bytes],
        options: Sequence[str],
        reply_timeout: float,
    ) -> dict[str, aiosmtplib.SMTPResponse]:
        """MAIL, RCPT for each recipient, DATA: the recipients refused, as sendmail(). Each
        reply, and the sending of the message, may take ``reply_timeout`` seconds."""
        encoding = "utf-8" if "SMTPUTF8" in options else "ascii"
        for address in (sender, *recipients):  # all checked before any is sent
            _quoted(address)
        await self._ehlo_or_helo_if_needed()
        if self.protocol is not None and self.protocol._buffer:
            # Left over from the last reply: it would be read as the answer to the next command.
            raise aiosmtplib.SMTPResponseException(-1, "unexpected data from the MTA")
        wire = _wire(parts)
        mail_options = list(options)
        if self.supports_extension("size"):
            mail_options.insert(0, f"SIZE={sum(map(len, wire))}")
        if self.supports_extension("pipelining"):
            return await self._pipelined(
                sender, recipients, wire, mail_options, encoding, reply_timeout
            )
        refused: dict[str, aiosmtplib.SMTPResponse] = {}
        try:
            await self.mail(sender, options=mail_options, encoding=encoding, timeout=reply_timeout)
            for rcpt in recipients:
                try:
                    await self.rcpt(rcpt, encoding=encoding, timeout=reply_timeout)
                except aiosmtplib.SMTPRecipientRefused as e:
                    refused[rcpt] = aiosmtplib.SMTPResponse(e.code, e.message)
            if len(refused) == len(recipients):
                raise aiosmtplib.SMTPRecipientsRefused(
                    [
                        aiosmtplib.SMTPRecipientRefused(r.code, r.message, a)
                        for a, r in refused.items()
                    ]
                )
            await self._data(wire, reply_timeout)
        except (aiosmtplib.SMTPResponseException, aiosmtplib.SMTPRecipientsRefused) as e:
            await self._reset(e, reply_timeout)
            raise
        return refused

    async def _reset(self, e: Exception, reply_timeout: float) -> None:
        """RSET after a refusal, for a clean envelope; not when the reply made no sense."""
        if isinstance(e, aiosmtplib.SMTPResponseException) and not 400 <= e.code < 600:
            return
        with contextlib.suppress(ConnectionError, aiosmtplib.SMTPResponseException):
            await self.rset(timeout=reply_timeout)

    async def _pipelined(
        self,
        sender: str,
        recipients: Sequence[str],
        wire: list[bytes],
        options: list[str],
        encoding: str,
        reply_timeout: float,
    ) -> dict[str, aiosmtplib.SMTPResponse]:
        """MAIL, every RCPT and DATA in one write, one round trip (RFC 2920)."""
        protocol = self.protocol
        if protocol is None:
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        assert isinstance(protocol, _Protocol)

        def command(verb: bytes, address: str, opts: Sequence[str] = ()) -> bytes:
            quoted = _quoted(address).encode(encoding)
            return b" ".join([verb + quoted, *(o.encode("ascii") for o in opts)]) + b"\r\n"

        commands = [command(b"MAIL FROM:", sender, options)]
        commands += [command(b"RCPT TO:", rcpt) for rcpt in recipients]
        mail, *rcpts, data = await protocol.pipeline([*commands, b"DATA\r\n"], reply_timeout)
        refused = {
            rcpt: reply
            for rcpt, reply in zip(recipients, rcpts, strict=True)
            if reply.code not in (250, 251)
        }
        try:
            if data.code == 354 and (mail.code != 250 or len(refused) == len(recipients)):
                # DATA was taken although nobody will get the message: end it empty (RFC 2920).
                protocol.write(b".\r\n")
                await protocol.read_response(timeout=reply_timeout)
            if mail.code != 250:
                raise aiosmtplib.SMTPSenderRefused(mail.code, mail.message, sender)
            if len(refused) == len(recipients):
                raise aiosmtplib.SMTPRecipientsRefused(
                    [
                        aiosmtplib.SMTPRecipientRefused(r.code, r.message, a)
                        for a, r in refused.items()
                    ]
                )
            if data.code != 354:
                raise aiosmtplib.SMTPDataError(data.code, data.message)
            await self._send_message(protocol, wire, reply_timeout)
        except (aiosmtplib.SMTPResponseException, aiosmtplib.SMTPRecipientsRefused) as e:
            await self._reset(e, reply_timeout)
            raise
        return refused

    async def _data(self, wire: list[bytes], reply_timeout: float) -> None:
        reply = await self.execute_command(b"DATA", timeout=reply_timeout)
        if reply.code != 354:
            raise aiosmtplib.SMTPDataError(reply.code, reply.message)
        protocol = self.protocol
        if protocol is None:
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        await self._send_message(protocol, wire, reply_timeout)

    async def _send_message(
        self, protocol: aiosmtplib.protocol.SMTPProtocol, wire: list[bytes], reply_timeout: float
    ) -> None:
        """The message after DATA's 354, in slices under flow control, then its final dot."""
        if protocol is None:
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        slices = [
            memoryview(part)[start : start + _CHUNK]
            for part in wire
            for start in range(0, len(part), _CHUNK)
        ]
        last = bytes(slices.pop()) + b".\r\n"  # the dot in the same write: one syscall less
        try:
            async with asyncio.timeout(reply_timeout):
                for piece in slices:
                    protocol.write(piece)  # type: ignore[arg-type]
                    await protocol._drain_helper()  # waits while the socket is full
        except TimeoutError:
            raise aiosmtplib.SMTPTimeoutError("timed out sending the message") from None
        except ConnectionError as e:
            raise aiosmtplib.SMTPServerDisconnected(f"connection lost: {e}") from None
        self.data_started = True  # with the final dot the MTA may queue it: outcome unsure
        protocol.write(last)
        reply = await protocol.read_response(timeout=reply_timeout)
        if reply.code != 250:
            raise aiosmtplib.SMTPDataError(reply.code, reply.message)


class SMTPDeliverer(Deliverer):
    """SMTP or LMTP over TCP or a Unix socket; one connection reused for the poll.

    LMTP answers DATA once per recipient, which aiosmtplib cannot read: each LMTP transaction
    therefore carries one recipient, so its single reply is that recipient's.
    """

    def __init__(self, settings: Delivery, *, connect_timeout: float, where: str) -> None:
        super().__init__(settings, where)
        self.lmtp = settings.kind == "lmtp"
        self._connect_timeout = connect_timeout
        self._sent_on_connection = 0
        self._smtp = self._client()

    def _client(self) -> _SMTP:
        s = self.settings
        context = context_for(s.tls)
        return _SMTP(
            hostname=None if s.socket else s.host,
            port=None if s.socket else s.port,
            socket_path=s.socket,
            local_hostname=self.local_hostname,
            # Never opportunistic: TLS exactly when configured, then verified and mandatory.
            use_tls=s.tls.mode == "implicit",
            start_tls=s.tls.mode == "starttls",
            tls_context=context,
            validate_certs=context is not None and s.tls.verify,
            timeout=self._connect_timeout,
        )

    async def _ensure_connected(self) -> None:
        limit = self.settings.batch_limit
        if self._smtp.is_connected and limit and self._sent_on_connection >= limit:
            await self.close()  # batch_limit: a fresh connection every N messages
        if self._smtp.is_connected:
            return
        self._smtp = self._client()
        self._sent_on_connection = 0
        try:
            if self.lmtp:
                await self._smtp.connect()
                reply = await self._smtp.execute_command(b"LHLO", self.local_hostname.encode())
                if reply.code != 250:
                    raise aiosmtplib.SMTPHeloError(reply.code, reply.message)
                self._smtp.last_ehlo_response = reply  # parses the extensions it lists
            else:
                await self._smtp.connect()
            if self.settings.tls.mode != "none":
                self._security().check_peer(self._smtp.get_transport_info("ssl_object"), self.where)
        except CertificateError as e:
            self._smtp.close()
            raise DeliveryDeferred(f"{e} (the MTA at {self.target})") from None
        except ssl.SSLError as e:
            raise self._deferred(describe_tls_error(e, self.settings.host)) from None
        except (aiosmtplib.SMTPException, OSError) as e:
            self._smtp.close()
            raise DeliveryDeferred(
                f"{self.where}: cannot reach the MTA at {self.target}: {_reason(e)}"
            ) from None

    def _security(self) -> Security:
        tls = self.settings.tls
        return Security(
            context=context_for(tls),
            starttls=tls.mode == "starttls",
            server_name=self.settings.host,
            fingerprints=tls.fingerprints,
            verify=tls.verify,
        )

    async def deliver(
        self, message: bytes, sender: str, recipients: Sequence[str], *, prefix: bytes = b""
    ) -> Replies:
        await self._ensure_connected()
        smtp = self._smtp
        options: list[str] = []
        parts = (prefix, message) if prefix else (message,)
        if any(has_8bit(p) for p in parts) and smtp.supports_extension("8bitmime"):
            options.append("BODY=8BITMIME")
        if not (sender.isascii() and all(r.isascii() for r in recipients)):
            if not smtp.supports_extension("smtputf8"):
                text = f"the MTA does not offer SMTPUTF8, needed for {sender!r}"
                return dict.fromkeys(recipients, (553, text))
            options.append("SMTPUTF8")
        self._sent_on_connection += 1
        if not self.lmtp:
            return await self._transaction(sender, list(recipients), parts, options)
        replies: Replies = {}
        for rcpt in recipients:
            try:
                replies.update(await self._transaction(sender, [rcpt], parts, options))
            except DeliveryDeferred as e:  # those that did accept are not sent it again
                e.accepted = tuple(r for r, (code, _) in replies.items() if 200 <= code < 300)
                raise
            if not self._smtp.is_connected:
                break  # 421: the others wait for the next poll
        for rcpt in recipients:
            replies.setdefault(rcpt, (421, "not tried: the MTA closed the connection"))
        return replies

    async def _transaction(
        self, sender: str, recipients: list[str], parts: Sequence[bytes], options: list[str]
    ) -> Replies:
        self._smtp.data_started = False
        try:
            refused = await self._smtp.transact(
                sender, recipients, parts, options, reply_timeout=self.settings.timeout
            )
        except aiosmtplib.SMTPRecipientsRefused as e:
            refusals = {r.recipient: (r.code, r.message) for r in e.recipients}
            return self._refusals(refusals)
        except aiosmtplib.SMTPResponseException as e:
            return self._refusals(dict.fromkeys(recipients, (e.code, e.message)))
        except (aiosmtplib.SMTPException, OSError, ValueError, UnicodeError) as e:
            self._smtp.close()  # unknown state: never reuse the connection
            if self._smtp.data_started and isinstance(
                e, aiosmtplib.SMTPTimeoutError | aiosmtplib.SMTPServerDisconnected | OSError
            ):
                raise DeliveryUncertain(
                    f"{self.where}: the MTA at {self.target} gave no final reply after the "
                    f"message was sent ({_reason(e)}): it may have queued it"
                ) from None
            raise self._deferred(_reason(e)) from None
        replies: Replies = dict.fromkeys(recipients, (250, "accepted"))
        replies.update(self._refusals({r: (x.code, x.message) for r, x in refused.items()}))
        return replies

    def _refusals(self, refusals: Replies) -> Replies:
        """Refusals are 4xx or 5xx. Any other code here (a malformed reply, a success where
        a refusal was due, a reply to another command) means fetchd and the MTA no longer
        agree on where they are: the connection is dropped and the message is not counted
        as delivered."""
        for code, text in refusals.values():
            if not 400 <= code < 600:
                self._smtp.close()
                said = " ".join(str(text).split())[:200]  # one line in the log, whatever came
                raise self._deferred(f"out of step with the MTA (it answered {code} {said})")
        return refusals

    async def close(self) -> None:
        if not self._smtp.is_connected:
            return
        try:
            await self._smtp.quit(timeout=10)
        except (aiosmtplib.SMTPException, OSError):
            self._smtp.close()


class MDADeliverer(Deliverer):
    """Pipes each message into a command (no shell), with LF line ends as MDAs expect.

    ``%T`` becomes the recipient (one run per recipient), ``%F`` the envelope sender, ``%%`` a
    percent sign. Exit 0 means delivered, 75 (EX_TEMPFAIL) try later, anything else refused.
    """

    async def deliver(
        self, message: bytes, sender: str, recipients: Sequence[str], *, prefix: bytes = b""
    ) -> Replies:
        per_recipient = any("%T" in arg for arg in self.settings.mda)
        groups = [[r] for r in recipients] if per_recipient else [list(recipients)]
        data = (prefix + message).replace(b"\r\n", b"\n")
        replies: Replies = {}
        for group in groups:
            argv = [
                _substitute(arg, sender, group[0] if group else "") for arg in self.settings.mda
            ]
            reply = await self._run(argv, data)
            replies.update(dict.fromkeys(group, reply))
        return replies

    async def _run(self, argv: list[str], data: bytes) -> tuple[int, str]:
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as e:
            raise self._deferred(f"cannot run {argv[0]}: {e.strerror or e}") from None
        try:
            async with asyncio.timeout(self.settings.timeout):
                _, err = await proc.communicate(data)
        except TimeoutError:
            _kill(proc)
            await proc.wait()
            return 451, f"{argv[0]} did not finish within {self.settings.timeout:g} s"
        text = err.decode("utf-8", "replace").strip().splitlines()
        detail = (text[-1] if text else "")[:200]
        if proc.returncode == 0:
            return 250, "delivered"
        if proc.returncode == EX_TEMPFAIL:
            return 451, f"{argv[0]} asked to try later: {detail}"
        return 554, f"{argv[0]} exited with status {proc.returncode}: {detail}"


def _substitute(arg: str, sender: str, recipient: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(arg):
        if arg[i] == "%" and i + 1 < len(arg) and arg[i + 1] in "TF%":
            out.append({"T": recipient, "F": sender, "%": "%"}[arg[i + 1]])
            i += 2
        else:
            out.append(arg[i])
            i += 1
    return "".join(out)


def _kill(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _reason(e: BaseException) -> str:
    return str(e) or type(e).__name__
