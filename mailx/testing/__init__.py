"""Helpers for testing mailx and things built on it (loopback DNS, SMTP sink, servers)."""

import secrets

# SRS secrets that pass the configuration's strength check, new in each test
# run: a fixed one here would be a sample value anyone could copy.
SRS_SECRET = secrets.token_urlsafe(32)
SRS_SECRET_2 = secrets.token_urlsafe(32)

# What precedes the data in a queue entry's file (`mailx.storage.queue`): an
# envelope line, here an empty one, for data files a test writes by hand.
ENTRY_LINE = b"{}\n"
