"""fetchd: a mail retrieval daemon that moves POP3/IMAP mail into the local MTA, safely."""

__version__ = "0.1.0"
