"""The listener (Postfix's smtpd and cleanup), one job per module:

- ``engine``: the seam with aiosmtpd, the only module that imports it;
- ``session``: one SMTP session's dialogue, every command and reply;
- ``policy``: pure decisions (addresses, parameters, relay restrictions, limits) and the
  listener's settings record;
- ``content``: the DATA phase's framing (dot-stuffing, end of data, bare LF and CR);
- ``replies``: the text of every reply;
- ``cleanup``: the commit of a received message to the spool;
- ``listener``: what all sessions of a process share.

Importing the package imports none of them, so the queue manager process, which needs
only the settings, never loads aiosmtpd.
"""
