"""The state database on its own: group commit and the partial-delivery shortcut."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
from pathlib import Path

import pytest

from fetchd.state import State


async def test_records_made_at_once_are_all_committed(tmp_path: Path) -> None:
    path = str(tmp_path / "state.db")
    state = await State.open(path)
    await asyncio.gather(*(state.record("a", "INBOX", 7, str(uid), "d") for uid in range(200)))
    # Committed when record() returns: another connection sees every row at once.
    with sqlite3.connect(path) as other:
        assert other.execute("SELECT count(*) FROM seen").fetchone() == (200,)
    await state.close()


async def test_the_digest_of_the_content_is_stored(tmp_path: Path) -> None:
    """Given the message bytes, the state hashes them (in its own thread): the digest that
    recognises the message after a UIDVALIDITY change is the SHA-256 of exactly those bytes."""
    path = str(tmp_path / "state.db")
    state = await State.open(path)
    body = b"Subject: x\r\n\r\n" + bytes(range(256)) * 100
    await asyncio.gather(
        state.record("a", "INBOX", 7, "1", content=body),
        state.record("a", "INBOX", 7, "2", "given", content=body),  # a given digest stands
        state.record("a", "INBOX", 7, "3"),
    )
    with sqlite3.connect(path) as db:
        rows = dict(db.execute("SELECT uid, digest FROM seen WHERE uidvalidity=7").fetchall())
    digest = hashlib.sha256(body).hexdigest()[:32]
    assert rows == {"1": digest, "2": "given", "3": None}
    await state.set_uidvalidity("a", "INBOX", 8)  # the UIDs are void, the digests stay known
    assert await state.known_digests("a", "INBOX") == {digest, "given"}
    await state.close()


async def test_close_commits_the_records_in_hand(tmp_path: Path) -> None:
    path = str(tmp_path / "state.db")
    state = await State.open(path)
    pending = [asyncio.create_task(state.record("a", "INBOX", 7, str(uid))) for uid in range(50)]
    await asyncio.sleep(0)  # the records are queued, not yet committed
    await state.close()
    await asyncio.gather(*pending)
    state = await State.open(path)
    assert await state.seen("a", "INBOX", 7) == {str(uid) for uid in range(50)}
    await state.close()


async def test_a_failed_commit_fails_every_record_in_it(tmp_path: Path) -> None:
    path = str(tmp_path / "state.db")
    state = await State.open(path)
    await state._run(lambda db: db.execute("DROP TABLE seen"))  # every insert now fails
    results = await asyncio.gather(
        *(state.record("a", "INBOX", 7, str(uid)) for uid in range(10)), return_exceptions=True
    )
    assert all(isinstance(r, sqlite3.OperationalError) for r in results), results
    await state.close()


async def test_a_failed_commit_does_not_keep_the_other_messages_bytes(tmp_path: Path) -> None:
    """The error every waiter of a group commit gets must not carry, in its traceback, the
    bytes of the other messages in that commit (other accounts' mail, held until the next
    poll of each failed account)."""
    state = await State.open(str(tmp_path / "state.db"))
    await state._run(lambda db: db.execute("DROP TABLE seen"))
    bodies = [bytes([n]) * 100_000 for n in range(3)]
    results = await asyncio.gather(
        *(state.record("a", "INBOX", 7, str(n), content=b) for n, b in enumerate(bodies)),
        return_exceptions=True,
    )
    await state.close()
    error = results[0]
    assert isinstance(error, sqlite3.OperationalError)
    reachable: list[object] = []
    tb = error.__traceback__
    while tb is not None:
        for value in tb.tb_frame.f_locals.values():
            reachable.append(value)
            if isinstance(value, list | tuple):
                reachable += [y for x in value for y in (x if isinstance(x, tuple) else (x,))]
        tb = tb.tb_next
    assert not any(v is bodies[1] or v is bodies[2] for v in reachable)


@pytest.mark.parametrize("reopen", [False, True])
async def test_partial_deliveries_are_found_also_from_an_earlier_run(
    tmp_path: Path, reopen: bool
) -> None:
    path = str(tmp_path / "state.db")
    state = await State.open(path)
    assert await state.delivered_to("a", "INBOX", 7, "1") == set()
    await state.record_partial("a", "INBOX", 7, "1", ["x@test"])
    if reopen:
        await state.close()
        state = await State.open(path)
    assert await state.delivered_to("a", "INBOX", 7, "1") == {"x@test"}
    await state.record("a", "INBOX", 7, "1")
    assert await state.delivered_to("a", "INBOX", 7, "1") == set(), "done: no longer partial"
    await state.close()
