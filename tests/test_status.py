"""`fetchd status` and `fetchd health` read the state alone, even with a broken configuration."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fetchd.config import state_file_of
from fetchd.errors import StateBusy
from fetchd.state import AccountStatus, State
from fetchd.status import _kept, health, status


@pytest.mark.parametrize(
    "text",
    [
        "state_file: s.db\naccounts: [{name: a}]\n",
        "state_file: 's.db'  # here\naccounts: [ {name: broken\n",  # being edited: not YAML
    ],
)
def test_state_file_is_found_without_reading_the_accounts(tmp_path: Path, text: str) -> None:
    path = tmp_path / "fetchd.yaml"
    path.write_text(text)
    assert state_file_of(str(path), {}) == str(tmp_path / "s.db")


async def test_status_and_health_tell_what_the_state_knows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = str(tmp_path / "state.sqlite3")
    state = await State.open(db, lock=True)
    try:
        with pytest.raises(StateBusy, match=f"another fetchd \\(pid {os.getpid()}\\)"):
            await State.open(db, lock=True)
        await state.daemon_alive("fetchd.yaml", 2, "fetchd.yaml:3: \x1b[2Jbad", started=True)
        await state.record_poll("ok-acct", 1.5, True, "3 delivered", None)
        await state.record_poll("bad-acct", 0.2, False, "", "password refused [u at h:995]")
        await state.record_rejected("ok-acct", "", 0, "u1", 554, "refused: spam")
        await state.record_rejected("ok-acct", "", 0, "u2", -1, "u2 came broken in 3 polls")
        assert health(db) == 0
        assert status(db, ["ok-acct", "bad-acct", "new-acct"]) == 0
        out = capsys.readouterr().out
        lines = out.splitlines()
        assert lines[0].startswith(f"ok: fetchd (pid {os.getpid()}) running")
        assert "last reload FAILED" in out and "\x1b" not in out, "terminal escapes are cut"
        assert lines[3].split()[:2] == ["ACCOUNT", "LAST"]
        assert lines[4].split()[0] == "ok-acct" and " ok " in lines[4]
        assert "3 delivered" in lines[4] and lines[4].split()[6] == "1+1", "one refused, one broken"
        assert "FAILED" in lines[5] and "password refused" in lines[5]
        assert lines[6].split()[:2] == ["new-acct", "never"]
        assert "ok-acct: refused: spam" in out and "ok-acct: u2 came broken" in out
        await state.daemon_stopped()
        assert health(db) == 1
        assert "no fetchd daemon is running" in capsys.readouterr().out
    finally:
        await state.close()
    assert health(str(tmp_path / "missing.sqlite3")) == 1


def test_kept_column_counts_each_kind() -> None:
    assert _kept(None) == "-"
    assert _kept(AccountStatus("a", refused=1, held=2, broken=3)) == "1+2 held+3 broken"
    assert _kept(AccountStatus("a", broken=2)) == "2 broken", "no refused count of 0"
