"""The exception hierarchy: each class says what the daemon does next.

    FetchdError
    ├── ConfigError      refuse to start; on reload keep the old config
    ├── TemporaryError   retry the account later (network, timeouts, 4xx, server busy)
    │   ├── ProtocolError     the peer sent something we cannot parse (retry, logged loudly)
    │   ├── DeliveryDeferred  the MTA cannot take mail now: stop fetching, keep the rest
    │   │   └── DeliveryUncertain  it went silent after the message was sent: maybe delivered
    │   └── MessageUnavailable  the server would not give this one message: skip it
    ├── PermanentError   park the account until a human acts (auth, certificate, no TLS)
    │   └── StateBusy     another fetchd works with this state file: refuse to start
    └── MessageRejected  the MTA refused one message for good (5xx): policy decides

Foreign exceptions (OSError, ssl.SSLError, library errors) are translated once, at the edge of
the adapter that called the library, so nothing above the adapters sees them.
"""

from __future__ import annotations


class FetchdError(Exception):
    """Base of every error fetchd raises on purpose."""


class ConfigError(FetchdError):
    """The configuration is invalid; the message names file, line and key path."""


class TemporaryError(FetchdError):
    """Something that may work on the next attempt: back off and retry."""


class ProtocolError(TemporaryError):
    """The server violated the protocol (garbage, bad literal, desync)."""


class DeliveryDeferred(TemporaryError):
    """The MTA did not take the message now (4xx, down, timeout): keep it, retry later.

    ``accepted`` lists recipients that did accept it before the failure (LMTP), so a retry
    goes only to the others.
    """

    def __init__(self, message: str, accepted: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.accepted = accepted


class DeliveryUncertain(DeliveryDeferred):
    """The connection failed or timed out after the message was sent, before the final reply:
    the MTA may or may not have queued it."""


class MessageUnavailable(TemporaryError):
    """The server would not give one message now (refused, cut short): skip it, go on."""


class NoIdle(TemporaryError):
    """The IMAP server does not offer IDLE: the folder is polled at the interval instead."""


class PermanentError(FetchdError):
    """Retrying will not help until the configuration or the server changes."""


class MessageRejected(FetchdError):
    """The MTA refused one message permanently; the other messages go on."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class StateBusy(PermanentError):
    """Another fetchd process holds the lock of this state file."""
