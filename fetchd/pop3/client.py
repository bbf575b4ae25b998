"""POP3 over asyncio streams: pumps bytes between a socket and :mod:`fetchd.pop3.proto`.

This is the only POP3 code that does I/O, and the only place where socket, TLS and timeout
errors from a POP3 server are translated into fetchd's errors.
"""

from __future__ import annotations

import asyncio
import base64
import re
import ssl
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

from fetchd.deadline import Progress
from fetchd.errors import PermanentError, ProtocolError, TemporaryError
from fetchd.pop3.proto import NEED_DATA, POP3Connection, Reply
from fetchd.sasl import Mechanism, apop_digest, decode_challenge, token_mechanism
from fetchd.sasl import make as sasl_make
from fetchd.sasl import preference as sasl_preference
from fetchd.sasl import refused as sasl_refused
from fetchd.tls import (
    Security,
    describe_connect_error,
    ensure_no_buffered_plaintext,
    tls_description,
    translate_tls_error,
)

# RFC 2449/3206 response codes after which trying again later may work.
TEMPORARY_CODES = frozenset({"IN-USE", "LOGIN-DELAY", "SYS/TEMP"})
READ_SIZE = 1 << 18
# Bytes of RETR replies we let the server send ahead of what we have consumed.
PIPELINE_BYTES = 8 << 20
PIPELINE_DEPTH = 32


@dataclass(frozen=True, slots=True)
class Listing:
    """One message on the server: its number in this session, its UIDL and its size."""

    number: int
    uid: str
    size: int
    duplicate: bool = False  # another message has the same UIDL: the UID alone cannot track it


@dataclass(frozen=True, slots=True)
class Retrieved:
    """A message's bytes, or why the server would not give them (the others go on)."""

    message: Listing
    body: bytes | None
    problem: str | None = None


class POP3Client:
    """One POP3 session. Create it with :meth:`connect`; every reply wait is bounded."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        where: str,
        timeout: float,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._proto = POP3Connection()
        self.where = where
        self.timeout = timeout
        self.capabilities: dict[str, list[str]] = {}
        self.apop_timestamp: bytes | None = None
        self.tls = tls_description(writer.get_extra_info("ssl_object"))

    # -- connection ---------------------------------------------------------------------------

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        security: Security,
        io_timeout: float,
        where: str,
    ) -> POP3Client:
        """Open a session, upgraded to TLS when asked; CAPA is read on the secured channel.

        With ``starttls`` the server must offer STLS and accept it, and nothing it sends between
        its OK and the handshake is accepted; otherwise the connection is dropped before any
        credential is sent.
        """
        timeout = io_timeout
        implicit = security.implicit
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(
                    host,
                    port,
                    ssl=security.context if implicit else None,
                    server_hostname=security.server_name if implicit else None,
                    ssl_handshake_timeout=timeout if implicit else None,
                    limit=READ_SIZE,
                )
        except TimeoutError:
            raise TemporaryError(
                f"{where}: no connection to {host}:{port} within {timeout:g} s"
            ) from None
        except ssl.SSLError as e:
            raise translate_tls_error(e, security.server_name, where) from None
        except OSError as e:
            reason = describe_connect_error(e, security if implicit else None)
            raise TemporaryError(f"{where}: cannot connect to {host}:{port}: {reason}") from None
        client = cls(reader, writer, where=where, timeout=timeout)
        try:
            if implicit:
                security.check_peer(writer.get_extra_info("ssl_object"), where)
            greeting = await client._reply()
            if not greeting.ok:
                raise client._error("greeting", greeting)
            client.apop_timestamp = apop_timestamp(greeting.text)
            await client.capa()
            if security.starttls:
                await client._starttls(security)
        except BaseException:
            client.close()
            raise
        return client

    async def _starttls(self, security: Security) -> None:
        assert security.context is not None
        if "STLS" not in self.capabilities:
            raise PermanentError(
                f"{self.where}: server does not offer STLS, and TLS is required; "
                "no password was sent"
            )
        reply = await self.command("STLS")
        if not reply.ok:
            raise PermanentError(
                f"{self.where}: server refused STLS ({_text(reply)}); no password was sent"
            )
        if self._proto.buffered:
            raise ProtocolError(
                f"{self.where}: server sent data right after agreeing to STLS; refusing the "
                "connection (possible injection attack)"
            )
        ensure_no_buffered_plaintext(self._reader, self.where)
        try:
            async with asyncio.timeout(self.timeout):
                await self._writer.start_tls(
                    security.context,
                    server_hostname=security.server_name,
                    ssl_handshake_timeout=self.timeout,
                )
        except ssl.SSLError as e:
            raise translate_tls_error(e, security.server_name, self.where) from None
        except TimeoutError:
            raise TemporaryError(f"{self.where}: TLS handshake timed out") from None
        except OSError as e:
            reason = describe_connect_error(e, security)
            raise TemporaryError(f"{self.where}: TLS handshake failed: {reason}") from None
        ensure_no_buffered_plaintext(self._reader, self.where)
        security.check_peer(self._writer.get_extra_info("ssl_object"), self.where)
        self.tls = tls_description(self._writer.get_extra_info("ssl_object"))
        self.capabilities = {}  # what was said in plaintext is forgotten
        await self.capa()

    def close(self) -> None:
        self._writer.close()

    # -- the pump -----------------------------------------------------------------------------

    def _send(self, name: str, *args: str | bytes) -> None:
        self._writer.write(self._proto.send(name, *args))

    async def _reply(self) -> Reply:
        loop = asyncio.get_running_loop()
        progress = Progress(self.timeout, loop.time())
        while True:
            reply = self._proto.next_reply()
            if reply is not NEED_DATA:
                assert isinstance(reply, Reply)
                return reply
            remaining = progress.remaining(loop.time())
            try:
                async with asyncio.timeout(min(self.timeout, max(remaining, 0))):
                    data = await self._reader.read(READ_SIZE)
            except TimeoutError:
                if remaining < self.timeout:
                    raise TemporaryError(
                        f"{self.where}: server sends too slowly ({progress.received} bytes in "
                        f"{loop.time() - progress.start:.0f} s); giving up"
                    ) from None
                raise TemporaryError(
                    f"{self.where}: server sent nothing for {self.timeout:g} s"
                ) from None
            except ssl.SSLError as e:
                raise TemporaryError(f"{self.where}: TLS error: {e.reason or e}") from None
            except OSError as e:
                raise TemporaryError(f"{self.where}: connection lost: {e.strerror or e}") from None
            if not data:
                raise TemporaryError(f"{self.where}: server closed the connection")
            progress.received += len(data)
            self._proto.receive_data(data)

    def peer_certificate(self) -> bytes | None:
        """The server's certificate (DER), once TLS is up."""
        ssl_object = self._writer.get_extra_info("ssl_object")
        return ssl_object.getpeercert(binary_form=True) if ssl_object else None

    @property
    def peer(self) -> str | None:
        """The server's IP address, for the Received header."""
        peername = self._writer.get_extra_info("peername")
        return str(peername[0]) if isinstance(peername, tuple) and peername else None

    async def _drain_replies(self) -> None:
        """Read and drop replies nobody waits for any more (an abandoned RETR pipeline)."""
        while self._proto.pending:
            await self._reply()

    async def command(self, name: str, *args: str | bytes) -> Reply:
        """Send one command and return its reply, OK or not."""
        await self._drain_replies()
        self._send(name, *args)
        try:
            await self._writer.drain()
        except OSError as e:
            raise TemporaryError(f"{self.where}: connection lost: {e.strerror or e}") from None
        return await self._reply()

    async def _ok(self, name: str, *args: str) -> Reply:
        reply = await self.command(name, *args)
        if not reply.ok:
            raise self._error(name, reply)
        return reply

    def _error(self, what: str, reply: Reply) -> Exception:
        code = reply.code
        message = f"{self.where}: server answered {what} with -ERR {_text(reply)}"
        if code in TEMPORARY_CODES:
            return TemporaryError(message)
        if code in ("AUTH", "SYS/PERM"):
            return PermanentError(message)
        return TemporaryError(message)

    # -- commands -----------------------------------------------------------------------------

    async def capa(self) -> dict[str, list[str]]:
        """CAPA; a server without it (RFC 1939 only) gets an empty capability list."""
        reply = await self.command("CAPA")
        caps: dict[str, list[str]] = {}
        if reply.ok:
            for line in reply.lines():
                words = line.decode("ascii", "replace").split()
                if words:
                    caps[words[0].upper()] = words[1:]
        self.capabilities = caps
        return caps

    async def login(
        self, user: str, secret: str, *, method: str = "any", encrypted: bool = True
    ) -> None:
        """Authenticate with ``method`` (see fetchd.config.AUTH_METHODS).

        ``any`` picks the strongest the server offers: CRAM-MD5, then APOP, then SASL PLAIN,
        LOGIN, and USER/PASS last. OAuth methods take ``secret`` as the access token. APOP is
        refused without TLS (its MD5 challenge can be attacked) and needs a well-formed
        timestamp in the greeting.
        """
        sasl = {m.upper() for m in self.capabilities.get("SASL", [])}
        chosen = method
        if method == "any":
            names = [m for m in sasl_preference(password=True) if m in sasl]
            if names and names[0] == "CRAM-MD5":
                chosen = "cram-md5"
            elif self.apop_timestamp and encrypted:
                chosen = "apop"
            elif names:
                chosen = names[0].lower()
            else:
                chosen = "user"
        elif method == "oauth2":
            chosen = token_mechanism(sasl) or ""
            if not chosen:
                raise PermanentError(
                    f"{self.where}: server offers neither SASL OAUTHBEARER nor XOAUTH2 "
                    f"(it offers: {', '.join(sorted(sasl)) or 'none'})"
                )
        mechanism = None
        if chosen == "user":
            reply = await self.command("USER", user)
            if reply.ok:
                reply = await self.command("PASS", secret)
            hidden = [secret]
        elif chosen == "apop":
            if not self.apop_timestamp:
                raise PermanentError(f"{self.where}: server offers no APOP timestamp")
            if not encrypted:
                raise PermanentError(f"{self.where}: APOP without TLS is refused")
            reply = await self.command("APOP", user, apop_digest(self.apop_timestamp, secret))
            hidden = [secret]
        else:
            name = chosen.upper()
            if name not in sasl and method not in ("any", "oauth2"):
                raise PermanentError(
                    f"{self.where}: server does not offer SASL {name} "
                    f"(it offers: {', '.join(sorted(sasl)) or 'none'})"
                )
            mechanism = sasl_make(name, user, secret)
            reply = await self._sasl(mechanism)
            hidden = mechanism.secrets()
        if not reply.ok:
            if reply.code in TEMPORARY_CODES:
                raise self._error("login", reply)
            # No code, [AUTH] or anything else: the credentials were refused. Retrying every
            # few minutes would only lock the account; it waits for a human instead.
            text = _text(reply)
            for item in sorted(hidden, key=len, reverse=True):
                if item:
                    text = text.replace(item, "********")
            if mechanism is not None and mechanism.error:
                text = f"{mechanism.error}: {text}"
            raise sasl_refused(mechanism, f"{self.where}: login failed ({chosen}): {text}")

    async def _sasl(self, mechanism: Mechanism) -> Reply:
        """AUTH with an initial response when there is one; challenges answered or cancelled."""
        args = [mechanism.name]
        initial_pending = False
        if mechanism.initial is not None:
            encoded = base64.b64encode(mechanism.initial).decode("ascii") or "="
            # RFC 5034: the AUTH line may not exceed 255 octets (an access token often does);
            # the initial response then answers the server's first, empty challenge.
            if len(f"AUTH {mechanism.name} {encoded}\r\n") <= 255:
                args.append(encoded)
            else:
                initial_pending = True
        reply = await self.command("AUTH", *args)
        for _ in range(10):  # no honest exchange needs more steps
            if not reply.continuation:
                return reply
            if initial_pending:
                initial_pending = False
                answer: bytes | None = mechanism.initial
            else:
                challenge = decode_challenge(reply.text)
                answer = mechanism.respond(challenge) if challenge is not None else None
            line = b"*" if answer is None else base64.b64encode(answer)
            self._writer.write(self._proto.send_sasl(line))
            reply = await self._reply()
        self._writer.write(self._proto.send_sasl(b"*"))
        reply = await self._reply()
        if reply.continuation:
            raise ProtocolError(f"{self.where}: server does not end the SASL exchange")
        return reply

    async def listing(self, *, uidl_required: bool = True) -> list[Listing]:
        """Every message with its UIDL and size (UIDL and LIST pipelined when allowed).

        A message whose UIDL is empty or shared with another cannot be tracked by UID: it comes
        marked ``duplicate`` (the poller then knows it by a digest of its bytes). Without UIDL
        at all, every message is so marked, unless ``uidl_required``.
        """
        if "PIPELINING" in self.capabilities:
            self._send("UIDL")
            self._send("LIST")
            uidl, sizes = await self._reply(), await self._reply()
        else:
            uidl = await self.command("UIDL")
            sizes = await self.command("LIST")
        if not sizes.ok:
            raise self._error("LIST", sizes)
        size_of: dict[int, int] = {}
        for number, rest in _parse_pairs(sizes, self.where, "LIST"):
            size = rest.split(b" ")[0]
            if size.isdigit() and len(size) <= 15:  # otherwise unknown: no size check
                size_of[number] = int(size)
        if not uidl.ok:
            if uidl_required:
                raise PermanentError(
                    f"{self.where}: server does not support UIDL ({_text(uidl)}); keep: true "
                    "needs it to know which messages are new"
                )
            return [Listing(n, "", size, True) for n, size in sorted(size_of.items())]
        uids = _parse_pairs(uidl, self.where, "UIDL", allow_empty=True)
        counts = Counter(rest for _, rest in uids)
        return [
            Listing(number, uid_key(rest), size_of.get(number, 0), counts[rest] > 1 or not rest)
            for number, rest in uids
        ]

    async def retrieve(self, messages: Iterable[Listing]) -> AsyncIterator[Retrieved]:
        """RETR each message in turn, pipelined when the server allows it.

        The server may already be sending the next messages, bounded by PIPELINE_BYTES of
        outstanding data. A message the server refuses, or sends shorter than LIST said (cut
        short, or a bare "." line it did not stuff), comes with a problem and no body.
        """
        todo = list(messages)
        await self._drain_replies()
        window = PIPELINE_DEPTH if "PIPELINING" in self.capabilities else 1
        sent = 0
        outstanding = 0
        for i, msg in enumerate(todo):
            while (
                sent < len(todo)
                and sent - i < window
                and (sent == i or outstanding + todo[sent].size <= PIPELINE_BYTES)
            ):
                self._send("RETR", str(todo[sent].number))
                outstanding += todo[sent].size
                sent += 1
            try:
                await self._writer.drain()
            except OSError as e:
                raise TemporaryError(f"{self.where}: connection lost: {e.strerror or e}") from None
            reply = await self._reply()
            outstanding -= msg.size
            if not reply.ok:
                yield Retrieved(msg, None, f"server refused RETR {msg.number}: {_text(reply)}")
            elif reply.body is None or len(reply.body) < msg.size:
                got = len(reply.body or b"")
                yield Retrieved(
                    msg,
                    None,
                    f"message {msg.number} came with {got} bytes where LIST announced "
                    f"{msg.size}: not delivered, it may be cut short",
                )
            else:
                yield Retrieved(msg, reply.body)

    async def delete(self, numbers: Iterable[int]) -> None:
        """DELE each message (pipelined when allowed); they go only when QUIT succeeds."""
        numbers = list(numbers)
        if "PIPELINING" not in self.capabilities:
            for n in numbers:
                await self._ok("DELE", str(n))
            return
        await self._drain_replies()
        for start in range(0, len(numbers), 256):
            batch = numbers[start : start + 256]
            for n in batch:
                self._send("DELE", str(n))
            for n in batch:
                reply = await self._reply()
                if not reply.ok:
                    raise self._error(f"DELE {n}", reply)

    async def quit(self) -> None:
        """QUIT commits the deletions; without a +OK they did not happen."""
        try:
            await self._ok("QUIT")
        finally:
            self.close()


def apop_timestamp(greeting: bytes) -> bytes | None:
    """The APOP challenge of a greeting, only when it has the RFC 1939 form <...@...>
    (CVE-2007-1558: an unchecked challenge lets a man in the middle recover the password)."""
    m = re.search(rb"<[!-;=?-~]+@[!-;=?-~]+>", greeting)
    return m.group(0) if m and len(m.group(0)) <= 255 else None


def _text(reply: Reply) -> str:
    """Server text, made safe to log: printable ASCII, bounded."""
    text = reply.text.decode("ascii", "replace")
    return "".join(c if c.isprintable() else "?" for c in text)[:200] or "(no text)"


def _parse_pairs(
    reply: Reply, where: str, what: str, *, allow_empty: bool = False
) -> list[tuple[int, bytes]]:
    """``n rest`` lines of UIDL or LIST: the message number and the rest of the line."""
    pairs: list[tuple[int, bytes]] = []
    for line in reply.lines():
        number, _, rest = line.strip(b" \t").partition(b" ")
        rest = rest.strip(b" \t")
        if not number.isdigit() or len(number) > 10 or not (rest or allow_empty):
            raise ProtocolError(f"{where}: malformed {what} line: {line[:80]!r}")
        pairs.append((int(number), rest))
    return pairs


def uid_key(raw: bytes) -> str:
    """A UIDL as stored in the state: the UID itself when it is printable ASCII (spaces
    included, as some servers send them), else a tab and its hex. No two UIDs share a key: a
    printable UID never contains a tab.
    """
    if all(0x20 <= b <= 0x7E for b in raw):
        return raw.decode("ascii")
    return "\t" + raw.hex()
