"""aiohttp imported without loading CA certificates it may never use.

Importing ``aiohttp.connector`` builds two SSL contexts, each loading the system's default CA
certificates (``set_default_verify_paths``: 0.05 s each with OpenSSL 3), in every process that
imports it (the coordinator, the fork server), for plain-http endpoints as much as for https.
``import_aiohttp`` imports it with that call deferred for the contexts created meanwhile: they
become ``CertsOnFirstUse`` (still ``ssl.SSLContext``; aiohttp keeps them as its own), which load
the same default certificates the first time they verify a connection, or are asked for them.
An https connection is verified exactly as before; a run that makes none pays nothing.
``load_deferred`` loads them off the event loop: ``HubClient`` calls it on a thread before its
first https request (a context first used otherwise, as after a redirect aiohttp follows from
http to https, loads them then, once, on the loop).

Only the tool's own processes do this (the CLI before the API's imports, a worker process before
its task modules' imports): in a library user's process aiohttp imports as it always does.
"""

from __future__ import annotations

import ssl
import sys
import threading
from typing import Any

#: The class ``CertsOnFirstUse`` extends: only its instances take that class (the same layout).
_PLAIN = ssl.SSLContext
_LOCK = threading.Lock()
#: Contexts whose default certificates are not loaded yet (made while ``import_aiohttp`` ran).
_DEFERRED: list[CertsOnFirstUse] = []


class CertsOnFirstUse(_PLAIN):
    """An ``ssl.SSLContext`` whose ``set_default_verify_paths`` was deferred: done before the
    first handshake that verifies (a ``CERT_NONE`` context verifies nothing, so it makes none
    of its handshakes wait) and before its certificates are listed."""

    _owed = False

    def set_default_verify_paths(self) -> None:
        with _LOCK:
            if not self._owed:
                self._owed = True
                _DEFERRED.append(self)

    def settle(self) -> None:
        """Load the deferred default certificates now (blocking I/O: not on an event loop)."""
        with _LOCK:
            if self._owed:
                super().set_default_verify_paths()
                self._owed = False
                _DEFERRED.remove(self)

    def wrap_socket(self, *args: Any, **kwargs: Any) -> Any:
        if self.verify_mode != ssl.CERT_NONE:
            self.settle()
        return super().wrap_socket(*args, **kwargs)

    def wrap_bio(self, *args: Any, **kwargs: Any) -> Any:
        if self.verify_mode != ssl.CERT_NONE:
            self.settle()
        return super().wrap_bio(*args, **kwargs)

    def get_ca_certs(self, binary_form: bool = False) -> Any:
        self.settle()
        return super().get_ca_certs(binary_form)

    def cert_store_stats(self) -> Any:
        self.settle()
        return super().cert_store_stats()


def import_aiohttp() -> None:
    """Import aiohttp, its SSL contexts' default certificates deferred (a no-op once imported).

    ``ssl.SSLContext.set_default_verify_paths`` only records its context while aiohttp's modules
    run (``ssl.SSLContext`` itself stays the class it is: aiohttp keeps it for type checks); the
    contexts recorded then become ``CertsOnFirstUse``, a subclass with the same layout."""
    if "aiohttp.connector" in sys.modules:
        return
    made: list[ssl.SSLContext] = []
    had = ssl.SSLContext.__dict__.get("set_default_verify_paths")

    def record(self: ssl.SSLContext) -> None:
        made.append(self)

    ssl.SSLContext.set_default_verify_paths = record  # type: ignore[method-assign]
    try:
        import aiohttp.connector  # noqa: F401
    finally:
        if had is None:
            del ssl.SSLContext.set_default_verify_paths
        else:
            ssl.SSLContext.set_default_verify_paths = had  # type: ignore[method-assign]
        for ctx in made:
            if type(ctx) is _PLAIN:
                ctx.__class__ = CertsOnFirstUse
                ctx.set_default_verify_paths()  # recorded as owed
            else:  # another class (ssl.SSLContext replaced by a library): loaded now, as it would have been
                ctx.set_default_verify_paths()


def _verifying() -> list[CertsOnFirstUse]:
    with _LOCK:
        return [ctx for ctx in _DEFERRED if ctx.verify_mode != ssl.CERT_NONE]


def deferred() -> bool:
    """A context that verifies connections still owes its default certificates."""
    return bool(_verifying())


def load_deferred() -> None:
    """Load the deferred default certificates of every context that verifies connections
    (blocking I/O: on a thread)."""
    for ctx in _verifying():
        ctx.settle()


__all__ = ["CertsOnFirstUse", "deferred", "import_aiohttp", "load_deferred"]
