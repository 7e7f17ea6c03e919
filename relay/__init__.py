"""relay: a pure-Python SMTP relay MTA with its own spool, administered like Postfix."""

__version__ = "0.1.0"
