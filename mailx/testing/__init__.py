"""Helpers for testing mailx and things built on it (loopback DNS, SMTP sink, servers)."""

# SRS secrets that pass the configuration's strength check (config.secret_weakness).
# Public, so for tests only: never in a real configuration.
SRS_SECRET = "2ucJ-Ad0jn8MYl85jcvZlPspRAIY-5I_G1HQe0fQM7U"
SRS_SECRET_2 = "U1E5vawEC-oc3PDUWKydRwrIe7DIizgGM9mUAo5BgRs"
