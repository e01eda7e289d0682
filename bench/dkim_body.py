"""CPU and memory of DKIM verification for many bogus signatures over a large body.

Security review, issue 9: each signature's ``bh=`` is wrong, so nothing can
pass, but a verifier that hashes the body once per signature (or holds it
in memory) pays for every one.  Runs ``mailx.checks.dkim.verify_dkim`` of
whatever mailx is first on the path, so the same command measures two
checkouts::

    PYTHONPATH=/work/main python3 bench/dkim_body.py --mib 24 --signatures 10
    PYTHONPATH=$PWD       python3 bench/dkim_body.py --mib 24 --signatures 10

The body is written to a spool-like file first; a mailx whose
``verify_dkim`` takes the body as chunks reads it from there, an older one
gets the whole message in memory, as its delivery layer gave it.  DNS is
answered from memory (one RSA key for every selector), so only hashing and
parsing are measured.

The verification runs in a thread, as in the server, beside a thread that
stands for the reactor: it sleeps 1 ms at a time and records the longest
it waited to run again.  Every session of the server waits that long when
the DKIM thread holds the GIL (``sys.getswitchinterval()`` is 5 ms; a C
call that keeps the GIL, such as a regular expression substitution, holds
it for as long as it runs).
"""

from __future__ import annotations

import argparse
import base64
import inspect
import os
import resource
import tempfile
import threading
import time

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from mailx.checks.dkim import verify_dkim
from mailx.dns import Resolver


class MemoryResolver(Resolver):
    """Every key lookup answers the same RSA key, at once."""

    def __init__(self) -> None:
        super().__init__([("127.0.0.1", 9)], 1.0)
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        der = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.record = b"v=DKIM1; k=rsa; p=" + base64.b64encode(der)

    def txt_bytes(self, name: str | bytes) -> list[bytes]:
        return [self.record]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=24)
    parser.add_argument("--signatures", type=int, default=10)
    args = parser.parse_args()
    header = b"".join(
        b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=signer.test;"
        b" s=s%d; h=from:subject; bh=%s; b=AAAA\r\n" % (n, b"A" * 43 + b"=")
        for n in range(args.signatures)
    ) + b"From: x@signer.test\r\nSubject: s\r\n\r\n"
    line = b"bogus  body \t line with  runs of   whitespace \r\n"
    chunk = line * (1024 * 1024 // len(line))
    resolver = MemoryResolver()
    with tempfile.NamedTemporaryFile(prefix="dkim-body-") as spool:
        for _ in range(args.mib):
            spool.write(chunk)
        spool.flush()
        size = os.path.getsize(spool.name)

        def chunks():
            with open(spool.name, "rb") as f:
                while data := f.read(1024 * 1024):
                    yield data

        streamed = "body" in inspect.signature(verify_dkim).parameters
        outcome: dict = {}

        def verify() -> None:
            started = time.thread_time()
            if streamed:
                outcome["results"] = verify_dkim(resolver, header, chunks)
            else:
                with open(spool.name, "rb") as f:
                    outcome["results"] = verify_dkim(resolver, header + f.read())
            outcome["cpu"] = time.thread_time() - started

        gaps = []
        done = threading.Event()

        def reactor() -> None:
            last = time.perf_counter()
            while not done.is_set():
                time.sleep(0.001)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        ticker = threading.Thread(target=reactor)
        ticker.start()
        started = time.monotonic()
        worker = threading.Thread(target=verify)
        worker.start()
        worker.join()
        wall = time.monotonic() - started
        done.set()
        ticker.join()
        after = resource.getrusage(resource.RUSAGE_SELF)
    results, cpu = outcome["results"], outcome["cpu"]
    gaps.sort()
    print(
        f"{'streamed' if streamed else 'in memory'}: {args.signatures} signatures over"
        f" {size / 2**20:.0f} MiB: cpu {cpu:.2f}s wall {wall:.2f}s"
        f" peak RSS {after.ru_maxrss / 1024:.0f} MiB (before: {rss_before / 1024:.0f} MiB);"
        f" the other thread waited at most {gaps[-1] * 1000:.0f} ms to run"
        f" (99th percentile {gaps[int(len(gaps) * 0.99)] * 1000:.1f} ms, {len(gaps)} turns)"
    )
    print("results:", ", ".join(sorted({r.result for r in results})), f"({len(results)})")


if __name__ == "__main__":
    main()
