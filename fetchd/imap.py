"""IMAP through aioimaplib, with the library's sharp edges wrapped.

aioimaplib lacks STARTTLS, AUTHENTICATE PLAIN, an SNI name other than the host, and it never
fails pending commands when the connection drops; it also formats every received chunk for a
debug log nobody reads. The subclasses below add what is missing. Every call is bounded by a
deadline, and after any error the connection is closed and thrown away, never reused.

Library exceptions stop here: callers see only fetchd's errors.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import ssl
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import aioimaplib

from fetchd.deadline import Progress
from fetchd.errors import (
    MessageUnavailable,
    NoIdle,
    PermanentError,
    ProtocolError,
    TemporaryError,
)
from fetchd.sasl import Mechanism, decode_challenge, token_mechanism
from fetchd.sasl import make as sasl_make
from fetchd.sasl import refused as sasl_refused
from fetchd.tls import Security, describe_connect_error, tls_description, translate_tls_error

# The library logs whole message bodies at DEBUG; never let them reach a log file.
logging.getLogger("aioimaplib").setLevel(logging.WARNING)
logging.getLogger("aioimaplib.aioimaplib").setLevel(logging.WARNING)

T = TypeVar("T")
_UIDVALIDITY = re.compile(rb"\[UIDVALIDITY (\d{1,20})\]")
_UIDNEXT = re.compile(rb"\[UIDNEXT (\d+)\]")
_EXISTS = re.compile(rb"^(\d+) EXISTS$")
_FETCH_UID = re.compile(rb"\bUID (\d+)\b")
_LITERAL = re.compile(rb"BODY\[\] \{(\d+)\}$")
_RFC822_SIZE = re.compile(rb"\bRFC822\.SIZE (\d{1,15})\b")
# What may follow the message literal up to the closing parenthesis: more FETCH items.
_FETCH_TAIL = re.compile(
    rb"^(?: [A-Za-z0-9.\-]+(?:\[[^\]\r\n]*\])?(?:<\d+>)?"  # item name, e.g. FLAGS
    rb' (?:\([^()\r\n]*\)|"[^"\r\n]*"|[^ ()"\r\n]+))*'  # its value
    rb"\)$"
)
MAX_UID = 2**32 - 1  # UIDs and UIDVALIDITY are 32-bit (RFC 3501 nz-number)
EXPUNGE_BATCH = 200
MAX_LINE = 16 << 20  # a UID SEARCH of a million messages is about 8 MB on one line


CONNECTION_LOST = [b"* connection lost"]
_CHANGE = re.compile(rb"^\d+ (EXISTS|RECENT)\b|^BYE\b", re.IGNORECASE)


class FolderUnavailable(TemporaryError):
    """A folder cannot be selected: reported, and the other folders go on."""


class _Protocol(aioimaplib.IMAP4ClientProtocol):  # type: ignore[misc]
    """aioimaplib's protocol plus a STARTTLS guard, SASL continuations and fail-fast."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.starttls_tag: str | None = None
        self.starttls_answered = False
        self.injected = False
        self.sasl: Mechanism | None = None
        self.sasl_initial_pending = False
        self.lost: BaseException | None = None
        self.incomplete_line: bytes = b""
        self.current_command: Any = None
        self.received_bytes = 0
        self.news = False  # an EXISTS/RECENT arrived since the last UID SEARCH
        self.secrets: list[str] = []  # kept out of every error text

    def data_received(self, d: bytes) -> None:
        # Same as the library's, without formatting every chunk for a disabled debug log.
        self.received_bytes += len(d)
        if self.starttls_answered:
            self.injected = True  # bytes after the STARTTLS reply, before the handshake
            return
        try:
            self._handle_responses(
                self.incomplete_line + d, self._handle_line, self.current_command
            )
            self.incomplete_line = b""
            self.current_command = None
        except aioimaplib.IncompleteRead as incomplete:
            self.current_command = incomplete.cmd
            self.incomplete_line = incomplete.data
            if len(self.incomplete_line) > MAX_LINE:  # literals do not count: they are apart
                self._fail_all(ProtocolError(f"server sent a line longer than {MAX_LINE} bytes"))
                if self.transport is not None:
                    self.transport.close()
        except Exception as e:  # a parse failure: fail every waiter instead of hanging them
            # The library's message may quote our pending command, password included.
            reason = _scrub(str(e), self.secrets)[:300]
            self._fail_all(ProtocolError(f"unparsable server response: {reason}"))
            if self.transport is not None:
                self.transport.close()

    def _handle_line(self, line: bytes, current_cmd: Any) -> Any:
        if self.starttls_answered:
            self.injected = True
            return None
        result = super()._handle_line(line, current_cmd)
        if self.starttls_tag and line.startswith(self.starttls_tag.encode() + b" "):
            self.starttls_answered = True
            if line.rstrip().endswith(b"}"):  # a literal would swallow plaintext bytes unseen
                self.injected = True
        return result

    @aioimaplib.change_state  # type: ignore[untyped-decorator]
    async def welcome(self, command: bytes) -> None:
        # The library looks for "PREAUTH" anywhere in the greeting; only the status counts.
        if re.match(rb"\* PREAUTH\b", command, re.IGNORECASE):
            self.state = aioimaplib.AUTH
        elif re.match(rb"\* OK\b", command, re.IGNORECASE):
            self.state = aioimaplib.NONAUTH
        else:
            raise aioimaplib.Error(command.decode("ascii", "replace")[:200])
        await self.capability()

    def _untagged_response(self, line: bytes) -> Any:
        # New mail announced in the answer to some other command (the library would drop it
        # or file it away): remembered, so IDLE does not start blind to it.
        if _CHANGE.match(line.removeprefix(b"* ")):
            self.news = True
        return super()._untagged_response(line)

    def _continuation(self, line: bytes) -> None:
        pending = self.pending_sync_command
        if pending is not None and pending.name == "AUTHENTICATE":
            self.transport.write(self._sasl_answer(line[1:].strip()) + b"\r\n")
            return
        super()._continuation(line)

    def _sasl_answer(self, text: bytes) -> bytes:
        """The reply to one "+ challenge": the initial response first if it was not sent with
        the command, then the mechanism's answers; "*" cancels anything unexpected."""
        mechanism = self.sasl
        if mechanism is None:
            return b"*"
        if self.sasl_initial_pending:
            self.sasl_initial_pending = False
            return base64.b64encode(mechanism.initial or b"")
        challenge = decode_challenge(text)
        answer = mechanism.respond(challenge) if challenge is not None else None
        return b"*" if answer is None else base64.b64encode(answer)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc or ConnectionResetError("connection closed by the server")
        self.idle_queue.put_nowait(CONNECTION_LOST)  # wakes an IDLE wait at once
        self._fail_all(TemporaryError("connection closed by the server"))
        super().connection_lost(exc)

    def _fail_all(self, error: Exception) -> None:
        commands = list(self.pending_async_commands.values())
        if self.pending_sync_command is not None:
            commands.append(self.pending_sync_command)
        for command in commands:
            if command is not None and not command._event.is_set():
                command._exception = error
                command.close(b"", "KO")


class _Client(aioimaplib.IMAP4):  # type: ignore[misc]
    """aioimaplib's client with our protocol and a configurable SNI/verification name."""

    def __init__(self, *args: Any, server_hostname: str, **kwargs: Any) -> None:
        self._server_hostname = server_hostname
        super().__init__(*args, **kwargs)

    def create_client(
        self,
        host: str,
        port: int,
        loop: asyncio.AbstractEventLoop | None,
        conn_lost_cb: Any = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        loop = loop or asyncio.get_running_loop()
        protocol = self.protocol = _Protocol(loop, conn_lost_cb)
        self._client_task = loop.create_task(
            loop.create_connection(
                lambda: protocol,
                host,
                port,
                ssl=ssl_context,
                server_hostname=self._server_hostname if ssl_context else None,
            )
        )


@dataclass(frozen=True, slots=True)
class FolderStatus:
    uidvalidity: int
    uidnext: int | None
    exists: int


class IMAPClient:
    """One IMAP session. Create it with :meth:`connect`; close it after any error."""

    def __init__(self, client: _Client, *, where: str, timeout: float) -> None:
        self._client = client
        self._proto: _Protocol = client.protocol
        self.where = where
        self.timeout = timeout
        self.tls = self._tls_info()

    @property
    def capabilities(self) -> set[str]:
        return {c.upper() for c in self._proto.capabilities}

    @property
    def peer(self) -> str | None:
        """The server's IP address, for the Received header."""
        transport = self._proto.transport
        peername = transport.get_extra_info("peername") if transport else None
        return str(peername[0]) if isinstance(peername, tuple) and peername else None

    def _ssl_object(self) -> ssl.SSLObject | None:
        transport = self._proto.transport
        return transport.get_extra_info("ssl_object") if transport else None

    def peer_certificate(self) -> bytes | None:
        """The server's certificate (DER), once TLS is up."""
        ssl_object = self._ssl_object()
        return ssl_object.getpeercert(binary_form=True) if ssl_object else None

    def _tls_info(self) -> str:
        return tls_description(self._ssl_object())

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        security: Security,
        io_timeout: float,
        where: str,
    ) -> IMAPClient:
        """Connect, read the greeting and capabilities, and secure the session.

        With ``starttls``: a PREAUTH greeting, a missing STARTTLS capability, a refusal, or any
        byte between the server's OK and the handshake aborts before credentials are sent.
        """
        timeout = io_timeout
        server_hostname = security.server_name
        try:
            raw = _Client(
                host,
                port,
                timeout=timeout,
                ssl_context=security.context if security.implicit else None,
                server_hostname=server_hostname,
            )
        except ValueError as e:
            raise PermanentError(f"{where}: {e}") from None
        self = cls(raw, where=where, timeout=timeout)
        try:
            await self._call(
                "connect", raw._client_task, server_hostname=server_hostname, security=security
            )
            if security.implicit:
                security.check_peer(self._ssl_object(), where)
            await self._call("greeting", self._proto.wait("AUTH|NONAUTH"))
            self.tls = self._tls_info()
            if security.starttls:
                await self._starttls(security)
        except BaseException:
            self.close()
            raise
        return self

    async def _starttls(self, security: Security) -> None:
        p = self._proto
        ctx, server_hostname = security.context, security.server_name
        assert ctx is not None
        if p.state == aioimaplib.AUTH:
            raise PermanentError(
                f"{self.where}: server greeted with PREAUTH, so STARTTLS is impossible and the "
                "session would stay unencrypted; refusing it"
            )
        if "STARTTLS" not in self.capabilities:
            raise PermanentError(
                f"{self.where}: server does not offer STARTTLS, and TLS is required; "
                "no password was sent"
            )
        p.starttls_tag = p.new_tag()
        command = aioimaplib.Command("STARTTLS", p.starttls_tag, loop=p.loop)
        response = await self._call("STARTTLS", p.execute(command))
        if response.result != "OK":
            raise PermanentError(
                f"{self.where}: server refused STARTTLS ({_text(response)}); no password was sent"
            )
        if p.injected or p.incomplete_line or p.current_command is not None:
            raise ProtocolError(
                f"{self.where}: server sent data right after agreeing to STARTTLS; refusing "
                "the connection (possible injection attack)"
            )
        try:
            async with asyncio.timeout(self.timeout):
                p.transport = await p.loop.start_tls(
                    p.transport,
                    p,
                    ctx,
                    server_hostname=server_hostname,
                    ssl_handshake_timeout=self.timeout,
                )
        except ssl.SSLError as e:
            raise translate_tls_error(e, server_hostname, self.where) from None
        except TimeoutError:
            raise TemporaryError(f"{self.where}: TLS handshake timed out") from None
        except OSError as e:
            reason = describe_connect_error(e, security)
            raise TemporaryError(f"{self.where}: TLS handshake failed: {reason}") from None
        security.check_peer(self._ssl_object(), self.where)
        if p.injected:
            raise ProtocolError(f"{self.where}: unencrypted data arrived during the TLS handshake")
        p.starttls_answered = False
        p.starttls_tag = None
        p.capabilities = set()  # what was said in plaintext is forgotten
        self.tls = self._tls_info()
        await self._call("CAPABILITY", p.capability())

    async def _call(
        self,
        what: str,
        awaitable: Awaitable[T],
        server_hostname: str = "",
        security: Security | None = None,
    ) -> T:
        """Await one library call, translating whatever it raises.

        The deadline moves with the data (see fetchd.deadline): a big message arriving slowly
        but steadily is fetched, a server that trickles or goes silent is given up on.
        """
        loop = asyncio.get_running_loop()
        p = self._proto
        if p.lost is not None:  # a command sent now would wait for ever
            if asyncio.iscoroutine(awaitable):
                awaitable.close()
            raise TemporaryError(f"{self.where}: {what}: the connection was closed")
        progress = Progress(self.timeout, loop.time())
        start_bytes = p.received_bytes
        task = asyncio.ensure_future(awaitable)
        try:
            last_bytes, quiet_since = p.received_bytes, loop.time()
            while True:
                progress.received = p.received_bytes - start_bytes
                remaining = progress.remaining(loop.time())
                if remaining <= 0:
                    raise TemporaryError(
                        f"{self.where}: {what}: server sends too slowly ({progress.received} "
                        f"bytes in {loop.time() - progress.start:.0f} s); giving up"
                    )
                # Wake up every second: a connection that died under a command that will never
                # be answered is noticed at once, not after the whole timeout.
                done, _ = await asyncio.wait({task}, timeout=min(remaining, 1.0))
                if task in done:
                    return task.result()
                # No transport yet is a TLS handshake still under way, not a closed line.
                closing = p.transport is not None and p.transport.is_closing()
                if p.lost is not None or closing:
                    raise TemporaryError(f"{self.where}: {what}: the connection was closed")
                if p.received_bytes != last_bytes:
                    last_bytes, quiet_since = p.received_bytes, loop.time()
                elif loop.time() - quiet_since >= self.timeout:
                    raise TemporaryError(
                        f"{self.where}: no answer to {what} within {self.timeout:g} s"
                    )
        except (TemporaryError, PermanentError) as e:
            if str(e).startswith(self.where):
                raise
            raise type(e)(f"{self.where}: {what}: {_scrub(str(e), p.secrets)}") from None
        except TimeoutError:
            raise TemporaryError(
                f"{self.where}: no answer to {what} within {self.timeout:g} s"
            ) from None
        except ssl.SSLError as e:
            raise translate_tls_error(e, server_hostname or self.where, self.where) from None
        except OSError as e:
            reason = describe_connect_error(e, security if security and security.implicit else None)
            if what == "connect":
                raise TemporaryError(
                    f"{self.where}: cannot connect to {self._client.host}:{self._client.port}: "
                    f"{reason}"
                ) from None
            raise TemporaryError(f"{self.where}: {what} failed: {reason}") from None
        except aioimaplib.CommandTimeout:
            raise TemporaryError(f"{self.where}: {what} timed out") from None
        except (aioimaplib.AioImapException, ValueError) as e:
            text = _scrub(str(e), p.secrets)
            raise ProtocolError(f"{self.where}: {what} failed: {text}") from None
        finally:
            if not task.done():
                task.cancel()

    def close(self) -> None:
        transport = self._proto.transport
        if transport is not None:
            transport.close()
        for pending in list(self._proto.tasks):  # e.g. the greeting task, after a pin mismatch
            if pending.done():
                if not pending.cancelled():
                    pending.exception()  # retrieved: no "never retrieved" noise in the log
            else:
                pending.cancel()
        task = getattr(self._client, "_client_task", None)
        if task is not None and not task.done():
            task.cancel()

    # -- commands -----------------------------------------------------------------------------

    async def login(self, user: str, secret: str, *, method: str = "any") -> None:
        """Authenticate with ``method``: ``any`` is AUTHENTICATE PLAIN when offered (UTF-8
        safe), else LOGIN with quoted arguments; ``cram-md5``, ``xoauth2``, ``oauthbearer``
        (``secret`` is then the access token) and ``plain``/``login`` on request.
        LOGINDISABLED is honoured."""
        p = self._proto
        if p.state == aioimaplib.AUTH:
            return  # PREAUTH on a connection the user chose to leave plaintext
        caps = self.capabilities
        if method == "any":
            method = "plain" if "AUTH=PLAIN" in caps else "login"
        elif method == "oauth2":
            mechanisms = {c[5:] for c in caps if c.startswith("AUTH=")}
            method = token_mechanism(mechanisms) or ""
            if not method:
                raise PermanentError(
                    f"{self.where}: server offers neither AUTHENTICATE OAUTHBEARER nor XOAUTH2 "
                    f"(it offers: {', '.join(sorted(mechanisms)) or 'none'})"
                )
        if method == "login":
            if "LOGINDISABLED" in caps:
                raise PermanentError(
                    f"{self.where}: server disables LOGIN here and offers no AUTHENTICATE PLAIN"
                )
            try:
                user.encode("ascii")
                secret.encode("ascii")
            except UnicodeEncodeError:
                raise PermanentError(
                    f"{self.where}: non-ASCII user or password needs AUTHENTICATE PLAIN, "
                    "which this server does not offer"
                ) from None
            p.secrets = [secret, _quote(secret)]
            command = aioimaplib.Command(
                "LOGIN", p.new_tag(), _quote(user), _quote(secret), loop=p.loop
            )
            mechanism = None
        else:
            name = method.upper()
            if f"AUTH={name}" not in caps:
                offered = sorted(c[5:] for c in caps if c.startswith("AUTH="))
                raise PermanentError(
                    f"{self.where}: server does not offer AUTHENTICATE {name} "
                    f"(it offers: {', '.join(offered) or 'none'})"
                )
            mechanism = sasl_make(name, user, secret)
            p.secrets = [secret, _quote(secret), *mechanism.secrets()]
            args = [name]
            if mechanism.initial is not None and "SASL-IR" in caps:
                args.append(base64.b64encode(mechanism.initial).decode("ascii") or "=")
            else:
                p.sasl_initial_pending = mechanism.initial is not None
            p.sasl = mechanism
            command = aioimaplib.Command("AUTHENTICATE", p.new_tag(), *args, loop=p.loop)
        try:
            response = await self._call("login", p.execute(command))
        finally:
            p.sasl = None
            p.sasl_initial_pending = False
        if response.result != "OK":
            text = _scrub(_text(response), p.secrets)
            if "[UNAVAILABLE]" in text or "[INUSE]" in text:
                raise TemporaryError(f"{self.where}: login refused for now: {text}")
            if mechanism is not None and mechanism.error:
                text = f"{mechanism.error}: {text}"
            raise sasl_refused(mechanism, f"{self.where}: login failed ({method}): {text}")
        p.state = aioimaplib.AUTH
        await self._call("CAPABILITY", p.capability())

    async def select(self, folder: str) -> FolderStatus:
        p = self._proto
        response = await self._call(f"SELECT {folder}", p.select(_quote(encode_mailbox(folder))))
        p.news = False  # the EXISTS of the SELECT answer itself is not news
        if response.result != "OK":
            raise FolderUnavailable(
                f"{self.where}: cannot open folder {folder!r} (does it still exist?): "
                f"{_text(response)}"
            )
        uidvalidity = uidnext = exists = None
        for line in response.lines:
            if not isinstance(line, bytes | bytearray):
                continue
            if m := _UIDVALIDITY.search(line):
                uidvalidity = int(m.group(1))
            if m := _UIDNEXT.search(line):
                uidnext = int(m.group(1))
            if m := _EXISTS.match(line):
                exists = int(m.group(1))
        if uidvalidity is None:
            raise ProtocolError(f"{self.where}: server gave no UIDVALIDITY for {folder!r}")
        if not 0 < uidvalidity <= MAX_UID:
            raise ProtocolError(f"{self.where}: UIDVALIDITY {uidvalidity} is out of range")
        return FolderStatus(uidvalidity, uidnext, exists or 0)

    async def uids(self) -> list[int]:
        """Every UID in the selected folder."""
        p = self._proto
        p.news = False
        response = await self._call("UID SEARCH", p.search("ALL", charset=None, by_uid=True))
        if response.result != "OK":
            raise TemporaryError(f"{self.where}: UID SEARCH failed: {_text(response)}")
        try:
            return _search_result(response.lines)
        except ProtocolError as e:
            raise ProtocolError(f"{self.where}: {e}") from None

    async def sizes(self, uids: list[int]) -> dict[int, int]:
        """RFC822.SIZE of each message, asked in batches (one response line per message)."""
        p = self._proto
        found: dict[int, int] = {}
        for start in range(0, len(uids), EXPUNGE_BATCH):
            batch = sorted(uids[start : start + EXPUNGE_BATCH])
            response = await self._call(
                "UID FETCH (RFC822.SIZE)",
                p.fetch(
                    compress_uids(batch), "(UID RFC822.SIZE)", by_uid=True, timeout=self.timeout
                ),
            )
            if response.result != "OK":
                raise TemporaryError(f"{self.where}: cannot get message sizes: {_text(response)}")
            for line in response.lines[:-1]:
                if not isinstance(line, bytes):
                    continue
                m_uid, m_size = _FETCH_UID.search(line), _RFC822_SIZE.search(line)
                if m_uid and m_size:
                    found[int(m_uid.group(1))] = int(m_size.group(1))
        return found

    async def fetch(self, uid: int) -> bytes:
        """The whole message, byte-exact, without setting \\Seen.

        Raises MessageUnavailable when the server refuses this one message or sends fewer
        bytes than its RFC822.SIZE, ProtocolError when the response does not add up.
        """
        got = (await self.fetch_many([uid]))[uid]
        if isinstance(got, Exception):
            raise got
        return got

    async def fetch_many(self, uids: list[int]) -> dict[int, bytes | TemporaryError]:
        """Several whole messages in one command (one round trip), as :meth:`fetch` would
        give each: its bytes, or the MessageUnavailable or ProtocolError it would raise.

        Once one message's response does not add up, what follows it in that response is not
        trusted either: those messages are asked for again, one by one.
        """
        p = self._proto
        wanted = sorted(set(uids))
        what = f"UID FETCH {wanted[0]}" if len(wanted) == 1 else f"UID FETCH ({len(wanted)})"
        response = await self._call(
            what,
            p.fetch(
                compress_uids(wanted),
                "(UID RFC822.SIZE BODY.PEEK[])",
                by_uid=True,
                timeout=self.timeout,
            ),
        )
        if response.result != "OK":
            if len(wanted) > 1:  # one of them may be the reason: ask for each alone
                found: dict[int, bytes | TemporaryError] = {}
                for uid in wanted:
                    found.update(await self.fetch_many([uid]))
                return found
            text = f"{self.where}: server refused UID {wanted[0]}: {_text(response)}"
            return {wanted[0]: MessageUnavailable(text)}
        found = {}
        asked = set(wanted)
        broken: ProtocolError | None = None
        lines, i = response.lines, 0
        while i < len(lines) - 2 and broken is None:
            line = lines[i]
            i += 1
            if not isinstance(line, bytes) or b"FETCH" not in line:
                continue
            m_uid = _FETCH_UID.search(line)
            m_lit = _LITERAL.search(line)
            if not m_lit:
                continue  # a flag update, say
            body, tail = lines[i], lines[i + 1]
            i += 2  # the literal and what follows it are never read as response lines
            if not m_uid and isinstance(tail, bytes):  # UID may also follow the literal
                m_uid = _FETCH_UID.search(tail)
            uid = int(m_uid.group(1)) if m_uid else 0
            if uid not in asked or uid in found:
                continue
            if not isinstance(body, bytes | bytearray) or len(body) != int(m_lit.group(1)):
                broken = ProtocolError(f"{self.where}: UID {uid}: literal length mismatch")
            elif not isinstance(tail, bytes) or not _FETCH_TAIL.match(tail):
                # More data than the literal announced: the message would be cut short.
                broken = ProtocolError(
                    f"{self.where}: UID {uid}: data after the message literal: {bytes(tail)[:60]!r}"
                )
            elif (m_size := _RFC822_SIZE.search(line) or _RFC822_SIZE.search(tail)) and len(
                body
            ) < int(m_size.group(1)):
                found[uid] = MessageUnavailable(
                    f"{self.where}: UID {uid} came with {len(body)} bytes where RFC822.SIZE "
                    f"is {int(m_size.group(1))}: not delivered, it may be cut short"
                )
            else:
                found[uid] = bytes(body)
            if broken is not None:
                found[uid] = broken
        missing = [uid for uid in wanted if uid not in found]
        if broken is not None and len(wanted) > 1:
            for uid in missing:  # not trusted from that response: asked for again, alone
                found.update(await self.fetch_many([uid]))
            return found
        for uid in missing:  # most likely expunged meanwhile by another client
            found[uid] = broken or MessageUnavailable(
                f"{self.where}: server sent no body for UID {uid} (deleted meanwhile?)"
            )
        return found

    async def delete(self, uids: Iterable[int]) -> None:
        """Flag the messages \\Deleted and expunge exactly those (UIDPLUS), never others."""
        wanted = sorted(set(uids))
        # In batches: aioimaplib parses a response recursively, one stack frame per line, and
        # UID EXPUNGE answers with one line per message.
        for start in range(0, len(wanted), EXPUNGE_BATCH):
            await self._delete_batch(wanted[start : start + EXPUNGE_BATCH])

    async def _delete_batch(self, wanted: list[int]) -> None:
        uid_set = compress_uids(wanted)
        p = self._proto
        response = await self._call(
            "UID STORE", p.store(uid_set, "+FLAGS.SILENT", r"(\Deleted)", by_uid=True)
        )
        if response.result != "OK":
            raise TemporaryError(f"{self.where}: cannot flag messages deleted: {_text(response)}")
        if "UIDPLUS" in self.capabilities:
            response = await self._call("UID EXPUNGE", p.expunge(uid_set, by_uid=True))
        else:
            # Plain EXPUNGE removes every \Deleted message: only when all of them are ours.
            found = await self._call(
                "UID SEARCH DELETED", p.search("DELETED", charset=None, by_uid=True)
            )
            if found.result != "OK" or not set(_search_result(found.lines)) <= set(wanted):
                return  # others' deletions pending: leave ours flagged for a later expunge
            response = await self._call("EXPUNGE", p.expunge())
        if response.result != "OK":
            raise TemporaryError(f"{self.where}: EXPUNGE failed: {_text(response)}")

    async def mark_seen(self, uids: Iterable[int]) -> None:
        wanted = sorted(set(uids))
        p = self._proto
        for start in range(0, len(wanted), EXPUNGE_BATCH):
            uid_set = compress_uids(wanted[start : start + EXPUNGE_BATCH])
            response = await self._call(
                "UID STORE \\Seen", p.store(uid_set, "+FLAGS.SILENT", r"(\Seen)", by_uid=True)
            )
            if response.result != "OK":
                raise TemporaryError(f"{self.where}: cannot flag messages seen: {_text(response)}")

    async def move(self, uids: Iterable[int], folder: str) -> None:
        """MOVE when offered, else COPY then delete exactly those messages."""
        wanted = sorted(set(uids))
        p = self._proto
        target = _quote(encode_mailbox(folder))
        for start in range(0, len(wanted), EXPUNGE_BATCH):
            batch = wanted[start : start + EXPUNGE_BATCH]
            uid_set = compress_uids(batch)
            if "MOVE" in self.capabilities:
                response = await self._call(
                    f"UID MOVE to {folder}", p.move(uid_set, target, by_uid=True)
                )
            else:
                response = await self._call(
                    f"UID COPY to {folder}", p.copy(uid_set, target, by_uid=True)
                )
                if response.result == "OK":
                    await self._delete_batch(batch)
            if response.result != "OK":
                raise TemporaryError(
                    f"{self.where}: cannot move messages to {folder!r}: {_text(response)}"
                )

    async def idle_until_change(self, max_wait: float, stop: asyncio.Event) -> bool:
        """IDLE on the selected folder until the server reports new mail (True), or until
        ``max_wait`` passes or ``stop`` is set (False). A dead connection, BYE, or no answer to
        DONE raises TemporaryError: the caller reconnects."""
        if "IDLE" not in self.capabilities:
            raise NoIdle(f"{self.where}: server does not offer IDLE; polling instead")
        c, p = self._client, self._proto
        if p.news:  # mail arrived after the last search: fetch it before idling
            return True
        loop = asyncio.get_running_loop()
        while not p.idle_queue.empty():  # leftovers of an earlier IDLE
            p.idle_queue.get_nowait()
        idle = await self._call("IDLE", c.idle_start(timeout=max_wait + 3600))
        changed = False
        try:
            deadline = loop.time() + max_wait
            while not changed and not stop.is_set():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                push = asyncio.ensure_future(p.idle_queue.get())
                stopper = asyncio.ensure_future(stop.wait())
                done, _ = await asyncio.wait(
                    {push, stopper}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
                for task in (push, stopper):
                    if task not in done:
                        task.cancel()
                if push not in done:
                    continue
                lines = push.result()
                if lines is CONNECTION_LOST or p.lost is not None:
                    raise TemporaryError(f"{self.where}: connection lost during IDLE")
                for line in lines:
                    if isinstance(line, bytes) and _CHANGE.match(line):
                        if line.upper().startswith(b"BYE"):
                            raise TemporaryError(f"{self.where}: server ended IDLE with BYE")
                        changed = True
        finally:
            if p.lost is None and p.transport is not None and not p.transport.is_closing():
                c.idle_done()
        try:
            async with asyncio.timeout(self.timeout):
                await idle
        except TimeoutError:
            raise TemporaryError(
                f"{self.where}: no answer to DONE: the connection is dead"
            ) from None
        except (aioimaplib.AioImapException, TemporaryError) as e:
            raise TemporaryError(f"{self.where}: IDLE ended badly: {e}") from None
        return changed

    async def logout(self) -> None:
        try:
            await self._call("LOGOUT", self._proto.logout())
        except (TemporaryError, ProtocolError):
            pass  # the server may close first; nothing is lost by that
        finally:
            self.close()


def _search_result(lines: list[Any]) -> list[int]:
    uids: list[int] = []
    for line in lines[:-1]:
        if isinstance(line, bytes | bytearray):
            words = bytes(line).split()
            if words and words[0].upper() == b"SEARCH":
                words = words[1:]
            for w in words:
                if w.isdigit():
                    if len(w) > 10 or int(w) > MAX_UID:
                        raise ProtocolError(f"UID out of range in a search result: {w[:20]!r}")
                    uids.append(int(w))
    return uids


def compress_uids(uids: list[int]) -> str:
    """``[1, 2, 3, 7]`` → ``"1:3,7"``; input sorted and unique."""
    runs: list[list[int]] = []
    for uid in uids:
        if runs and uid == runs[-1][1] + 1:
            runs[-1][1] = uid
        else:
            runs.append([uid, uid])
    return ",".join(str(a) if a == b else f"{a}:{b}" for a, b in runs)


def _scrub(text: str, secrets: list[str]) -> str:
    for secret in sorted(secrets, key=len, reverse=True):
        if secret:
            text = text.replace(secret, "********")
    return text


def _quote(text: str) -> str:
    """An IMAP quoted string (RFC 3501 §4.3)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def encode_mailbox(name: str) -> str:
    """Modified UTF-7 (RFC 3501 §5.1.3) for folder names outside printable ASCII."""
    out: list[str] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            raw = "".join(pending).encode("utf-16-be")
            out.append(
                "&" + base64.b64encode(raw).decode("ascii").rstrip("=").replace("/", ",") + "-"
            )
            pending.clear()

    for ch in name:
        if 0x20 <= ord(ch) <= 0x7E:
            flush()
            out.append("&-" if ch == "&" else ch)
        else:
            pending.append(ch)
    flush()
    return "".join(out)


def _text(response: Any) -> str:
    lines = getattr(response, "lines", None) or [b""]
    last = lines[-1]
    raw = bytes(last) if isinstance(last, bytes | bytearray) else str(last).encode()
    text = raw.decode("utf-8", "replace")
    return "".join(c if c.isprintable() else "?" for c in text)[:200] or "(no text)"
