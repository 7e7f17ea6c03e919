"""The commands, one module each (postqueue, postsuper, postcat, qshape, postconf,
sendmail, ``relay ...``), with what they share in ``command``.  They reach the spool only
through ``spool`` and the daemon only through its control socket (relay.control), never
the listener, the SMTP client or the scheduler (tests/unit/test_import_rules.py)."""
