"""Outbound TLS you can trust, one job per module:

- ``policy``: pure: Postfix's security levels, smtp_tls_policy_maps entries and their
  lookup, certificate name matching, protocol and cipher settings, and the record of what
  one server must give (``HostPolicy``);
- ``mta_sts``: MTA-STS (RFC 8461): the TXT record and policy parsers, the HTTPS fetch and
  the policy cache in the spool;
- ``dane``: DANE (RFC 7672): TLSA records matched against a server's certificate chain;
- ``destination``: which policy each server of a next hop gets (map, MTA-STS, DANE,
  REQUIRETLS, TLS-Required: No), decided before connecting;
- ``session``: the client side of one TLS handshake: contexts, verification, Postfix's
  log lines;
- ``report``: TLS reports (RFC 8460): daily aggregates and the report mail.

Importing the package imports none of them.
"""
