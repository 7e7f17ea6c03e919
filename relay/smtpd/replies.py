"""Every reply the listener sends, in Postfix 3.7's words: one table, no other source.

The dialogue (relay.smtpd.session) picks a reply from here at the point where it decides;
nothing rewrites a reply afterwards, and the SMTP engine underneath (aiosmtpd) never gets
to say anything of its own.  Replies that name something (a host, an address, an option)
are templates filled with ``str.format``.  Each carries the RFC 3463 enhanced status code,
since ENHANCEDSTATUSCODES is offered (RFC 2034); only the greeting, EHLO/HELO and the
continuation replies (334, 354) go without one, as in Postfix.

No I/O, no state.
"""

from __future__ import annotations

# Session set-up and end (smtpd.c, postscreen; 421 for anything that ends a session).
GREETING = "220 {banner}"
BYE = "221 2.0.0 Bye"
PREGREET = "554 5.5.1 Error: SMTP protocol synchronization"
PIPELINING = "554 5.5.0 Error: SMTP protocol synchronization"
TOO_MANY_CONNECTIONS = "421 4.7.0 {myhostname} Error: too many connections from {client}"
TOO_MANY_MESSAGES = "421 4.7.0 {myhostname} Error: too many messages from {client}"
TOO_MANY_RECIPIENTS_FROM = "421 4.7.0 {myhostname} Error: too many recipients from {client}"
TOO_MANY_LOGINS = "421 4.7.0 {myhostname} Error: too many failed logins from {client}"
TOO_MANY_ERRORS = "421 4.7.0 {myhostname} Error: too many errors"
TIMEOUT = "421 4.4.2 {myhostname} Error: timeout exceeded"
SHUTTING_DOWN = "421 4.3.2 Service shutting down"

# Anything, anywhere.
OK = "250 2.0.0 Ok"
UNKNOWN_COMMAND = "500 5.5.2 Error: command not recognized"
BAD_SYNTAX = "500 5.5.2 Error: bad syntax"
COMMAND_TOO_LONG = "500 5.5.2 Error: command line too long"
NUL_IN_COMMAND = "500 5.5.2 Error: NUL character in command"
BAD_UTF8 = "500 5.5.2 Error: bad UTF-8 syntax"
BARE_LF = "{code} 5.5.2 Error: bare <LF> received"
NEED_HELO = "503 5.5.1 Error: send HELO/EHLO first"
NEED_STARTTLS = "530 5.7.0 Must issue a STARTTLS command first"
CONFIG_ERROR = "451 4.3.5 Server configuration error"
INTERNAL_ERROR = "451 4.3.0 Error: internal error"

# HELO, EHLO, RSET, NOOP, VRFY, QUIT (helo_cmd, ehlo_cmd, rset_cmd, noop_cmd, vrfy_cmd).
HELO = "250 {myhostname}"
# Before HELO/EHLO nothing has announced ENHANCEDSTATUSCODES: Postfix's two say none.
HELO_SYNTAX = "501 Syntax: HELO hostname"
EHLO_SYNTAX = "501 Syntax: EHLO hostname"
RSET_SYNTAX = "501 5.5.4 Syntax: RSET"
VRFY = "252 2.0.0 {address}"
VRFY_SYNTAX = "501 5.5.4 Syntax: VRFY address [SMTPUTF8]"

# ETRN (RFC 1985; etrn_cmd, flush(8)), without enhanced status codes as in Postfix.
ETRN_STARTED = "250 Queuing started"
ETRN_SYNTAX = "500 Syntax: ETRN domain"
ETRN_BAD_SITE = "501 Error: invalid parameter syntax"
ETRN_IN_TRANSACTION = "503 Error: MAIL transaction in progress"
ETRN_DENIED = "459 <{site}>: service unavailable"
ETRN_UNAVAILABLE = "458 Unable to queue messages"

# STARTTLS (RFC 3207).
STARTTLS_READY = "220 2.0.0 Ready to start TLS"
STARTTLS_SYNTAX = "501 5.5.4 Syntax: STARTTLS"
TLS_ACTIVE = "554 5.5.1 Error: TLS already active"
NOT_IMPLEMENTED = "502 5.5.1 Error: command not implemented"

# AUTH (RFC 4954; smtpd_sasl_proto.c, smtpd_sasl_glue.c).
AUTH_CHALLENGE = "334 {challenge}"
AUTH_OK = "235 2.7.0 Authentication successful"
AUTH_FAILED = "535 5.7.8 Error: authentication failed: authentication failure"
AUTH_NOT_ENABLED = "503 5.5.1 Error: authentication not enabled"
AUTH_ALREADY = "503 5.5.1 Error: already authenticated"
AUTH_IN_TRANSACTION = "503 5.5.1 Error: MAIL transaction in progress"
AUTH_SYNTAX = "501 5.5.4 Syntax: AUTH mechanism"
AUTH_MECHANISM = "504 5.5.4 Unsupported authentication mechanism: {mechanism}"
AUTH_ABORTED = "501 5.7.0 Authentication aborted"
AUTH_MALFORMED = "501 5.5.2 Error: malformed authentication response"
AUTH_TEMPORARY = "454 4.7.0 Temporary authentication failure"

# MAIL (mail_cmd; RFC 1870 SIZE, RFC 6152 BODY, RFC 6531 SMTPUTF8, RFC 3461 DSN,
# RFC 4954 AUTH=).
MAIL_OK = "250 2.1.0 Ok"
MAIL_SYNTAX = "501 5.5.4 Syntax: MAIL FROM:<address>"
NESTED_MAIL = "503 5.5.1 Error: nested MAIL command"
BAD_SENDER = "501 5.1.7 Bad sender address syntax"
BAD_SIZE = "501 5.5.4 Bad message size syntax"
BAD_RET = "501 5.5.4 Bad RET parameter syntax"
BAD_ENVID = "501 5.5.4 Bad ENVID parameter syntax"
BAD_AUTH_PARAMETER = "501 5.5.4 Bad AUTH parameter syntax"
MULTIPLE_AUTH = "503 5.5.4 Error: multiple AUTH= options"
UNSUPPORTED_OPTION = "555 5.5.4 Unsupported option: {option}"
MESSAGE_TOO_BIG = "552 5.3.4 Message size exceeds fixed limit"
NO_SPACE = "452 4.3.1 Insufficient system storage"

# RCPT (rcpt_cmd, smtpd_check.c).
RCPT_OK = "250 2.1.5 Ok"
RCPT_SYNTAX = "501 5.5.4 Syntax: RCPT TO:<address>"
NEED_MAIL = "503 5.5.1 Error: need MAIL command"
BAD_RECIPIENT = "501 5.1.3 Bad recipient address syntax"
BAD_NOTIFY = "501 5.5.4 Error: Bad NOTIFY parameter syntax"
BAD_ORCPT = "501 5.5.4 Error: Bad ORCPT parameter syntax"
TOO_MANY_RECIPIENTS = "452 4.5.3 Error: too many recipients"
RELAY_DENIED = "554 5.7.1 <{recipient}>: Relay access denied"
RELAY_DEFERRED = "454 4.7.1 <{recipient}>: Relay access denied"
ACCESS_DENIED = "554 5.7.1 <{recipient}>: Recipient address rejected: Access denied"
ACCESS_DEFERRED = "450 4.7.1 <{recipient}>: Recipient address rejected: Access denied"

# DATA (data_cmd, receive_data_message, cleanup's status texts).
DATA_GO_AHEAD = "354 End data with <CR><LF>.<CR><LF>"
DATA_SYNTAX = "501 5.5.4 Syntax: DATA"
NEED_RCPT = "503 5.5.1 Error: need RCPT command"
NO_VALID_RECIPIENTS = "554 5.5.1 Error: no valid recipients"
QUEUED = "250 2.0.0 Ok: queued as {queue_id}"
NUL_IN_CONTENT = "554 5.6.0 Error: NUL character in message content"
TOO_MANY_HOPS = "554 5.4.6 Too many hops"
WRITE_ERROR = "451 4.3.0 Error: queue file write error"
