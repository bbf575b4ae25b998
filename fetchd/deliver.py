"""Handing messages to the local MTA over SMTP (aiosmtplib).

The contract with the poller: :meth:`SMTPDelivery.deliver` returns only when the MTA accepted
the message for every recipient (a 250 after the final dot). Anything else raises:
DeliveryDeferred (4xx, 421, disconnect, timeout: keep the message, retry later) or
MessageRejected (5xx: a permanent refusal of this one message).
"""

from __future__ import annotations

import socket
import ssl

import aiosmtplib

from fetchd.config import Delivery
from fetchd.errors import DeliveryDeferred, MessageRejected
from fetchd.message import has_8bit
from fetchd.tls import context_for, describe_tls_error


class SMTPDelivery:
    """One SMTP connection, opened on first use and reused for the messages of one poll."""

    def __init__(self, settings: Delivery, *, connect_timeout: float, where: str) -> None:
        self.settings = settings
        self.where = where
        self.local_hostname = socket.gethostname() or "localhost"
        tls = settings.tls
        context = context_for(tls)
        self._smtp = aiosmtplib.SMTP(
            hostname=settings.host,
            port=settings.port,
            local_hostname=self.local_hostname,
            # Never opportunistic: TLS exactly when configured, then verified and mandatory.
            use_tls=tls.mode == "implicit",
            start_tls=tls.mode == "starttls",
            tls_context=context,
            validate_certs=context is not None and tls.verify,
            timeout=connect_timeout,
        )
        self._server_name = settings.host

    @property
    def target(self) -> str:
        return f"SMTP {self.settings.host}:{self.settings.port}"

    async def _ensure_connected(self) -> None:
        if self._smtp.is_connected:
            return
        try:
            await self._smtp.connect()
        except ssl.SSLError as e:
            reason = describe_tls_error(e, self._server_name)
            raise DeliveryDeferred(f"{self.where}: MTA at {self.target}: {reason}") from None
        except (aiosmtplib.SMTPException, OSError) as e:
            raise DeliveryDeferred(
                f"{self.where}: cannot reach the MTA at {self.target}: {_reason(e)}"
            ) from None

    async def deliver(self, message: bytes, sender: str) -> None:
        """Send one message; return only when every recipient was accepted."""
        await self._ensure_connected()
        smtp = self._smtp
        options: list[str] = []
        if has_8bit(message) and smtp.supports_extension("8bitmime"):
            options.append("BODY=8BITMIME")
        recipients = list(self.settings.to)
        if not (sender.isascii() and all(r.isascii() for r in recipients)):
            if not smtp.supports_extension("smtputf8"):
                raise MessageRejected(
                    f"{self.where}: the MTA at {self.target} does not offer SMTPUTF8, needed "
                    f"for the address {sender!r}",
                    553,
                )
            options.append("SMTPUTF8")
        try:
            refused, _ = await smtp.sendmail(
                sender, recipients, message, mail_options=options, timeout=self.settings.timeout
            )
        except aiosmtplib.SMTPRecipientsRefused as e:
            codes = [r.code for r in e.recipients]
            text = "; ".join(f"{r.recipient}: {r.code} {r.message}" for r in e.recipients)
            raise self._refusal(
                min(codes) if codes else 451, f"recipients refused: {text}"
            ) from None
        except aiosmtplib.SMTPResponseException as e:
            raise self._refusal(e.code, f"{e.code} {e.message}") from None
        except (aiosmtplib.SMTPException, OSError, ValueError, UnicodeError) as e:
            self._smtp.close()  # unknown state: never reuse the connection
            raise DeliveryDeferred(
                f"{self.where}: delivery to {self.target} failed: {_reason(e)}"
            ) from None
        if refused:
            # Some recipients took it, others not: retry the whole message later (duplicates
            # for the ones that accepted are better than a loss for the others).
            text = "; ".join(f"{r}: {resp.code} {resp.message}" for r, resp in refused.items())
            code = min(resp.code for resp in refused.values())
            raise self._refusal(code, f"some recipients refused: {text}")

    def _refusal(self, code: int, text: str) -> Exception:
        message = f"{self.where}: the MTA at {self.target} refused the message: {text}"
        if 500 <= code < 600:
            return MessageRejected(message, code)
        return DeliveryDeferred(message)

    async def close(self) -> None:
        if not self._smtp.is_connected:
            return
        try:
            await self._smtp.quit(timeout=10)
        except (aiosmtplib.SMTPException, OSError):
            self._smtp.close()


def _reason(e: BaseException) -> str:
    return str(e) or type(e).__name__
