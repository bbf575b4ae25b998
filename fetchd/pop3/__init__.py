"""POP3: a sans-IO protocol core (proto) and its asyncio adapter (client)."""
