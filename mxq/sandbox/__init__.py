"""Local servers for tests and the demo sandbox.

- ``mxq.sandbox.smtpd`` -- scripted aiosmtpd SMTP servers (greylisting,
  per-recipient refusals, recipient limits, refusal or dropped connection
  during DATA, STARTTLS, implicit TLS, AUTH, DSN/SMTPUTF8/8BITMIME/SIZE
  advertisement) that record everything they accept, and a server that never
  answers.
- ``mxq.sandbox.dns``   -- the DNS server process.
- ``mxq.sandbox.stack`` -- the demo sandbox that ties them together.

Nothing is imported here, so importing one module does not pull in the
others' dependencies (aiosmtpd, dnslib, trustme are the ``sandbox`` extra).
"""
