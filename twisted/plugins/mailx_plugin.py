"""twistd plugin: ``twistd -n mailx [--config FILE]``.

twistd imports every plugin module at start-up (research notes section 7),
so this one only declares options and imports mailx when asked to run.
"""

from twisted.application.service import ServiceMaker

mailx = ServiceMaker(
    "mailx",
    "mailx.service",
    "A mail exchanger for your own domains: SMTP in, SPF/DKIM/DMARC, Maildir out.",
    "mailx",
)
