# -*- test-case-name: tests.test_mtasts -*-
"""An HTTPS server on 127.0.0.1 that plays a domain's MTA-STS policy host in tests::

    ca = TestCA()                      # trusted through SSL_CERT_FILE by the test
    server = start_policy_server(ca.issue("mta-sts.remote.test"), POLICY)
    ... # PolicyFetcher(resolver, port=server.port)
    server.body = b"version: STSv1\\r\\nmode: testing\\r\\n..."   # change what it serves
    yield server.stop()

What it answers is plain attributes: ``body``, ``status``, ``content_type``,
``headers`` (extra ones, e.g. a Location for a redirect) and ``chunks``
(send the body in that many writes, without a Content-Length, to show a
size limit applied while reading).  ``requests`` counts the GETs of the
well-known path, ``hosts`` records their Host headers.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.web import resource, server

from mailx.testing.tls import server_options

__all__ = ["PolicyServer", "start_policy_server"]


class _Policy(resource.Resource):
    isLeaf = True

    def __init__(self, owner: PolicyServer) -> None:
        super().__init__()
        self.owner = owner

    def render_GET(self, request: Any) -> Any:
        owner = self.owner
        if request.path != b"/.well-known/mta-sts.txt":
            request.setResponseCode(404)
            return b"not found"
        owner.requests += 1
        owner.hosts.append((request.getHeader(b"host") or b"").decode("ascii", "replace"))
        request.setResponseCode(owner.status)
        request.setHeader(b"content-type", owner.content_type)
        for name, value in owner.headers.items():
            request.setHeader(name, value)
        if owner.chunks <= 1:
            return owner.body
        size = -(-len(owner.body) // owner.chunks)
        for i in range(0, len(owner.body), size):
            request.write(owner.body[i : i + size])
        request.finish()
        return server.NOT_DONE_YET


class PolicyServer:
    """See the module docstring."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.status = 200
        self.content_type = b"text/plain"
        self.headers: dict[bytes, bytes] = {}
        self.chunks = 1
        self.requests = 0
        self.hosts: list[str] = []
        self.port = 0
        self._listening: Any = None

    def stop(self) -> defer.Deferred:
        return defer.maybeDeferred(self._listening.stopListening)


def start_policy_server(
    certificate: tuple[bytes, bytes], body: bytes = b"", *, reactor: Any = None
) -> PolicyServer:
    """A `PolicyServer` serving ``body`` over TLS with ``certificate`` on an ephemeral port."""
    if reactor is None:
        from twisted.internet import reactor  # type: ignore[no-redef]
    policy = PolicyServer(body)
    site = server.Site(_Policy(policy))
    site.noisy = False
    site.displayTracebacks = False
    site.log = lambda request: None  # type: ignore[method-assign]  # no access log lines in the test output
    policy._listening = reactor.listenSSL(
        0, site, server_options(*certificate), interface="127.0.0.1"
    )
    policy.port = policy._listening.getHost().port
    return policy
