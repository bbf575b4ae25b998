"""fetchd import-fetchmailrc: fetchmail's rc grammar, its mapping onto fetchd's keys, and the same
mail delivered by fetchmail and by fetchd from one rc file.

fetchmail itself (the Debian package) is the oracle: ``fetchmail --configdump`` prints how it
parsed a file, and every imported account must agree with it.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import hashlib
import io
import os
import re
import shlex
import shutil
import ssl
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fetchd import fetchmailrc
from fetchd.config import DEFAULT_PORTS, Account, Delivery, load
from fetchd.deliver import MDADeliverer
from tests.support.dovecot import Dovecot, running_dovecot
from tests.support.sink import Accepted, Sink

FIXTURES = Path(__file__).parent / "fetchmailrc"
RC_FILES = sorted(p.name for p in FIXTURES.glob("*.rc") if not p.name.startswith("bad-"))
BAD_FILES = sorted(p.name for p in FIXTURES.glob("bad-*.rc"))
FETCHMAIL = shutil.which("fetchmail")
needs_fetchmail = pytest.mark.skipif(
    FETCHMAIL is None,
    reason="fetchmail is not installed (Debian package fetchmail): it is the oracle here",
)


UPDATE = os.environ.get("FETCHD_UPDATE_GOLDEN") == "1"


def golden(name: str, produced: str) -> str:
    """The expected content of a golden file. With FETCHD_UPDATE_GOLDEN=1 the file is rewritten
    from what was produced (and the test skipped), for reviewing the change with git diff."""
    path = FIXTURES / name
    if UPDATE:
        path.write_text(produced)
    return path.read_text()


def expected_exit(rc: Path) -> int:
    m = re.match(r"# exit: (\d)", rc.read_text())
    assert m, f"{rc.name} must start with '# exit: N'"
    return int(m.group(1))


def normalise(text: str, directory: Path) -> str:
    for form in {str(directory.resolve()), str(directory)}:
        text = text.replace(form, "$TMP")
    return text


def import_rc(*args: str) -> tuple[int, str, str]:
    """Run the importer in this process; its exit status, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = fetchmailrc.main(list(args))
    return code, out.getvalue(), err.getvalue()


def password_envs(yaml_text: str) -> dict[str, str]:
    """Stand-in values for the password_env variables an output names."""
    return {name: "stand-in" for name in re.findall(r"password_env: (\S+)", yaml_text)}


def prepare(directory: Path, ca: trustme.CA, ca_file: Path) -> None:
    """What the fixtures' relative paths name: CA files, a client certificate, and a procmail
    on PATH (so an MDA given without a path is found, at a known place)."""
    certs = directory / "certs"
    certs.mkdir(exist_ok=True)
    shutil.copy(ca_file, certs / "ca.pem")
    client = ca.issue_cert("client.example")
    client.cert_chain_pems[0].write_to_path(str(certs / "client.pem"))
    client.private_key_pem.write_to_path(str(certs / "client.key"))
    bindir = directory / "bin"
    bindir.mkdir(exist_ok=True)
    (bindir / "procmail").write_text("#!/bin/sh\nexit 0\n")
    (bindir / "procmail").chmod(0o755)


@pytest.fixture
def workdir(tmp_path: Path, ca: trustme.CA, ca_file: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The fixtures' directory as the importer sees it, with a fixed local user and a fixed
    place for procmail, so that the golden files do not depend on the machine."""
    prepare(tmp_path, ca, ca_file)
    programs = {"procmail": "/usr/bin/procmail"}
    monkeypatch.setattr(fetchmailrc.shutil, "which", lambda name, **_: programs.get(name))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(fetchmailrc, "local_user", lambda: "jdoe")
    monkeypatch.setattr(fetchmailrc, "default_postmaster", lambda: "jdoe")
    return tmp_path


# ---------------------------------------------------------------------------------------------
# Golden files: each rc file, its YAML, its report and its exit status.


@pytest.mark.parametrize("name", RC_FILES)
def test_rc_file_imports_as_its_golden_yaml_and_report(name: str, workdir: Path) -> None:
    shutil.copy(FIXTURES / name, workdir / name)
    stem = name.removesuffix(".rc")

    code, out, err = import_rc(name, "-o", "fetchd.yaml")

    produced = (workdir / "fetchd.yaml").read_text()
    assert out == ""
    report = normalise(err, workdir)
    assert report == golden(f"{stem}.stderr", report)
    assert normalise(produced, workdir) == golden(f"{stem}.yaml", normalise(produced, workdir))
    assert code == expected_exit(FIXTURES / name)
    assert "would refuse" not in err
    config = load(workdir / "fetchd.yaml", environ=password_envs(produced))
    active = re.findall(r"^  - name: (\S+)$", produced, re.M)
    assert [a.name for a in config.accounts] == active
    secrets = {p.name: p for p in (workdir / "passwords").glob("*")}
    for account in config.accounts:
        if account.name in secrets:
            assert stat.S_IMODE(secrets[account.name].stat().st_mode) == 0o600
            assert secrets[account.name].read_text() == account.password.reveal() + "\n"
    assert set(secrets) <= set(re.findall(r"password_file: passwords/(\S+)", produced))
    if UPDATE:
        pytest.skip("golden files rewritten")


@pytest.mark.parametrize("name", BAD_FILES)
def test_unparsable_rc_file_exits_2_naming_the_line(name: str, workdir: Path) -> None:
    shutil.copy(FIXTURES / name, workdir / name)

    code, _, err = import_rc(name, "-o", "fetchd.yaml")

    assert code == 2 == expected_exit(FIXTURES / name)
    assert err == golden(f"{name.removesuffix('.rc')}.stderr", err)
    assert not (workdir / "fetchd.yaml").exists()
    assert not (workdir / "passwords").exists()
    if UPDATE:
        pytest.skip("golden file rewritten")


def test_fetchd_check_accepts_the_output(workdir: Path) -> None:
    shutil.copy(FIXTURES / "tls.rc", workdir / "tls.rc")
    assert import_rc("tls.rc", "-o", "fetchd.yaml")[0] == 1  # ssl3 and ssl on port 110

    result = subprocess.run(
        [sys.executable, "-m", "fetchd", "check", "-c", "fetchd.yaml"],
        capture_output=True,
        text=True,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    assert "fetchd.yaml: ok, 11 account(s)" in result.stdout


# ---------------------------------------------------------------------------------------------
# Passwords, outputs and options of the command.


RC = 'poll imap.example.org proto imap user "alice" password "s3cret pass" is alice here ssl\n'


def test_passwords_go_to_files_readable_by_the_owner_only(workdir: Path) -> None:
    (workdir / "rc").write_text(RC)

    code, _, _ = import_rc("rc", "-o", "out/fetchd.yaml")

    assert code == 0
    secret = workdir / "out" / "passwords" / "alice@imap.example.org"
    assert secret.read_text() == "s3cret pass\n"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE(secret.parent.stat().st_mode) == 0o700
    text = (workdir / "out" / "fetchd.yaml").read_text()
    assert "s3cret" not in text
    assert "password_file: passwords/alice@imap.example.org\n" in text
    config = load(workdir / "out" / "fetchd.yaml", environ={})
    assert config.accounts[0].password.reveal() == "s3cret pass"


def test_password_files_in_a_chosen_directory(workdir: Path) -> None:
    (workdir / "rc").write_text(RC)

    code, _, _ = import_rc("rc", "-o", "fetchd.yaml", "--password-files", "secrets")

    assert code == 0
    assert (workdir / "secrets" / "alice@imap.example.org").read_text() == "s3cret pass\n"
    assert (
        "password_file: secrets/alice@imap.example.org\n" in (workdir / "fetchd.yaml").read_text()
    )


def test_no_password_files_leaves_an_environment_variable_to_set(workdir: Path) -> None:
    (workdir / "rc").write_text(RC)

    code, _, err = import_rc("rc", "-o", "fetchd.yaml", "--no-password-files")

    assert code == 0
    assert not (workdir / "passwords").exists()
    text = (workdir / "fetchd.yaml").read_text()
    assert "s3cret" not in text + err
    line = "password_env: FETCHD_PASSWORD_ALICE_IMAP_EXAMPLE_ORG  # TODO: export "
    assert line in text
    assert "set FETCHD_PASSWORD_ALICE_IMAP_EXAMPLE_ORG" in err
    env = {"FETCHD_PASSWORD_ALICE_IMAP_EXAMPLE_ORG": "from-env"}
    assert load(workdir / "fetchd.yaml", environ=env).accounts[0].password.reveal() == "from-env"


def test_yaml_on_standard_output_names_passwords_by_absolute_path(workdir: Path) -> None:
    (workdir / "rc").write_text(RC)

    code, out, _ = import_rc("rc")

    assert code == 0
    path = workdir.resolve() / "passwords" / "alice@imap.example.org"
    assert f"password_file: {path}\n" in out
    (workdir / "elsewhere").mkdir()
    (workdir / "elsewhere" / "fetchd.yaml").write_text(out)
    assert load(workdir / "elsewhere" / "fetchd.yaml").accounts[0].user == "alice"


def test_default_rc_file_follows_fetchmailhome(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (workdir / "fetchmailrc").write_text(RC)
    monkeypatch.setenv("FETCHMAILHOME", str(workdir))

    code, _, _ = import_rc("-o", "fetchd.yaml")

    assert code == 0
    assert "host: imap.example.org" in (workdir / "fetchd.yaml").read_text()


def test_missing_rc_file_exits_2(workdir: Path) -> None:
    code, _, err = import_rc("no-such-rc", "-o", "fetchd.yaml")
    assert code == 2
    assert "cannot read no-such-rc: No such file or directory" in err


def test_missing_ca_file_is_reported_and_fails_the_check(workdir: Path) -> None:
    (workdir / "rc").write_text(RC.replace("ssl\n", "ssl sslcertfile missing.pem\n"))

    code, _, err = import_rc("rc", "-o", "fetchd.yaml")

    assert code == 1
    assert f"{workdir.resolve()}/missing.pem is not a file on this machine" in err
    assert "fetchd check would refuse it: fetchd.yaml:" in err


def test_every_option_of_a_poll_entry_is_reported_or_carried(workdir: Path) -> None:
    """No option disappears: each one either shows up as a fetchd key or in the report."""
    rc = (FIXTURES / "options.rc").read_text()
    (workdir / "rc").write_text(rc)
    _, _, err = import_rc("rc", "-o", "fetchd.yaml")
    text = (workdir / "fetchd.yaml").read_text()
    for keyword in (
        "timeout", "interval", "folders", "limit", "limit_delete", "fetch_limit", "batch_limit",
        "expunge_every", "fetch_all",
    ):  # fmt: skip
        assert f"{keyword}:" in text
    for keyword in (
        "warnings", "fetchsizelimit", "fastuidl", "flush", "uidl", "tracepolls", "bad-header",
        "no dns", "no envelope", "aka", "rewrite", "stripcr", "forcecr", "pass8bits",
        "dropstatus", "dropdelivered", "mimedecode", "preconnect", "postconnect", "properties",
        "interface", "monitor", "principal", "expunge", "folder",
    ):  # fmt: skip
        assert f": {keyword}: " in err, keyword


# ---------------------------------------------------------------------------------------------
# The lexer's quirks, as fetchmail has them.


def parse_one(rc: str) -> dict[str, Any]:
    """The user options of the first poll entry, values only."""
    entry = fetchmailrc.parse(rc).entries[0]
    return {k: o.value for k, o in {**entry.server, **entry.users[0]}.items()}


@pytest.mark.parametrize(
    ("source", "password"),
    [
        (r'"a\tb"', "a\tb"),
        (r'"\x41\102"', "Af"),  # hex, and decimal (not octal)
        (r'"\0101"', "\x081"),  # \0 starts octal and counts as one of its three digits
        (r'"a\"b"', '"a"b"'),  # no escaped quotes: the longer unquoted word wins
        ("'it \"is\"'", 'it "is"'),
        ('"join\\\nme"', "joinme"),
        ('"two\nlines"', "two\nlines"),
        ("pass#word", "pass#word"),  # # starts a comment only between words
        ("keep", "keep"),  # after "password" a keyword is just a name
        ("0042", "0042"),
        (r'"nul\x00cut"', "nul"),  # C strings end at NUL
    ],
)
def test_strings_and_escapes(source: str, password: str) -> None:
    options = parse_one(f"poll h.example user u password {source} is u here\n")
    assert options["password"] == password


def test_no_prefixed_words_split_like_fetchmail() -> None:
    options = parse_one("poll h.example user u pass p keep nokeep nofetchall nomimedec\n")
    assert options["keep"] is False
    assert options["fetchall"] is False
    assert options["mimedecode"] is False


def test_noise_words_and_punctuation_are_ignored() -> None:
    options = parse_one(
        "poll h.example with proto imap and options:\n"
        "  user u there, has password p; wants ssl, is v here;\n"
    )
    assert options == {
        "protocol": "imap",
        "user": "u",
        "password": "p",
        "ssl": True,
        "localnames": [("v", None)],
    }


def test_defaults_fill_only_what_an_entry_leaves_unset() -> None:
    rc = fetchmailrc.parse(
        "defaults proto imap keep folder A B smtphost h1\n"
        "poll one.example user u pass p no keep folder C\n"
        "poll two.example proto pop3 user v pass q\n"
    )
    one, two = ({**e.server, **e.users[0]} for e in rc.entries)
    assert one["protocol"].value == "imap" and one["keep"].value is False
    assert one["folder"].value == ["C"] and one["smtphost"].value == ["h1"]
    assert two["protocol"].value == "pop3" and two["keep"].value is True
    assert two["folder"].value == ["A", "B"]


# ---------------------------------------------------------------------------------------------
# MDA commands: fetchmail used the shell, fetchd never pastes a value into one.


async def test_mda_through_the_shell_gets_values_as_parameters_only(workdir: Path) -> None:
    log = workdir / "mda.log"
    rc = (
        "poll h.example proto imap user u pass p is u here ssl\n"
        f'  mda "cat > {log}.$$ && mv {log}.$$ {log}-%T && echo 100%% >> {log}-%T"\n'
    )
    (workdir / "rc").write_text(rc)
    assert import_rc("rc", "-o", "fetchd.yaml")[0] == 0
    account = load(workdir / "fetchd.yaml").accounts[0]
    assert account.deliver.mda[:2] == ("/bin/sh", "-c")
    hostile = "x;touch pwned"
    delivery = Delivery(kind="mda", mda=account.deliver.mda, to=(hostile,))
    deliverer = MDADeliverer(delivery, where="test")

    replies = await deliverer.deliver(b"Subject: hi\r\n\r\nbody\r\n", "s@example.org", [hostile])

    assert replies == {hostile: (250, "delivered")}
    assert not (workdir / "pwned").exists()
    delivered = Path(f"{log}-{hostile}")
    assert delivered.read_bytes() == b"Subject: hi\n\nbody\n100%%\n"  # noqa: ASYNC240


def test_plain_mda_command_is_an_argument_list() -> None:
    result = fetchmailrc.convert(
        fetchmailrc.parse(
            'poll h.example proto imap user u pass p is u here mda "procmail -d %T -a 50%"\n'
        ),
        "/",
        resolve_program={"procmail": "/opt/bin/procmail"}.get,
    )
    deliver = next(i for i in result.accounts[0].items if i.key == "deliver")
    assert isinstance(deliver.value, list)
    mda = next(i for i in deliver.value if isinstance(i, fetchmailrc.Item) and i.key == "mda")
    assert mda.value == ["/opt/bin/procmail", "-d", "%T", "-a", "50%%"]


# ---------------------------------------------------------------------------------------------
# fetchmail --configdump as the oracle.


def fetchmail_dump(rc: Path, home: Path) -> tuple[int, str, dict[str, Any] | None]:
    """fetchmail's own reading of ``rc``: exit status, stderr, and the parsed dump."""
    assert FETCHMAIL is not None
    rc.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FETCHMAIL")}
    result = subprocess.run(
        [FETCHMAIL, "--nosyslog", "--configdump", "-f", str(rc)],
        capture_output=True,
        env={**env, "HOME": str(home)},
        timeout=60,
        check=False,
    )
    stderr = result.stderr.decode("utf-8", "replace")
    if result.returncode != 0:
        return result.returncode, stderr, None
    text = result.stdout.decode("latin-1")
    body = text[text.index("fetchmailrc = ") + 14 : text.index("# End of initializer")]
    return 0, stderr, _literal(ast.parse(body, mode="eval").body)


def _literal(node: ast.AST) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        return {"TRUE": True, "FALSE": False, "None": None}[node.id]
    if isinstance(node, ast.Dict):
        return {_literal(k): _literal(v) for k, v in zip(node.keys, node.values, strict=True)}
    if isinstance(node, ast.List | ast.Tuple):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_literal(node.operand)
    raise AssertionError(f"unexpected in the dump: {ast.dump(node)}")


SERVICES = {"pop3": 110, "pop3s": 995, "imap": 143, "imaps": 993, "kpop": 1109}


def agree(server: dict[str, Any], user: dict[str, Any], account: Account) -> None:
    """What fetchmail parsed for one user, against the fetchd account imported for it."""
    service = server["service"]
    port = int(service) if service and service.isdigit() else SERVICES.get(service or "")
    protocol = {"POP3": "pop3", "APOP": "pop3", "RPOP": "pop3", "IMAP": "imap"}.get(
        server["protocol"], "pop3" if port in (110, 995) else "imap"
    )
    if user["ssl"] or port in (993, 995):
        mode = "implicit"
    elif user["sslproto"] == "":
        mode = "none"
    else:
        mode = "starttls"
    assert account.host == (server["via"] or server["pollname"])
    assert account.user == user["remote"]
    assert account.protocol == protocol
    assert account.port == (port or DEFAULT_PORTS[(protocol, mode)])
    assert account.tls.mode == mode
    fingerprint = user["sslfingerprint"]
    digits = re.sub("[: ]", "", fingerprint or "").upper()
    pins = (f"md5:{digits}",) if re.fullmatch("[0-9A-F]{32}", digits) else ()
    assert account.tls.fingerprints == pins
    assert account.tls.verify == (user["sslcertck"] or bool(fingerprint and not pins))
    assert account.keep == user["keep"]
    assert account.fetch_all == user["fetchall"]
    folders = tuple(user["mailboxes"]) if protocol == "imap" and user["mailboxes"] else ("INBOX",)
    assert account.folders == folders
    # The dump leaves "auth" out for external.
    if server.get("auth") in ("any", "password", "cram-md5") and user["password"] is not None:
        assert account.password.reveal() == user["password"]
    d = account.deliver
    first = user["smtphunt"][0]
    destination = "localhost"
    if user["mda"]:
        assert d.kind == "mda"
        program = shlex.split(user["mda"])[0]
        assert d.mda[:2] == ("/bin/sh", "-c") or Path(d.mda[0]).name == Path(program).name
    elif first.startswith("/"):
        assert (d.kind, d.socket) == ("lmtp", first)
    else:
        host, _, port_text = first.partition("/")
        assert d.kind == ("lmtp" if user["lmtp"] else "smtp")
        assert d.host == host
        assert d.port == (int(port_text) if port_text else 24 if user["lmtp"] else 25)
        destination = host
    destination = user["smtpaddress"] or destination

    def rcpt(name: str) -> str:
        if "@" in name or user["mda"]:
            return name
        return user["smtpname"] or f"{name}@{destination}"

    names = [n for n in user["localnames"] if n != "*"]
    if "*" not in user["localnames"] and len(names) == 1:
        first_name = names[0] if isinstance(names[0], str) else names[0][0]
        assert d.to == (rcpt(first_name),)
        assert d.multidrop is None
    else:
        assert d.multidrop is not None
        expected: dict[str, str] = {}  # a name given twice: fetchmail finds the first
        for n in names:
            server_name, local = (n, n) if isinstance(n, str) else n
            expected.setdefault(server_name.lower(), rcpt(local))
        assert dict(d.multidrop.map) == expected


def compare_with_fetchmail(rc: Path, home: Path) -> int:
    """Import ``rc`` and check every active account against fetchmail's dump of the same file;
    returns how many accounts were compared."""
    _, stderr, dump = fetchmail_dump(rc, home)
    if dump is None and "Cannot find my own host" in stderr:
        # fetchmail qualifies its own host name for ETRN, ODMR and Kerberos polls and gives up
        # where that name does not resolve (a bare container): compare the other polls.
        own_host = re.compile(r"\b(etrn|odmr|kerberos\w*)\b")
        lines = rc.read_text().splitlines(keepends=True)
        rc = rc.with_name(f"resolvable-{rc.name}")
        rc.write_text("".join(line for line in lines if not own_host.search(line)))
        _, stderr, dump = fetchmail_dump(rc, home)
    assert dump is not None, f"fetchmail --configdump failed: {stderr}"
    out = rc.parent / "fetchd.yaml"
    code, _, err = import_rc(str(rc), "-o", str(out))
    assert code in (0, 1), err
    produced = out.read_text()
    text = rc.read_bytes().decode("latin-1")
    imported = fetchmailrc.convert(fetchmailrc.parse(text), str(rc.parent)).accounts
    if all(a.disabled for a in imported):
        assert code == 1 and "no account could be imported as an active one" in err
        return 0
    assert "would refuse" not in err, err
    loaded = {a.name: a for a in load(out, environ=password_envs(produced)).accounts}
    pairs = [(s, u) for s in dump["servers"] for u in s["users"]]
    assert len(pairs) == len(imported)
    compared = 0
    for (server, user), account in zip(pairs, imported, strict=True):
        assert (account.name in loaded) == (not account.disabled), account.name
        if not server["active"]:
            assert account.disabled
        if account.name in loaded:
            agree(server, user, loaded[account.name])
            compared += 1
    return compared


@needs_fetchmail
@pytest.mark.parametrize("name", RC_FILES)
def test_fixture_agrees_with_fetchmails_own_reading(
    name: str, tmp_path: Path, ca: trustme.CA, ca_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prepare(tmp_path, ca, ca_file)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
    shutil.copy(FIXTURES / name, tmp_path / name)
    assert compare_with_fetchmail(tmp_path / name, tmp_path) > 0


@needs_fetchmail
@pytest.mark.parametrize("name", BAD_FILES)
def test_fetchmail_refuses_the_same_files_at_the_same_place(name: str, tmp_path: Path) -> None:
    shutil.copy(FIXTURES / name, tmp_path / name)
    code, stderr, _ = fetchmail_dump(tmp_path / name, tmp_path)
    assert code != 0
    ours = (FIXTURES / f"{name.removesuffix('.rc')}.stderr").read_text()
    if m := re.search(rf"{re.escape(name)}:(\d+: .*)$", stderr, re.M):
        assert ours.endswith(f"{name}:{m.group(1)}\n")


# Random rc files: fetchmail and the importer must accept and reject the same ones, and agree
# on every account.

HOSTS = ["mail.example.org", "pop.example.net", "imap-2.example.com", "192.0.2.7"]
SAFE = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=6)
NAME = SAFE.map(lambda w: "x" + w)  # never a keyword, never a number
PRINTABLE = "".join(chr(c) for c in range(33, 127) if chr(c) not in "\"'\\")


@st.composite
def rc_string(draw: st.DrawFn, bare_ok: bool = True) -> str:
    """A string token in one of fetchmail's spellings."""
    text = draw(st.text(alphabet=PRINTABLE + " ", min_size=1, max_size=10).filter(str.strip))
    styles = ["double", "single", "escaped"]
    if bare_ok and re.fullmatch(r"[^=;:,\s#\"'\\]+", text):
        styles.append("bare")
    style = draw(st.sampled_from(styles))
    if style == "bare":
        return text
    if style == "single":
        return f"'{text}'"
    if style == "double":
        return f'"{text}"'
    escaped = "".join(
        (f"\\{ord(c)}" if ord(c) >= 100 else f"\\x{ord(c):02x}") if draw(st.booleans()) else c
        for c in text
    )
    return f'"{escaped}"'


def quote(draw: st.DrawFn, text: str) -> str:
    return draw(st.sampled_from([text, f'"{text}"', f"'{text}'"]))


@st.composite
def server_options(draw: st.DrawFn) -> list[str]:
    choices = {
        "proto": st.sampled_from(["proto pop3", "protocol imap", "proto IMAP", "proto apop"]),
        "port": st.sampled_from(["port 110", "port 995", "service 143", "service imaps", "port 7"]),
        "via": st.sampled_from(HOSTS).map(lambda h: f"via {h}"),
        "timeout": st.integers(1, 900).map(lambda n: f"timeout {n}"),
        "interval": st.integers(1, 5).map(lambda n: f"interval {n}"),
        "auth": st.sampled_from(["auth any", "authenticate password", "auth cram-md5"]),
        "envelope": st.sampled_from(
            ["envelope X-Original-To", "envelope 1 Delivered-To", "no envelope"]
        ),
        "domains": st.lists(SAFE, min_size=1, max_size=2).map(
            lambda ds: "localdomains " + " ".join(f"{d}.example" for d in ds)
        ),
        "flags": st.sampled_from(["uidl", "no uidl", "dns", "no dns", "tracepolls"]),
    }
    keys = draw(st.lists(st.sampled_from(sorted(choices)), unique=True, max_size=4))
    return [draw(choices[k]) for k in keys]


@st.composite
def user_options(draw: st.DrawFn, lmtp_ok: bool) -> list[str]:
    names = draw(st.lists(NAME, min_size=1, max_size=3))
    here = draw(st.sampled_from(["", " here"]))
    mapping = " ".join(
        names
        + (["*"] if draw(st.booleans()) and len(names) > 1 else [])
        + ([f"{draw(NAME)}={draw(NAME)}"] if draw(st.booleans()) else [])
    )
    hosts = draw(
        st.lists(
            st.sampled_from(["localhost", "mx.local/2525", "127.0.0.1/24", "/run/lmtp"]),
            min_size=1,
            max_size=2,
        )
    )
    choices = {
        "password": rc_string(bare_ok=True).map(lambda s: f"password {s}"),
        "is": st.sampled_from(["is", "to"]).map(lambda w: f"{w} {mapping}{here}"),
        "keep": st.sampled_from(["keep", "no keep", "nokeep"]),
        "fetchall": st.sampled_from(["fetchall", "no fetchall"]),
        "ssl": st.sampled_from(["ssl", "no ssl"]),
        "sslproto": st.sampled_from(["'tls1.2+'", "''", '"auto"', "tls1.3+"]).map(
            lambda v: f"sslproto {v}"
        ),
        "sslcertck": st.sampled_from(["sslcertck", "no sslcertck"]),
        "fingerprint": st.binary(min_size=16, max_size=16).map(
            lambda b: f'sslfingerprint "{":".join(f"{x:02X}" for x in b)}"'
        ),
        "folder": st.lists(
            st.sampled_from(["INBOX", "Lists", '"Sent Items"', "a.b"]), min_size=1
        ).map(lambda fs: "folder " + ",".join(dict.fromkeys(fs))),
        "smtphost": st.just("smtphost " + " ".join(hosts)),
        "smtpaddress": st.just("smtpaddress example.net"),
        "smtpname": st.just('smtpname "box@example.net"'),
        "mda": st.sampled_from(['mda "/usr/bin/procmail -d %T"', 'mda "/bin/cat >/dev/null"']),
        "limits": st.sampled_from(["limit 1000", "fetchlimit 5", "batchlimit 3", "expunge 2"]),
    }
    keys = draw(st.lists(st.sampled_from(sorted(choices)), unique=True, max_size=6))
    options = [draw(choices[k]) for k in keys]
    lmtp_possible = all(h != "localhost" and h != "mx.local/2525" for h in hosts)
    if lmtp_ok and "smtphost" in keys and lmtp_possible and draw(st.booleans()):
        options.append("lmtp")
    return options


@st.composite
def rc_files(draw: st.DrawFn) -> str:
    lines = []
    for statement in draw(
        st.lists(
            st.sampled_from(
                ["set daemon 300", "set postmaster pm", "set no softbounce", "set no bouncemail"]
            ),
            unique=True,
        )
    ):
        lines.append(statement)
    for _ in range(draw(st.integers(1, 4))):
        verb = draw(st.sampled_from(["poll", "poll", "skip", "server"]))
        words = [verb, draw(st.sampled_from(HOSTS)), *draw(server_options())]
        for _ in range(draw(st.integers(1, 3))):
            user = draw(rc_string(bare_ok=True))
            words.append(f"user {user}" + draw(st.sampled_from(["", " there"])))
            words += draw(user_options(lmtp_ok=True))
        if draw(st.integers(0, 9)) == 0:  # now and then a misplaced server option
            words.append(draw(server_options().filter(bool))[0])
        noise = st.sampled_from([" ", " ", "\n  ", " with ", " and ", ", ", "; ", " # note\n  "])
        text = words[0]
        for word in words[1:]:
            after_name = text.rstrip().endswith((" user", " is", " to", " password"))
            text += (" " if after_name else draw(noise)) + word
        lines.append(text)
    return "\n".join(lines) + "\n"


@needs_fetchmail
@settings(
    max_examples=int(os.environ.get("FETCHD_RC_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(text=rc_files())
def test_random_rc_files_read_as_fetchmail_reads_them(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        rc = directory / "rc"
        rc.write_text(text)
        _, stderr, dump = fetchmail_dump(rc, directory)
        try:
            fetchmailrc.parse(text)
            ours = None
        except fetchmailrc.RcError as e:
            ours = e
        if dump is None:
            assert ours is not None, f"fetchmail refused it but the importer did not: {stderr}"
            if m := re.search(r"/rc:(\d+): (.*)$", stderr, re.M):
                assert (ours.line, ours.message) == (int(m.group(1)), m.group(2))
            return
        assert ours is None, f"the importer refused what fetchmail reads: {ours}"
        compare_with_fetchmail(rc, directory)


# ---------------------------------------------------------------------------------------------
# End to end: fetchmail and fetchd, from one rc file, deliver the same mail.

MESSAGES = [
    b"Return-Path: <alice@example.org>\nFrom: alice@example.org\nTo: bob@example.net\n"
    b"Subject: plain\nMessage-ID: <1@example.org>\n\nHello.\n",
    b"Return-Path: <carol@example.org>\nFrom: carol@example.org\nTo: bob@example.net\n"
    b"Subject: dots\nMessage-ID: <2@example.org>\n\n.leading dot\n..two dots\n.\nend\n",
    b"Return-Path: <dave@example.org>\nFrom: dave@example.org\nTo: bob@example.net\n"
    b"Subject: long\nMessage-ID: <3@example.org>\n\n" + b"x" * 2000 + b"\n",
]


def comparable(message: Accepted) -> tuple[str, tuple[str, ...], bytes]:
    """Envelope and bytes, without the trace header each program adds on top and without
    Return-Path (fetchmail moves it into MAIL FROM and drops the header; fetchd keeps it)."""
    data = re.sub(rb"\AReceived: [^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*", b"", message.data)
    data = re.sub(rb"(?m)^Return-Path: [^\r\n]*\r\n", b"", data)
    return message.mail_from, message.rcpt_tos, data


@pytest.fixture(scope="module")
def named_dovecot(ca: trustme.CA) -> Iterator[Dovecot]:
    """A Dovecot whose certificate carries its name as CommonName too: fetchmail 6.4 refuses a
    certificate without one, and the shared fixture's has only subjectAltNames."""
    leaf = ca.issue_cert("localhost", "127.0.0.1", common_name="localhost")
    chain = b"".join(p.bytes() for p in leaf.cert_chain_pems)
    with running_dovecot(chain, leaf.private_key_pem.bytes()) as server:
        yield server


async def run(*argv: str, env: dict[str, str]) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


async def fetch_both_ways(
    rc_text: str, directory: Path, sink: Sink
) -> tuple[list[Accepted], list[Accepted]]:
    """What fetchmail delivered from the rc file (keeping the mail), then what fetchd delivered
    from its import of the same file."""
    rc = directory / "fetchmailrc"
    rc.write_text(rc_text)
    rc.chmod(0o600)
    assert FETCHMAIL is not None
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FETCHMAIL", "STATE_DIR"))}
    home = {**env, "HOME": str(directory)}
    code, out = await run(
        FETCHMAIL, "-f", str(rc), "--nosyslog", "--pidfile", str(directory / "pid"), env=home
    )
    assert code == 0, out
    by_fetchmail = list(sink.accepted)
    sink.accepted.clear()

    imported, _, err = import_rc(str(rc), "-o", str(directory / "fetchd.yaml"))
    assert imported == 0, err
    state = {**env, "XDG_STATE_HOME": str(directory / "state")}
    code, out = await run(
        sys.executable, "-m", "fetchd", "once", "-c", str(directory / "fetchd.yaml"), env=state
    )
    assert code == 0, out
    return by_fetchmail, list(sink.accepted)


@needs_fetchmail
@pytest.mark.parametrize(
    ("protocol", "port", "tls"),
    [
        ("imap", "imaps", "ssl"),
        ("pop3", "pop3s", "ssl"),
        ("imap", "imap", "sslproto 'tls1.2+'"),
    ],
)
async def test_fetchmail_and_fetchd_deliver_the_same_mail(
    named_dovecot: Dovecot,
    sink: Sink,
    ca_file: Path,
    tmp_path: Path,
    protocol: str,
    port: str,
    tls: str,
) -> None:
    user = f"rc-{protocol}-{port}"
    named_dovecot.add_user(user, f"pw-{user}")
    named_dovecot.deliver(user, MESSAGES)
    rc_text = (
        f"# the rc file fetchmail used\n"
        f"poll localhost proto {protocol} port {named_dovecot.ports[port]}:\n"
        f'  user "{user}" there with password "pw-{user}" is "{user}" here\n'
        f'  {tls} sslcertfile "{ca_file}" keep\n'
        f"  smtphost 127.0.0.1/{sink.port}\n"
    )

    by_fetchmail, by_fetchd = await fetch_both_ways(rc_text, tmp_path, sink)

    assert len(by_fetchmail) == len(MESSAGES)
    assert sorted(map(comparable, by_fetchd)) == sorted(map(comparable, by_fetchmail))
    assert {m.rcpt_tos for m in by_fetchd} == {(f"{user}@127.0.0.1",)}
    assert named_dovecot.count(user) == len(MESSAGES), "keep was carried over"


@needs_fetchmail
async def test_pinned_certificate_without_verification_works_for_both(
    dovecot: Dovecot, mailbox_user: str, sink: Sink, tmp_path: Path
) -> None:
    """The shared Dovecot's certificate has no CommonName, which fetchmail can only accept with
    no sslcertck; the MD5 pin then decides, for fetchmail and for fetchd alike."""
    dovecot.deliver(mailbox_user, MESSAGES[:2])
    pem = (dovecot.root / "tls" / "cert.pem").read_text()
    der = ssl_der(pem)
    md5 = ":".join(f"{b:02X}" for b in hashlib.md5(der).digest())  # noqa: S324 - as fetchmail pins
    rc_text = (
        f"poll localhost proto imap port {dovecot.ports['imaps']} user {mailbox_user}\n"
        f'  password "{dovecot.users[mailbox_user]}" is {mailbox_user} here keep\n'
        f'  ssl no sslcertck sslfingerprint "{md5}" smtphost 127.0.0.1/{sink.port}\n'
    )

    by_fetchmail, by_fetchd = await fetch_both_ways(rc_text, tmp_path, sink)

    assert len(by_fetchmail) == 2
    assert sorted(map(comparable, by_fetchd)) == sorted(map(comparable, by_fetchmail))
    yaml_text = (tmp_path / "fetchd.yaml").read_text()
    assert f'fingerprints: ["md5:{md5.replace(":", "")}"]' in yaml_text


def ssl_der(pem: str) -> bytes:
    first = pem[: pem.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----")]
    return ssl.PEM_cert_to_DER_cert(first)
