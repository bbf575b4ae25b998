from __future__ import annotations

import asyncio
import os
import shutil
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from fetchd.config import Account, Secret, load
from fetchd.errors import ConfigError, PermanentError, TemporaryError
from fetchd.poller import Poller
from fetchd.state import State

REPO = Path(__file__).parent.parent


def write(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "fetchd.yaml"
    path.write_text(textwrap.dedent(text))
    os.chmod(path, mode)
    return path


BASE = """\
defaults:
  deliver:
    smtp: "127.0.0.1:2525"
    to: [postmaster@localhost]
accounts:
  - name: alice
    protocol: imap
    host: imap.example.net
    user: alice
    password_env: ALICE_PW
"""


def test_the_bundled_example_is_valid(tmp_path: Path) -> None:
    example = tmp_path / "fetchd.yaml"
    shutil.copy(REPO / "config" / "fetchd.example.yaml", example)
    (tmp_path / "bob.password").write_text("bob-secret\n")
    os.chmod(tmp_path / "bob.password", 0o600)
    os.chmod(example, 0o600)
    config = load(example, environ={"ALICE_PASSWORD": "alice-secret"})
    assert [a.name for a in config.accounts] == ["alice-imap", "bob-pop3"]
    alice, bob = config.accounts
    assert alice.password.reveal() == "alice-secret"
    assert bob.password.reveal() == "bob-secret"
    assert (alice.port, alice.tls.mode) == (993, "implicit")
    assert (bob.port, bob.tls.mode) == (110, "starttls")


def test_defaults_are_inherited_and_nested_mappings_merge(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        BASE
        + """\
  - name: bob
    protocol: pop3
    host: pop.example.net
    user: bob
    password: inline
    tls: {mode: starttls}
    deliver: {to: [bob@localhost]}
    keep: true
""",
    )
    config = load(path, environ={"ALICE_PW": "pw"})
    alice, bob = config.accounts
    assert alice.deliver.to == ("postmaster@localhost",)
    assert (bob.deliver.host, bob.deliver.port) == ("127.0.0.1", 2525)
    assert bob.deliver.to == ("bob@localhost",)
    assert (bob.port, bob.tls.mode, bob.keep) == (110, "starttls", True)
    assert alice.folders == ("INBOX",) and not alice.keep
    assert alice == load(path, environ={"ALICE_PW": "pw"}).accounts[0], "equal by value"


@pytest.mark.parametrize(
    ("port", "mode", "expected"),
    [
        (None, None, (993, "implicit")),
        (143, None, (143, "starttls")),
        (993, None, (993, "implicit")),
        (None, "starttls", (143, "starttls")),
        (10143, None, (10143, "starttls")),
    ],
)
def test_port_and_tls_mode_default_from_each_other(
    tmp_path: Path, port: int | None, mode: str | None, expected: tuple[int, str]
) -> None:
    extra = (f"    port: {port}\n" if port else "") + (
        f"    tls: {{mode: {mode}}}\n" if mode else ""
    )
    config = load(write(tmp_path, BASE + extra), environ={"ALICE_PW": "pw"})
    assert (config.accounts[0].port, config.accounts[0].tls.mode) == expected


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            "    prot: 1\n",
            r"fetchd.yaml:11: accounts\[0\].prot: unknown key \(did you mean 'port'\?\)",
        ),
        ("    port: 70000\n", r":11: accounts\[0\].port: must be between 1 and 65535"),
        ("    port: '993'\n", r":11: accounts\[0\].port: must be a whole number, not '993'"),
        ("    keep: maybe\n", r":11: accounts\[0\].keep: must be true or false"),
        (
            "    tls: {mode: ssl}\n",
            r":11: accounts\[0\].tls.mode: must be one of implicit, starttls, none",
        ),
        ("    tls: {mode: none}\n", r"tls.mode: no TLS sends the password unencrypted"),
        ("    tls: {ca_file: /nonexistent/ca.pem}\n", r"tls.ca_file: no such file"),
        ("    folders: []\n", r"folders: must not be an empty list"),
        ("    deliver: {smtp: 'a b:c'}\n", r"deliver.smtp: must be host or host:port"),
        ("    deliver: {to: ['not an address']}\n", r"deliver.to: item 0 is not a mail address"),
        ("    password: also\n", r"give only one of"),
        ("    interval: 0\n", r"interval: must be between 1 and"),
        ("    port: 143\n    tls: {mode: implicit}\n", r"port: port 143 is for STARTTLS but"),
        ("    port: 995\n    tls: {mode: starttls}\n", r"port: port 995 is for implicit TLS"),
    ],
)
def test_bad_values_name_file_line_and_key_path(tmp_path: Path, extra: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(write(tmp_path, BASE + extra), environ={"ALICE_PW": "pw"})


def test_errors_in_defaults_point_at_defaults(tmp_path: Path) -> None:
    text = BASE.replace("defaults:\n", "defaults:\n  timeout: -1\n")
    with pytest.raises(ConfigError, match=r"fetchd.yaml:2: accounts\[0\].timeout: must be between"):
        load(write(tmp_path, text), environ={"ALICE_PW": "pw"})
    text = BASE.replace("defaults:\n", "defaults:\n  name: x\n")
    with pytest.raises(ConfigError, match=r":2: defaults.name: cannot be set in defaults"):
        load(write(tmp_path, text), environ={"ALICE_PW": "pw"})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "the file is empty"),
        ("accounts: [\n", "not valid YAML"),
        ("accounts: []\n", "lists no account"),
        ("acounts: []\n", "must be a list of accounts"),
        ("state_file: x\nstate_file: y\naccounts: []\n", r":2: state_file: given twice"),
        (BASE.replace("  - name: alice", "  - name: alice\n    pop: 1"), r"unknown key"),
    ],
)
def test_structural_errors(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(write(tmp_path, text), environ={"ALICE_PW": "pw"})


def test_pop3_has_no_folders_and_names_are_unique(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="POP3 has no folders"):
        load(
            write(
                tmp_path, BASE.replace("protocol: imap", "protocol: pop3") + "    folders: [x]\n"
            ),
            environ={"ALICE_PW": "pw"},
        )
    twice = BASE + BASE.split("accounts:\n")[1]
    with pytest.raises(ConfigError, match="account name 'alice' is used twice"):
        load(write(tmp_path, twice), environ={"ALICE_PW": "pw"})


def test_password_sources(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="environment variable ALICE_PW is not set"):
        load(write(tmp_path, BASE), environ={})
    secret = tmp_path / "alice.pw"
    secret.write_text("s3cret\n")
    os.chmod(secret, 0o600)
    text = BASE.replace("password_env: ALICE_PW", "password_file: alice.pw")
    assert load(write(tmp_path, text)).accounts[0].password == Secret("s3cret")
    os.chmod(secret, 0o644)
    with pytest.raises(ConfigError, match=r"alice\.pw is readable or writable by everyone"):
        load(write(tmp_path, text))
    text = BASE.replace("password_env: ALICE_PW", "password: inline")
    assert load(write(tmp_path, text, mode=0o640)).accounts[0].password.reveal() == "inline"
    with pytest.raises(ConfigError, match="holds a password and is readable by everyone"):
        load(write(tmp_path, text, mode=0o644))


def test_a_password_in_defaults_also_needs_a_file_others_cannot_read(tmp_path: Path) -> None:
    text = BASE.replace("defaults:\n", "defaults:\n  password: inline\n")
    text = text.replace("    password_env: ALICE_PW\n", "")
    assert load(write(tmp_path, text, mode=0o640)).accounts[0].password.reveal() == "inline"
    with pytest.raises(ConfigError, match=r":2: defaults.password: the file holds a password"):
        load(write(tmp_path, text, mode=0o644))


def test_secrets_stay_out_of_reprs(tmp_path: Path) -> None:
    text = BASE.replace("password_env: ALICE_PW", "password: hunter2")
    config = load(write(tmp_path, text))
    assert "hunter2" not in repr(config)
    assert "hunter2" not in str(config.accounts[0].password)


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    config = load(
        write(tmp_path, "state_file: state/db.sqlite3\n" + BASE), environ={"ALICE_PW": "p"}
    )
    assert config.state_file == str(tmp_path / "state" / "db.sqlite3")


def test_state_file_default_follows_systemd(tmp_path: Path) -> None:
    config = load(
        write(tmp_path, BASE), environ={"ALICE_PW": "p", "STATE_DIRECTORY": "/var/lib/fetchd"}
    )
    assert config.state_file == "/var/lib/fetchd/state.sqlite3"


def tls_of(tmp_path: Path, tls: str) -> object:
    text = BASE + f"    tls: {tls}\n"
    return load(write(tmp_path, text), environ={"ALICE_PW": "pw"})


def test_tls_versions_and_fetchmail_sslproto_words(tmp_path: Path) -> None:
    config = tls_of(tmp_path, "{min_version: 1.3}")
    assert config.accounts[0].tls.min_version == "TLSv1.3"  # type: ignore[attr-defined]
    config = tls_of(tmp_path, "{sslproto: 'tls1.2'}")
    tls = config.accounts[0].tls  # type: ignore[attr-defined]
    assert (tls.min_version, tls.max_version) == ("TLSv1.2", "TLSv1.2")
    config = tls_of(tmp_path, "{sslproto: 'tls1+'}")
    assert config.accounts[0].tls.min_version == "TLSv1"  # type: ignore[attr-defined]
    assert any("obsolete" in w for w in config.warnings)  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match=r"tls.sslproto: ssl3: SSL 2 and 3 are broken"):
        tls_of(tmp_path, "{sslproto: ssl3}")
    with pytest.raises(ConfigError, match=r"tls.min_version: sslv3: SSL 2 and 3 are broken"):
        tls_of(tmp_path, "{min_version: SSLv3}")
    with pytest.raises(ConfigError, match=r"tls.max_version: TLSv1.2 is older than min_version"):
        tls_of(tmp_path, "{min_version: '1.3', max_version: '1.2'}")
    with pytest.raises(ConfigError, match=r"no TLS sends the password unencrypted"):
        tls_of(tmp_path, "{sslproto: ''}")
    assert tls_of(tmp_path, "{sslproto: '', allow_plaintext: true}").accounts[0].tls.mode == "none"  # type: ignore[attr-defined]


def test_fetchmail_aliases_and_conflicts(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("x")
    tls = (
        tls_of(tmp_path, "{sslcertck: false, sslcertfile: ca.pem, sslcommonname: mail.example.net}")
        .accounts[0]
        .tls
    )  # type: ignore[attr-defined]
    assert (tls.verify, tls.ca_file, tls.server_name) == (
        False,
        str(tmp_path / "ca.pem"),
        "mail.example.net",
    )
    assert tls.system_ca is False, "a CA file replaces the system store, as in fetchmail"
    with pytest.raises(ConfigError, match=r"sslcertfile: is fetchmail's name for ca_file"):
        tls_of(tmp_path, "{sslcertfile: ca.pem, ca_file: ca.pem}")


@pytest.mark.parametrize(
    ("pin", "normal"),
    [
        ("6c:ad:be:5a:bf:67:ee:47:35:16:93:3d:c2:f7:55:c4", "md5:6CADBE5ABF67EE473516933DC2F755C4"),
        ("6CADBE5ABF67EE473516933DC2F755C4", "md5:6CADBE5ABF67EE473516933DC2F755C4"),
        ("{SHA256}" + "AB:" * 31 + "CD", "sha256:" + "AB" * 31 + "CD"),
        ("sha256:" + "ab" * 32, "sha256:" + "AB" * 32),
        ("sha1=" + "0a" * 20, "sha1:" + "0A" * 20),
        (
            "pin-sha256:qD+Tiurzoc1HWC56XxN56OjWeM29fvjwN74tgBmo9Ck=",
            "pin-sha256:qD+Tiurzoc1HWC56XxN56OjWeM29fvjwN74tgBmo9Ck=",
        ),
    ],
)
def test_fingerprint_forms_are_normalised(tmp_path: Path, pin: str, normal: str) -> None:
    tls = tls_of(tmp_path, f"{{fingerprints: ['{pin}']}}").accounts[0].tls  # type: ignore[attr-defined]
    assert tls.fingerprints == (normal,)


@pytest.mark.parametrize(
    "pin", ["AB:CD", "sha256:" + "AB" * 16, "pin-sha256:notbase64!", "zz" * 16]
)
def test_bad_fingerprints_are_errors(tmp_path: Path, pin: str) -> None:
    with pytest.raises(ConfigError, match=r"tls.fingerprints: item 0 is not a fingerprint"):
        tls_of(tmp_path, f"{{fingerprints: ['{pin}']}}")


def test_verify_off_without_pin_warns(tmp_path: Path) -> None:
    config = tls_of(tmp_path, "{verify: false}")
    assert any("verify is off and no fingerprint" in w for w in config.warnings)  # type: ignore[attr-defined]


# -- password_command --------------------------------------------------------------------------


def script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return path


@pytest.fixture
async def state(tmp_path: Path) -> AsyncIterator[State]:
    opened = await State.open(str(tmp_path / "state.sqlite3"))
    yield opened
    await opened.close()


def with_command(tmp_path: Path, command: str, extra: str = "", **env: str) -> Account:
    text = BASE.replace("password_env: ALICE_PW", f"password_command: {command}") + extra
    return load(write(tmp_path, text), environ=env).accounts[0]


def test_password_command_as_list_and_as_text(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    helper = script(tmp_path / "bin" / "get-pw", "echo s3cret\n")
    account = with_command(tmp_path, f"['{helper}', --account, 'alice smith']")
    assert account.password_command == (str(helper), "--account", "alice smith")
    assert account.password == Secret("")
    # A text is split like a shell would, but none runs; a bare name is looked up on PATH now.
    account = with_command(tmp_path, "\"get-pw --account 'alice smith'\"", PATH=str(helper.parent))
    assert account.password_command == (str(helper), "--account", "alice smith")
    assert account != with_command(tmp_path, f"['{helper}']"), "a changed command is a change"


@pytest.mark.parametrize(
    ("command", "message"),
    [
        ("no-such-helper", r"password_command: program 'no-such-helper' is not found on PATH"),
        ("bin/get-pw", r"password_command: bin/get-pw: give an absolute path or a program on"),
        ("/nonexistent/get-pw", r"password_command: /nonexistent/get-pw is not an executable"),
        ('"get-pw \'unclosed"', r"password_command: cannot split into arguments"),
        ("[]", r"password_command: must not be an empty list"),
    ],
)
def test_password_command_must_name_a_program_that_exists(
    tmp_path: Path, command: str, message: str
) -> None:
    (tmp_path / "bin").mkdir()
    script(tmp_path / "bin" / "get-pw", "echo s3cret\n")
    with pytest.raises(ConfigError, match=r"fetchd\.yaml:10: accounts\[0\]\." + message):
        with_command(tmp_path, command, PATH=str(tmp_path / "bin"))


def test_password_command_in_defaults_is_replaced_by_an_accounts_own_source(
    tmp_path: Path,
) -> None:
    helper = script(tmp_path / "get-pw", "echo s3cret\n")
    (tmp_path / "alice.pw").write_text("from-file\n")
    os.chmod(tmp_path / "alice.pw", 0o600)
    text = BASE.replace("defaults:\n", f"defaults:\n  password_command: ['{helper}']\n")
    text = text.replace("password_env: ALICE_PW", "password_file: alice.pw")
    text += "  - {name: bob, protocol: pop3, host: pop.example.net, user: bob}\n"
    alice, bob = load(write(tmp_path, text), environ={}).accounts
    assert (alice.password_command, alice.password) == (None, Secret("from-file"))
    assert (bob.password_command, bob.password) == ((str(helper),), Secret(""))


async def test_password_command_runs_at_each_login(tmp_path: Path, state: State) -> None:
    helper = script(
        tmp_path / "rotate",
        """\
        n=$(($(cat "$0.count" 2>/dev/null || echo 0) + 1))
        echo "$n" > "$0.count"
        printf ' secret %s\r\nsecond line\n' "$n"
        """,
    )
    poller = Poller(with_command(tmp_path, f"['{helper}']"), state)
    assert await poller._secret() == " secret 1"
    assert await poller._secret() == " secret 2", "run again, so a rotated password is used"


@pytest.mark.parametrize(
    ("body", "error", "message"),
    [
        (
            "echo hunter2\necho 'first line' >&2\necho 'vault is locked' >&2\nexit 3\n",
            PermanentError,
            r"password_command \S+/helper exited with status 3: vault is locked$",
        ),
        ("echo\necho hunter2\n", PermanentError, r"helper printed no password"),
        ("printf 'hun\\rter2\\n'\n", PermanentError, r"helper printed a password holding a CR"),
        ("printf 'hun\\000ter2\\n'\n", PermanentError, r"helper printed a password holding a"),
        ("printf 'hunter2\\377\\n'\n", PermanentError, r"helper printed a password that is not"),
        ("echo hunter2\nexec sleep 30\n", TemporaryError, r"helper gave no password within 1 s"),
    ],
)
async def test_password_command_failures_name_the_account_but_never_the_secret(
    tmp_path: Path, state: State, body: str, error: type[Exception], message: str
) -> None:
    helper = script(tmp_path / "helper", body)
    account = with_command(tmp_path, f"['{helper}', hunter2-is-an-argument]", "    timeout: 1\n")
    with pytest.raises(error, match=message) as caught:
        await Poller(account, state)._secret()
    text = str(caught.value)
    assert text.startswith("account alice (alice at imap.example.net:993): password_command ")
    assert "hunter2" not in text and "hunter2" not in repr(caught.value)


def alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status  # a zombie is dead, only not yet reaped


async def test_password_command_that_overruns_is_killed_with_its_children(
    tmp_path: Path, state: State
) -> None:
    helper = script(tmp_path / "helper", 'sleep 30 &\necho $! > "$0.child"\nwait\n')
    account = with_command(tmp_path, f"['{helper}']", "    timeout: 1\n")
    started = time.monotonic()
    with pytest.raises(TemporaryError, match="gave no password within 1 s"):
        await Poller(account, state)._secret()
    assert time.monotonic() - started < 10, "the child holding stdout was killed as well"
    child = int((tmp_path / "helper.child").read_text())
    for _ in range(50):
        if not alive(child):
            break
        await asyncio.sleep(0.02)
    assert not alive(child)


async def test_password_command_that_floods_its_output_is_bounded(
    tmp_path: Path, state: State
) -> None:
    """A program that never stops writing: memory stays bounded and the login fails in time."""
    helper = script(tmp_path / "helper", "exec yes hunter2\n")
    account = with_command(tmp_path, f"['{helper}']", "    timeout: 1\n")
    started = time.monotonic()
    with pytest.raises(TemporaryError, match="gave no password within 1 s"):
        await Poller(account, state)._secret()
    assert time.monotonic() - started < 10


# -- include: -----------------------------------------------------------------------------------


MAIN = """\
defaults:
  password_file: main.pw
  deliver:
    smtp: "127.0.0.1:2525"
    to: [postmaster@localhost]
include: accounts.d
accounts:
  - {name: main, protocol: imap, host: imap.example.net, user: main}
"""


def account_file(path: Path, text: str, mode: int = 0o600) -> Path:
    path.parent.mkdir(exist_ok=True)
    path.write_text(textwrap.dedent(text))
    os.chmod(path, mode)
    return path


def secret_file(path: Path, value: str) -> None:
    path.write_text(value + "\n")
    os.chmod(path, 0o600)


def test_include_a_directory(tmp_path: Path) -> None:
    secret_file(tmp_path / "main.pw", "main-secret")
    (tmp_path / "accounts.d").mkdir()
    secret_file(tmp_path / "accounts.d" / "b.pw", "b-secret")
    account_file(
        tmp_path / "accounts.d" / "b.yaml",
        """\
        - {name: b, protocol: pop3, host: pop.example.net, user: b, password_file: b.pw}
        """,
    )
    account_file(
        tmp_path / "accounts.d" / "a.yml",
        """\
        accounts:
          - {name: a1, protocol: imap, host: imap.example.net, user: a1}
          - {name: a2, protocol: imap, host: imap.example.net, user: a2, keep: true}
        """,
    )
    account_file(tmp_path / "accounts.d" / "notes.txt", "not yaml: [\n")
    account_file(tmp_path / "accounts.d" / ".editing.yaml", "not yaml: [\n")
    config = load(write(tmp_path, MAIN), environ={})
    assert [a.name for a in config.accounts] == ["main", "a1", "a2", "b"]
    _, a1, a2, b = config.accounts
    # defaults: apply, and a path is relative to the file that names it.
    assert a1.deliver.to == ("postmaster@localhost",) and a2.keep
    assert a1.password == Secret("main-secret")
    assert b.password == Secret("b-secret")
    assert config.warnings == ()


def test_include_a_glob_and_only_included_accounts(tmp_path: Path) -> None:
    secret_file(tmp_path / "main.pw", "main-secret")
    for name in ("c", "a", "b"):
        account_file(
            tmp_path / "hosts" / f"{name}.yaml",
            f"- {{name: {name}, protocol: imap, host: imap.example.net, user: {name}}}\n",
        )
    account_file(tmp_path / "hosts" / "skip.yml", "- {name: skip}\n")
    text = MAIN.replace("include: accounts.d", "include: ['hosts/*.yaml']")
    text = text.split("accounts:\n")[0]
    config = load(write(tmp_path, text), environ={})
    assert [a.name for a in config.accounts] == ["a", "b", "c"]


def test_errors_in_included_files_name_that_file_and_line(tmp_path: Path) -> None:
    secret_file(tmp_path / "main.pw", "main-secret")
    account_file(
        tmp_path / "accounts.d" / "x.yaml",
        """\
        accounts:
          - name: x
            protocol: imap
            host: imap.example.net
            user: x
            port: 70000
        """,
    )
    with pytest.raises(ConfigError, match=r"accounts\.d/x\.yaml:6: accounts\[0\]\.port: must be"):
        load(write(tmp_path, MAIN), environ={})
    # A mistake in the main file's defaults: is still reported where it was written.
    (tmp_path / "accounts.d" / "x.yaml").write_text(
        "- {name: x, protocol: imap, host: imap.example.net, user: x}\n"
    )
    text = MAIN.replace("  password_file: main.pw\n", "  password_file: missing.pw\n")
    with pytest.raises(ConfigError, match=r"/fetchd\.yaml:2: accounts\[0\]\.password_file: cannot"):
        load(write(tmp_path, text.split("accounts:\n")[0]), environ={})


def test_account_names_are_unique_across_files(tmp_path: Path) -> None:
    secret_file(tmp_path / "main.pw", "main-secret")
    account_file(
        tmp_path / "accounts.d" / "x.yaml",
        """\
        - {name: other, protocol: imap, host: imap.example.net, user: other}
        - {name: main, protocol: imap, host: imap.example.net, user: again}
        """,
    )
    with pytest.raises(
        ConfigError,
        match=r"x\.yaml:2: accounts\[1\]: account name 'main' is used twice "
        r"\(also at \S*fetchd\.yaml:8\)",
    ):
        load(write(tmp_path, MAIN), environ={})


def test_included_file_with_a_password_must_not_be_readable_by_everyone(tmp_path: Path) -> None:
    secret_file(tmp_path / "main.pw", "main-secret")
    inline = "- {name: x, protocol: imap, host: imap.example.net, user: x, password: hunter2}\n"
    included = account_file(tmp_path / "accounts.d" / "x.yaml", inline, mode=0o644)
    with pytest.raises(
        ConfigError, match=r"x\.yaml:1: accounts\[0\]\.password: the file holds a password"
    ):
        load(write(tmp_path, MAIN), environ={})
    os.chmod(included, 0o640)
    assert load(write(tmp_path, MAIN), environ={}).accounts[1].password == Secret("hunter2")


@pytest.mark.parametrize(
    ("include", "message"),
    [
        ("nowhere", r"fetchd\.yaml:6: include: no such file or directory: \S*nowhere"),
        ("[empty.d]", r"fetchd\.yaml:6: include: no account, neither in accounts: nor"),
        ("fetchd.yaml", r"fetchd\.yaml:6: include: names the main configuration file itself"),
        ("nested.yaml", r"nested\.yaml:1: include: an included file cannot include"),
        ("defaults.yaml", r"defaults\.yaml:1: defaults: can only be set in the main file"),
        ("empty.yaml", r"empty\.yaml: the file is empty; it needs a list of accounts"),
    ],
)
def test_include_errors(tmp_path: Path, include: str, message: str) -> None:
    secret_file(tmp_path / "main.pw", "main-secret")
    (tmp_path / "empty.d").mkdir()
    account_file(tmp_path / "nested.yaml", "include: other.yaml\naccounts: []\n")
    account_file(tmp_path / "defaults.yaml", "defaults: {keep: true}\naccounts: []\n")
    account_file(tmp_path / "empty.yaml", "# all accounts moved away\n")
    text = MAIN.replace("include: accounts.d", f"include: {include}").split("accounts:\n")[0]
    with pytest.raises(ConfigError, match=message):
        load(write(tmp_path, text), environ={})


def test_an_empty_included_directory_is_a_warning(tmp_path: Path) -> None:
    secret_file(tmp_path / "main.pw", "main-secret")
    (tmp_path / "accounts.d").mkdir()
    config = load(write(tmp_path, MAIN), environ={})
    assert [a.name for a in config.accounts] == ["main"]
    assert len(config.warnings) == 1
    assert "fetchd.yaml:6: include: " in config.warnings[0]
    assert "holds no .yaml or .yml file" in config.warnings[0]


async def test_password_command_is_killed_when_the_login_is_cancelled(
    tmp_path: Path, state: State
) -> None:
    helper = script(tmp_path / "helper", 'echo $$ > "$0.pid"\nexec sleep 30\n')
    account = with_command(tmp_path, f"['{helper}']", "    timeout: 60\n")
    login = asyncio.create_task(Poller(account, state)._secret())
    pid_file = tmp_path / "helper.pid"
    for _ in range(500):
        if pid_file.exists() and pid_file.read_text().endswith("\n"):
            break
        await asyncio.sleep(0.01)
    login.cancel()
    with pytest.raises(asyncio.CancelledError):
        await login
    assert not alive(int(pid_file.read_text()))


@pytest.mark.parametrize(
    "line",
    ["    password: 8675309\n", "    password_command: [/bin/echo, 8675309]\n"],
)
def test_a_secret_written_as_a_number_is_not_repeated_in_the_error(
    tmp_path: Path, line: str
) -> None:
    text = BASE.replace("    password_env: ALICE_PW\n", line)
    with pytest.raises(ConfigError) as e:
        load(write(tmp_path, text), environ={})
    assert "8675309" not in str(e.value) and "must be" in str(e.value)
