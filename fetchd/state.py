"""What fetchd remembers between polls, in SQLite.

For each account and folder: the UIDVALIDITY last seen (IMAP) and the UIDs of messages that
were delivered. A UID is recorded — and committed — after the MTA accepted the message and
before the server is told to delete it, so a crash at any point may cause a second delivery but
never a loss.

SQLite calls block, so they run on one worker thread that owns the connection; the event loop
never waits on the disk.
"""

from __future__ import annotations

import asyncio
import copy
import fcntl
import hashlib
import os
import pwd
import sqlite3
import stat
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TypeVar
from urllib.parse import quote

from fetchd.errors import ConfigError, StateBusy

T = TypeVar("T")
SCHEMA_VERSION = 5
_SCHEMA = """
CREATE TABLE IF NOT EXISTS seen (
    account TEXT NOT NULL,
    folder TEXT NOT NULL,
    uidvalidity INTEGER NOT NULL,
    uid TEXT NOT NULL,
    delivered_at REAL NOT NULL,
    digest TEXT,
    PRIMARY KEY (account, folder, uidvalidity, uid)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS digests (
    account TEXT NOT NULL,
    folder TEXT NOT NULL,
    digest TEXT NOT NULL,
    PRIMARY KEY (account, folder, digest)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS partial (
    account TEXT NOT NULL,
    folder TEXT NOT NULL,
    uidvalidity INTEGER NOT NULL,
    uid TEXT NOT NULL,
    recipient TEXT NOT NULL,
    PRIMARY KEY (account, folder, uidvalidity, uid, recipient)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS rejected (
    account TEXT NOT NULL,
    folder TEXT NOT NULL,
    uidvalidity INTEGER NOT NULL,
    uid TEXT NOT NULL,
    code INTEGER NOT NULL,
    reason TEXT NOT NULL,
    rejected_at REAL NOT NULL,
    PRIMARY KEY (account, folder, uidvalidity, uid)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS noticed (
    account TEXT NOT NULL,
    folder TEXT NOT NULL,
    uidvalidity INTEGER NOT NULL,
    uid TEXT NOT NULL,
    what TEXT NOT NULL,
    PRIMARY KEY (account, folder, uidvalidity, uid, what)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS uncertain (
    account TEXT NOT NULL,
    digest TEXT NOT NULL,
    folder TEXT NOT NULL,
    uid TEXT NOT NULL,
    ident TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (account, digest)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS polls (
    account TEXT PRIMARY KEY,
    started REAL NOT NULL,
    seconds REAL NOT NULL,
    ok INTEGER NOT NULL,
    summary TEXT NOT NULL,
    error TEXT,
    last_ok REAL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS daemon (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    pid INTEGER NOT NULL,
    started REAL NOT NULL,
    heartbeat REAL NOT NULL,
    config TEXT NOT NULL,
    accounts INTEGER NOT NULL,
    reload_error TEXT
);
CREATE TABLE IF NOT EXISTS folders (
    account TEXT NOT NULL,
    folder TEXT NOT NULL,
    uidvalidity INTEGER NOT NULL,
    PRIMARY KEY (account, folder)
) WITHOUT ROWID;
"""


_ACCOUNT_TABLES = (
    "seen",
    "digests",
    "partial",
    "rejected",
    "noticed",
    "uncertain",
    "polls",
    "folders",
)


_SeenRow = tuple[str, str, int, str, float, str | None]


# A message the server sent broken is noted once an hour as "unreadable <hour>"; kept on the
# server for that reason, its row in `rejected` has this code (refusals have the MTA's, 0 is
# held after the MTA went silent).
UNREADABLE_NOTE = "unreadable "
BROKEN_CODE = -1


def content_digest(content: bytes) -> str:
    """What recognises a message's bytes after its UID changed (SHA-256, 128 bits kept)."""
    return hashlib.sha256(content).hexdigest()[:32]


class State:
    """The state database. Open with :meth:`open`, close with :meth:`close`."""

    def __init__(self, path: str, db: sqlite3.Connection, executor: ThreadPoolExecutor) -> None:
        self.path = path
        self._db = db
        self._executor = executor
        self._lock: int | None = None
        # Deliveries recorded by many pollers at once share one transaction (group commit).
        self._records: list[tuple[_SeenRow, bytes | None, asyncio.Future[None]]] = []
        self._committer: asyncio.Task[None] | None = None
        # Partial deliveries are rare: while none was ever stored, delivered_to() need not ask.
        self._partials = True

    @classmethod
    async def open(cls, path: str, *, lock: bool = False) -> State:
        """Open (creating it if needed). With ``lock``, hold ``PATH.lock`` until closed, so a
        second fetchd on the same state file refuses to start (StateBusy)."""
        fd = _lock(path) if lock else None
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fetchd-state")
        loop = asyncio.get_running_loop()
        try:
            db = await loop.run_in_executor(executor, _connect, path)
        except BaseException:
            executor.shutdown(wait=False)
            if fd is not None:
                os.close(fd)
            raise
        state = cls(path, db, executor)
        state._lock = fd
        state._partials = await state._run(
            lambda db: db.execute("SELECT 1 FROM partial LIMIT 1").fetchone() is not None
        )
        return state

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, self._db)

    async def close(self) -> None:
        if self._committer is not None:
            await asyncio.wait([self._committer])  # what record() has in hand is committed first
        if self._records:  # the committer was cancelled with records still waiting
            await self._commit_records()
        await self._run(lambda db: db.close())
        self._executor.shutdown(wait=True)
        if self._lock is not None:
            os.close(self._lock)  # releases the lock
            self._lock = None

    async def rename_account(self, old: str, new: str) -> None:
        """Carry an account's state over to its new name (a rename in the configuration)."""

        def q(db: sqlite3.Connection) -> None:
            with db:
                for table in _ACCOUNT_TABLES:
                    db.execute(
                        f"UPDATE OR REPLACE {table} SET account=? WHERE account=?",  # noqa: S608
                        (new, old),
                    )

        await self._run(q)

    async def record_poll(
        self, account: str, seconds: float, ok: bool, summary: str, error: str | None
    ) -> None:
        """The latest poll of an account, for `fetchd status`."""
        now = time.time()

        def q(db: sqlite3.Connection) -> None:
            with db:
                db.execute(
                    "INSERT INTO polls VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(account) DO UPDATE "
                    "SET started=excluded.started, seconds=excluded.seconds, ok=excluded.ok, "
                    "summary=excluded.summary, error=excluded.error, "
                    "last_ok=coalesce(excluded.last_ok, polls.last_ok)",
                    (account, now - seconds, seconds, ok, summary, error, now if ok else None),
                )

        await self._run(q)

    async def daemon_alive(
        self, config: str, accounts: int, reload_error: str | None, *, started: bool = False
    ) -> None:
        """The daemon's heartbeat: `fetchd health` and `fetchd status` read it."""
        now, pid = time.time(), os.getpid()

        def q(db: sqlite3.Connection) -> None:
            with db:
                if started:
                    db.execute("DELETE FROM daemon")
                    db.execute(
                        "INSERT INTO daemon VALUES (1, ?, ?, ?, ?, ?, ?)",
                        (pid, now, now, config, accounts, reload_error),
                    )
                else:
                    db.execute(
                        "UPDATE daemon SET heartbeat=?, config=?, accounts=?, reload_error=? "
                        "WHERE id=1 AND pid=?",
                        (now, config, accounts, reload_error, pid),
                    )

        await self._run(q)

    async def daemon_stopped(self) -> None:
        pid = os.getpid()

        def q(db: sqlite3.Connection) -> None:
            with db:
                db.execute("DELETE FROM daemon WHERE pid=?", (pid,))

        await self._run(q)

    async def seen(self, account: str, folder: str, uidvalidity: int) -> set[str]:
        def q(db: sqlite3.Connection) -> set[str]:
            rows = db.execute(
                "SELECT uid FROM seen WHERE account=? AND folder=? AND uidvalidity=?",
                (account, folder, uidvalidity),
            )
            return {r[0] for r in rows}

        return await self._run(q)

    async def record(
        self,
        account: str,
        folder: str,
        uidvalidity: int,
        uid: str,
        digest: str | None = None,
        *,
        content: bytes | None = None,
    ) -> None:
        """Remember a delivered message; committed when this returns. The digest of its bytes
        lets a folder whose UIDVALIDITY changed be fetched again without duplicates: given, or
        computed from ``content`` in the database thread, where hashing (which releases the
        GIL) runs beside the event loop instead of in it."""
        done = asyncio.get_running_loop().create_future()
        row = (account, folder, uidvalidity, uid, time.time(), digest)
        self._records.append((row, content, done))
        if self._committer is None or self._committer.done():
            self._committer = asyncio.create_task(self._commit_records())
        await done

    async def _commit_records(self) -> None:
        """Commit every record() waiting, in one transaction, until none is left: with 200
        accounts delivering at once, one commit serves many messages."""
        while self._records:
            batch, self._records = self._records, []
            todo = [(row, content) for row, content, _ in batch]

            def q(db: sqlite3.Connection, todo: list[tuple[_SeenRow, bytes | None]] = todo) -> None:
                rows = [
                    row if content is None or row[5] else (*row[:5], content_digest(content))
                    for row, content in todo
                ]
                with db:
                    db.executemany("INSERT OR REPLACE INTO seen VALUES (?, ?, ?, ?, ?, ?)", rows)
                    if self._partials:
                        db.executemany(
                            "DELETE FROM partial "
                            "WHERE account=? AND folder=? AND uidvalidity=? AND uid=?",
                            [row[:4] for row in rows],
                        )

            try:
                await self._run(q)
            except asyncio.CancelledError:
                for _, _, done in batch:
                    done.cancel()
                raise
            except Exception as e:  # each waiter hears of it; none is told "committed"
                # Each its own copy, without a traceback: the frames a shared one collects
                # hold every message of the batch (other accounts' mail) until the next poll.
                for _, _, done in batch:
                    if not done.done():
                        done.set_exception(copy.copy(e).with_traceback(None))
            else:
                for _, _, done in batch:
                    if not done.done():
                        done.set_result(None)

    async def delivered_to(self, account: str, folder: str, uidvalidity: int, uid: str) -> set[str]:
        """Recipients that already accepted a message not yet delivered to all of them."""

        if not self._partials:
            return set()

        def q(db: sqlite3.Connection) -> set[str]:
            rows = db.execute(
                "SELECT recipient FROM partial WHERE account=? AND folder=? AND uidvalidity=? "
                "AND uid=?",
                (account, folder, uidvalidity, uid),
            )
            return {r[0] for r in rows}

        return await self._run(q)

    async def record_partial(
        self, account: str, folder: str, uidvalidity: int, uid: str, recipients: Iterable[str]
    ) -> None:
        """Remember recipients that accepted, so a retry goes only to the others."""
        rows = [(account, folder, uidvalidity, uid, r) for r in recipients]
        if rows:
            self._partials = True

        def q(db: sqlite3.Connection) -> None:
            with db:
                db.executemany("INSERT OR REPLACE INTO partial VALUES (?, ?, ?, ?, ?)", rows)

        if rows:
            await self._run(q)

    async def rejected(self, account: str, folder: str, uidvalidity: int) -> set[str]:
        """Messages the MTA refused for good and that are kept on the server."""

        def q(db: sqlite3.Connection) -> set[str]:
            rows = db.execute(
                "SELECT uid FROM rejected WHERE account=? AND folder=? AND uidvalidity=?",
                (account, folder, uidvalidity),
            )
            return {r[0] for r in rows}

        return await self._run(q)

    async def record_rejected(
        self, account: str, folder: str, uidvalidity: int, uid: str, code: int, reason: str
    ) -> None:
        now = time.time()

        def q(db: sqlite3.Connection) -> None:
            with db:
                db.execute(
                    "INSERT OR REPLACE INTO rejected VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (account, folder, uidvalidity, uid, code, reason, now),
                )

        await self._run(q)

    async def forget(
        self, account: str, folder: str, uidvalidity: int, uids: Iterable[str]
    ) -> None:
        """Drop UIDs that are no longer on the server."""
        items = [(account, folder, uidvalidity, uid) for uid in uids]
        if not items:
            return

        def q(db: sqlite3.Connection) -> None:
            with db:
                for table in ("seen", "partial", "rejected", "noticed"):
                    db.executemany(
                        f"DELETE FROM {table} WHERE account=? AND folder=? AND uidvalidity=? "  # noqa: S608
                        "AND uid=?",
                        items,
                    )

        await self._run(q)

    async def known_digests(self, account: str, folder: str) -> set[str]:
        """Digests of messages delivered from this folder before its UIDVALIDITY changed."""

        def q(db: sqlite3.Connection) -> set[str]:
            rows = db.execute(
                "SELECT digest FROM digests WHERE account=? AND folder=?", (account, folder)
            )
            return {r[0] for r in rows}

        return await self._run(q)

    async def forget_digests(self, account: str, folder: str) -> None:
        """Once every message of a folder was seen under its new UIDVALIDITY."""

        def q(db: sqlite3.Connection) -> None:
            with db:
                db.execute("DELETE FROM digests WHERE account=? AND folder=?", (account, folder))

        await self._run(q)

    async def record_many(
        self, account: str, folder: str, uidvalidity: int, uids: list[str]
    ) -> None:
        """Mark messages as delivered without delivering them (a re-baseline)."""
        now = time.time()
        rows = [(account, folder, uidvalidity, uid, now, None) for uid in uids]

        def q(db: sqlite3.Connection) -> None:
            with db:
                db.executemany("INSERT OR IGNORE INTO seen VALUES (?, ?, ?, ?, ?, ?)", rows)

        await self._run(q)

    async def delivered_before(
        self, account: str, folder: str, uidvalidity: int, cutoff: float
    ) -> set[str]:
        """Messages delivered before ``cutoff`` (a time.time() value)."""

        def q(db: sqlite3.Connection) -> set[str]:
            rows = db.execute(
                "SELECT uid FROM seen WHERE account=? AND folder=? AND uidvalidity=? "
                "AND delivered_at<?",
                (account, folder, uidvalidity, cutoff),
            )
            return {r[0] for r in rows}

        return await self._run(q)

    async def notice(
        self, account: str, folder: str, uidvalidity: int, uid: str, what: str
    ) -> bool:
        """Remember that something was said about a message; True the first time only."""

        def q(db: sqlite3.Connection) -> bool:
            with db:
                cursor = db.execute(
                    "INSERT OR IGNORE INTO noticed VALUES (?, ?, ?, ?, ?)",
                    (account, folder, uidvalidity, uid, what),
                )
            return cursor.rowcount == 1

        return await self._run(q)

    async def noticed(self, account: str, folder: str, uidvalidity: int) -> set[str]:
        """UIDs something was said about (a size warning, a broken copy), to be forgotten
        with the others once the message left the server."""

        def q(db: sqlite3.Connection) -> set[str]:
            rows = db.execute(
                "SELECT DISTINCT uid FROM noticed WHERE account=? AND folder=? AND uidvalidity=?",
                (account, folder, uidvalidity),
            )
            return {r[0] for r in rows}

        return await self._run(q)

    async def notices(
        self, account: str, folder: str, uidvalidity: int, uid: str, prefix: str
    ) -> int:
        """How many different things starting with ``prefix`` were said about a message."""

        def q(db: sqlite3.Connection) -> int:
            row = db.execute(
                "SELECT count(*) FROM noticed WHERE account=? AND folder=? AND uidvalidity=? "
                "AND uid=? AND substr(what, 1, ?)=?",
                (account, folder, uidvalidity, uid, len(prefix), prefix),
            ).fetchone()
            return int(row[0])

        return await self._run(q)

    async def uidvalidity(self, account: str, folder: str) -> int | None:
        def q(db: sqlite3.Connection) -> int | None:
            row = db.execute(
                "SELECT uidvalidity FROM folders WHERE account=? AND folder=?", (account, folder)
            ).fetchone()
            return None if row is None else int(row[0])

        return await self._run(q)

    async def set_uidvalidity(self, account: str, folder: str, uidvalidity: int) -> None:
        """Start tracking a folder under a new UIDVALIDITY; UIDs under the old one are void."""

        def q(db: sqlite3.Connection) -> None:
            with db:
                db.execute(
                    "INSERT OR REPLACE INTO folders VALUES (?, ?, ?)",
                    (account, folder, uidvalidity),
                )
                # What was delivered under the old UIDVALIDITY stays known by its digest.
                db.execute("DELETE FROM digests WHERE account=? AND folder=?", (account, folder))
                db.execute(
                    "INSERT OR IGNORE INTO digests SELECT account, folder, digest FROM seen "
                    "WHERE account=? AND folder=? AND uidvalidity<>? AND digest IS NOT NULL",
                    (account, folder, uidvalidity),
                )
                for table in ("seen", "partial", "rejected", "noticed"):
                    db.execute(
                        f"DELETE FROM {table} WHERE account=? AND folder=? "  # noqa: S608
                        "AND uidvalidity<>?",
                        (account, folder, uidvalidity),
                    )

        await self._run(q)

    async def record_uncertain(
        self, account: str, folder: str, uid: str, digest: str, ident: str
    ) -> None:
        """Remember a message the MTA went silent on after it was sent (after_timeout: dedupe)."""
        row = (account, digest, folder, uid, ident, time.time())

        def q(db: sqlite3.Connection) -> None:
            with db:
                db.execute("INSERT OR REPLACE INTO uncertain VALUES (?, ?, ?, ?, ?, ?)", row)

        await self._run(q)

    async def uncertain_since(self, account: str, digest: str, window: float) -> float | None:
        """When the MTA went silent on this message, if that was less than ``window`` ago.

        Older entries are dropped on the way.
        """
        cutoff = time.time() - window

        def q(db: sqlite3.Connection) -> float | None:
            with db:
                db.execute("DELETE FROM uncertain WHERE account=? AND at<?", (account, cutoff))
                row = db.execute(
                    "SELECT at FROM uncertain WHERE account=? AND digest=?", (account, digest)
                ).fetchone()
            return None if row is None else float(row[0])

        return await self._run(q)


def _connect(path: str) -> sqlite3.Connection:
    directory = os.path.dirname(path)
    try:
        if directory:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        db.isolation_level = "DEFERRED"
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")  # durable across a process crash
        db.execute("PRAGMA busy_timeout=5000")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise ConfigError(
                f"state file {path} was written by a newer fetchd (schema {version}); "
                "refusing to touch it"
            )
        with db:
            db.executescript(_SCHEMA)
            columns = {row[1] for row in db.execute("PRAGMA table_info(seen)")}
            if "digest" not in columns:  # written by an older fetchd
                db.execute("ALTER TABLE seen ADD COLUMN digest TEXT")
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    except sqlite3.Error as e:
        raise ConfigError(f"cannot open state file {path}: {e}") from None
    except OSError as e:
        raise ConfigError(f"cannot create state directory {directory}: {e.strerror}") from None
    return db


def _lock(path: str) -> int:
    """Take ``PATH.lock`` (flock, released when the process dies) and write our pid in it."""
    lock_path = os.path.realpath(path) + ".lock"  # one lock per database, however it is named
    directory = os.path.dirname(lock_path)
    try:
        if directory:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NOCTTY
        fd = os.open(lock_path, flags, 0o600)
    except OSError as e:
        raise ConfigError(f"cannot create the lock file {lock_path}: {e.strerror}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
        os.close(fd)
        raise ConfigError(f"{lock_path} is not a regular file of this user: refusing to use it")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise StateBusy(
            f"another fetchd (pid {holder}) is using the state file {path}; "
            "two must never work the same accounts"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


@dataclass(frozen=True, slots=True)
class AccountStatus:
    account: str
    started: float | None = None
    seconds: float | None = None
    ok: bool | None = None
    summary: str = ""
    error: str | None = None
    last_ok: float | None = None
    refused: int = 0  # kept on the server after a permanent refusal
    held: int = 0  # kept after the MTA went silent (after_timeout: dedupe)
    broken: int = 0  # kept because the server sent it broken, poll after poll
    reasons: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class DaemonStatus:
    pid: int
    started: float
    heartbeat: float
    config: str
    accounts: int
    reload_error: str | None


def release(path: str, accounts: Iterable[str]) -> dict[str, int]:
    """Forget why mail was kept on the server (refused by the MTA, held after it went silent,
    sent broken), so the next poll fetches it again: for `fetchd release`, after the cause was
    dealt with. Works beside a running daemon; returns how many messages each account had.

    Only the owner of the state file may do it: a write by another user (root) could leave
    journal files the daemon cannot open.
    """
    if not os.path.exists(path):
        raise ConfigError(f"no state file at {path}: fetchd has not run with this configuration")
    owner = os.stat(path).st_uid
    if os.geteuid() != owner:
        try:
            name = pwd.getpwuid(owner).pw_name
        except KeyError:
            name = str(owner)
        raise ConfigError(
            f"the state file {path} belongs to user {name}: run this as that user "
            f"(runuser -u {name} -- fetchd release ...)"
        )
    released: dict[str, int] = {}
    try:
        db = sqlite3.connect(path, timeout=10)
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version != SCHEMA_VERSION:
                raise ConfigError(f"state file {path} has schema {version}, not {SCHEMA_VERSION}")
            with db:
                for account in accounts:
                    cursor = db.execute("DELETE FROM rejected WHERE account=?", (account,))
                    released[account] = released.get(account, 0) + cursor.rowcount
                    db.execute(
                        "DELETE FROM noticed WHERE account=? AND substr(what, 1, ?)=?",
                        (account, len(UNREADABLE_NOTE), UNREADABLE_NOTE),
                    )
                    # after_timeout: dedupe would hold a released message again at once
                    db.execute("DELETE FROM uncertain WHERE account=?", (account,))
        finally:
            db.close()
    except sqlite3.Error as e:
        raise ConfigError(f"cannot change the state file {path}: {e}") from None
    return released


def snapshot(path: str) -> tuple[DaemonStatus | None, dict[str, AccountStatus]]:
    """Read the state for `fetchd status` and `fetchd health`, without writing to it.

    Opened read-only so an admin running this as root never leaves root-owned files next to
    the daemon's database.
    """
    if not os.path.exists(path):
        raise ConfigError(f"no state file at {path}: fetchd has not run with this configuration")
    try:
        db = sqlite3.connect(f"file:{quote(path)}?mode=ro", uri=True)
        try:
            return _snapshot(db)
        finally:
            db.close()
    except sqlite3.Error:
        pass
    try:  # no -shm file we may use (a stopped daemon, another user): read the file as it is
        db = sqlite3.connect(f"file:{quote(path)}?immutable=1", uri=True)
        try:
            return _snapshot(db)
        finally:
            db.close()
    except sqlite3.Error as e:
        raise ConfigError(f"cannot read the state file {path}: {e}") from None


def _snapshot(db: sqlite3.Connection) -> tuple[DaemonStatus | None, dict[str, AccountStatus]]:
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version < 5:
        return None, {}
    row = db.execute(
        "SELECT pid, started, heartbeat, config, accounts, reload_error FROM daemon"
    ).fetchone()
    daemon = DaemonStatus(*row) if row else None
    accounts: dict[str, AccountStatus] = {}
    for r in db.execute("SELECT account, started, seconds, ok, summary, error, last_ok FROM polls"):
        accounts[r[0]] = AccountStatus(r[0], r[1], r[2], bool(r[3]), r[4], r[5], r[6])
    kept: dict[str, list[tuple[int, str]]] = {}
    for name, code, reason in db.execute(
        "SELECT account, code, reason FROM rejected ORDER BY rejected_at"
    ):
        kept.setdefault(name, []).append((code, reason))
    for name, items in kept.items():
        base = accounts.get(name, AccountStatus(name))
        accounts[name] = replace(
            base,
            refused=sum(1 for code, _ in items if code > 0),
            held=sum(1 for code, _ in items if code == 0),
            broken=sum(1 for code, _ in items if code == BROKEN_CODE),
            reasons=tuple(reason for _, reason in items),
        )
    return daemon, accounts
