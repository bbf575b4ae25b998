"""One poll of one account: the only place that decides what happens to each message.

The order per message is always: fetch → deliver → record in the state → delete on the server.
A crash anywhere re-delivers at most the messages in hand; nothing is deleted that the MTA has
not accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import TypeVar

from fetchd.config import Account
from fetchd.deliver import make_deliverer
from fetchd.errors import (
    DeliveryDeferred,
    DeliveryUncertain,
    FetchdError,
    MessageUnavailable,
    PermanentError,
    ProtocolError,
    TemporaryError,
)
from fetchd.imap import FolderUnavailable, IMAPClient
from fetchd.message import envelope_sender, message_digest, received_header, recipients_for
from fetchd.oauth2 import token_source
from fetchd.pop3.client import Listing, POP3Client
from fetchd.sasl import TokenRefused
from fetchd.state import BROKEN_CODE, UNREADABLE_NOTE, State, content_digest
from fetchd.tls import (
    CertificateError,
    Security,
    explain_certificate_failure,
    inspection_context,
    security_for,
)

log = logging.getLogger("fetchd.poll")
IDLE_REFRESH = 29 * 60.0
UNREADABLE_POLLS = 3  # hours in which a message came broken before it is set aside
Client = TypeVar("Client", POP3Client, IMAPClient)


@dataclass(slots=True)
class PollResult:
    """What one poll did, for the log line and the exit status."""

    fetched: int = 0
    delivered: int = 0
    rejected: int = 0
    redirected: int = 0
    dropped: int = 0
    skipped: int = 0
    deleted: int = 0
    moved: int = 0
    held: int = 0
    unreadable: int = 0
    bytes: int = 0
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{self.delivered} delivered"]
        if self.deleted:
            parts.append(f"{self.deleted} deleted on the server")
        if self.moved:
            parts.append(f"{self.moved} moved on the server")
        if self.rejected:
            parts.append(f"{self.rejected} refused by the MTA (kept on the server)")
        if self.redirected:
            parts.append(f"{self.redirected} refused and sent to the quarantine")
        if self.dropped:
            parts.append(f"{self.dropped} refused and deleted (on_reject: delete)")
        if self.held:
            parts.append(f"{self.held} held after the MTA went silent (after_timeout: dedupe)")
        if self.skipped:
            parts.append(f"{self.skipped} the server would not give (kept, retried)")
        if self.unreadable:
            parts.append(f"{self.unreadable} the server sends broken (kept, not fetched again)")
        return ", ".join(parts)


class Poller:
    """Polls one account once. ``stopping()`` is checked between messages."""

    def __init__(
        self, account: Account, state: State, stopping: Callable[[], bool] = lambda: False
    ) -> None:
        self.account = account
        self.state = state
        self.stopping = stopping
        self.result = PollResult()
        self._budget: int | None = account.fetch_limit or None  # messages left this poll
        self.where = f"account {account.where()}"
        self.delivery = make_deliverer(
            account.deliver, connect_timeout=account.timeout, where=self.where
        )

    async def poll(self) -> PollResult:
        try:
            if self.account.protocol == "pop3":
                await self._poll_pop3()
            else:
                await self._poll_imap()
        finally:
            await self.delivery.close()
        return self.result

    async def _secret(self, rejected: str | None = None) -> str:
        """The password, or for OAuth methods the access token, read fresh for each poll.

        ``rejected``: the server just refused this access token; fetchd's own token source
        then replaces it (once for all connections of the account).
        """
        a = self.account
        if a.oauth2 is not None:
            source = token_source(a.oauth2)
            return await source.access_token(self.where, a.name, a.timeout, rejected=rejected)
        if a.oauth2_token_file:
            try:
                token = await asyncio.to_thread(_first_line, a.oauth2_token_file)
            except (OSError, UnicodeDecodeError) as e:
                raise PermanentError(
                    f"{self.where}: cannot read the OAuth2 token file {a.oauth2_token_file}: {e}"
                ) from None
        elif a.oauth2_token_command:
            argv = a.oauth2_token_command
            out = await _run_helper(argv, a.timeout, self.where, argv[0], "token", TemporaryError)
            token = out.decode("utf-8", "replace").strip()
        elif a.password_command:
            return await _command_password(a.password_command, a.timeout, self.where)
        else:
            return a.password.reveal()
        if not token or any(c in token for c in "\r\n\0"):
            raise PermanentError(f"{self.where}: the OAuth2 token is empty or malformed")
        return token

    async def _open(self, kind: type[Client]) -> Client:
        """Connect and log in. An access token that fetchd refreshes itself and that the server
        refuses is refreshed and tried once more, on a new connection: it may have expired or
        been revoked early, and that alone should not park the account."""
        client = await self._connect(kind)
        secret = ""
        try:
            secret = await self._secret()
            await self._login(client, secret)
            return client
        except TokenRefused as e:
            client.close()
            if self.account.oauth2 is None:
                raise
            log.info("%s; refreshing the access token and trying once more", e)
        except BaseException:
            client.close()
            raise
        secret = await self._secret(rejected=secret)
        client = await self._connect(kind)
        try:
            await self._login(client, secret)
        except BaseException:
            client.close()
            raise
        return client

    async def _login(self, client: POP3Client | IMAPClient, secret: str) -> None:
        a = self.account
        if isinstance(client, POP3Client):
            await client.login(a.user, secret, method=a.auth, encrypted=a.tls.mode != "none")
        else:
            await client.login(a.user, secret, method=a.auth)

    async def _connect(self, kind: type[Client]) -> Client:
        """Connect and secure the session; a refused certificate is explained in plain words."""
        a = self.account
        security = security_for(a)
        try:
            return await kind.connect(
                a.host, a.port, security=security, io_timeout=a.timeout, where=self.where
            )
        except CertificateError as e:
            if e.verify_code is None:
                raise  # a pin mismatch says it all already
            raise await self._explain(kind, security, e) from None

    async def _explain(
        self, kind: type[Client], security: Security, error: CertificateError
    ) -> CertificateError:
        """Fetch the refused certificate once more, unverified and without logging in, to say
        what is wrong with it (expired when, issued for which names...)."""
        a = self.account
        look = replace(security, context=inspection_context(), fingerprints=(), verify=True)
        try:
            client = await kind.connect(
                a.host, a.port, security=look, io_timeout=a.timeout, where=self.where
            )
        except FetchdError:
            return error
        try:
            der = client.peer_certificate()
        finally:
            client.close()
        reason = str(error).split(": ", 1)[-1]
        text = explain_certificate_failure(der, security.server_name, error.verify_code, reason)
        return CertificateError(f"{self.where}: {text}", error.verify_code)

    async def _deliver(
        self,
        body: bytes,
        *,
        protocol: str,
        tls: str,
        peer: str | None,
        folder: str,
        uidvalidity: int,
        key: str,
        ident: str,
    ) -> bool:
        """Deliver one message to every recipient; True when it may leave the server.

        True: every recipient accepted it (or a permanent refusal's policy says delete or the
        quarantine took it). False: refused for good and kept on the server, remembered so it
        is not fetched again. Raises DeliveryDeferred when the MTA cannot take it now; the
        recipients that did accept are remembered, and a retry goes only to the others.
        """
        a, d = self.account, self.account.deliver
        recipients = recipients_for(body, d)
        sender = d.sender if d.sender is not None else envelope_sender(body)
        prefix = b""  # sent before the body, not joined to it: no copy of a big message
        if d.received_header:
            prefix = received_header(
                server=a.host,
                server_ip=peer,
                local_host=self.delivery.local_hostname,
                protocol=protocol,
                tls=tls,
                recipients=recipients,
                message_id=ident,
                account=a.name,
            )
        self.result.fetched += 1
        self.result.bytes += len(body)
        if not recipients:  # multidrop found no local address and there is no fallback
            header = d.multidrop.header if d.multidrop else "the envelope"
            return await self._refused(
                (prefix, body),
                sender,
                {"(nobody)": (550, f"no local recipient in {header}")},
                folder=folder,
                uidvalidity=uidvalidity,
                key=key,
                ident=ident,
            )
        digest = message_digest(body) if d.after_timeout == "dedupe" else ""
        if digest:
            since = await self.state.uncertain_since(a.name, digest, d.dedupe_window)
            if since is not None:
                return await self._held(folder, uidvalidity, key, ident, since)
        done = await self.state.delivered_to(a.name, folder, uidvalidity, key)
        pending = [r for r in recipients if r not in done]
        try:
            replies = (
                await self.delivery.deliver(body, sender, pending, prefix=prefix) if pending else {}
            )
        except DeliveryDeferred as e:
            if e.accepted:
                await self.state.record_partial(a.name, folder, uidvalidity, key, e.accepted)
            if digest and isinstance(e, DeliveryUncertain):
                await self.state.record_uncertain(a.name, folder, key, digest, ident)
                await self._held(folder, uidvalidity, key, ident, time.time())
            raise
        strange = {r: reply for r, reply in replies.items() if reply[0] // 100 not in (2, 4, 5)}
        if strange:  # never taken for "accepted": the message stays and is tried again
            raise DeliveryDeferred(
                f"{self.where}: the MTA at {self.delivery.target} gave no usable answer for "
                f"message {ident}: {_replies(strange)}"
            )
        accepted = [r for r, (code, _) in replies.items() if 200 <= code < 300]
        deferred = {r: reply for r, reply in replies.items() if 400 <= reply[0] < 500}
        refused = {r: reply for r, reply in replies.items() if reply[0] >= 500}
        if deferred or refused:
            await self.state.record_partial(a.name, folder, uidvalidity, key, accepted)
        if deferred:
            raise DeliveryDeferred(
                f"{self.where}: the MTA at {self.delivery.target} cannot take message {ident} "
                f"now: {_replies(deferred)}"
            )
        if refused:
            return await self._refused(
                (prefix, body),
                sender,
                refused,
                folder=folder,
                uidvalidity=uidvalidity,
                key=key,
                ident=ident,
            )
        self.result.delivered += 1
        return True

    async def _held(
        self, folder: str, uidvalidity: int, key: str, ident: str, since: float
    ) -> bool:
        """after_timeout: dedupe — the MTA went silent after taking this message, so it may
        have it: not delivered again, kept on the server, listed by `fetchd status`."""
        a = self.account
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since))
        text = (
            f"{self.where}: message {ident} is not delivered again: the MTA at "
            f"{self.delivery.target} gave no final reply for it at {when}, so it may have it "
            "(after_timeout: dedupe); kept on the server — check the MTA's log"
        )
        await self.state.record_rejected(a.name, folder, uidvalidity, key, 0, text)
        self.result.held += 1
        self.result.problems.append(text)
        log.warning("%s", text)
        return False

    async def _refused(
        self,
        message: tuple[bytes, bytes],
        sender: str,
        refused: dict[str, tuple[int, str]],
        *,
        folder: str,
        uidvalidity: int,
        key: str,
        ident: str,
    ) -> bool:
        """A permanent refusal: keep (default), delete, or redirect to the quarantine."""
        a, d = self.account, self.account.deliver
        code = min(c for c, _ in refused.values())
        action = d.reject_action(code)
        text = f"{self.where}: the MTA at {self.delivery.target} refused message {ident}: "
        text += _replies(refused)
        if action == "redirect" and d.quarantine:
            prefix, body = message
            replies = await self.delivery.deliver(body, sender, [d.quarantine], prefix=prefix)
            qcode, qtext = replies.get(d.quarantine, (451, "no reply"))
            if 200 <= qcode < 300:
                log.warning("%s; sent to the quarantine %s instead", text, d.quarantine)
                self.result.redirected += 1
                return True
            if 400 <= qcode < 500:
                raise DeliveryDeferred(f"{text}; the quarantine cannot take it now: {qtext}")
            text += f"; the quarantine refused it too: {qcode} {qtext}"
            action = "keep"
        if action == "delete":
            log.warning("%s; deleted on the server as configured (on_reject)", text)
            self.result.dropped += 1
            return True
        await self.state.record_rejected(a.name, folder, uidvalidity, key, code, text)
        self.result.rejected += 1
        self.result.problems.append(text)
        log.warning("%s; kept on the server and not fetched again", text)
        return False

    async def watch(
        self,
        folder: str,
        stop: asyncio.Event,
        refresh: float = IDLE_REFRESH,
        report: Callable[[PollResult | None], Awaitable[None]] | None = None,
    ) -> None:
        """IMAP IDLE on one folder: fetch what is there, wait for news, fetch again, until
        ``stop``. IDLE is renewed every ``refresh`` seconds (servers drop it after 30 minutes).
        Errors are raised: the caller reconnects, with back-off. ``report`` gets each round's
        result once logged in, and None when the connection ends."""
        a = self.account
        client = await self._open(IMAPClient)
        try:
            while not stop.is_set():
                self.result = PollResult()
                try:
                    await self._poll_folder(client, folder)
                finally:
                    await self.delivery.close()
                if self.result.fetched or self.result.problems:
                    log.info("%s: %s: %s", a.name, folder, self.result.summary())
                if report is not None:
                    await report(self.result)
                await client.idle_until_change(refresh, stop)
            await client.logout()
        finally:
            client.close()
            if report is not None:
                await report(None)

    # -- POP3 ---------------------------------------------------------------------------------

    async def _poll_pop3(self) -> None:
        """Sessions until nothing is left to do: one, unless expunge_every asks to QUIT (and so
        commit the deletions) every N messages."""
        a = self.account
        budget = a.fetch_limit or None
        while True:
            more = await self._pop3_session(budget)
            if not more or not a.expunge_every or self.stopping():
                return
            if budget is not None:
                budget -= a.expunge_every
                if budget <= 0:
                    return

    async def _pop3_session(self, budget: int | None) -> bool:
        """One POP3 session; True when messages remain for another session."""
        a = self.account
        client = await self._open(POP3Client)
        try:
            listing = await client.listing(uidl_required=a.keep)
            seen = await self.state.seen(a.name, "", 0)
            rejected = await self.state.rejected(a.name, "", 0)
            # A UID shared by several messages, or empty, cannot tell them apart: those are
            # fetched every time and known by UID plus a digest of their bytes.
            trackable = [m for m in listing if not m.duplicate]
            done = [m for m in trackable if m.uid in seen and not a.fetch_all]
            on_server = {m.uid for m in trackable}
            if len(trackable) < len(listing):
                log.warning("%s: some messages have no usable UID; known by digest", self.where)
            odd = [m.uid for m in trackable if len(m.uid) > 70 or not m.uid.isprintable()]
            if odd:  # RFC 1939: 1 to 70 printable characters; kept whole all the same
                log.info(
                    "%s: %d UIDs break RFC 1939's form, e.g. %r", self.where, len(odd), odd[0][:80]
                )
            if a.keep and a.delete_after_days:  # keep them for a while, then delete them
                cutoff = time.time() - a.delete_after_days * 86400
                old = await self.state.delivered_before(a.name, "", 0, cutoff)
                expired = [m for m in trackable if m.uid in old]
            else:
                expired = []
            new = [m for m in listing if m.duplicate or a.fetch_all or m.uid not in seen]
            new = [m for m in new if m.uid not in rejected or m.duplicate]
            new, too_big = await self._apply_limit(new, "", 0)
            if a.limit_delete:
                expired += too_big
            step = a.expunge_every or None
            wanted = [x for x in (budget, step) if x]
            more = bool(wanted) and len(new) > min(wanted)
            new = new[: min(wanted)] if wanted else new
            deferred: DeliveryDeferred | None = None
            complete = not more
            async for got in client.retrieve(new):
                msg = got.message
                if got.body is None:
                    self._skip(got.problem or "unavailable")
                    continue
                key = msg.uid
                if msg.duplicate:
                    key = f"{msg.uid}\t{content_digest(got.body)}"
                    on_server.add(key)
                    if key in seen and not a.fetch_all:
                        done.append(msg)
                    if key in rejected or (key in seen and not a.fetch_all):
                        continue
                try:
                    ok = await self._deliver(
                        got.body,
                        protocol="POP3",
                        tls=client.tls,
                        peer=client.peer,
                        folder="",
                        uidvalidity=0,
                        key=key,
                        ident=msg.uid or f"#{msg.number}",
                    )
                except DeliveryDeferred as e:
                    deferred = e  # the MTA is unwell: stop, but delete what it did accept
                    complete = more = False
                    break
                if ok:
                    await self.state.record(a.name, "", 0, key)
                    if msg not in done:
                        done.append(msg)
                if self.stopping():
                    complete = more = False
                    break
            to_delete = ([] if a.keep else done) + expired
            await client.delete(m.number for m in to_delete)
            await client.quit()  # deletions take effect only now
            self.result.deleted += len(to_delete)
            on_server -= {m.uid for m in to_delete}
            if complete:  # keys of duplicates not fetched this time are unknown: keep them
                # Notes are keyed by UID, shared or not, or by number when there is none.
                listed = {m.uid or str(m.number) for m in listing}
                noticed = await self.state.noticed(a.name, "", 0) - listed
                await self.state.forget(a.name, "", 0, (seen | rejected | noticed) - on_server)
            if deferred is not None:
                raise deferred
            return more
        finally:
            client.close()

    async def _apply_limit(
        self, messages: list[Listing], folder: str, uidvalidity: int
    ) -> tuple[list[Listing], list[Listing]]:
        """Split off messages larger than ``limit``, with one warning per message."""
        a = self.account
        if not a.limit:
            return messages, []
        small = [m for m in messages if m.size <= a.limit]
        big = [m for m in messages if m.size > a.limit]
        for m in big:
            if await self.state.notice(
                a.name, folder, uidvalidity, m.uid or str(m.number), "limit"
            ):
                what = "deleted on the server" if a.limit_delete else "left on the server"
                log.warning(
                    "%s: message %s is %d bytes, over the limit of %d: %s",
                    self.where,
                    m.uid or m.number,
                    m.size,
                    a.limit,
                    what,
                )
            self.result.skipped += 1
        return small, big

    def _skip(self, problem: str) -> None:
        """One message could not be had; it stays on the server and the others go on."""
        self.result.skipped += 1
        message = f"{self.where}: {problem}"
        self.result.problems.append(message)
        log.warning("%s", message)

    async def _unreadable(
        self, error: ProtocolError, folder: str, uidvalidity: int, key: str, ident: str
    ) -> None:
        """A message the server sent in a form that does not add up, in a poll where others
        came whole: skipped, so that it does not hold back the others. Broken in
        UNREADABLE_POLLS different hours, it is set aside: kept on the server, listed by
        `fetchd status`, not fetched again. (When nothing at all comes whole, the poll fails
        instead and nothing is counted: a server-wide fault must not set mail aside.)"""
        a = self.account
        problem = str(error).removeprefix(f"{self.where}: ")
        hour = int(time.time() // 3600)
        await self.state.notice(a.name, folder, uidvalidity, key, f"{UNREADABLE_NOTE}{hour}")
        hours = await self.state.notices(a.name, folder, uidvalidity, key, UNREADABLE_NOTE)
        if hours < UNREADABLE_POLLS:
            self._skip(f"message {ident} came broken ({problem}); kept, tried again next poll")
            return
        text = (
            f"{self.where}: message {ident} came broken in {hours} different hours ({problem}); "
            "kept on the server and not fetched again — check it with a mail client"
        )
        await self.state.record_rejected(a.name, folder, uidvalidity, key, BROKEN_CODE, text)
        self.result.unreadable += 1
        self.result.problems.append(text)
        log.error("%s", text)

    # -- IMAP ---------------------------------------------------------------------------------

    async def _poll_imap(self) -> None:
        a = self.account
        client = await self._open(IMAPClient)
        try:
            missing: list[FolderUnavailable] = []
            for folder in a.folders:
                try:
                    await self._poll_folder(client, folder)
                except FolderUnavailable as e:
                    missing.append(e)  # the other folders go on
                    log.warning("%s", e)
                if self.stopping():
                    break
            await client.logout()
            if missing:
                raise missing[0]
        finally:
            client.close()

    async def _poll_folder(self, client: IMAPClient, folder: str) -> None:
        a = self.account
        status = await client.select(folder)
        known = await self.state.uidvalidity(a.name, folder)
        changed = known is not None and known != status.uidvalidity
        if known != status.uidvalidity:
            await self.state.set_uidvalidity(a.name, folder, status.uidvalidity)
        if changed:
            log.warning(
                "%s: folder %r has a new UIDVALIDITY (%d, was %d): nothing is deleted in this "
                "poll; %s",
                self.where,
                folder,
                status.uidvalidity,
                known,
                "its messages count as delivered (uidvalidity_change: rebaseline)"
                if a.uidvalidity_change == "rebaseline"
                else "messages delivered before are recognised by their digest",
            )
            if a.uidvalidity_change == "rebaseline":
                current = await client.uids() if status.exists else []
                await self.state.record_many(
                    a.name, folder, status.uidvalidity, [str(u) for u in current]
                )
                return
        # Until a poll has gone through the whole folder, not only in the first one after it.
        digests = await self.state.known_digests(a.name, folder)
        uids = await client.uids() if status.exists else []
        seen = await self.state.seen(a.name, folder, status.uidvalidity)
        rejected = await self.state.rejected(a.name, folder, status.uidvalidity)
        done = [u for u in uids if str(u) in seen and not a.fetch_all]  # delivered, still there
        expired: list[int] = []
        if a.keep and a.delete_after_days:
            cutoff = time.time() - a.delete_after_days * 86400
            old = await self.state.delivered_before(a.name, folder, status.uidvalidity, cutoff)
            expired = [u for u in uids if str(u) in old]
        new = [u for u in uids if (a.fetch_all or str(u) not in seen) and str(u) not in rejected]
        # Whether every message gets compared with the digests in this poll: not those kept
        # for being refused or broken, nor those too big.
        whole = len(new) + len(done) == len(uids)
        sizes: dict[int, int] = {}
        if a.limit and new:
            sizes = await client.sizes(new)
            listed = [Listing(0, str(u), sizes.get(u, 0)) for u in new]
            small, big = await self._apply_limit(listed, folder, status.uidvalidity)
            new = [int(m.uid) for m in small]
            if a.limit_delete:
                expired += [int(m.uid) for m in big]
            whole = whole and not big
        if self._budget is not None:
            whole = whole and len(new) <= self._budget
            new = new[: self._budget]
            self._budget -= len(new)
        if len(new) > 1 and not sizes:
            sizes = await client.sizes(new)
        skipped = self.result.skipped
        deferred: DeliveryDeferred | None = None
        fresh: list[int] = []  # delivered in this poll
        fetched: dict[int, bytes | TemporaryError] = {}
        broken: list[tuple[int, ProtocolError]] = []  # came in a form that does not add up
        intact = 0  # came whole
        for n, uid in enumerate(new):
            if uid not in fetched:
                fetched = await client.fetch_many(_batch(new[n:], sizes))
            got = fetched.pop(uid)
            if isinstance(got, MessageUnavailable):
                self._skip(str(got).removeprefix(f"{self.where}: "))
                continue
            if isinstance(got, ProtocolError):  # the session is in step: only this one is bad
                broken.append((uid, got))
                continue
            if isinstance(got, Exception):
                raise got
            body = got
            intact += 1
            digest = content_digest(body) if digests else None  # else hashed by the state
            if digest in digests:  # delivered before the UIDVALIDITY changed
                await self.state.record(a.name, folder, status.uidvalidity, str(uid), digest)
                continue
            try:
                ok = await self._deliver(
                    body,
                    protocol="IMAP",
                    tls=client.tls,
                    peer=client.peer,
                    folder=folder,
                    uidvalidity=status.uidvalidity,
                    key=str(uid),
                    ident=f"{folder}/{uid}",
                )
            except DeliveryDeferred as e:
                deferred = e  # the MTA is unwell: stop, but delete what it did accept
                break
            if ok:
                await self.state.record(
                    a.name, folder, status.uidvalidity, str(uid), digest, content=body
                )
                fresh.append(uid)
                if uid not in done:
                    done.append(uid)
            if self.stopping():
                whole = False
                break
        if broken and not intact:  # nothing came whole: the server, not a message, is unwell
            raise broken[0][1]
        for uid, error in broken:
            await self._unreadable(error, folder, status.uidvalidity, str(uid), f"{folder}/{uid}")
        if digests and whole and not deferred and not broken and self.result.skipped == skipped:
            await self.state.forget_digests(a.name, folder)  # every message was seen again
        on_server = {str(u) for u in uids}
        action = a.after_delivery
        if changed:
            action, expired = "leave", []  # never delete while the UIDs are in doubt
        gone: list[int] = list(expired)
        if action == "delete":
            gone += done
        elif action == "move" and done:
            assert a.move_to is not None
            await client.move(done, a.move_to)
            self.result.moved += len(done)
            on_server -= {str(u) for u in done}
        elif action == "seen" and fresh:
            await client.mark_seen(fresh)
        if gone:
            await client.delete(gone)
            self.result.deleted += len(gone)
            on_server -= {str(u) for u in gone}
        noticed = await self.state.noticed(a.name, folder, status.uidvalidity)
        remembered = seen | rejected | noticed
        await self.state.forget(a.name, folder, status.uidvalidity, remembered - on_server)
        if deferred is not None:
            raise deferred


FETCH_BATCH = 16  # messages fetched with one command, at most
FETCH_BATCH_BYTES = 512 * 1024  # and about this many bytes, so 200 accounts hold ~100 MiB


def _batch(uids: list[int], sizes: dict[int, int]) -> list[int]:
    """The first UIDs of ``uids`` to fetch in one command: one round trip for many small
    messages, a big one alone (a size not known counts as big)."""
    batch, total = [uids[0]], sizes.get(uids[0], FETCH_BATCH_BYTES)
    for uid in uids[1:FETCH_BATCH]:
        total += sizes.get(uid, FETCH_BATCH_BYTES)
        if total > FETCH_BATCH_BYTES:
            break
        batch.append(uid)
    return batch


def _replies(replies: dict[str, tuple[int, str]]) -> str:
    return "; ".join(f"{rcpt}: {code} {text}" for rcpt, (code, text) in replies.items())


def _first_line(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.readline().strip()


async def _command_password(argv: tuple[str, ...], deadline: float, where: str) -> str:
    """Run password_command at each login, so a rotated password is picked up without a reload.

    Failures name the program only: its arguments and output may reveal the secret.
    """
    label = f"password_command {argv[0]}"
    out = await _run_helper(argv, deadline, where, label, "password", PermanentError)
    try:
        secret = out.decode("utf-8")
    except UnicodeDecodeError:
        raise PermanentError(f"{where}: {label} printed a password that is not UTF-8") from None
    if not secret:
        raise PermanentError(f"{where}: {label} printed no password (empty first line)")
    if any(c in secret for c in "\r\n\0"):
        raise PermanentError(f"{where}: {label} printed a password holding a CR or NUL")
    return secret


async def _run_helper(
    argv: tuple[str, ...],
    deadline: float,
    where: str,
    label: str,
    what: str,
    failed: type[FetchdError],
) -> bytes:
    """The first line a secret helper prints, without its line ending; no shell, no stdin.

    It runs in its own process group so that an overrun kills whatever it started too.
    Errors show its stderr's last line, never stdout: that is the secret.
    """
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            process_group=0,
        )
    except OSError as e:
        raise PermanentError(f"{where}: cannot run {label}: {e.strerror or e}") from None
    assert proc.stdout is not None and proc.stderr is not None
    try:
        async with asyncio.timeout(deadline):
            out, err = await asyncio.gather(_bounded(proc.stdout), _bounded(proc.stderr))
            await proc.wait()
    except BaseException as e:  # timed out, or the poll was cancelled: the helper goes too
        _kill_group(proc.pid)
        with contextlib.suppress(TimeoutError):  # a child that left the group may hold a pipe
            async with asyncio.timeout(5):  # read the pipes to their end, so they close
                await asyncio.gather(_bounded(proc.stdout, 0), _bounded(proc.stderr, 0))
                await proc.wait()
        if isinstance(e, TimeoutError):
            raise TemporaryError(f"{where}: {label} gave no {what} within {deadline:g} s") from None
        raise
    if proc.returncode != 0:
        detail = err.decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
        raise failed(f"{where}: {label} exited with status {proc.returncode}: {detail[0][:200]}")
    return out.split(b"\n", 1)[0].rstrip(b"\r")


async def _bounded(stream: asyncio.StreamReader, limit: int = 65536) -> bytes:
    """What a helper writes, kept up to ``limit`` bytes; the rest is read and dropped, so a
    chatty program neither fills the memory nor blocks on a full pipe."""
    data = b""
    while chunk := await stream.read(65536):
        if len(data) < limit:
            data += chunk[: limit - len(data)]
    return data


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
