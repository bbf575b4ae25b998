from __future__ import annotations

import os
import shutil
import textwrap
from pathlib import Path

import pytest

from fetchd.config import Secret, load
from fetchd.errors import ConfigError

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
