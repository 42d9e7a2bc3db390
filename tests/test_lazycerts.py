"""aiohttp imported by the tool's own processes without loading CA certificates it may not use
(``bolmo_async.lazycerts``): an https connection is still verified against the default CAs.

Each case runs in a fresh interpreter: aiohttp must not be imported yet (this test process has)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

trustme = pytest.importorskip("trustme")

# A real TLS server (aiohttp, on loopback) with a certificate of a test CA, and the tool's own
# client (``make_session`` + ``HubClient.get``) and aiohttp's defaults against it.
SCRIPT = textwrap.dedent(
    """
    import asyncio, json, ssl, sys
    from bolmo_async.lazycerts import deferred, import_aiohttp

    import_aiohttp()
    import aiohttp
    from aiohttp import web
    from bolmo_async.hub import HubClient, make_session
    from bolmo_async.retry import RetryPolicy

    report = {"patched_left": "set_default_verify_paths" in ssl.SSLContext.__dict__, "owed_at_import": deferred()}

    async def main():
        app = web.Application()
        app.router.add_get("/x", lambda request: web.Response(text="ok"))
        runner = web.AppRunner(app)
        await runner.setup()
        server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_ctx.load_cert_chain(sys.argv[1], sys.argv[2])
        tls = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ctx)
        plain = web.TCPSite(runner, "127.0.0.1", 0)
        await tls.start()
        await plain.start()
        https = f"https://localhost:{tls._server.sockets[0].getsockname()[1]}/x"
        http = f"http://127.0.0.1:{plain._server.sockets[0].getsockname()[1]}/x"
        retry = RetryPolicy(max_attempts=1)

        async def get(url, client):
            try:
                if client:
                    async with make_session(2, retry) as session:
                        hub = HubClient(session, endpoint=url.rsplit("/", 1)[0], repo_id="a/b", retry=retry)
                        async with hub.get(url, headers={}) as r:
                            return await r.text()
                async with aiohttp.ClientSession() as session, session.get(url) as r:
                    return await r.text()
            except aiohttp.ClientConnectorCertificateError:
                return "certificate refused"

        report["http"] = await get(http, True)
        report["owed_after_http"] = deferred()
        # First through the tool's client (which loads them on a thread first), or through
        # aiohttp's default context (which loads them at its first handshake).
        first, then = ("client", "default") if sys.argv[4] == "client" else ("default", "client")
        report["https_" + first] = await get(https, first == "client")
        report["owed_after_https"] = deferred()
        report["https_" + then] = await get(https, then == "client")
        # A context of the caller's own is still one aiohttp takes (its type checks saw ssl.SSLContext).
        own = ssl.create_default_context(cafile=sys.argv[3])
        async with aiohttp.ClientSession() as session, session.get(https, ssl=own) as r:
            report["https_own_context"] = await r.text()
        await runner.cleanup()

    asyncio.run(main())
    print(json.dumps(report))
    """
)


def _run(tmp_path: Path, trusted: bool, first: str) -> dict:
    import json
    import os

    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    other = trustme.CA()  # a CA that did not sign the server's certificate
    other.cert_pem.write_to_path(str(tmp_path / "other.pem"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SSL_CERT", "HTTP", "HTTPS", "http", "https"))}
    # OpenSSL's default verify paths: what ``set_default_verify_paths`` loads, deferred or not.
    env["SSL_CERT_FILE"] = str(tmp_path / ("ca.pem" if trusted else "other.pem"))
    env["SSL_CERT_DIR"] = str(tmp_path / "no-such-dir")
    r = subprocess.run(
        [sys.executable, "-c", SCRIPT, *(str(tmp_path / n) for n in ("server.pem", "server.pem", "ca.pem")), first],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.splitlines()[-1])


@pytest.mark.parametrize("first", ["client", "default"])
def test_aiohttp_loads_no_certificate_until_an_https_connection_needs_them(tmp_path, first):
    got = _run(tmp_path, trusted=True, first=first)
    assert got["patched_left"] is False
    # Imported: nothing loaded. A plain-http request: still nothing (0.1 s of a run, and CPU).
    assert got["owed_at_import"] is True
    assert got["http"] == "ok" and got["owed_after_http"] is True
    # The first https request loads the default CAs (here the test CA, by SSL_CERT_FILE), and
    # the server's certificate is verified against them.
    assert got["owed_after_https"] is False
    assert got["https_client"] == "ok"
    assert got["https_default"] == "ok" and got["https_own_context"] == "ok"


@pytest.mark.parametrize("first", ["client", "default"])
def test_https_is_still_verified_against_the_default_cas(tmp_path, first):
    got = _run(tmp_path, trusted=False, first=first)
    # The default CAs do not include the server's: refused, by the tool's client and by aiohttp's
    # default context alike.
    assert got["https_client"] == "certificate refused"
    assert got["https_default"] == "certificate refused"
    assert got["http"] == "ok" and got["https_own_context"] == "ok"


def test_a_certificate_that_does_not_verify_is_named_as_such_at_once_not_as_an_unreachable_server(tmp_path):
    """The server answered with a certificate the default CAs do not vouch for: the error names
    the host and the fix (SSL_CERT_FILE), at the first attempt; it read "cannot reach ... check
    that the server runs" and a download retried it."""
    import os
    import socket
    import ssl
    import threading

    ca = trustme.CA()
    ca.issue_cert("localhost").private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    trustme.CA().cert_pem.write_to_path(str(tmp_path / "other.pem"))
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(str(tmp_path / "server.pem"))
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    handshakes = []

    def serve() -> None:  # a TLS server: each connection's handshake, then closed
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            try:
                with server_ctx.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass
            handshakes.append(1)

    threading.Thread(target=serve, daemon=True).start()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SSL_CERT", "HTTP", "HTTPS", "http", "https"))}
    env.update(
        SSL_CERT_FILE=str(tmp_path / "other.pem"), SSL_CERT_DIR=str(tmp_path / "none"), HF_HOME=str(tmp_path / "hf")
    )
    try:
        r = subprocess.run(
            [
                *(sys.executable, "-m", "bolmo_async", "plan", "--output-dir", str(tmp_path / "out")),
                *("--endpoint", f"https://localhost:{port}", "--repo-id", "a/b"),
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
    finally:
        listener.close()
    assert r.returncode != 0
    assert "TLS certificate of localhost could not be verified" in r.stderr and "SSL_CERT_FILE" in r.stderr, r.stderr
    assert "cannot reach" not in r.stderr and "Traceback" not in r.stderr
    assert len(handshakes) == 1  # not retried
