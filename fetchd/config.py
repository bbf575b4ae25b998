"""The configuration: one YAML file turned into frozen dataclasses.

Every value is checked here, once, so the rest of fetchd can trust it. Errors name the file, the
line and the key path (``fetchd.yaml:12: accounts[0].tls.mode: ...``) because the person reading
them is editing that file. Frozen dataclasses compare by value, which makes "did this account
change?" a plain ``==`` when the configuration is reloaded.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import glob
import io
import ipaddress
import os
import re
import shlex
import shutil
import stat
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from fetchd.errors import ConfigError

Protocol = Literal["pop3", "imap"]
TLSMode = Literal["implicit", "starttls", "none"]

DEFAULT_PORTS: dict[tuple[str, str], int] = {
    ("imap", "implicit"): 993,
    ("imap", "starttls"): 143,
    ("imap", "none"): 143,
    ("pop3", "implicit"): 995,
    ("pop3", "starttls"): 110,
    ("pop3", "none"): 110,
}
IMPLICIT_TLS_PORTS = frozenset({993, 995})


class Secret:
    """A password that never shows up in a repr, a log line or a traceback."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


TLS_VERSIONS = ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")


@dataclass(frozen=True, slots=True)
class TLSSettings:
    """How to secure one connection. Hashable: equal settings share one SSLContext.

    ``fingerprints`` are normalised pins: ``md5:HEX``, ``sha1:HEX``, ``sha256:HEX`` (of the
    whole certificate, as fetchmail's ``sslfingerprint``) or ``pin-sha256:BASE64`` (of the
    public key, which survives a renewal with the same key).
    """

    mode: TLSMode = "implicit"
    verify: bool = True
    ca_file: str | None = None
    ca_path: str | None = None
    system_ca: bool = True
    crl_file: str | None = None
    crl_check: Literal["none", "leaf", "chain"] = "none"
    min_version: str = "TLSv1.2"
    max_version: str | None = None
    server_name: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    client_key_password: Secret | None = field(default=None, repr=False)
    fingerprints: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Multidrop:
    """Recipients from an envelope header the receiving server added, for local domains."""

    header: str
    local_domains: tuple[str, ...]
    map: tuple[tuple[str, str], ...] = ()
    fallback: str | None = None


@dataclass(frozen=True, slots=True)
class Delivery:
    """Where retrieved messages go, and what to do when they are refused."""

    kind: Literal["smtp", "lmtp", "mda"] = "smtp"
    host: str = "localhost"
    port: int = 25
    socket: str | None = None  # a Unix socket instead of host:port
    mda: tuple[str, ...] = ()
    to: tuple[str, ...] = ()
    sender: str | None = None  # None: the message's Return-Path
    received_header: bool = True
    timeout: float = 600.0
    # No TLS to a local MTA by default (never opportunistic, unverified STARTTLS); a remote
    # one gets the same verified TLS as the mail servers.
    tls: TLSSettings = TLSSettings(mode="none")
    batch_limit: int = 0  # messages per connection; 0: no limit
    on_reject: tuple[tuple[str, str], ...] = (("default", "keep"),)
    quarantine: str | None = None
    multidrop: Multidrop | None = None
    # After the MTA went silent once the message was sent: deliver it again at the next poll
    # (may duplicate), or "dedupe": remember its digest and never deliver it again within
    # dedupe_window seconds — it stays on the server and is listed by `fetchd status`.
    after_timeout: Literal["redeliver", "dedupe"] = "redeliver"
    dedupe_window: float = 7 * 86400.0

    def reject_action(self, code: int) -> str:
        """keep, delete or redirect, for a permanent refusal with this reply code."""
        table = dict(self.on_reject)
        return table.get(str(code)) or table.get(f"{code // 100}xx") or table.get("default", "keep")

    def target(self) -> str:
        if self.kind == "mda":
            return f"MDA {self.mda[0]}"
        where = self.socket or f"{self.host}:{self.port}"
        return f"{self.kind.upper()} {where}"


@dataclass(frozen=True, slots=True)
class OAuth2Settings:
    """fetchd's own token handling: a refresh token in a file, exchanged for access tokens.

    ``authorization_params`` are extra query parameters of the browser sign-in (Google needs
    ``access_type=offline`` to issue a refresh token at all).
    """

    refresh_token_file: str
    token_url: str
    client_id: str
    client_secret: Secret | None = field(default=None, repr=False)
    scope: str = ""
    device_authorization_url: str | None = None
    authorization_url: str | None = None
    authorization_params: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Account:
    name: str
    protocol: Protocol
    host: str
    port: int
    user: str
    password: Secret = field(repr=False)
    tls: TLSSettings
    deliver: Delivery
    folders: tuple[str, ...] = ("INBOX",)
    keep: bool = False
    interval: float = 300.0
    timeout: float = 60.0
    auth: str = "any"
    oauth2_token_file: str | None = None
    oauth2_token_command: tuple[str, ...] = ()
    oauth2: OAuth2Settings | None = None  # fetchd refreshes the access token itself
    # Run at each login for the password (``password`` is then empty); argv[0] is absolute.
    password_command: tuple[str, ...] | None = None
    fetch_all: bool = False  # deliver messages again even if the state says they were
    limit: int = 0  # bytes; larger messages are skipped (or deleted with limit_delete)
    limit_delete: bool = False
    fetch_limit: int = 0  # messages per poll; 0: all
    delete_after_days: float = 0  # with keep: delete delivered messages this much later
    expunge_every: int = 0  # POP3: QUIT and reconnect after this many deletions
    after_delivery: str = "delete"  # IMAP: delete, seen, move or leave (keep: true = leave)
    move_to: str | None = None
    uidvalidity_change: str = "refetch"  # IMAP: refetch (skipping known digests) or rebaseline
    idle: bool = False  # IMAP: stay connected and fetch new mail as soon as it arrives

    def where(self) -> str:
        """How error messages name this account: ``name (user at host:port)``."""
        return f"{self.name} ({self.user} at {self.host}:{self.port})"


@dataclass(frozen=True, slots=True)
class Config:
    path: str
    state_file: str
    accounts: tuple[Account, ...]
    max_connections: int = 50
    warnings: tuple[str, ...] = ()
    max_connections_per_host: int = 0  # 0: no limit; some providers cap connections per address
    startup_window: float = 30.0  # `fetchd run` spreads the first polls over this many seconds
    http_listen: tuple[str, int] | None = None  # metrics and /healthz; off unless configured


# ---------------------------------------------------------------------------------------------
# Reading YAML with positions


_STR = "tag:yaml.org,2002:str"
_NULL = "tag:yaml.org,2002:null"
T = TypeVar("T")
_MISSING: Any = object()


class _Ctx:
    """One YAML file. An included file's accounts also hold nodes from the main file's
    ``defaults:`` (``outer``); those are reported, and their paths resolved, where written."""

    def __init__(self, path: str, outer: _Ctx | None = None) -> None:
        self.file = path
        self.base = Path(path).resolve().parent
        self.outer = outer

    def owner(self, node: Node | None) -> _Ctx:
        if node is not None and self.outer is not None and node.start_mark.name == self.outer.file:
            return self.outer
        return self

    def at(self, node: Node | None) -> str:
        """``file:line`` of a node, or just the file."""
        if node is None:
            return self.file
        return f"{self.owner(node).file}:{node.start_mark.line + 1}"

    def error(self, node: Node | None, where: str, message: str) -> ConfigError:
        prefix = f"{where}: " if where else ""
        return ConfigError(f"{self.at(node)}: {prefix}{message}")

    def value(self, node: Node) -> Any:
        return yaml.SafeLoader("").construct_object(node, deep=True)

    def path(self, raw: str, node: Node | None = None) -> str:
        """Relative paths are relative to the file they are written in, not to the working
        directory."""
        p = Path(os.path.expanduser(raw))
        return str(p if p.is_absolute() else self.owner(node).base / p)


def _mapping_entries(ctx: _Ctx, node: Node, where: str) -> dict[str, tuple[Node, Node]]:
    if not isinstance(node, MappingNode):
        raise ctx.error(node, where, "must be a mapping of keys to values")
    entries: dict[str, tuple[Node, Node]] = {}
    for key, value in node.value:
        if key.tag == "tag:yaml.org,2002:merge":
            raise ctx.error(key, where, "YAML merge keys (<<) are not supported; use defaults:")
        if not isinstance(key, ScalarNode) or key.tag != _STR:
            raise ctx.error(key, where, "keys must be plain words")
        if key.value in entries:
            raise ctx.error(key, _join(where, key.value), "given twice")
        entries[key.value] = (key, value)
    return entries


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _merge_defaults(ctx: _Ctx, defaults: Node | None, own: Node, where: str) -> Node:
    """Overlay an account on ``defaults:``; nested mappings merge, everything else is replaced."""
    if defaults is None:
        return own
    base = _mapping_entries(ctx, defaults, "defaults")
    mine = _mapping_entries(ctx, own, where)
    merged: dict[str, tuple[Node, Node]] = dict(base)
    if _PASSWORD_KEYS & mine.keys():  # an account's own password source replaces the default
        for key in _PASSWORD_KEYS:
            merged.pop(key, None)
    for key, (knode, vnode) in mine.items():
        if key in base and isinstance(vnode, MappingNode) and isinstance(base[key][1], MappingNode):
            vnode = _merge_defaults(ctx, base[key][1], vnode, _join(where, key))
        merged[key] = (knode, vnode)
    return MappingNode("tag:yaml.org,2002:map", list(merged.values()), own.start_mark, own.end_mark)


class _Section:
    """One mapping being read; remembers which keys were used so leftovers are errors."""

    def __init__(self, ctx: _Ctx, node: Node | None, where: str) -> None:
        self.ctx = ctx
        self.node = node
        self.where = where
        # A key whose entries are all commented out holds null: the same as no entries.
        empty = node is None or node.tag == _NULL
        self.entries = {} if node is None or empty else _mapping_entries(ctx, node, where)
        self.used: set[str] = set()

    def has(self, key: str) -> bool:
        return key in self.entries and self.entries[key][1].tag != _NULL

    def node_of(self, key: str) -> Node | None:
        self.used.add(key)
        entry = self.entries.get(key)
        return entry[1] if entry else None

    def error(self, key: str, message: str) -> ConfigError:
        node = self.entries[key][1] if key in self.entries else self.node
        return self.ctx.error(node, _join(self.where, key) if key else self.where, message)

    def _get(self, key: str, default: T, kind: str, check: Callable[[Any], bool]) -> Any:
        node = self.node_of(key)
        if node is None or node.tag == _NULL:
            if default is _MISSING:
                raise self.ctx.error(self.node, self.where, f"{key!r} is required")
            return default
        value = self.ctx.value(node)
        if not check(value):
            shown = _show(value) if key not in _SECRET_KEYS else "that"  # never echo a secret
            raise self.error(key, f"must be {kind}, not {shown}")
        return value

    def text(self, key: str, default: Any = _MISSING) -> Any:
        value = self._get(key, default, "a text", lambda v: isinstance(v, str))
        if isinstance(value, str):
            if not value.strip():
                raise self.error(key, "must not be empty")
            if re.search(r"[\x00-\x1f\x7f]", value):
                raise self.error(key, "must not contain control characters")
        return value

    def flag(self, key: str, default: bool) -> bool:
        result: bool = self._get(key, default, "true or false", lambda v: isinstance(v, bool))
        return result

    def number(self, key: str, default: float, low: float, high: float) -> float:
        value = self._get(
            key,
            default,
            "a number",
            lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        )
        if not low <= value <= high:
            raise self.error(key, f"must be between {low:g} and {high:g}, not {value}")
        return float(value)

    def integer(self, key: str, default: int, low: int, high: int) -> int:
        value = self._get(
            key, default, "a whole number", lambda v: isinstance(v, int) and not isinstance(v, bool)
        )
        if not low <= value <= high:
            raise self.error(key, f"must be between {low} and {high}, not {value}")
        result: int = value
        return result

    def choice(self, key: str, choices: tuple[str, ...], default: Any = _MISSING) -> Any:
        value = self.text(key, default)
        if value is not None and value not in choices:
            raise self.error(key, f"must be one of {', '.join(choices)}, not {_show(value)}")
        return value

    def text_list(self, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        node = self.node_of(key)
        if node is None or node.tag == _NULL:
            return default
        if isinstance(node, ScalarNode):  # a single item written without brackets
            return (self.text(key),)
        if not isinstance(node, SequenceNode):
            raise self.error(key, "must be a list")
        items: list[str] = []
        for i, item in enumerate(node.value):
            value = self.ctx.value(item)
            where = f"{_join(self.where, key)}[{i}]"
            if not isinstance(value, str) or not value.strip():
                shown = _show(value) if key not in _SECRET_KEYS else "that"
                raise self.ctx.error(item, where, f"must be a non-empty text, not {shown}")
            if re.search(r"[\x00-\x1f\x7f]", value):
                raise self.ctx.error(item, where, "must not contain control characters")
            items.append(value)
        if not items:
            raise self.error(key, "must not be an empty list")
        return tuple(items)

    def section(self, key: str) -> _Section:
        return _Section(self.ctx, self.node_of(key), _join(self.where, key))

    def path(self, key: str, raw: str) -> str:
        """The value of ``key`` as a path, relative to the file that holds it."""
        entry = self.entries.get(key)
        return self.ctx.path(raw, entry[1] if entry else None)

    def done(self) -> None:
        for key in self.entries:
            if key not in self.used:
                hint = difflib.get_close_matches(key, self.known, n=1)
                extra = f" (did you mean {hint[0]!r}?)" if hint else ""
                raise self.ctx.error(
                    self.entries[key][0], _join(self.where, key), f"unknown key{extra}"
                )

    known: tuple[str, ...] = ()

    def expect(self, *keys: str) -> _Section:
        """Declare the keys this mapping may hold (for the "did you mean" hint)."""
        self.known = keys
        return self


def _show(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "nothing"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, int | float):
        return "a number (quote it to make it a text)"
    return repr(value)


# Values never repeated in an error message: errors reach logs, `fetchd status` and systemd.
_SECRET_KEYS = frozenset({"password", "password_command", "client_secret", "refresh_token"})


# ---------------------------------------------------------------------------------------------
# The schema

_TOP_KEYS = (
    "state_file",
    "max_connections",
    "max_connections_per_host",
    "startup_window",
    "http",
    "defaults",
    "accounts",
    "include",
)
_ACCOUNT_KEYS = (
    "name",
    "protocol",
    "host",
    "port",
    "user",
    "password",
    "password_file",
    "password_env",
    "password_command",
    "tls",
    "folders",
    "keep",
    "deliver",
    "interval",
    "timeout",
    "auth",
    "oauth2",
    "fetch_all",
    "limit",
    "limit_delete",
    "fetch_limit",
    "delete_after_days",
    "expunge_every",
    "after_delivery",
    "move_to",
    "uidvalidity_change",
    "idle",
)
AUTH_METHODS = (
    "any",
    "user",
    "apop",
    "plain",
    "login",
    "cram-md5",
    "oauth2",
    "xoauth2",
    "oauthbearer",
)
# oauth2: OAUTHBEARER or XOAUTH2, whichever the server offers (OAUTHBEARER first).
OAUTH_METHODS = ("oauth2", "xoauth2", "oauthbearer")
_OAUTH2_KEYS = (
    "provider",
    "tenant",
    "token_url",
    "device_authorization_url",
    "authorization_url",
    "client_id",
    "client_secret_file",
    "client_secret_env",
    "scope",
    "refresh_token_file",
    "token_file",
    "token_command",
)
_MICROSOFT = "https://login.microsoftonline.com/{tenant}/oauth2/v2.0"
# Endpoints and default scopes of the providers fetchd knows. Google's device flow does not
# grant mail scopes, so Google has no device endpoint here: its sign-in is the browser flow.
OAUTH2_PROVIDERS: dict[str, dict[str, str]] = {
    "microsoft": {
        "token_url": _MICROSOFT + "/token",
        "device_authorization_url": _MICROSOFT + "/devicecode",
        "authorization_url": _MICROSOFT + "/authorize",
        "scope": "https://outlook.office.com/IMAP.AccessAsUser.All "
        "https://outlook.office.com/POP.AccessAsUser.All offline_access",
    },
    "google": {
        "token_url": "https://oauth2.googleapis.com/token",
        "authorization_url": "https://accounts.google.com/o/oauth2/v2/auth",
        "scope": "https://mail.google.com/",
    },
}
_OAUTH2_AUTHORIZATION_PARAMS = {"google": (("access_type", "offline"), ("prompt", "consent"))}
_TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]{0,253}$")
_PASSWORD_SOURCES = ("password", "password_file", "password_env", "password_command")
_PASSWORD_KEYS = frozenset(_PASSWORD_SOURCES)
_TLS_KEYS = (
    "mode",
    "allow_plaintext",
    "verify",
    "ca_file",
    "ca_path",
    "system_ca",
    "crl_file",
    "crl_check",
    "min_version",
    "max_version",
    "server_name",
    "client_cert",
    "client_key",
    "client_key_password_file",
    "fingerprints",
)
# fetchmail's keywords, accepted under tls: for people moving over.
_TLS_ALIASES = {
    "sslcertck": "verify",
    "sslcertfile": "ca_file",
    "sslcertpath": "ca_path",
    "sslcommonname": "server_name",
    "sslfingerprint": "fingerprints",
    "sslcert": "client_cert",
    "sslkey": "client_key",
}
# fetchmail's sslproto words: (minimum, maximum) version.
SSLPROTO = {
    "auto": ("TLSv1.2", None),
    "ssl23": ("TLSv1.2", None),
    "tls": ("TLSv1.2", None),
    "tls1+": ("TLSv1", None),
    "tls1.1+": ("TLSv1.1", None),
    "tls1.2+": ("TLSv1.2", None),
    "tls1.3+": ("TLSv1.3", None),
    "tls1": ("TLSv1", "TLSv1"),
    "tls1.1": ("TLSv1.1", "TLSv1.1"),
    "tls1.2": ("TLSv1.2", "TLSv1.2"),
    "tls1.3": ("TLSv1.3", "TLSv1.3"),
}
_DELIVER_KEYS = (
    "smtp",
    "lmtp",
    "mda",
    "to",
    "sender",
    "received_header",
    "timeout",
    "tls",
    "batch_limit",
    "after_timeout",
    "dedupe_window",
    "on_reject",
    "quarantine",
    "multidrop",
)
_MULTIDROP_KEYS = ("header", "local_domains", "map", "fallback")
_REJECT_ACTIONS = ("keep", "delete", "redirect")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}$")
_HOST_RE = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._:-]+)$")
_ADDRESS_RE = re.compile(r"^[^\s<>()\[\],;:\"@]+(@[A-Za-z0-9.\-\[\]:]+)?$")


def load(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Config:
    """Read, check and freeze a configuration file.

    Raises ConfigError for anything wrong, with file, line and key path in the message.
    """
    try:
        return _load(os.fspath(path), environ)
    except RecursionError:
        raise ConfigError(
            f"{os.fspath(path)}: nested too deeply, or an alias (*name) refers to itself"
        ) from None


def _load(path: str, environ: Mapping[str, str] | None) -> Config:
    env: Mapping[str, str] = os.environ if environ is None else environ
    ctx = _Ctx(path)
    try:
        root, file_mode = _compose(path)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the configuration: {e.strerror}") from None
    if root is None:
        raise ConfigError(f"{path}: the file is empty; it needs at least 'accounts:'")

    top = _Section(ctx, root, "").expect(*_TOP_KEYS)
    state_file = ctx.path(top.text("state_file", _default_state_file(env)))
    max_connections = top.integer("max_connections", 50, 1, 100_000)
    per_host = top.integer("max_connections_per_host", 0, 0, 100_000)
    startup_window = top.number("startup_window", 30.0, 0.0, 86400.0)
    http_listen = None
    warnings: list[str] = []
    if top.has("http"):
        h = top.section("http").expect("listen")
        listen = h.text("listen")
        try:
            http_listen = split_host_port(listen, 9205)
        except ValueError as e:
            raise h.error("listen", str(e)) from None
        if not _is_loopback(http_listen[0]):
            warnings.append(
                f"{path}: http.listen {listen} is not a loopback address: anyone who can reach "
                "it sees account names and counters"
            )
        h.done()
    else:
        top.used.add("http")
    defaults_node = top.node_of("defaults")
    if defaults_node is not None and defaults_node.tag != _NULL:
        # Checked on its own so a mistake in defaults: is reported where it was written.
        for key, (knode, vnode) in _mapping_entries(ctx, defaults_node, "defaults").items():
            if key not in _ACCOUNT_KEYS or key == "name":
                raise ctx.error(knode, f"defaults.{key}", "cannot be set in defaults")
            if key == "password" and file_mode & stat.S_IROTH:
                raise ctx.error(vnode, "defaults.password", _READABLE_INLINE)
    else:
        defaults_node = None

    # (file, its mode, its accounts): the main file first, then each included file in order.
    sources: list[tuple[_Ctx, int, list[Node]]] = []
    accounts_node = top.node_of("accounts")
    if top.has("include"):
        if accounts_node is not None and accounts_node.tag != _NULL:
            if not isinstance(accounts_node, SequenceNode):
                raise ctx.error(accounts_node, "accounts", "must be a list of accounts")
            sources.append((ctx, file_mode, accounts_node.value))
        sources += _includes(ctx, top, path, warnings)
        if not any(nodes for _, _, nodes in sources):
            raise top.error("include", "no account, neither in accounts: nor in included files")
    else:
        top.used.add("include")
        if accounts_node is None or not isinstance(accounts_node, SequenceNode):
            raise ctx.error(accounts_node or root, "accounts", "must be a list of accounts")
        if not accounts_node.value:
            raise ctx.error(accounts_node, "accounts", "lists no account")
        sources.append((ctx, file_mode, accounts_node.value))
    top.done()

    accounts: list[Account] = []
    names: dict[str, str] = {}  # name -> file:line, to name both places of a duplicate
    for file_ctx, mode, nodes in sources:
        for i, node in enumerate(nodes):
            where = f"accounts[{i}]"
            merged = _merge_defaults(file_ctx, defaults_node, node, where)
            section = _Section(file_ctx, merged, where).expect(*_ACCOUNT_KEYS)
            account = _account(file_ctx, section, env, warnings)
            if account.name in names:
                raise file_ctx.error(
                    node,
                    where,
                    f"account name {account.name!r} is used twice (also at {names[account.name]})",
                )
            names[account.name] = file_ctx.at(node)
            own = _mapping_entries(file_ctx, node, where)
            if "password" in own and mode & stat.S_IROTH:
                raise file_ctx.error(own["password"][1], f"{where}.password", _READABLE_INLINE)
            accounts.append(account)
    return Config(
        path=path,
        state_file=state_file,
        accounts=tuple(accounts),
        max_connections=max_connections,
        warnings=tuple(warnings),
        max_connections_per_host=per_host,
        startup_window=startup_window,
        http_listen=http_listen,
    )


_READABLE_INLINE = (
    "the file holds a password and is readable by everyone: chmod o-r it, or use password_file"
)


def _compose(path: str) -> tuple[Node | None, int]:
    """The YAML tree of one file, and the file's mode. Each node's marks carry ``path`` as
    their name, which tells which file a node of a merged account came from."""
    with open(path, "rb") as f:
        stream = io.BytesIO(f.read())
        mode = os.fstat(f.fileno()).st_mode
    stream.name = path
    try:
        return yaml.compose(stream, Loader=yaml.SafeLoader), mode
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{path}{line}: not valid YAML: {problem}") from None


def _includes(
    ctx: _Ctx, top: _Section, path: str, warnings: list[str]
) -> list[tuple[_Ctx, int, list[Node]]]:
    """The accounts of the files named by ``include:``, in order: a file, a directory (its
    ``*.yaml`` and ``*.yml`` files, sorted, hidden ones skipped) or a glob pattern (sorted)."""
    node = top.node_of("include")
    assert node is not None
    items = node.value if isinstance(node, SequenceNode) else [node]
    patterns = top.text_list("include", ())
    here = os.path.dirname(path)  # shown paths stay as relative as the main file's path
    main = os.path.realpath(path)
    seen: dict[str, str] = {}
    result: list[tuple[_Ctx, int, list[Node]]] = []
    for i, (item, raw) in enumerate(zip(items, patterns, strict=True)):
        where = f"include[{i}]" if isinstance(node, SequenceNode) else "include"
        pattern = os.path.join(here, os.path.expanduser(raw))
        if re.search(r"[*?\[]", raw):
            files = sorted(
                os.path.join(here, f)
                for f in glob.glob(os.path.expanduser(raw), root_dir=here or None)
                if os.path.isfile(os.path.join(here, f))
            )
            if not files:
                warnings.append(f"{ctx.at(item)}: {where}: {raw} matches no file")
        elif os.path.isdir(pattern):
            files = [
                os.path.join(pattern, name)
                for name in sorted(os.listdir(pattern))
                if not name.startswith(".")
                and name.endswith((".yaml", ".yml"))
                and os.path.isfile(os.path.join(pattern, name))
            ]
            if not files:
                warnings.append(f"{ctx.at(item)}: {where}: {pattern} holds no .yaml or .yml file")
        elif os.path.isfile(pattern):
            files = [pattern]
        elif os.path.exists(pattern):  # a FIFO or a device would block the reload for ever
            raise ctx.error(item, where, f"{pattern} is not a regular file")
        else:
            raise ctx.error(item, where, f"no such file or directory: {pattern}")
        for file in files:
            real = os.path.realpath(file)
            if real == main:
                if files == [pattern]:
                    raise ctx.error(item, where, "names the main configuration file itself")
                continue  # e.g. include: "*.yaml" next to the main file
            if real in seen:
                raise ctx.error(item, where, f"{file} is included twice (also by {seen[real]})")
            seen[real] = ctx.at(item)
            result.append(_included(ctx, item, where, file))
    return result


def _included(ctx: _Ctx, item: Node, where: str, file: str) -> tuple[_Ctx, int, list[Node]]:
    """One included file: a list of accounts, or a mapping with only ``accounts:``."""
    try:
        root, mode = _compose(file)
    except OSError as e:
        raise ctx.error(item, where, f"cannot read {file}: {e.strerror}") from None
    inc = _Ctx(file, outer=ctx)
    if root is None or root.tag == _NULL:
        raise ConfigError(f"{file}: the file is empty; it needs a list of accounts")
    nodes = root
    if isinstance(root, MappingNode):
        body = _Section(inc, root, "").expect("accounts")
        for key in body.entries:
            if key == "include":
                raise body.error(
                    key, f"an included file cannot include others; list them in {ctx.file}"
                )
            if key in _TOP_KEYS and key != "accounts":
                raise body.error(key, f"can only be set in the main file {ctx.file}")
        found = body.node_of("accounts")
        body.done()
        if found is None:
            raise inc.error(root, "accounts", "is missing")
        nodes = found
    if not isinstance(nodes, SequenceNode):
        raise inc.error(nodes, "accounts", "must be a list of accounts")
    if not nodes.value:
        raise inc.error(nodes, "accounts", "lists no account")
    return inc, mode, nodes.value


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _default_state_file(env: Mapping[str, str]) -> str:
    if env.get("STATE_DIRECTORY"):  # set by systemd's StateDirectory=
        return os.path.join(env["STATE_DIRECTORY"].split(":")[0], "state.sqlite3")
    base = env.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "fetchd", "state.sqlite3")


def state_file_of(path: str, environ: Mapping[str, str] | None = None) -> str:
    """Only the state file a configuration names: `fetchd status` and `fetchd health` must
    work from a shell that lacks the daemon's password variables, or with a file being edited.
    """
    env: Mapping[str, str] = os.environ if environ is None else environ
    ctx = _Ctx(path)
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the configuration: {e.strerror}") from None
    value = None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        if isinstance(root, MappingNode):
            for knode, vnode in root.value:
                if knode.value == "state_file" and isinstance(vnode, ScalarNode):
                    value = vnode.value
    except (yaml.YAMLError, RecursionError):  # a file being edited: find the line itself
        m = re.search(rb"(?m)^state_file:[ \t]*(['\"]?)([^'\"#\r\n]*?)\1[ \t]*(?:#.*)?$", text)
        value = m.group(2).decode("utf-8", "replace") if m else None
    return ctx.path(value or _default_state_file(env))


def _account(ctx: _Ctx, s: _Section, env: Mapping[str, str], warnings: list[str]) -> Account:
    protocol = s.choice("protocol", ("pop3", "imap"))
    host = s.text("host")
    if not _HOST_RE.match(host):
        raise s.error("host", f"is not a host name or address: {host!r}")
    user = s.text("user")
    name = s.text("name", f"{user}@{host}")
    if not _NAME_RE.match(name):
        raise s.error("name", "may use letters, digits and . _ @ + - (at most 128)")

    port_given = s.has("port")
    port = s.integer("port", 0, 1, 65535) if port_given else 0
    default_mode = "starttls" if port_given and port not in IMPLICIT_TLS_PORTS else "implicit"
    tls = _tls(ctx, s.section("tls"), default_mode, warnings)
    mode = tls.mode
    if not port_given:
        port = DEFAULT_PORTS[(protocol, mode)]
    elif (mode == "implicit") != (port not in (110, 143)) and port in (110, 143, 993, 995):
        raise s.error(
            "port",
            f"port {port} is for {'implicit TLS' if port in IMPLICIT_TLS_PORTS else 'STARTTLS'}"
            f" but tls.mode is {mode}; change one of them",
        )

    # An oauth2: block means OAuth unless auth: says otherwise (and then it must be an OAuth one).
    default_auth = "oauth2" if s.has("oauth2") else "any"
    auth_given = s.text("auth") if s.has("auth") else default_auth
    if s.has("oauth2") and auth_given not in OAUTH_METHODS:
        raise s.error(
            "oauth2", f"applies with auth: oauth2, xoauth2 or oauthbearer, not {auth_given}"
        )
    oauth = auth_given in OAUTH_METHODS
    password_command: tuple[str, ...] | None = None
    if oauth and not (_PASSWORD_KEYS & s.entries.keys()):
        password = Secret("")
        s.used.update(_PASSWORD_KEYS)
    else:
        password, password_command = _password(s, env)
    folders = s.text_list("folders", ("INBOX",))
    if protocol == "pop3" and s.has("folders"):
        raise s.error("folders", "POP3 has no folders; remove this key or use protocol: imap")
    keep = s.flag("keep", False)
    interval = s.number("interval", 300.0, 1.0, 7 * 86400.0)
    timeout = s.number("timeout", 60.0, 1.0, 3600.0)
    auth = s.choice("auth", AUTH_METHODS, default_auth)
    if protocol == "imap" and auth in ("user", "apop"):
        raise s.error("auth", f"{auth} is a POP3 method; IMAP has login, plain, cram-md5, ...")
    token_file, token_command, oauth2 = _oauth2(s.section("oauth2"), env, warnings)
    if auth in OAUTH_METHODS and not (token_file or token_command or oauth2):
        raise s.error(
            "auth",
            f"{auth} needs an oauth2: block with refresh_token_file, token_file or token_command",
        )
    fetch_all = s.flag("fetch_all", False)
    limit = s.integer("limit", 0, 0, 1 << 40)
    limit_delete = s.flag("limit_delete", False)
    if limit_delete and not limit:
        raise s.error("limit_delete", "needs limit: the size above which messages are deleted")
    fetch_limit = s.integer("fetch_limit", 0, 0, 10_000_000)
    delete_after_days = s.number("delete_after_days", 0, 0, 36500)
    if delete_after_days and not keep:
        raise s.error("delete_after_days", "applies with keep: true (else mail is deleted at once)")
    expunge_every = s.integer("expunge_every", 0, 0, 10_000_000)
    imap_only = [k for k in ("after_delivery", "move_to", "uidvalidity_change", "idle") if s.has(k)]
    if protocol == "pop3" and imap_only:
        raise s.error(imap_only[0], "applies to IMAP only")
    after_delivery = s.choice(
        "after_delivery", ("delete", "seen", "move", "leave"), "leave" if keep else "delete"
    )
    if keep and after_delivery != "leave":
        raise s.error("after_delivery", "contradicts keep: true (which means leave)")
    if after_delivery == "leave":
        keep = True
    move_to = s.text("move_to", None)
    if (after_delivery == "move") != (move_to is not None):
        raise s.error("move_to", "give move_to exactly when after_delivery is move")
    uidvalidity_change = s.choice("uidvalidity_change", ("refetch", "rebaseline"), "refetch")
    idle = s.flag("idle", False)

    deliver = _delivery(ctx, s.section("deliver"), warnings)
    s.done()
    return Account(
        name=name,
        protocol=protocol,
        host=host,
        port=port,
        user=user,
        password=password,
        tls=tls,
        deliver=deliver,
        folders=folders,
        keep=keep,
        interval=interval,
        timeout=timeout,
        auth=auth,
        oauth2_token_file=token_file,
        oauth2_token_command=token_command,
        oauth2=oauth2,
        password_command=password_command,
        fetch_all=fetch_all,
        limit=limit,
        limit_delete=limit_delete,
        fetch_limit=fetch_limit,
        delete_after_days=delete_after_days,
        expunge_every=expunge_every,
        after_delivery=after_delivery,
        move_to=move_to,
        uidvalidity_change=uidvalidity_change,
        idle=idle,
    )


def _oauth2(
    o: _Section, env: Mapping[str, str], warnings: list[str]
) -> tuple[str | None, tuple[str, ...], OAuth2Settings | None]:
    """The oauth2: block: (token_file, token_command, settings), at most one of them set.

    With ``refresh_token_file`` fetchd keeps the access token fresh itself, from a provider
    preset or explicit endpoints; ``token_file`` and ``token_command`` hand over an access token
    that something else keeps fresh.
    """
    o.expect(*_OAUTH2_KEYS)
    if not o.entries:
        return None, (), None
    sources = [k for k in ("refresh_token_file", "token_file", "token_command") if o.has(k)]
    if len(sources) != 1:
        raise o.error(
            sources[1] if sources else "",
            "give exactly one of refresh_token_file, token_file, token_command",
        )
    if sources[0] != "refresh_token_file":
        extra = [k for k in o.entries if k not in ("token_file", "token_command")]
        if extra:
            raise o.error(
                extra[0],
                f"applies with refresh_token_file only; {sources[0]} hands over an access token "
                "that something else keeps fresh",
            )
        if sources[0] == "token_file":
            token_file = o.path("token_file", o.text("token_file"))
            o.done()
            return token_file, (), None
        token_command = o.text_list("token_command", ())
        if not os.path.isabs(token_command[0]):
            raise o.error("token_command", "must start with an absolute path (no shell)")
        o.done()
        return None, token_command, None

    provider: str | None = o.choice("provider", tuple(OAUTH2_PROVIDERS), None)
    preset = OAUTH2_PROVIDERS.get(provider or "", {})
    tenant = o.text("tenant", None)
    if tenant is not None:
        if provider != "microsoft":
            raise o.error("tenant", "applies with provider: microsoft only")
        if not _TENANT_RE.match(tenant):
            raise o.error(
                "tenant", "must be a tenant ID or domain, or common, organizations or consumers"
            )

    def url(key: str) -> str | None:
        raw: str | None = o.text(key, None)
        if raw is None:
            return preset[key].format(tenant=tenant or "common") if key in preset else None
        problem = _endpoint_problem(raw)
        if problem:
            raise o.error(key, problem)
        return raw

    token_url = url("token_url")
    if token_url is None:
        raise o.error("", "needs provider: microsoft or google, or token_url")
    client_id = o.text("client_id", None)
    if client_id is None:
        raise o.error("", "needs client_id: the client ID of the application you registered")
    client_secret = _client_secret(o, env)
    scope = " ".join(o.text_list("scope", ())) or preset.get("scope", "")
    path = o.path("refresh_token_file", o.text("refresh_token_file"))
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        raise o.error("refresh_token_file", f"no such directory: {directory}")
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        mode = 0  # written by `fetchd oauth2 login`
    except OSError as e:
        raise o.error("refresh_token_file", f"cannot read {path}: {e.strerror}") from None
    if mode & (stat.S_IROTH | stat.S_IWOTH):
        raise o.error(
            "refresh_token_file", f"{path} is readable or writable by everyone: chmod 600 it"
        )
    if provider == "google" and client_secret is None:
        warnings.append(
            f"{o.ctx.at(o.node)}: {o.where}: Google's token endpoint wants the client secret of "
            "the Desktop client too: set client_secret_file or client_secret_env"
        )
    settings = OAuth2Settings(
        refresh_token_file=path,
        token_url=token_url,
        client_id=client_id,
        client_secret=client_secret,
        scope=scope,
        device_authorization_url=url("device_authorization_url"),
        authorization_url=url("authorization_url"),
        authorization_params=_OAUTH2_AUTHORIZATION_PARAMS.get(provider or "", ()),
    )
    o.done()
    return None, (), settings


def _endpoint_problem(url: str) -> str | None:
    """Why a token or sign-in endpoint is unacceptable, or None. Plain http would expose the
    client secret and the tokens; it is allowed to a loopback address only."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname
        _ = parts.port  # raises ValueError for a port out of range
    except ValueError:
        return f"is not a valid URL: {url!r}"
    if parts.scheme not in ("https", "http") or not host:
        return f"must be an https:// URL, not {url!r}"
    if parts.scheme == "http" and not _is_loopback(host):
        return "must use https:// (plain http:// only to a loopback address such as 127.0.0.1)"
    if parts.username is not None or parts.password is not None:
        return "must not hold a user name or password"
    if parts.fragment:
        return "must not have a #fragment"
    return None


def _client_secret(o: _Section, env: Mapping[str, str]) -> Secret | None:
    """The OAuth client secret, from a file only its owner can read or from the environment;
    none for a public client (Microsoft's device flow, for one, uses none)."""
    given = [k for k in ("client_secret_file", "client_secret_env") if o.has(k)]
    o.used.update(("client_secret_file", "client_secret_env"))
    if not given:
        return None
    if len(given) > 1:
        raise o.error(given[1], "give only one of client_secret_file, client_secret_env")
    key = given[0]
    value = o.text(key)
    if key == "client_secret_env":
        return _env_secret(o, key, value, env)
    return _file_secret(o, key, o.path(key, value))


def _delivery(ctx: _Ctx, d: _Section, warnings: list[str]) -> Delivery:
    d.expect(*_DELIVER_KEYS)
    if not d.entries:
        raise d.ctx.error(
            d.node, d.where, "is required: where should the mail go? e.g. smtp: localhost:25"
        )
    kinds = [k for k in ("smtp", "lmtp", "mda") if d.has(k)]
    if len(kinds) > 1:
        raise d.error(kinds[1], f"give only one of {', '.join(kinds)}")
    kind = kinds[0] if kinds else "smtp"
    host, port, socket_path = "localhost", 25, None
    mda: tuple[str, ...] = ()
    if kind == "mda":
        node = d.node_of("mda")
        assert node is not None
        raw = d.ctx.value(node)
        if isinstance(raw, str):
            try:
                mda = tuple(shlex.split(raw))
            except ValueError as e:
                raise d.error("mda", f"cannot split into arguments: {e}") from None
        else:
            mda = d.text_list("mda", ())
        if not mda or not os.path.isabs(mda[0]):
            raise d.error("mda", "must start with the program's absolute path (no shell is used)")
    else:
        target = d.text(kind, "localhost:25")
        if target.startswith("/"):
            socket_path = target
        else:
            default = 24 if kind == "lmtp" else 25
            host, port = _host_port(target, default, lambda m: d.error(kind, m))
    to = d.text_list("to", ())
    for i, address in enumerate(to):
        if not _ADDRESS_RE.match(address):
            raise d.error("to", f"item {i} is not a mail address: {address!r}")
    sender = d.text("sender", None) if d.has("sender") else None
    if sender is None and "sender" in d.entries:
        d.used.add("sender")
        sender = ""  # sender: '' or null: the null sender
    if sender and not _ADDRESS_RE.match(sender):
        raise d.error("sender", f"is not a mail address: {sender!r}")
    timeout = d.number("timeout", 600.0, 1.0, 3600.0)
    tls = TLSSettings(mode="none")
    if d.has("tls"):
        if kind != "smtp" or socket_path:
            raise d.error("tls", "applies only to SMTP delivery over TCP")
        tls_section = d.section("tls")
        tls = _tls(ctx, tls_section, "implicit" if port == 465 else "starttls", warnings)
        if tls.server_name:
            raise tls_section.error("server_name", "is not supported for delivery")
    else:
        d.used.add("tls")
    on_reject: dict[str, str] = {"default": "keep"}
    r = d.section("on_reject")
    for key, (_, value_node) in r.entries.items():
        r.used.add(key)
        if not re.fullmatch(r"default|5\d\d|5xx", key):
            raise r.error(key, "must be default, 5xx or a 5xx reply code such as 554")
        action = ctx.value(value_node)
        if action not in _REJECT_ACTIONS:
            raise r.error(key, f"must be one of {', '.join(_REJECT_ACTIONS)}, not {_show(action)}")
        on_reject[key] = action
    quarantine = d.text("quarantine", None)
    if quarantine is not None and not _ADDRESS_RE.match(quarantine):
        raise d.error("quarantine", f"is not a mail address: {quarantine!r}")
    if "redirect" in on_reject.values() and not quarantine:
        raise d.error("on_reject", "redirect needs a quarantine: address")
    multidrop = None
    if d.has("multidrop"):
        m = d.section("multidrop").expect(*_MULTIDROP_KEYS)
        header = m.choice("header", ("Delivered-To", "X-Original-To", "X-Envelope-To"))
        domains = tuple(x.lower() for x in m.text_list("local_domains", ()))
        if not domains:
            raise m.error("local_domains", "is required: which domains are delivered locally")
        mapping: list[tuple[str, str]] = []
        table = m.section("map")
        for key, (_, value_node) in table.entries.items():
            table.used.add(key)
            value = ctx.value(value_node)
            if not isinstance(value, str) or not _ADDRESS_RE.match(value):
                raise table.error(key, f"must map to a local address, not {_show(value)}")
            mapping.append((key.lower(), value))
        fallback = m.text("fallback", None)
        m.done()
        multidrop = Multidrop(header, domains, tuple(mapping), fallback)
    else:
        d.used.add("multidrop")
    if not to and multidrop is None:
        raise d.error("to", "is required: the local address(es) to deliver to")
    delivery = Delivery(
        kind=kind,  # type: ignore[arg-type]
        host=host,
        port=port,
        socket=socket_path,
        mda=mda,
        to=to,
        sender=sender,
        received_header=d.flag("received_header", True),
        timeout=timeout,
        tls=tls,
        batch_limit=d.integer("batch_limit", 0, 0, 1_000_000),
        on_reject=tuple(sorted(on_reject.items())),
        quarantine=quarantine,
        multidrop=multidrop,
        after_timeout=d.choice("after_timeout", ("redeliver", "dedupe"), "redeliver"),
        dedupe_window=d.number("dedupe_window", 7 * 86400.0, 60.0, 366 * 86400.0),
    )
    d.done()
    return delivery


def _tls(ctx: _Ctx, t: _Section, default_mode: str, warnings: list[str]) -> TLSSettings:
    """The tls: mapping of one account, with fetchmail's spellings accepted."""
    t.expect(*_TLS_KEYS, *_TLS_ALIASES, "sslproto")
    for alias, key in _TLS_ALIASES.items():
        if alias in t.entries:
            if key in t.entries:
                raise t.error(alias, f"is fetchmail's name for {key}; give only one of them")
            t.entries[key] = t.entries.pop(alias)
    sslproto: str | None = None
    if (node := t.node_of("sslproto")) is not None:
        raw = t.ctx.value(node)
        sslproto = "" if raw is None else raw  # sslproto '' (or empty): no TLS, as in fetchmail
        if not isinstance(sslproto, str):
            raise t.error("sslproto", f"must be a text such as 'tls1.2+', not {_show(raw)}")
    mode: TLSMode | None = t.choice("mode", ("implicit", "starttls", "none"), None)
    if sslproto == "":
        if mode not in (None, "none"):
            raise t.error("sslproto", "'' means no TLS at all, which contradicts tls.mode")
        mode = "none"  # fetchmail: sslproto '' turns STARTTLS off
    mode = mode or cast(TLSMode, default_mode)
    if mode == "none" and not t.flag("allow_plaintext", False):
        raise t.error(
            "mode" if "mode" in t.entries else "sslproto",
            "no TLS sends the password unencrypted; also set allow_plaintext: true "
            "if that is really wanted",
        )
    t.used.add("allow_plaintext")

    low: str = "TLSv1.2"
    high: str | None = None
    if sslproto:
        word = sslproto.lower()
        if word not in SSLPROTO and word.startswith(("ssl2", "ssl3")):
            raise t.error("sslproto", f"{sslproto}: SSL 2 and 3 are broken and not supported")
        if word not in SSLPROTO:
            raise t.error("sslproto", f"unknown value; use one of {', '.join(SSLPROTO)}")
        low, high = SSLPROTO[word]
    low = _tls_version(t, "min_version", low) or low
    high = _tls_version(t, "max_version", high)
    if high is not None and TLS_VERSIONS.index(high) < TLS_VERSIONS.index(low):
        raise t.error("max_version", f"{high} is older than min_version {low}")
    if low in ("TLSv1", "TLSv1.1"):
        warnings.append(
            f"{ctx.at(t.node)}: {t.where}: allows "
            f"{low}, which is obsolete and weak; use it only for a server that cannot do better"
        )

    def existing(key: str, kind: str) -> str | None:
        value = t.text(key, None)
        if value is None:
            return None
        path = t.path(key, value)
        ok = os.path.isdir(path) if kind == "directory" else os.path.isfile(path)
        if not ok:
            raise t.error(key, f"no such {kind}: {path}")
        return path

    ca_file = existing("ca_file", "file")
    ca_path = existing("ca_path", "directory")
    crl_file = existing("crl_file", "file")
    default_crl = "leaf" if crl_file else "none"
    crl_check = t.choice("crl_check", ("none", "leaf", "chain"), default_crl)
    system_ca = t.flag("system_ca", ca_file is None and ca_path is None)
    verify = t.flag("verify", True)
    client_cert = existing("client_cert", "file")
    client_key = existing("client_key", "file")
    if client_key and not client_cert:
        raise t.error("client_key", "needs client_cert as well")
    key_password = None
    password_file = existing("client_key_password_file", "file")
    if password_file:
        with open(password_file, "rb") as f:
            if os.fstat(f.fileno()).st_mode & (stat.S_IROTH | stat.S_IWOTH):
                raise t.error(
                    "client_key_password_file",
                    f"{password_file} is readable or writable by everyone: chmod 600 it",
                )
            key_password = Secret(f.read().decode("utf-8", "replace").rstrip("\r\n"))
    fingerprints = tuple(_pin(t, i, raw) for i, raw in enumerate(t.text_list("fingerprints", ())))
    if not verify and (crl_file or crl_check != "none"):
        warnings.append(
            f"{ctx.owner(t.node).file}: {t.where}: verify is off, so CRLs are not checked either"
        )
    if not verify and not fingerprints:
        warnings.append(
            f"{ctx.owner(t.node).file}: {t.where}: verify is off and no fingerprint is pinned: "
            "anyone in the middle can read the password"
        )
    server_name = t.text("server_name", None)
    t.done()
    return TLSSettings(
        mode=mode,
        verify=verify,
        ca_file=ca_file,
        ca_path=ca_path,
        system_ca=system_ca,
        crl_file=crl_file,
        crl_check=crl_check,
        min_version=low,
        max_version=high,
        server_name=server_name,
        client_cert=client_cert,
        client_key=client_key,
        client_key_password=key_password,
        fingerprints=fingerprints,
    )


def _tls_version(t: _Section, key: str, default: str | None) -> str | None:
    value = t.node_of(key)
    if value is None or value.tag == _NULL:
        return default
    raw = str(t.ctx.value(value)).strip().lower()
    if raw.startswith(("ssl", "sslv")):
        raise t.error(key, f"{raw}: SSL 2 and 3 are broken and not supported")
    number = raw.removeprefix("tlsv").removeprefix("tls").strip()
    if number in ("1", "1.0"):
        return "TLSv1"
    if f"TLSv{number}" in TLS_VERSIONS:
        return f"TLSv{number}"
    raise t.error(key, f"must be one of 1.0, 1.1, 1.2, 1.3, not {raw!r}")


_HEX_DIGEST = {32: "md5", 40: "sha1", 64: "sha256"}


def _pin(t: _Section, index: int, raw: str) -> str:
    """Normalise one fingerprint to ``algo:HEX`` or ``pin-sha256:BASE64``."""
    text = raw.strip()
    fail = t.error(
        "fingerprints",
        f"item {index} is not a fingerprint: {raw!r} (expected e.g. AA:BB:... as fetchmail "
        "prints it, sha256:..., {SHA256}... or pin-sha256:BASE64)",
    )
    low = text.lower()
    if low.startswith(("pin-sha256:", "pin-sha256=")):
        value = text[len("pin-sha256:") :].strip().strip('"')
        try:
            if len(base64.b64decode(value, validate=True)) != 32:
                raise fail
        except (ValueError, binascii.Error):
            raise fail from None
        return f"pin-sha256:{value}"
    algo = None
    if m := re.match(r"^(?:\{(md5|sha1|sha256)\}|(md5|sha1|sha256)[:=])", low):
        algo, text = m.group(1) or m.group(2), text[m.end() :]
    digits = text.replace(":", "").replace(" ", "").upper()
    if not re.fullmatch(r"[0-9A-F]+", digits) or len(digits) not in _HEX_DIGEST:
        raise fail
    if algo is not None and _HEX_DIGEST[len(digits)] != algo:
        raise fail
    return f"{_HEX_DIGEST[len(digits)]}:{digits}"


def _password(s: _Section, env: Mapping[str, str]) -> tuple[Secret, tuple[str, ...] | None]:
    """The password, or an empty one and the password_command that prints it at each login."""
    given = [k for k in _PASSWORD_SOURCES if s.has(k)]
    s.used.update(_PASSWORD_SOURCES)
    if not given:
        raise s.ctx.error(
            s.node, s.where, "needs password_file, password_env, password_command or password"
        )
    if len(given) > 1:
        raise s.error(given[1], f"give only one of {', '.join(given)}")
    key = given[0]
    if key == "password_command":
        return Secret(""), _password_command(s, key, env)
    value = s.text(key)
    if key == "password":
        return Secret(value), None
    if key == "password_env":
        return _env_secret(s, key, value, env), None
    return _file_secret(s, key, s.path(key, value)), None


def _env_secret(s: _Section, key: str, name: str, env: Mapping[str, str]) -> Secret:
    """A secret from an environment variable: set, one line."""
    if name not in env:
        raise s.error(key, f"environment variable {name} is not set")
    if not env[name] or re.search(r"[\x00\r\n]", env[name]):
        raise s.error(key, f"environment variable {name} is empty or holds a line break")
    return Secret(env[name])


def _file_secret(s: _Section, key: str, path: str) -> Secret:
    """A secret from the first line of a file that not everyone can read."""
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            raw = f.read(4096)
    except OSError as e:
        raise s.error(key, f"cannot read {path}: {e.strerror}") from None
    if mode & (stat.S_IROTH | stat.S_IWOTH):
        raise s.error(key, f"{path} is readable or writable by everyone: chmod 600 it")
    try:
        secret = raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        raise s.error(key, f"{path} is not UTF-8 text") from None
    if not secret:
        raise s.error(key, f"{path} is empty")
    if re.search(r"[\x00\r\n]", secret):
        raise s.error(key, f"{path} holds more than one line, or a NUL byte")
    return Secret(secret)


def _password_command(s: _Section, key: str, env: Mapping[str, str]) -> tuple[str, ...]:
    """The argv of a password helper (a list, or a text split like a shell would, but without
    one). The program is looked up now, so a typo fails at load time rather than at each poll,
    and its absolute path is kept so the daemon's PATH cannot change what runs."""
    node = s.node_of(key)
    assert node is not None
    if isinstance(s.ctx.value(node), str):
        try:
            argv = tuple(shlex.split(s.text(key)))
        except ValueError as e:
            raise s.error(key, f"cannot split into arguments: {e}") from None
    else:
        argv = s.text_list(key, ())
    if not argv or not argv[0]:
        raise s.error(key, "must start with a program")
    program = argv[0]
    if os.path.isabs(program):
        if not (os.path.isfile(program) and os.access(program, os.X_OK)):
            raise s.error(key, f"{program} is not an executable file")
        return argv
    if os.sep in program:
        raise s.error(
            key, f"{program}: give an absolute path or a program on PATH (no shell is used)"
        )
    found = shutil.which(program, path=env.get("PATH", os.defpath))
    if found is None:
        raise s.error(key, f"program {program!r} is not found on PATH")
    return (os.path.abspath(found), *argv[1:])


def split_host_port(text: str, default_port: int) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]`` or ``[v6]:port``; ValueError if it is none of them."""

    def fail(message: str) -> ValueError:
        return ValueError(message)

    return _host_port(text, default_port, fail)


def _host_port(text: str, default_port: int, fail: Callable[[str], Exception]) -> tuple[str, int]:
    """Split ``host``, ``host:port``, ``[v6]`` or ``[v6]:port``."""
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(\d+))?|([^:\s\[\]]+)(?::(\d+))?", text.strip())
    if not m:
        raise fail(f"must be host or host:port, not {text!r}")
    host = m.group(1) or m.group(3)
    port_text = m.group(2) or m.group(4)
    port = int(port_text) if port_text else default_port
    if not 1 <= port <= 65535:
        raise fail(f"port must be between 1 and 65535, not {port}")
    return host, port
