"""``fetchd import-fetchmailrc``: turn a fetchmail run control file into a fetchd configuration.

The rc file is read with fetchmail's own grammar: the lexer rules of its rcfile_l.l (longest
match, keyword order, the NAME and AUTH start states, backslash escapes), the productions of
rcfile_y.y, and the merging of a leading ``defaults`` entry into every poll entry. A file that
fetchmail accepts is therefore read the way fetchmail reads it, quirks included, and a file it
refuses is refused with the line number.

Every option is then carried over, or reported on stderr with its rc line and what fetchd does
instead (the same text goes into the YAML as a comment next to the account): nothing is dropped
silently. Passwords move to ``password_file`` entries (mode 0600), never into the YAML.

Exit status: 0 when everything was carried over, 1 when something could not be (the output is
still written), 2 when the rc file cannot be read or parsed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import getpass
import json
import os
import re
import shlex
import shutil
import socket
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeAlias

import yaml

from fetchd.config import SSLPROTO, load
from fetchd.errors import ConfigError

EXIT_OK, EXIT_INCOMPLETE, EXIT_UNREADABLE = 0, 1, 2

# ---------------------------------------------------------------------------------------------
# The lexer: fetchmail's rcfile_l.l (6.4), rule for rule, in its order.


class RcError(Exception):
    """The rc file cannot be read the way fetchmail would read it."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


@dataclass(frozen=True, slots=True)
class Token:
    kind: str
    value: str | int
    text: str  # the lexeme, for "syntax error at ..."
    line: int


_INITIAL, _NAME, _AUTH = "INITIAL", "NAME", "AUTH"
_ANY = frozenset({_INITIAL, _NAME, _AUTH})

# (pattern, start states, token kind, value, new state). flex picks the longest match; on a
# tie the rule written first wins, which is why the keywords come before the catch-all string.
_Rule: TypeAlias = tuple["re.Pattern[str]", frozenset[str], str, str, str | None]


def _rules() -> list[_Rule]:
    rules: list[_Rule] = []

    def add(
        pattern: str,
        kind: str,
        value: str = "",
        state: str | None = None,
        states: frozenset[str] = _ANY,
    ) -> None:
        rules.append((re.compile(pattern), states, kind, value, state))

    add(r'"[^"]*"|\'[^\']*\'', "QSTRING", state=_INITIAL)
    add(r"[^=;:, \t\r\n]+", "STRING", state=_INITIAL, states=frozenset({_NAME}))
    for word in [
        "set",
        "logfile",
        "idfile",
        "pidfile",
        "daemon",
        "syslog",
        "invisible",
        "showdots",
        "postmaster",
        "bouncemail",
        "spambounce",
        "softbounce",
        "warnings",
        "tracepolls",
        "defaults",
    ]:
        add(word, word.upper())
    add("server", "POLL")
    add("poll", "POLL")
    add("skip", "SKIP")
    add("via", "VIA")
    add("aka", "AKA")
    add("local(domains)?", "LOCALDOMAINS")
    add("proto(col)?", "PROTOCOL")
    add("service", "SERVICE")
    add("port", "PORT")
    add("interval", "INTERVAL")
    add("preauth(enticate)?", "AUTHENTICATE", state=_AUTH)
    add("auth(enticate)?", "AUTHENTICATE", state=_AUTH)
    for pattern, auth in (
        ("any", "any"),
        ("gssapi", "gssapi"),
        ("kerberos(_v)?4", "kerberos_v4"),
        ("kerberos(_v)?5", "kerberos_v5"),
        ("kerberos", "kerberos_v4"),
        ("ssh", "ssh"),
        ("external", "external"),
        ("(otp|opie)", "otp"),
        ("cram(-md5)?", "cram-md5"),
        ("msn", "msn"),
        ("ntlm", "ntlm"),
    ):
        add(pattern, "AUTHTYPE", auth, _INITIAL)
    add("password", "AUTHTYPE", "password", _INITIAL, frozenset({_AUTH}))
    for word in ["timeout", "envelope", "qvirtual", "principal", "esmtpname", "esmtppassword"]:
        add(word, word.upper())
    add("bad-header", "BADHEADER")
    add("accept", "ACCEPT")
    add("reject", "REJECT")
    add("user(name)?", "USERNAME", state=_NAME)
    add("pass(word)?", "PASSWORD", state=_NAME, states=frozenset({_INITIAL, _NAME}))
    add("folder(s)?", "FOLDER")
    add("smtp(host)?", "SMTPHOST")
    for word in ["fetchdomains", "smtpaddress", "smtpname"]:
        add(word, word.upper())
    add("antispam", "SPAMRESPONSE")
    for word in ["mda", "bsmtp", "lmtp"]:
        add(word, word.upper())
    add("pre(connect)?", "PRECONNECT")
    add("post(connect)?", "POSTCONNECT")
    for word in [
        "interface",
        "monitor",
        "plugin",
        "plugout",
        "batchlimit",
        "fetchlimit",
        "fetchsizelimit",
        "fastuidl",
        "expunge",
        "properties",
    ]:
        add(word, word.upper())
    add("is", "IS", state=_NAME)
    add("here", "HERE")
    add("there", "THERE")
    add("to", "TO", state=_NAME)
    add("=", "MAP", state=_NAME)
    add(
        "nobouncemail|nouidl|nocheckalias|nodns|noenvelope|nokeep|noflush|nolimitflush"
        "|nofetchall|norewrite|noforcecr|nostripcr|nopass8(bits)?|nodropstatus"
        "|nodropdelivered|nomimedec(ode)?|nospambounce|noidle",
        "NOPREFIX",
    )
    add("no", "NO")
    for word in ["keep", "flush", "limitflush", "fetchall", "rewrite", "forcecr", "stripcr"]:
        add(word, word.upper())
    add("pass8(bits)?", "PASS8BITS")
    add("dropstatus", "DROPSTATUS")
    add("dropdelivered", "DROPDELIVERED")
    add("mimedec(ode)?", "MIMEDECODE")
    for word in [
        "idle",
        "dns",
        "uidl",
        "ssl",
        "sslkey",
        "sslcert",
        "sslproto",
        "sslcertck",
        "sslcertfile",
        "sslcertpath",
        "sslcommonname",
        "sslfingerprint",
        "checkalias",
        "limit",
    ]:
        add(word, word.upper())
    add("with|and|has|wants|options|[;:,]", "NOISE")
    for proto in ("auto", "pop2"):
        add(f"{proto}|{proto.upper()}", "PROTO", proto)
    add("sdps|SDPS", "SDPS")
    for proto in ("pop3", "imap", "apop", "rpop", "etrn", "odmr"):
        add(f"{proto}|{proto.upper()}", "PROTO", proto)
    add("kpop|KPOP", "KPOP")
    add(r"(#.*)?\\?\n", "NEWLINE")
    add(r"-?[0-9]+", "NUMBER")
    add(r"[^=;:, \t\r\n]+", "STRING")
    add(r"[ \t\r]+", "SPACE")
    return rules


_RULES = _rules()


def lex(text: str) -> list[Token]:
    """fetchmail's tokens for ``text`` (bytes decoded as Latin-1, so every byte is one
    character), ending with an EOF token. Newlines and noise words are dropped."""
    tokens: list[Token] = []
    pos, line, state = 0, 1, _INITIAL
    while pos < len(text):
        best: tuple[int, _Rule] | None = None
        for rule in _RULES:
            if state not in rule[1]:
                continue
            m = rule[0].match(text, pos)
            if m and m.end() > pos and (best is None or m.end() - pos > best[0]):
                best = (m.end() - pos, rule)
        assert best is not None, "the catch-all rules match any character"
        length, (_, _, kind, value, new_state) = best
        lexeme = text[pos : pos + length]
        if kind == "NOPREFIX":  # flex's yyless(2): "nokeep" is NO, then "keep" again
            lexeme, length, kind = lexeme[:2], 2, "NO"
        if new_state is not None:
            state = new_state
        if kind in ("QSTRING", "STRING"):
            inner = lexeme[1:-1] if kind == "QSTRING" else lexeme
            tokens.append(Token("STRING", _escapes(inner), lexeme, line))
        elif kind == "NUMBER":
            tokens.append(Token("NUMBER", int(lexeme), lexeme, line))
        elif kind not in ("NEWLINE", "SPACE", "NOISE"):
            tokens.append(Token(kind, value or kind.lower(), lexeme, line))
        line += lexeme.count("\n")
        pos += length
    tokens.append(Token("EOF", "", "end of input", line))
    return tokens


def _escapes(s: str) -> str:
    """fetchmail's escapes(): \\n \\t \\b \\r, \\xhh, \\0oo (the 0 counts as a digit), \\ddd,
    backslash-newline joins lines, any other backslash pair is the character itself. The result
    is a C string, so it ends at the first NUL."""
    out: list[str] = []
    i = 0
    while i < len(s):
        c = s[i]
        if c == "\\" and i + 1 < len(s) and s[i + 1] in "0123456789xX":
            value, count = 0, 0
            i += 1
            if s[i] in "xX":
                i += 1
                while i < len(s) and s[i] in "0123456789abcdefABCDEF" and count < 2:
                    value, count, i = value * 16 + int(s[i], 16), count + 1, i + 1
            elif s[i] == "0":
                while i < len(s) and s[i] in "01234567" and count < 3:
                    value, count, i = value * 8 + int(s[i]), count + 1, i + 1
            else:
                while i < len(s) and s[i].isdigit() and s[i].isascii() and count < 3:
                    value, count, i = value * 10 + int(s[i]), count + 1, i + 1
            out.append(chr(value & 0xFF))
        elif c == "\\":
            if i + 1 >= len(s):
                break  # a backslash at the very end is ignored
            nxt = s[i + 1]
            i += 2
            if nxt == "\n":
                continue
            out.append({"n": "\n", "t": "\t", "b": "\b", "r": "\r"}.get(nxt, nxt))
        else:
            out.append(c)
            i += 1
    return "".join(out).split("\x00", 1)[0]


# ---------------------------------------------------------------------------------------------
# The parser: rcfile_y.y's productions, as recursive descent with the same decisions.


@dataclass(frozen=True, slots=True)
class Opt:
    """One option's value and the rc line its keyword is on."""

    value: object
    line: int


Options: TypeAlias = dict[str, Opt]


@dataclass
class Entry:
    kind: Literal["poll", "skip", "defaults"]
    name: str
    line: int
    server: Options = field(default_factory=dict)
    users: list[Options] = field(default_factory=list)


@dataclass
class RcFile:
    globals: Options
    entries: list[Entry]


_SERVER_STARTS = frozenset(
    [
        "AKA",
        "VIA",
        "LOCALDOMAINS",
        "PROTOCOL",
        "PRINCIPAL",
        "ESMTPNAME",
        "ESMTPPASSWORD",
        "UIDL",
        "CHECKALIAS",
        "SERVICE",
        "PORT",
        "INTERVAL",
        "AUTHENTICATE",
        "TIMEOUT",
        "ENVELOPE",
        "QVIRTUAL",
        "INTERFACE",
        "MONITOR",
        "PLUGIN",
        "PLUGOUT",
        "DNS",
        "TRACEPOLLS",
        "BADHEADER",
    ]
)
_SERVER_NO = frozenset({"UIDL", "CHECKALIAS", "DNS", "ENVELOPE"})
_SERVER_STRINGS = {
    "VIA": "via",
    "PRINCIPAL": "principal",
    "ESMTPNAME": "esmtpname",
    "ESMTPPASSWORD": "esmtppassword",
    "QVIRTUAL": "qvirtual",
    "INTERFACE": "interface",
    "MONITOR": "monitor",
    "PLUGIN": "plugin",
    "PLUGOUT": "plugout",
}
_USER_STRINGS = {
    "PASSWORD": "password",
    "SMTPADDRESS": "smtpaddress",
    "SMTPNAME": "smtpname",
    "MDA": "mda",
    "BSMTP": "bsmtp",
    "PRECONNECT": "preconnect",
    "POSTCONNECT": "postconnect",
    "SSLKEY": "sslkey",
    "SSLCERT": "sslcert",
    "SSLPROTO": "sslproto",
    "SSLCERTFILE": "sslcertfile",
    "SSLCERTPATH": "sslcertpath",
    "SSLCOMMONNAME": "sslcommonname",
    "SSLFINGERPRINT": "sslfingerprint",
    "PROPERTIES": "properties",
}
_USER_LISTS = {"FOLDER": "folder", "SMTPHOST": "smtphost", "FETCHDOMAINS": "fetchdomains"}
_USER_FLAGS = frozenset(
    [
        "KEEP",
        "FLUSH",
        "LIMITFLUSH",
        "FETCHALL",
        "REWRITE",
        "FORCECR",
        "STRIPCR",
        "PASS8BITS",
        "DROPSTATUS",
        "DROPDELIVERED",
        "MIMEDECODE",
        "IDLE",
        "SSL",
        "SSLCERTCK",
    ]
)
_USER_NO = _USER_FLAGS
_USER_NUMBERS = frozenset(
    ["LIMIT", "WARNINGS", "FETCHLIMIT", "FETCHSIZELIMIT", "FASTUIDL", "BATCHLIMIT", "EXPUNGE"]
)
_USER_STARTS = frozenset(
    {"TO", "IS", "SPAMRESPONSE", "LMTP", "NO"}
    | _USER_STRINGS.keys()
    | _USER_LISTS.keys()
    | _USER_FLAGS
    | _USER_NUMBERS
)
_SET_STRINGS = {
    "LOGFILE": "logfile",
    "IDFILE": "idfile",
    "PIDFILE": "pidfile",
    "POSTMASTER": "postmaster",
    "PROPERTIES": "properties",
}
_SET_FLAGS = frozenset(
    ["BOUNCEMAIL", "SPAMBOUNCE", "SOFTBOUNCE", "SYSLOG", "INVISIBLE", "SHOWDOTS"]
)


class _Parser:
    def __init__(self, tokens: list[Token]) -> None:
        self.tokens = tokens
        self.pos = 0

    @property
    def tok(self) -> Token:
        return self.tokens[self.pos]

    def peek(self, ahead: int = 1) -> Token:
        return self.tokens[min(self.pos + ahead, len(self.tokens) - 1)]

    def take(self, *kinds: str) -> Token:
        tok = self.tok
        if kinds and tok.kind not in kinds:
            raise RcError(tok.line, f"syntax error at {tok.text}")
        self.pos += 1
        return tok

    def parse(self) -> RcFile:
        settings: Options = {}
        entries: list[Entry] = []
        while self.tok.kind != "EOF":
            if self.tok.kind == "SET":
                self._set(settings)
            elif self.tok.kind in ("POLL", "SKIP", "DEFAULTS"):
                entries.append(self._entry())
            else:
                self.take("SET")  # the error names the token
        return RcFile(settings, entries)

    def _set(self, settings: Options) -> None:
        line = self.take("SET").line
        tok = self.take()
        if tok.kind in _SET_STRINGS or tok.kind == "DAEMON":
            if self.tok.kind == "MAP":
                self.take()
            value = self.take("NUMBER" if tok.kind == "DAEMON" else "STRING").value
            settings[str(tok.kind).lower()] = Opt(value, line)
        elif tok.kind in _SET_FLAGS:
            settings[tok.kind.lower()] = Opt(True, line)
        elif tok.kind == "NO" and self.tok.kind in _SET_FLAGS:
            settings[self.take().kind.lower()] = Opt(False, line)
        else:
            raise RcError(tok.line, f"syntax error at {tok.text}")

    def _entry(self) -> Entry:
        tok = self.take()
        if tok.kind == "DEFAULTS":
            entry = Entry("defaults", "defaults", tok.line)
        else:
            name = self.take("STRING").value
            entry = Entry("poll" if tok.kind == "POLL" else "skip", str(name), tok.line)
        while self._starts_server_option():
            self._server_option(entry.server)
        if self.tok.kind == "USERNAME":
            while self.tok.kind == "USERNAME":
                user: Options = {}
                self._userdef(user)
                while self._starts_user_option():
                    self._user_option(user)
                entry.users.append(user)
        elif self._starts_user_option():
            user = {}
            while self._starts_user_option():
                self._user_option(user)
            entry.users.append(user)
        else:
            entry.users.append({})
        if self.tok.kind == "NO":
            # After user options fetchmail's parser takes "no" as the start of a user option
            # (its grammar's two expected conflicts), so "no dns" there fails at "dns".
            nxt = self.peek()
            raise RcError(nxt.line, f"syntax error at {nxt.text}")
        if self._starts_server_option():
            # fetchmail complains once it has read the whole option, and for a list (aka,
            # localdomains) the token after it as well: that is the one its message names.
            lookahead = self.tok.kind in ("AKA", "LOCALDOMAINS")
            self._server_option({})
            last = self.tok if lookahead else self.tokens[self.pos - 1]
            raise RcError(last.line, f"server option after user options at {last.text}")
        if self.tok.kind not in ("EOF", "SET", "POLL", "SKIP", "DEFAULTS"):
            raise RcError(self.tok.line, f"syntax error at {self.tok.text}")
        return entry

    def _starts_server_option(self) -> bool:
        if self.tok.kind == "NO":
            return self.peek().kind in _SERVER_NO
        return self.tok.kind in _SERVER_STARTS

    def _starts_user_option(self) -> bool:
        if self.tok.kind == "NO":
            return self.peek().kind in _USER_NO
        return self.tok.kind in _USER_STARTS

    def _server_option(self, server: Options) -> None:
        tok = self.take()
        line, kind = tok.line, tok.kind
        if kind in _SERVER_STRINGS:
            server[_SERVER_STRINGS[kind]] = Opt(self.take("STRING").value, line)
        elif kind in ("AKA", "LOCALDOMAINS"):
            names = [str(self.take("STRING").value)]
            while self.tok.kind == "STRING":
                names.append(str(self.take().value))
            _append(server, kind.lower(), names, line)
        elif kind == "PROTOCOL":
            proto = self.take("PROTO", "KPOP", "SDPS")
            server["protocol"] = Opt(
                proto.value if proto.kind == "PROTO" else proto.kind.lower(), line
            )
        elif kind in ("UIDL", "CHECKALIAS", "DNS", "TRACEPOLLS"):
            server[kind.lower()] = Opt(True, line)
        elif kind == "NO":
            what = self.take().kind.lower()
            server[what] = Opt(None if what == "envelope" else False, line)
        elif kind == "SERVICE":
            value = self.take("STRING", "NUMBER").value
            server["service"] = Opt(str(value), line)
        elif kind == "PORT":
            server["service"] = Opt(str(self.take("NUMBER").value), line)
        elif kind in ("INTERVAL", "TIMEOUT"):
            server[kind.lower()] = Opt(self.take("NUMBER").value, line)
        elif kind == "AUTHENTICATE":
            server["auth"] = Opt(self.take("AUTHTYPE").value, line)
        elif kind == "ENVELOPE":
            skip = 0
            if self.tok.kind == "NUMBER":
                skip = int(self.take().value)
            server["envelope"] = Opt(self.take("STRING").value, line)
            server["envskip"] = Opt(skip, line)
        elif kind == "BADHEADER":
            server["badheader"] = Opt(self.take("ACCEPT", "REJECT").kind.lower(), line)
        else:  # pragma: no cover - _starts_server_option admits only the kinds above
            raise RcError(line, f"syntax error at {tok.text}")

    def _userdef(self, user: Options) -> None:
        line = self.take("USERNAME").line
        if self.tok.kind != "STRING":
            raise RcError(self.tok.line, f"syntax error at {self.tok.text}")
        if self.peek().kind == "THERE":
            user["user"] = Opt(self.take().value, line)
            self.take()
        elif self.peek().kind in ("STRING", "MAP", "HERE"):
            self._mappings(user, line)
            self.take("HERE")
        else:
            user["user"] = Opt(self.take().value, line)

    def _mappings(self, user: Options, line: int) -> None:
        """One or more ``name`` or ``server=local``; ``*`` passes unknown names through."""
        pairs: list[tuple[str, str | None]] = []
        if self.tok.kind != "STRING":
            raise RcError(self.tok.line, f"syntax error at {self.tok.text}")
        while self.tok.kind == "STRING":
            name = str(self.take().value)
            if self.tok.kind == "MAP":
                self.take()
                pairs.append((name, str(self.take("STRING").value)))
            elif name == "*":
                user["wildcard"] = Opt(True, line)
            else:
                pairs.append((name, None))
        if pairs:
            _append(user, "localnames", pairs, line)

    def _user_option(self, user: Options) -> None:
        tok = self.take()
        line, kind = tok.line, tok.kind
        if kind in ("TO", "IS"):
            if kind == "IS" and self.tok.kind == "STRING" and self.peek().kind == "THERE":
                user["user"] = Opt(self.take().value, line)
                self.take()
                return
            self._mappings(user, line)
            if self.tok.kind == "HERE":
                self.take()
        elif kind in _USER_STRINGS:
            user[_USER_STRINGS[kind]] = Opt(self.take("STRING").value, line)
        elif kind in _USER_LISTS:
            names = [str(self.take("STRING").value)]
            while self.tok.kind == "STRING":
                names.append(str(self.take().value))
            _append(user, _USER_LISTS[kind], names, line)
        elif kind == "SPAMRESPONSE":
            codes = [int(self.take("NUMBER").value)]
            while self.tok.kind == "NUMBER":
                codes.append(int(self.take().value))
            _append(user, "antispam", codes, line)
        elif kind == "LMTP" or kind in _USER_FLAGS:
            user[kind.lower()] = Opt(True, line)
        elif kind == "NO":
            user[self.take().kind.lower()] = Opt(False, line)
        elif kind in _USER_NUMBERS:
            user[kind.lower()] = Opt(self.take("NUMBER").value, line)
        else:  # pragma: no cover - _starts_user_option admits only the kinds above
            raise RcError(line, f"syntax error at {tok.text}")


def _append(options: Options, key: str, items: Sequence[object], line: int) -> None:
    """fetchmail's save_str(): a list option given twice grows."""
    old = options.get(key)
    prior: list[object] = list(old.value) if old and isinstance(old.value, list) else []
    options[key] = Opt([*prior, *items], old.line if old else line)


def parse(text: str) -> RcFile:
    """Parse rc text (Latin-1 decoded) and apply a leading ``defaults`` entry to the others,
    as fetchmail does: an option, or a list, the entry does not set comes from the defaults."""
    rc = _Parser(lex(text)).parse()
    defaults = [e for e in rc.entries if e.kind == "defaults"]
    if len(defaults) > 1 or (defaults and rc.entries[0] is not defaults[0]):
        bad = defaults[1] if len(defaults) > 1 or rc.entries[0] is defaults[0] else defaults[0]
        raise RcError(bad.line, '"defaults" must be the first entry, and there can be only one')
    if not defaults:
        return rc
    base = defaults[0]
    if len(base.users) > 1:
        raise RcError(base.line, '"defaults" can describe one user only')
    entries = [
        dataclasses.replace(
            entry,
            server={**base.server, **entry.server},
            users=[{**base.users[0], **user} for user in entry.users],
        )
        for entry in rc.entries[1:]
    ]
    return RcFile(rc.globals, entries)


# ---------------------------------------------------------------------------------------------
# Reports: what was carried over differently, or not at all.

Kind = Literal["dropped", "changed", "warning", "ignored"]
_PREFIX = {
    "dropped": "NOT CARRIED OVER: ",
    "changed": "changed: ",
    "warning": "WARNING: ",
    "ignored": "ignored: ",
}


@dataclass(frozen=True, slots=True)
class Report:
    line: int
    account: str | None
    keyword: str
    kind: Kind
    text: str

    def stderr(self, rcname: str) -> str:
        where = f"{rcname}:{self.line}:" if self.line else f"{rcname}:"
        who = f" {self.account}:" if self.account else ""
        return f"{where}{who} {self.keyword}: {_PREFIX[self.kind]}{self.text}"

    def comment(self) -> str:
        where = f"rc line {self.line}, " if self.line else ""
        return f"{where}{self.keyword}: {_PREFIX[self.kind]}{self.text}"


# ---------------------------------------------------------------------------------------------
# The fetchd side: what one imported account looks like, and how it is written.

Scalar: TypeAlias = str | int | bool


@dataclass
class Item:
    """One ``key: value`` line of the YAML; a nested mapping is a list of Items."""

    key: str
    value: Scalar | list[Scalar] | list[Item]
    comment: str = ""


@dataclass
class Account:
    name: str
    label: str  # "poll HOST, user NAME" as the rc file says it
    line: int
    items: list[Item] = field(default_factory=list)
    reports: list[Report] = field(default_factory=list)
    disabled: str = ""  # why the account is written commented out
    password: str | None = None
    env: str = ""  # the environment variable that would hold the password


_PLAIN = re.compile(r"[A-Za-z0-9_./@+-][A-Za-z0-9_./@+*() -]*")


def _scalars(values: Iterable[Scalar]) -> list[Scalar]:
    return list(values)


def _scalar(value: Scalar) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if _PLAIN.fullmatch(value) and not value.endswith(" "):
        with contextlib.suppress(yaml.YAMLError):
            if yaml.safe_load(value) == value:
                return value
    text = json.dumps(value, ensure_ascii=not value.isprintable())
    assert yaml.safe_load(text) == value
    return text


def _emit(items: list[Item], indent: int, first_prefix: str = "") -> list[str]:
    lines: list[str] = []
    for i, item in enumerate(items):
        pad = first_prefix if i == 0 and first_prefix else " " * indent
        key = _scalar(item.key)
        comment = f"  # {_printable(item.comment)}" if item.comment else ""
        value = item.value
        if isinstance(value, list) and value and isinstance(value[0], Item):
            lines.append(f"{pad}{key}:{comment}")
            lines += _emit([v for v in value if isinstance(v, Item)], indent + 2)
        elif isinstance(value, list):
            flow = "[" + ", ".join(_scalar(v) for v in value if not isinstance(v, Item)) + "]"
            if len(pad) + len(key) + len(flow) <= 96:
                lines.append(f"{pad}{key}: {flow}{comment}")
            else:
                lines.append(f"{pad}{key}:{comment}")
                for v in value:
                    if not isinstance(v, Item):
                        lines.append(f"{' ' * (indent + 2)}- {_scalar(v)}")
        else:
            lines.append(f"{pad}{key}: {_scalar(value)}{comment}")
    return lines


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _comment_block(text: str, pad: str) -> list[str]:
    return textwrap.wrap(
        _printable(text),
        width=99 - len(pad),
        initial_indent=f"{pad}# ",
        subsequent_indent=f"{pad}#   ",
        break_long_words=False,
        break_on_hyphens=False,
    )


# ---------------------------------------------------------------------------------------------
# fetchmail's semantics, mapped onto fetchd's keys.

_SERVICES = {"pop3": 110, "pop3s": 995, "imap": 143, "imap2": 143, "imaps": 993, "kpop": 1109}
_SMTP_SERVICES = {"smtp": 25, "lmtp": 24, "submission": 587, "smtps": 465, "submissions": 465}
_HEADERS = {h.lower(): h for h in ("Delivered-To", "X-Original-To", "X-Envelope-To")}
_HOST_RE = re.compile(r"\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._:-]+")
_ADDRESS_RE = re.compile(r"[^\s<>()\[\],;:\"@]+(@[A-Za-z0-9.\-\[\]:]+)?")
_SHELL_CHARS = frozenset("|&;<>()$`*?[]{}~\n")
_TLS_LABEL = {"TLSv1": "1.0", "TLSv1.1": "1.1", "TLSv1.2": "1.2", "TLSv1.3": "1.3"}


def local_user() -> str:
    """Who fetchmail would deliver to and log in as when the rc file does not say."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "root"


def default_postmaster() -> str:
    """fetchmail's postmaster: the calling user, or "postmaster" when run as root."""
    return "postmaster" if os.geteuid() == 0 else local_user()


@dataclass
class _Context:
    rc_dir: str
    settings: Options
    resolve_program: Callable[[str], str | None]
    names: set[str] = field(default_factory=set)


class _Converter:
    """Builds one fetchd account from one user of one poll entry."""

    def __init__(self, ctx: _Context, entry: Entry, user: Options) -> None:
        self.ctx, self.entry, self.s, self.u = ctx, entry, entry.server, user
        self.used: set[str] = {"user", "via"}
        via = self.s.get("via")
        remote = user.get("user")
        self.poll_name = _decode(entry.name)
        self.host = _decode(via.value) if via else self.poll_name
        self.remote = _decode(remote.value) if remote else local_user()
        label = f"{entry.kind} {self.poll_name}" + (f" via {self.host}" if via else "")
        line = remote.line if remote else entry.line
        name = _unique_name(ctx.names, self.remote, self.host)
        self.acct = Account(name, f"{label}, user {self.remote}", line)
        self.acct.env = "FETCHD_PASSWORD_" + re.sub(r"[^A-Z0-9]", "_", name.upper())
        self.tls: list[Item] = []
        self.deliver: list[Item] = []
        self.fetches = True  # False for ETRN, ODMR and POP2: no mailbox to fetch from

    # -- reading options ------------------------------------------------------------------

    def opt(self, key: str) -> Opt | None:
        """A user option, else a server option (both already merged with defaults)."""
        self.used.add(key)
        return self.u.get(key) or self.s.get(key)

    def flag(self, key: str, default: bool = False) -> bool:
        found = self.opt(key)
        return default if found is None else bool(found.value)

    def num(self, key: str) -> int:
        found = self.opt(key)
        return found.value if found is not None and isinstance(found.value, int) else 0

    def text(self, key: str) -> str | None:
        found = self.opt(key)
        return None if found is None or found.value is None else _decode(found.value)

    def texts(self, key: str) -> list[str]:
        found = self.opt(key)
        if found is None or not isinstance(found.value, list):
            return []
        return [_decode(v) for v in found.value]

    def line(self, key: str) -> int:
        found = self.u.get(key) or self.s.get(key)
        return found.line if found else self.acct.line

    def report(self, key: str, kind: Kind, text: str, keyword: str | None = None) -> None:
        self.acct.reports.append(Report(self.line(key), self.acct.name, keyword or key, kind, text))

    def path(self, key: str) -> str:
        """fetchmail's prependdir(): a relative path is relative to the rc file's directory."""
        raw = self.text(key) or ""
        return raw if not raw or os.path.isabs(raw) else os.path.join(self.ctx.rc_dir, raw)

    def _disable(self, key: str, why: str) -> None:
        self.report(key, "dropped", f"the account is written commented out: {why}")
        if not self.acct.disabled:
            self.acct.disabled = f"rc line {self.line(key)}: {why}"

    # -- the account ----------------------------------------------------------------------

    def convert(self) -> Account:
        a = self.acct
        if self.entry.kind == "skip":
            a.disabled = (
                f"rc line {self.entry.line}: skip: fetchmail polled this entry only when it was "
                "named on the command line; remove the # marks to poll it"
            )
        protocol = self._protocol()
        a.items += [Item("name", a.name), Item("protocol", protocol)]
        if not _HOST_RE.fullmatch(self.host):
            self._disable("via" if "via" in self.s else "poll", f"{self.host!r} is no host name")
        if not self.remote.strip() or not self.remote.isprintable():
            self._disable("user", f"{self.remote!r} is not a user name fetchd accepts")
        a.items.append(Item("host", self.host))
        port = self._port()
        if port is not None:
            a.items.append(Item("port", port))
        a.items.append(Item("user", self.remote))
        self._password()
        self._auth()
        mode = self._tls(port)
        if mode == "implicit" and port in (110, 143):
            self._disable(
                "ssl",
                f"ssl on port {port}, the port of in-band STARTTLS: fetchd refuses implicit TLS "
                "there",
            )
        if self.tls:
            a.items.append(Item("tls", self.tls))
        self._retrieval(protocol)
        self._timing()
        self._delivery()
        a.items.append(Item("deliver", self.deliver))
        self._leftovers(protocol)
        for key in sorted((self.u.keys() | self.s.keys()) - self.used):
            self.report(key, "dropped", "not understood by the importer")
        return a

    def _protocol(self) -> str:
        proto = self.text("protocol") or "auto"
        if proto in ("pop3", "imap"):
            return proto
        if proto == "apop":
            return "pop3"
        if proto == "sdps":
            self.report(
                "protocol",
                "changed",
                "sdps: plain POP3; Demon Internet's SDPS extension (envelope addresses from the "
                "server) is not used",
                keyword="proto",
            )
            return "pop3"
        if proto in ("kpop", "rpop"):
            how = "Kerberos IV" if proto == "kpop" else "RPOP"
            self.report(
                "protocol",
                "dropped",
                f"{proto}: POP3 with {how} login, which fetchd does not have; it logs in with "
                "the password",
                keyword="proto",
            )
            return "pop3"
        if proto in ("pop2", "etrn", "odmr"):
            self.fetches = False
            self._disable(
                "protocol",
                {
                    "pop2": "POP2 is not supported (fetchmail 6.4 cannot use it either)",
                    "etrn": "ETRN only asks the server to flush its queue by SMTP; fetchd "
                    "fetches mailboxes",
                    "odmr": "ODMR (on-demand mail relay) is not supported",
                }[proto],
            )
            return "pop3" if proto == "pop2" else "imap"
        service = self.text("service")
        port = _port_number(service, _SERVICES) if service else None
        guessed = {110: "pop3", 995: "pop3", 143: "imap", 993: "imap"}.get(port or 0)
        where = "protocol" if "protocol" in self.s else "service"
        if guessed:
            self.report(
                where,
                "changed",
                f"auto: fetchmail tried IMAP, then POP3; fetchd speaks one: {guessed}, as the "
                f"port is {port}",
                keyword="proto",
            )
            return guessed
        self.report(
            where if where in self.s else "poll",
            "dropped",
            "auto (the default): fetchmail tried IMAP, then POP3; fetchd speaks one: imap. "
            "Change protocol to pop3 if the server has no IMAP",
            keyword="proto",
        )
        return "imap"

    def _port(self) -> int | None:
        service = self.text("service")
        if service is None:
            return 1109 if self.text("protocol") == "kpop" else None
        port = _port_number(service, _SERVICES)
        if port is None or not 1 <= port <= 65535:
            self.report(
                "service",
                "dropped",
                f"{service!r} is neither a port number nor a known service; the default port "
                "is used",
            )
            return None
        return port

    def _password(self) -> None:
        a = self.acct
        found = self.opt("password")
        if found is None:
            if (self.text("auth") or "any") in ("any", "password", "cram-md5"):
                self.report(
                    "user",
                    "dropped",
                    "no password in the rc file (fetchmail took it from ~/.netrc or asked for "
                    f"it): export {a.env}, or give a password_file",
                    keyword="password",
                )
            a.items.append(Item("password_env", a.env, "TODO: the password is not in the rc file"))
            return
        try:
            secret = str(found.value).encode("latin-1").decode("utf-8")
        except UnicodeDecodeError:
            self.report("password", "dropped", "the password is not UTF-8 text")
            secret = ""
        else:
            if not secret or re.search(r"[\r\n]", secret):
                self.report(
                    "password", "dropped", "fetchd cannot use an empty or multi-line password"
                )
                secret = ""
        if not secret:
            a.items.append(Item("password_env", a.env, "TODO: set this variable"))
            return
        a.password = secret
        a.items.append(Item("password_file", ""))  # the writer puts the path in

    def _auth(self) -> None:
        auth = self.text("auth") or "any"
        if self.text("protocol") == "apop":
            self.acct.items.append(Item("auth", "apop", "proto apop"))
            if auth != "any":
                self.report("auth", "ignored", f"{auth}: proto apop decides the login")
            return
        if auth in ("any", "password"):
            return
        if auth == "cram-md5":
            self.acct.items.append(Item("auth", "cram-md5"))
            return
        what = {
            "ssh": "login-free sessions (IMAP PREAUTH through a plugin such as ssh)",
            "external": "TLS client-certificate login (EXTERNAL)",
            "gssapi": "GSSAPI",
            "kerberos_v4": "Kerberos IV",
            "kerberos_v5": "Kerberos V",
            "otp": "one-time passwords (OTP)",
            "ntlm": "NTLM",
            "msn": "MSN",
        }.get(auth, auth)
        self.report(
            "auth",
            "dropped",
            f"{auth}: fetchd has no {what}; it logs in with the password (auth: any)",
        )

    # -- TLS ------------------------------------------------------------------------------

    def _tls(self, port: int | None) -> str:
        t = self.tls
        ssl = self.flag("ssl")
        sslproto = self.text("sslproto")
        if ssl:
            mode = "implicit"
            t.append(Item("mode", "implicit", "ssl"))
            if sslproto == "":
                self.report(
                    "sslproto",
                    "changed",
                    "'' together with ssl: fetchmail logged an error and used auto",
                )
                sslproto = None
        elif sslproto == "" and port not in (993, 995):
            mode = "none"
            t += [Item("mode", "none", "sslproto ''"), Item("allow_plaintext", True)]
            self.report(
                "sslproto",
                "warning",
                "'' turns TLS off: the password and the mail cross the network unencrypted "
                "(tls.mode: none, allow_plaintext: true)",
            )
        elif port in (993, 995):
            mode = "implicit"
            t.append(Item("mode", "implicit", f"port {port}"))
            self.report(
                "service",
                "changed",
                f"port {port} speaks TLS from the first byte; fetchmail without ssl talked "
                "plaintext to it, which cannot work; fetchd uses implicit TLS",
                keyword="ssl",
            )
            sslproto = sslproto or None
        else:
            mode = "starttls"
            why = f"sslproto {sslproto}" if sslproto else "no ssl: STARTTLS, required"
            t.append(Item("mode", "starttls", why))
            if sslproto is None and not self.flag("sslcertck", True):
                self.report(
                    "sslcertck",
                    "changed",
                    "without ssl, sslproto and sslcertck fetchmail went on in plaintext when "
                    "the server offered no STARTTLS; fetchd requires STARTTLS",
                    keyword="no sslcertck",
                )
        if sslproto:
            self._versions(sslproto)
        self._verification()
        return mode

    def _versions(self, sslproto: str) -> None:
        word = sslproto.lower()
        low, high = SSLPROTO.get(word, ("TLSv1.2", None))
        if word in ("auto", "ssl23"):
            self.report(
                "sslproto",
                "changed",
                f"{sslproto}: fetchmail 6.4 accepted TLS 1.0 and 1.1 too; fetchd requires TLS "
                "1.2 or newer, like fetchmail 6.5 (min_version: '1.0' allows the old ones)",
            )
        elif word in ("ssl3", "ssl3+"):
            low = "TLSv1" if word == "ssl3+" else "TLSv1.2"
            self.report(
                "sslproto",
                "dropped",
                f"{sslproto}: SSL 3 is broken and not supported; TLS "
                f"{_TLS_LABEL[low]} or newer is used",
            )
        elif word not in SSLPROTO:
            self.report(
                "sslproto",
                "changed",
                f"{sslproto!r} is not a value fetchmail knows, so it used auto; fetchd requires "
                "TLS 1.2 or newer",
            )
        if low != "TLSv1.2":
            self.tls.append(Item("min_version", _TLS_LABEL[low], f"sslproto {sslproto}"))
        if low in ("TLSv1", "TLSv1.1"):
            self.report(
                "sslproto",
                "changed",
                f"allows TLS {_TLS_LABEL[low]}, which is obsolete: fetchd warns at each start",
            )
        if high is not None:
            self.tls.append(Item("max_version", _TLS_LABEL[high], f"sslproto {sslproto}"))

    def _verification(self) -> None:
        t = self.tls
        fingerprint = self.text("sslfingerprint")
        pin = _pin(fingerprint) if fingerprint is not None else None
        if fingerprint is not None and pin is None:
            self.report(
                "sslfingerprint",
                "dropped",
                f"{fingerprint!r} is not a fingerprint (hex digits in pairs), so fetchmail "
                "could never connect; no pin is set",
            )
        verify = self.flag("sslcertck", True)
        if not verify and fingerprint is not None and pin is None:
            self.report(
                "sslcertck",
                "changed",
                "no sslcertck with an unusable fingerprint: fetchd keeps verifying the "
                "certificate instead of connecting unchecked",
                keyword="no sslcertck",
            )
        elif not verify:
            t.append(Item("verify", False, "no sslcertck"))
            if pin:
                self.report(
                    "sslcertck",
                    "changed",
                    "the certificate chain is not checked; the pinned fingerprint alone "
                    "decides, as in fetchmail",
                    keyword="no sslcertck",
                )
            else:
                self.report(
                    "sslcertck",
                    "warning",
                    "the certificate is not checked and no fingerprint is pinned: anyone in the "
                    "middle can read the password (verify: false)",
                    keyword="no sslcertck",
                )
        for key, target, kind in (
            ("sslcertfile", "ca_file", "file"),
            ("sslcertpath", "ca_path", "directory"),
        ):
            if self.text(key):
                t.append(Item(target, self.path(key), key))
                self._exists(key, self.path(key), kind)
        if (name := self.text("sslcommonname")) is not None:
            t.append(Item("server_name", name, "sslcommonname"))
        if pin:
            t.append(Item("fingerprints", _scalars([pin]), "sslfingerprint"))
        cert, client_key = self.text("sslcert"), self.text("sslkey")
        if cert:
            t.append(Item("client_cert", self.path("sslcert"), "sslcert"))
            self._exists("sslcert", self.path("sslcert"), "file")
            self.report(
                "sslcert",
                "changed",
                "fetchmail logged in as the certificate's CommonName; fetchd logs in as user",
            )
            if client_key:
                t.append(Item("client_key", self.path("sslkey"), "sslkey"))
                self._exists("sslkey", self.path("sslkey"), "file")
        elif client_key:
            self.report("sslkey", "dropped", "a key without sslcert is not used")

    def _exists(self, key: str, path: str, kind: str) -> None:
        if not (os.path.isdir(path) if kind == "directory" else os.path.isfile(path)):
            self.report(
                key,
                "changed",
                f"{path} is not a {kind} on this machine: fetchd check refuses the "
                "configuration until it is",
            )

    # -- retrieval ------------------------------------------------------------------------

    def _retrieval(self, protocol: str) -> None:
        a = self.acct
        folders = self.texts("folder")
        if bad := [f for f in folders if not f.strip() or not f.isprintable()]:
            self.report("folder", "dropped", f"fetchd cannot name the folder(s) {bad!r}")
            folders = [f for f in folders if f not in bad]
        if folders and protocol == "pop3":
            self.report("folder", "ignored", "POP3 has no folders (fetchmail ignored them too)")
        elif folders:
            a.items.append(Item("folders", _scalars(folders)))
        keep = self.flag("keep")
        a.items.append(Item("keep", keep))
        if keep:
            self.report(
                "keep",
                "changed",
                "fetchd does not read fetchmail's list of seen messages (.fetchids) nor the "
                "server's read flags: its first poll delivers every message on the server "
                "again, later polls only new ones",
            )
        if self.flag("fetchall"):
            a.items.append(Item("fetch_all", True, "fetchall"))
            if keep:
                self.report(
                    "fetchall",
                    "warning",
                    "with keep, every poll delivers every message on the server again, as "
                    "fetchmail did; remove fetch_all to get new mail only",
                )
        elif protocol == "imap" and not keep and self.fetches:
            self.report(
                "user",
                "changed",
                "fetchd also fetches (and then deletes) messages already marked read on the "
                "server; fetchmail left those alone without fetchall",
                keyword="fetchall",
            )
        if self.flag("flush"):
            self.report(
                "flush",
                "dropped",
                "fetchd never deletes a message it has not delivered. fetchmail deleted old "
                "(read) messages unseen; the closest is what keep: false does here: read "
                "messages are fetched, delivered, then deleted",
            )
        limit, limitflush = self.num("limit"), self.flag("limitflush")
        if limit > 0:
            a.items.append(Item("limit", limit))
            if limitflush:
                a.items.append(Item("limit_delete", True, "limitflush"))
            self.report(
                "limit",
                "changed",
                "fetchd logs each oversized message at every poll instead of mailing a warning",
            )
        elif limitflush:
            self.report("limitflush", "ignored", "without a limit it has no effect")
        if self.opt("warnings") is not None:
            self.report("warnings", "ignored", "fetchd mails no oversize warnings")
        if (fetchlimit := self.num("fetchlimit")) > 0:
            a.items.append(Item("fetch_limit", fetchlimit, "fetchlimit"))
        if self.opt("expunge") is not None:
            expunge = self.num("expunge")
            if protocol == "pop3" and expunge > 0:
                a.items.append(Item("expunge_every", expunge, "expunge"))
            elif protocol == "imap":
                self.report(
                    "expunge",
                    "changed",
                    "fetchd expunges once per folder, after the messages it delivered",
                )
        if self.flag("idle"):
            if protocol == "imap":
                a.items.append(Item("idle", True))
            else:
                self.report("idle", "ignored", "IDLE is IMAP only (fetchmail ignored it too)")

    def _timing(self) -> None:
        a = self.acct
        if (timeout := self.num("timeout")) > 0:
            if timeout > 3600:
                self.report("timeout", "changed", f"{timeout} s is above fetchd's 3600 s limit")
            a.items.append(Item("timeout", min(timeout, 3600)))
        interval = self.num("interval")
        daemon = self.ctx.settings.get("daemon")
        every = daemon.value if daemon is not None and isinstance(daemon.value, int) else 0
        if interval > 1 and every > 0:
            seconds = min(interval * every, 7 * 86400)
            a.items.append(Item("interval", seconds, f"interval {interval} x set daemon {every}"))
        elif interval > 1:
            self.report(
                "interval",
                "changed",
                f"fetchmail polled this server every {interval}th run; without set daemon "
                "there is nothing to multiply, so fetchd's default applies",
            )

    # -- delivery -------------------------------------------------------------------------

    def _delivery(self) -> None:
        d = self.deliver
        mda = self.text("mda")
        hunt = self.texts("smtphost")
        lmtp = self.flag("lmtp")
        destaddr = "localhost"
        if self.text("bsmtp") is not None:
            self._disable("bsmtp", "fetchd cannot append messages to a BSMTP batch file")
        if mda is not None:
            d.append(Item("mda", self._mda(mda)))
            if hunt:
                self.report("smtphost", "ignored", "fetchmail ignored it too, as mda is set")
            if lmtp:
                self.report("lmtp", "ignored", "fetchmail ignored it too, as mda is set")
        else:
            destaddr = self._target(hunt, lmtp)
        smtpaddress = self.text("smtpaddress")
        smtpname = self.text("smtpname")
        if mda is not None:
            for key in ("smtpaddress", "smtpname"):
                if self.text(key) is not None:
                    self.report(key, "ignored", "an MDA is given the bare local names")
        elif smtpaddress is not None:
            destaddr = smtpaddress

        def rcpt(name: str, use_smtpname: bool = True) -> str:
            """fetchmail's rcpt_address(), or the bare name an MDA gets."""
            if "@" in name or mda is not None:
                return name
            if smtpname is not None and use_smtpname:
                return smtpname
            return f"{name}@{destaddr}"

        self._recipients(rcpt)
        if (batch := self.num("batchlimit")) > 0:
            d.append(Item("batch_limit", batch, "batchlimit"))
        self._on_reject(mda is not None)

    def _target(self, hunt: list[str], lmtp: bool) -> str:
        """deliver.smtp or deliver.lmtp from the first smtphost; returns the domain fetchmail
        appended to bare local names (the host, or localhost for a socket)."""
        target = hunt[0] if hunt else "localhost"
        if len(hunt) > 1:
            self.report(
                "smtphost",
                "dropped",
                f"fetchd delivers to one target, {target}; fetchmail fell back to "
                f"{', '.join(hunt[1:])} when it was down",
            )
        if target.startswith("/"):
            self.deliver.append(Item("lmtp", target, "smtphost: a path is an LMTP socket"))
            return "localhost"
        host, _, port_text = target.partition("/")
        host = host.removeprefix("[").removesuffix("]")
        if "/" in port_text:
            port_text, _, rest = port_text.partition("/")
            self.report("smtphost", "ignored", f"/{rest} after the port is not understood")
        port = _port_number(port_text, _SMTP_SERVICES) if port_text else None
        if port_text and (port is None or not 1 <= port <= 65535):
            self.report("smtphost", "dropped", f"{port_text!r} is not a port; 25 is used")
            port = None
        if lmtp and port in (None, 25):
            self.report(
                "lmtp",
                "changed",
                "fetchmail refuses LMTP without a port other than 25; fetchd uses port 24",
            )
            port = 24
        shown = f"[{host}]" if ":" in host else host
        comment = "" if hunt else "fetchmail's default"
        self.deliver.append(Item("lmtp" if lmtp else "smtp", f"{shown}:{port or 25}", comment))
        return host

    def _mda(self, command: str) -> list[Scalar]:
        """fetchmail runs the command through /bin/sh, with the recipients for %T (or %s) and
        the sender for %F, each single-quoted. fetchd runs an argument list without a shell, so
        a plain command is split as sh would split it; one that needs sh runs under /bin/sh -c
        with the values as positional parameters, never pasted into the script."""
        try:
            words = shlex.split(command)
        except ValueError:
            words = []
        for m in re.finditer(r"%([^TFs])", command):
            self.report(
                "mda",
                "ignored",
                f"%{m.group(1)} is no placeholder in fetchmail either; it is passed on as it is",
            )
        if "%s" in command:
            self.report("mda", "changed", "%s is fetchmail's old spelling of %T (the recipient)")
        if re.search(r"'[^']*%[TFs][^']*'", command):
            self.report(
                "mda", "changed", "%T or %F inside single quotes (fetchmail 6.4 refuses it)"
            )
        shell = not words or _needs_shell(command)
        if not shell and "/" not in words[0]:
            found = self.ctx.resolve_program(words[0])
            if found:
                self.report("mda", "changed", f"{words[0]} runs as {found}, found on PATH now")
                words[0] = found
            else:
                shell = True
                self.report(
                    "mda",
                    "changed",
                    f"{words[0]} is not on this machine's PATH: it runs under /bin/sh, which "
                    "looks for it at delivery time",
                )
        elif not shell and not os.path.isabs(words[0]):
            shell = True
            self.report("mda", "changed", f"{words[0]} is a relative path: it runs under /bin/sh")
        if not shell:
            return [_placeholders(w) for w in words]
        if words and _needs_shell(command):
            self.report(
                "mda",
                "changed",
                "the command needs a shell (pipes, redirections, $ or wildcards): it runs "
                "under /bin/sh -c, with the recipient and sender as positional parameters",
            )
        script, params = _shell_script(command)
        return ["/bin/sh", "-c", script, "sh", *params]

    def _recipients(self, rcpt: Callable[..., str]) -> None:
        found = self.opt("localnames")
        pairs: list[tuple[str, str | None]] = []
        if found is not None and isinstance(found.value, list):
            for pair in found.value:
                name, mapped = pair
                pairs.append((_decode(name), None if mapped is None else _decode(mapped)))
        wildcard = self.flag("wildcard")
        if not pairs:
            pairs = [(local_user(), None)]
        if wildcard or len(pairs) > 1:
            self._multidrop(pairs, wildcard, rcpt)
            return
        name, mapped = pairs[0]
        if mapped is not None:
            self.report(
                "localnames",
                "changed",
                f"a single mapping {name}={mapped}: fetchmail delivers a single-drop mailbox to "
                f"the first name, {name}, and so does this configuration",
                keyword="is/to",
            )
        address = rcpt(name)
        self.deliver.append(Item("to", _scalars([address]), "" if found else "the local user"))
        self._check_address(address)

    def _check_address(self, address: str) -> None:
        if not _ADDRESS_RE.fullmatch(address):
            self._disable("localnames", f"{address!r} is not a mail address fetchd accepts")

    def _multidrop(
        self, pairs: list[tuple[str, str | None]], wildcard: bool, rcpt: Callable[..., str]
    ) -> None:
        envelope = self.opt("envelope")
        header = None
        if envelope is not None and envelope.value is None:
            self.report(
                "envelope",
                "dropped",
                "fetchmail guessed recipients from To/Cc/Bcc; fetchd never does. X-Envelope-To "
                "is assumed: set the header your provider adds",
                keyword="no envelope",
            )
        else:
            name = (self.text("envelope") or "Received").rstrip(":").strip()
            header = _HEADERS.get(name.lower())
            if header is None:
                self.report(
                    "envelope" if envelope else "localnames",
                    "dropped",
                    f"fetchmail looked for recipients in {name} headers"
                    + (" (its default)" if envelope is None else "")
                    + "; fetchd reads one header the receiving server adds (Delivered-To, "
                    "X-Original-To or X-Envelope-To): X-Envelope-To is assumed, check which one "
                    "your provider adds",
                    keyword="envelope",
                )
        if (skip := self.num("envskip")) > 0:
            self.report(
                "envskip",
                "dropped",
                f"fetchmail skipped the first {skip} such header(s); fetchd reads every one",
                keyword="envelope",
            )
        if self.text("qvirtual") is not None:
            self.report(
                "qvirtual", "dropped", "fetchd cannot strip a prefix from envelope addresses"
            )
        servers = list(dict.fromkeys([self.poll_name.lower(), self.host.lower()]))
        aka = [x.lower() for x in self.texts("aka")]
        local = [x.lower() for x in self.texts("localdomains")]
        items = [
            Item("header", header or "X-Envelope-To", "" if header else "TODO: check"),
            Item("local_domains", _scalars(dict.fromkeys(local + servers + aka))),
        ]
        first: dict[str, str] = {}  # a name given twice: fetchmail uses the first
        for name, mapped in pairs:
            first.setdefault(name.lower(), rcpt(mapped or name))
        table = [Item(key, value) for key, value in first.items()]
        items.append(Item("map", table))
        postmaster = self.ctx.settings.get("postmaster")
        fallback = _decode(postmaster.value) if postmaster else default_postmaster()
        if fallback:
            items.append(Item("fallback", rcpt(fallback, False), "no local match: postmaster"))
        self.deliver.append(Item("multidrop", items))
        for item in table:
            self._check_address(str(item.value))
        self.report(
            "localnames",
            "dropped",
            f"an address at {', '.join(servers + aka)} whose name is not in map is delivered "
            "as it is; fetchmail "
            + ("gave it to the local user of that name (*)" if wildcard else "ignored it"),
            keyword="is/to",
        )
        if aka or local:
            self.report(
                "localdomains" if local else "aka",
                "changed",
                "fetchd matches these domains exactly; fetchmail accepted subdomains too",
            )
        if self.flag("dns", True):
            self.report(
                "dns" if "dns" in self.s else "localnames",
                "changed",
                "fetchmail also asked DNS for other names of the mail server; fetchd matches "
                "only local_domains",
                keyword="dns",
            )
        if self.flag("checkalias"):
            self.report("checkalias", "ignored", "fetchd does no DNS alias checks")
        mda = next((i.value for i in self.deliver if i.key == "mda"), None)
        if isinstance(mda, list) and any("%T" in str(v) for v in mda):
            self.report(
                "mda",
                "changed",
                "%T: fetchd runs the MDA once per recipient; fetchmail ran it once with all of "
                "them in one argument",
            )

    def _on_reject(self, mda: bool) -> None:
        soft = self.ctx.settings.get("softbounce")
        softbounce = True if soft is None else bool(soft.value)
        if mda:
            table = [Item("default", "keep", "an MDA failure keeps the message, as in fetchmail")]
        else:
            why = "softbounce, fetchmail's default" if soft is None else "set softbounce"
            action = "keep" if softbounce else "delete"
            table = [Item("default", action, why if softbounce else "set no softbounce")]
        default = str(table[0].value)
        found = self.opt("antispam")
        codes = (
            [c for c in found.value if isinstance(c, int)]
            if found and isinstance(found.value, list)
            else []
        )
        permanent = [c for c in codes if 500 <= c <= 599]
        temporary = [c for c in codes if 400 <= c <= 499]
        for code in permanent:
            if all(i.key != str(code) for i in table):
                table.append(Item(str(code), default, "antispam"))
        if permanent:
            self.report(
                "antispam",
                "changed",
                f"{', '.join(map(str, permanent))}: fetchd never bounces; a refusal as spam is "
                f"handled like any other permanent one ({default})",
            )
        if temporary:
            self.report(
                "antispam",
                "changed" if softbounce else "dropped",
                f"{', '.join(map(str, temporary))}: fetchd treats every 4xx reply as temporary: "
                "the message is kept and retried"
                + ("" if softbounce else "; fetchmail deleted it as spam"),
            )
        others = [c for c in codes if c not in permanent and c not in temporary and c != -1]
        if others:
            self.report(
                "antispam",
                "ignored",
                f"{', '.join(map(str, others))}: not SMTP reply codes, so they never match",
            )
        self.deliver.append(Item("on_reject", table))

    # -- everything else ------------------------------------------------------------------

    def _leftovers(self, protocol: str) -> None:
        """Options with no fetchd key: each gets a report, so none is lost silently."""
        mda = self.text("mda") is not None
        for key, (kind, text) in _NO_EQUIVALENT.items():
            found = self.opt(key)
            if found is None:
                continue
            if found.value is False and key in ("dropstatus", "dropdelivered", "mimedecode"):
                kind, text = "ignored", "fetchd never edits messages anyway"
            elif found.value is False and key == "tracepolls":
                kind, text = "ignored", "fetchd's Received header names the account anyway"
            elif key == "uidl" and protocol != "pop3":
                text = "POP3 only"
            self.report(key, kind, text, keyword=key if found.value is not False else f"no {key}")
        rewrite = self.opt("rewrite")
        if rewrite is not None and rewrite.value:
            self.report(
                "rewrite",
                "changed",
                "fetchd never rewrites addresses in headers (fetchmail added the server's name "
                "to bare local addresses)",
            )
        elif rewrite is not None:
            self.report("rewrite", "ignored", "fetchd never rewrites addresses", "no rewrite")
        for key in ("stripcr", "forcecr"):
            found = self.opt(key)
            if found is None:
                continue
            # fetchd sends CRLF to an MTA and LF to an MDA: only the opposite wish differs.
            differs = bool(found.value) and (mda if key == "forcecr" else not mda)
            self.report(
                key,
                "changed" if differs else "ignored",
                "fetchd sends CRLF line ends to an MTA and LF to an MDA",
                keyword=key if found.value else f"no {key}",
            )
        badheader = self.text("badheader")
        if badheader == "reject":
            self.report(
                "badheader",
                "changed",
                "fetchd passes messages with malformed headers on; the MTA decides",
                keyword="bad-header",
            )
        elif badheader == "accept":
            self.report(
                "badheader", "ignored", "fetchd passes every message on", keyword="bad-header"
            )
        if not any(i.key == "multidrop" for i in self.deliver):
            self.used.add("envskip")  # part of envelope
            for key in ("dns", "checkalias", "envelope", "qvirtual", "aka", "localdomains"):
                found = self.opt(key)
                if found is not None:
                    off = found.value is False or found.value is None
                    self.report(
                        key,
                        "ignored",
                        "multidrop only; this mailbox has one recipient",
                        keyword=f"no {key}" if off else key,
                    )


_NO_EQUIVALENT: dict[str, tuple[Kind, str]] = {
    "preconnect": ("dropped", "fetchd runs no command before connecting"),
    "postconnect": ("dropped", "fetchd runs no command after disconnecting"),
    "plugin": ("dropped", "fetchd connects to the server itself, not through a command"),
    "plugout": ("dropped", "fetchd connects to the MTA itself, not through a command"),
    "interface": ("dropped", "fetchd does not check network interfaces before polling"),
    "monitor": ("dropped", "fetchd does not watch an interface for activity"),
    "principal": ("dropped", "fetchd has no Kerberos"),
    "esmtpname": ("dropped", "fetchd does not log in to the MTA (SMTP AUTH)"),
    "esmtppassword": ("dropped", "fetchd does not log in to the MTA (SMTP AUTH)"),
    "dropstatus": ("dropped", "fetchd never edits messages: Status lines stay"),
    "dropdelivered": ("dropped", "fetchd never edits messages: Delivered-To lines stay"),
    "mimedecode": ("dropped", "fetchd never edits messages: no quoted-printable decoding"),
    "fetchdomains": ("ignored", "it applies to ETRN and ODMR only"),
    "fetchsizelimit": ("ignored", "fetchd asks for sizes as it needs them"),
    "fastuidl": ("ignored", "fetchd keeps the UIDs it delivered in its state"),
    "uidl": ("ignored", "fetchd always tracks POP3 messages by UIDL"),
    "properties": ("ignored", "fetchmail ignores it too"),
    "tracepolls": ("ignored", "fetchd's Received header always names the account"),
    "pass8bits": ("ignored", "fetchd announces BODY=8BITMIME whenever a message has 8-bit bytes"),
}


def _decode(raw: object) -> str:
    """An rc string (one character per byte) as the text those bytes spell in UTF-8."""
    return str(raw).encode("latin-1", "replace").decode("utf-8", "replace")


def _port_number(text: str, names: dict[str, int]) -> int | None:
    if re.fullmatch(r"-?[0-9]+", text):
        return int(text)
    if text in names:
        return names[text]
    try:
        return socket.getservbyname(text, "tcp")
    except OSError:
        return None


def _pin(raw: str) -> str | None:
    """fetchmail's fingerprint (hex pairs joined by colons, MD5 in 6.4; 6.5 allows a
    ``{SHA256}`` prefix) as a fetchd pin ``algo:HEX``."""
    text = raw.strip()
    algo = None
    if m := re.match(r"\{(md5|sha1|sha256)\}", text, re.IGNORECASE):
        algo, text = m.group(1).lower(), text[m.end() :]
    digits = text.replace(":", "").replace(" ", "").upper()
    lengths = {32: "md5", 40: "sha1", 64: "sha256"}
    if not re.fullmatch(r"[0-9A-F]+", digits) or len(digits) not in lengths:
        return None
    if algo is not None and lengths[len(digits)] != algo:
        return None
    return f"{lengths[len(digits)]}:{digits}"


def _unique_name(taken: set[str], user: str, host: str) -> str:
    base = re.sub(r"[^A-Za-z0-9._@+-]", "-", f"{user}@{host}").lstrip("._@+-")[:120] or "account"
    name, n = base, 1
    while name.lower() in taken:
        n += 1
        name = f"{base}-{n}"
    taken.add(name.lower())
    return name


def _needs_shell(command: str) -> bool:
    """Whether sh would do more than split words: operators, expansions, globs, comments or a
    leading variable assignment (quoted text excepted)."""
    quote = ""
    word_start = True
    first_word = True
    i = 0
    while i < len(command):
        c = command[i]
        if quote == "'":
            if c == "'":
                quote = ""
        elif quote == '"':
            if c == "\\":
                i += 1
            elif c == '"':
                quote = ""
            elif c in "$`":
                return True
        elif c == "\\":
            i += 1
        elif c in "'\"":
            quote = c
        elif c in _SHELL_CHARS or (c == "#" and word_start) or (c == "=" and first_word):
            return True
        if c in " \t" and not quote:
            if not word_start:
                first_word = False
            word_start = True
        else:
            word_start = False
        i += 1
    return False


def _placeholders(arg: str) -> str:
    """fetchmail's %T, %s and %F in fetchd's spelling; any other % is literal in fetchmail, so
    it is escaped for fetchd (which reads %% as one percent sign)."""
    out: list[str] = []
    i = 0
    while i < len(arg):
        pair = arg[i : i + 2]
        if pair in ("%T", "%s"):
            out.append("%T")
            i += 2
        elif pair == "%F":
            out.append("%F")
            i += 2
        elif arg[i] == "%":
            out.append("%%")
            i += 1
        else:
            out.append(arg[i])
            i += 1
    return "".join(out)


def _shell_script(command: str) -> tuple[str, list[str]]:
    """The command as a /bin/sh -c script with %T/%s and %F replaced by positional parameters
    (quoted outside double quotes), and those parameters in order."""
    order: list[str] = []
    out: list[str] = []
    quote = ""
    i = 0
    while i < len(command):
        c = command[i]
        pair = command[i : i + 2]
        if quote != "'" and pair in ("%T", "%s", "%F"):
            placeholder = "%F" if pair == "%F" else "%T"
            if placeholder not in order:
                order.append(placeholder)
            n = order.index(placeholder) + 1
            out.append(f"${n}" if quote == '"' else f'"${n}"')
            i += 2
            continue
        if c == "%":
            out.append("%%")
        elif quote == "'":
            out.append(c)
            if c == "'":
                quote = ""
        elif c == "\\" and i + 1 < len(command):
            out.append(command[i : i + 2].replace("%", "%%"))
            i += 2
            continue
        else:
            out.append(c)
            if c in "'\"" and not quote:
                quote = c
            elif c == quote:
                quote = ""
        i += 1
    return "".join(out), order


# ---------------------------------------------------------------------------------------------
# The whole file.


@dataclass
class Result:
    accounts: list[Account]
    reports: list[Report]  # global ones; each account holds its own
    defaults: list[Item]

    @property
    def all_reports(self) -> list[Report]:
        everything = [*self.reports]
        for a in self.accounts:
            everything += a.reports
        return sorted(everything, key=lambda r: r.line)

    @property
    def complete(self) -> bool:
        return not any(r.kind == "dropped" for r in self.all_reports)


def convert(
    rc: RcFile, rc_dir: str, resolve_program: Callable[[str], str | None] | None = None
) -> Result:
    """Map a parsed rc file onto fetchd accounts, with a report for everything that differs.
    ``resolve_program`` finds an MDA given without a path (default: shutil.which)."""
    ctx = _Context(rc_dir, rc.globals, resolve_program or shutil.which)
    accounts = [
        _Converter(ctx, entry, user).convert()
        for entry in rc.entries
        if entry.kind != "defaults"
        for user in entry.users
    ]
    return Result(accounts, _global_reports(rc.globals), _defaults(rc.globals))


def _defaults(settings: Options) -> list[Item]:
    items: list[Item] = []
    daemon = settings.get("daemon")
    if daemon is not None and isinstance(daemon.value, int) and daemon.value > 0:
        seconds = min(daemon.value, 7 * 86400)
        items.append(Item("interval", seconds, f"set daemon {daemon.value}"))
    invisible = settings.get("invisible")
    if invisible is not None and invisible.value:
        items.append(Item("deliver", [Item("received_header", False, "set invisible")]))
    return items


def _global_reports(settings: Options) -> list[Report]:
    reports: list[Report] = []

    def add(key: str, kind: Kind, text: str, keyword: str | None = None) -> None:
        reports.append(Report(settings[key].line, None, keyword or f"set {key}", kind, text))

    daemon = settings.get("daemon")
    every = daemon.value if daemon is not None and isinstance(daemon.value, int) else 0
    if every <= 0:
        reports.append(
            Report(
                daemon.line if daemon else 0,
                None,
                "set daemon",
                "changed",
                ("0" if daemon else "not set")
                + ": fetchmail polled once per run; `fetchd run` polls every 300 s (interval), "
                "`fetchd once` polls once",
            )
        )
    for key in settings:
        value = settings[key].value
        if key == "logfile":
            add(key, "changed", "fetchd logs to stderr (the journal under systemd)")
        elif key == "syslog":
            if value:
                add(key, "changed", "fetchd logs to stderr (the journal under systemd)")
            else:
                add(key, "ignored", "fetchd does not use syslog anyway", "set no syslog")
        elif key == "idfile":
            add(
                key,
                "changed",
                "fetchd keeps its own state (state_file); the UIDs fetchmail remembered are not "
                "imported",
            )
        elif key == "pidfile":
            add(key, "ignored", "fetchd run holds a lock next to its state file instead")
        elif key == "postmaster":
            add(
                key,
                "changed",
                "used as the multidrop fallback only; fetchd mails no warnings",
            )
        elif key == "bouncemail":
            if value:
                add(key, "changed", "fetchd never sends bounces (senders are easily forged)")
            else:
                add(key, "ignored", "fetchd never sends bounces anyway", "set no bouncemail")
        elif key == "spambounce":
            if value:
                add(key, "changed", "fetchd never sends bounces (senders are easily forged)")
            else:
                add(key, "ignored", "fetchd never sends bounces anyway", "set no spambounce")
        elif key == "softbounce":
            if value:
                add(
                    key,
                    "changed",
                    "a message the MTA refuses for good is kept, as in fetchmail, and recorded, "
                    "so fetchd does not fetch it again at every poll (on_reject: keep)",
                )
            else:
                add(
                    key,
                    "changed",
                    "a message the MTA refuses for good is deleted on the server, without the "
                    "bounce fetchmail sent (on_reject: delete)",
                    "set no softbounce",
                )
        elif key == "properties":
            add(key, "ignored", "fetchmail ignores it too")
        elif key == "invisible":
            if value:
                add(
                    key,
                    "changed",
                    "no Received header is added (deliver.received_header: false); fetchd does "
                    "not pretend to the MTA to be the mail server",
                )
            else:
                add(key, "ignored", "fetchd behaves that way anyway", "set no invisible")
        elif key == "showdots":
            add(
                key,
                "ignored",
                "fetchd shows no progress dots",
                f"set {'' if value else 'no '}showdots",
            )
    return reports


# ---------------------------------------------------------------------------------------------
# Writing the YAML and the password files.


def render(result: Result, rcname: str, password_paths: dict[str, str]) -> str:
    """The commented YAML. ``password_paths`` maps account names to the password_file value;
    accounts not in it get password_env with a TODO."""
    lines = [
        f"# fetchd configuration imported from {rcname} by `fetchd import-fetchmailrc`.",
        "# Check it with `fetchd check -c FILE`; poll once with `fetchd once -c FILE`.",
        '# Comments marked "NOT CARRIED OVER" describe fetchmail behaviour fetchd does not have,',
        '# "changed" what fetchd does differently, "WARNING" a risk fetchmail took as well.',
    ]
    if result.reports:
        lines.append("#")
        for r in sorted(result.reports, key=lambda r: r.line):
            lines += _comment_block(r.comment(), "")
    lines += [
        "",
        "# Where fetchd remembers what it delivered (SQLite). Without this line: $STATE_DIRECTORY",
        "# (set by systemd) or ~/.local/state/fetchd/state.sqlite3.",
        "# state_file: /var/lib/fetchd/state.sqlite3",
        "",
    ]
    if result.defaults:
        lines.append("defaults:")
        lines += _emit(result.defaults, 2)
        lines.append("")
    lines.append("accounts:")
    for account in result.accounts:
        lines.append("")
        lines.append(f"  # {account.label} (rc line {account.line})")
        for r in sorted(account.reports, key=lambda r: r.line):
            lines += _comment_block(r.comment(), "  ")
        body = _emit(_with_password(account, password_paths), 4, first_prefix="  - ")
        if account.disabled:
            lines += _comment_block(f"Commented out: {account.disabled}", "  ")
            body = [line[:2] + "# " + line[2:] for line in body]
        lines += body
    return "\n".join(lines) + "\n"


def _with_password(account: Account, password_paths: dict[str, str]) -> list[Item]:
    items = []
    for item in account.items:
        if item.key == "password_file":
            if account.name in password_paths:
                items.append(Item("password_file", password_paths[account.name]))
            else:
                items.append(
                    Item("password_env", account.env, f"TODO: export {account.env}=<password>")
                )
        else:
            items.append(item)
    return items


def write_secret(path: str, secret: str) -> None:
    """Write a password file readable by its owner only, never through a symlink."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(secret + "\n")


def _write_atomically(path: str, text: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".fetchd-import-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _default_rc() -> str:
    home = os.environ.get("FETCHMAILHOME")
    if home:
        return os.path.join(home, "fetchmailrc")
    return "~/.fetchmailrc"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fetchd import-fetchmailrc",
        description="Convert a fetchmail run control file into a fetchd configuration. Every "
        "option that fetchd cannot carry over, or carries over differently, is reported on "
        "stderr with its rc line, and as a comment in the YAML.",
    )
    p.add_argument(
        "file",
        nargs="?",
        help="the rc file (default: $FETCHMAILHOME/fetchmailrc or ~/.fetchmailrc)",
    )
    p.add_argument("-o", "--output", help="write the YAML here (default: standard output)")
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--password-files",
        metavar="DIR",
        help="write each password to DIR/ACCOUNT, mode 0600 (default: passwords/ next to the "
        "output, or ./passwords when writing to standard output)",
    )
    group.add_argument(
        "--no-password-files",
        action="store_true",
        help="write no password anywhere: each account reads FETCHD_PASSWORD_<NAME> instead",
    )
    return p


def main(argv: list[str]) -> int:
    """``fetchd import-fetchmailrc [FILE] [-o OUT] [--password-files DIR | --no-password-files]``
    (``argv`` without the program and command names). Returns the exit status."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else EXIT_UNREADABLE
    rcname = args.file or _default_rc()
    rcpath = os.path.expanduser(rcname)
    try:
        with open(rcpath, "rb") as f:
            text = f.read().decode("latin-1")
        rc = parse(text)
    except OSError as e:
        print(f"fetchd import-fetchmailrc: cannot read {rcname}: {e.strerror}", file=sys.stderr)
        return EXIT_UNREADABLE
    except RcError as e:
        print(f"fetchd import-fetchmailrc: {rcname}:{e.line}: {e.message}", file=sys.stderr)
        return EXIT_UNREADABLE
    result = convert(rc, os.path.dirname(os.path.abspath(rcpath)))
    active = [a for a in result.accounts if not a.disabled]
    extra: list[str] = []
    if not active:
        extra.append(
            f"{rcname}: no account could be imported as an active one; fetchd check refuses "
            "the output until one is"
        )

    out = args.output
    out_dir = os.path.dirname(os.path.abspath(out)) if out else os.getcwd()
    password_paths: dict[str, str] = {}
    with_password = [a for a in result.accounts if a.password is not None]
    try:
        os.makedirs(out_dir, exist_ok=True)
        if with_password and not args.no_password_files:
            directory = os.path.abspath(args.password_files or os.path.join(out_dir, "passwords"))
            os.makedirs(directory, mode=0o700, exist_ok=True)
            for a in with_password:
                path = os.path.join(directory, a.name)
                write_secret(path, a.password or "")
                relative = os.path.relpath(path, out_dir)
                inside = out and not relative.startswith(os.pardir)
                password_paths[a.name] = relative if inside else path
        yaml_text = render(result, rcname, password_paths)
        if out:
            _write_atomically(out, yaml_text)
    except OSError as e:
        print(f"fetchd import-fetchmailrc: {e.filename or out}: {e.strerror}", file=sys.stderr)
        return EXIT_UNREADABLE
    if not out:
        sys.stdout.write(yaml_text)
        sys.stdout.flush()

    for report in result.all_reports:
        print(report.stderr(rcname), file=sys.stderr)
    for line in extra:
        print(line, file=sys.stderr)
    problem = _self_check(yaml_text, out, result) if active else None
    if problem:
        print(
            f"fetchd import-fetchmailrc: fetchd check would refuse it: {problem}", file=sys.stderr
        )
    if args.no_password_files and with_password:
        names = ", ".join(a.env for a in with_password)
        print(f"{rcname}: passwords not written; set {names}", file=sys.stderr)
    done = result.complete and bool(active) and not problem
    return EXIT_OK if done else EXIT_INCOMPLETE


def _self_check(yaml_text: str, out: str | None, result: Result) -> str | None:
    """Load the output as `fetchd check` would (with the password variables set to stand-ins),
    so a mistake here is reported rather than found by the user."""
    environ = {**os.environ, **{a.env: "x" for a in result.accounts}}
    try:
        if out:
            load(out, environ=environ)
            return None
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "fetchd.yaml")
            with open(path, "w", encoding="utf-8") as f:
                f.write(yaml_text)
            os.chmod(path, 0o600)
            load(path, environ=environ)
    except ConfigError as e:
        return str(e)
    return None
