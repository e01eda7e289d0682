"""A loopback DNS server for the benchmark's authentication scenario.

Serves SPF and DMARC records for the load generator's domain, so that
mailx's checks do real lookups (then answer from its TTL cache, as in
production).  Prints the port, then serves until killed.
"""

from __future__ import annotations

import sys

from twisted.internet import reactor

from mailx.testing.dnsserver import start_dns_server

ZONES = {
    # loadgen.SENDER is loadgen@client.bench.test, connecting from 127.0.0.1.
    "client.bench.test": {"TXT": ["v=spf1 ip4:127.0.0.0/8 -all"]},
    "_dmarc.client.bench.test": {"TXT": ["v=DMARC1; p=reject"]},
}


def main() -> None:
    server = start_dns_server(ZONES)
    print(server.port, flush=True)
    reactor.run()


if __name__ == "__main__":
    sys.exit(main())
