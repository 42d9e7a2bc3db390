"""Talking to the Hub (or a mirror): endpoint and token, revision -> commit, the file listing,
and resolve URLs. Retries go through ``retry.py``, the one retry helper.

The token is read the usual way (``HF_TOKEN`` or ``huggingface-cli login``'s file, through
``huggingface_hub.get_token``), sent as a per-request ``Authorization`` header only to the
Hub endpoint's own origin, and never logged or written anywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import quote
from urllib.request import proxy_bypass

import aiohttp
from yarl import URL

from . import lazycerts
from .errors import AuthError, HubError, NotFoundError, Retry, UsageError
from .models import DEFAULT_REPO_ID, RepoFile, check_repo_path, data_suffix
from .retry import RETRY_STATUSES, Progress, RetryPolicy, attempt_count, not_http, retrying

log = logging.getLogger("bolmo_async")
T = TypeVar("T")

#: huggingface_hub's default endpoint (``constants.ENDPOINT`` without ``HF_ENDPOINT``).
HUB_ENDPOINT = "https://huggingface.co"


def default_endpoint(endpoint: str | None = None) -> str:
    """``--endpoint`` > ``HF_ENDPOINT`` > huggingface_hub's default."""
    ep = endpoint or os.environ.get("HF_ENDPOINT") or HUB_ENDPOINT
    ep = ep.rstrip("/")
    url = URL(ep)
    if url.scheme not in ("http", "https") or not url.host:
        if url.user is not None or url.password is not None:
            ep = str(url.with_user(None))  # (never said back, as below)
        raise UsageError(f"--endpoint / HF_ENDPOINT must be an http(s) URL, got {ep!r}")
    if url.user is not None or url.password is not None:
        # Said back in progress lines and errors, written into the folder's plan, sent along redirects:
        # a password in the URL would go wherever the endpoint is named.
        raise UsageError(
            f"--endpoint / HF_ENDPOINT carries a user name or password ({url.with_user(None)} with 'user:...@'): "
            "it would be printed and written into the output folder's plan. Give the endpoint without them, "
            "and the token in HF_TOKEN (or `hf auth login`)."
        )
    return ep


def read_token() -> str | None:
    """The user's HF token, the usual way: huggingface_hub's ``get_token`` (``HF_TOKEN``, the saved
    login, OIDC and OAuth refresh). Its import costs ~0.1 s of every process's start, so the
    common cases are answered without it: a plain ``HF_TOKEN`` / ``HUGGING_FACE_HUB_TOKEN``, and
    no token anywhere (no saved login file, no OIDC or Colab setting)."""
    env = os.environ
    if not env.get("HF_OIDC_RESOURCE"):
        plain = (env.get("HF_TOKEN") or env.get("HUGGING_FACE_HUB_TOKEN") or "").strip()
        if plain:
            return plain
        if not os.path.exists(_saved_token_path()) and "COLAB_RELEASE_TAG" not in env:
            return None
    from huggingface_hub import get_token

    tok = get_token()
    return tok or None


def _saved_token_path() -> str:
    """Where ``hf auth login`` (``huggingface-cli login``) saved the token."""
    env = os.environ
    home = env.get("HF_HOME") or os.path.join(
        env.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface"
    )
    return env.get("HF_TOKEN_PATH") or os.path.join(home, "token")


def token_source() -> str:
    """Which token ``read_token`` sends, in words for a refusal's line (never the token itself):
    the variable, or the saved login's path; a variable set hides a saved login, said with how
    to use that one instead."""
    env = os.environ
    saved = _saved_token_path()
    if not env.get("HF_OIDC_RESOURCE"):
        if (env.get("HF_TOKEN") or env.get("HUGGING_FACE_HUB_TOKEN") or "").strip():
            name = "HF_TOKEN" if env.get("HF_TOKEN") else "HUGGING_FACE_HUB_TOKEN"
            hides = f" (used instead of the login saved at {saved}: `unset {name}` to use that one)"
            return f"the token in {name}" + (hides if os.path.exists(saved) else "")
        if os.path.exists(saved):
            return f"the token saved at {saved} (`hf auth login`)"
    return "the token huggingface_hub found"


def status_error(status: int, what: str, body: str = "", headers: Any = None, token_sent: bool = False) -> HubError:
    """Translate an HTTP status into our error, with the fix in the message. The Hub (and
    mirrors such as olah) answer 401 for a repo or revision that does not exist, saying so in
    ``X-Error-Code``; that is "not found", not a token problem. ``token_sent``: the request
    carried the token (a refusal names where it came from)."""
    body = " ".join(body.split())[:200]
    code = (headers or {}).get("X-Error-Code", "") if headers is not None else ""
    if code in ("RepoNotFound", "RevisionNotFound", "EntryNotFound"):
        hint = "" if code != "RepoNotFound" else " (a private or gated repo also answers this without a valid HF_TOKEN)"
        return NotFoundError(
            f"{what}: not found ({code}, HTTP {status}){hint}. Check --repo-id, --revision and --endpoint.", code
        )
    if status in (401, 403):
        terms = "and accept the dataset's terms on its Hub page if it is gated."
        if token_sent:
            return AuthError(
                f"{what}: HTTP {status} (not authorised) with {token_source()}. Use a token that can read this "
                f"repo, {terms}"
            )
        return AuthError(
            f"{what}: HTTP {status} (not authorised): no token was sent. Set HF_TOKEN (or run `hf auth login`) "
            f"with a token that can read this repo, {terms}"
        )
    if status == 404:
        return NotFoundError(f"{what}: not found (HTTP 404). Check --repo-id, --revision and --endpoint.")
    return HubError(f"{what}: HTTP {status} from the endpoint ({body[:120]}). Check --endpoint, or try again later.")


class HubClient:
    """One per run; wraps one ``aiohttp.ClientSession``."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        endpoint: str,
        repo_id: str,
        repo_type: str = "dataset",
        token: str | None = None,
        retry: RetryPolicy | None = None,
        fail_fast: bool = False,
    ):
        """``fail_fast``: a refused connection or an unknown host is an error at once (the first
        request of a run: nothing listens there), instead of being retried."""
        if repo_id.count("/") != 1 or any(c in repo_id for c in " ?#\\"):
            raise UsageError(f"--repo-id must look like 'namespace/name', got {repo_id!r}")
        self.session = session
        self.endpoint = endpoint.rstrip("/")
        self.repo_id = repo_id
        self.repo_type = repo_type
        self._token = token
        self.retry = retry or RetryPolicy()
        self.fail_fast = fail_fast
        self._origin = URL(self.endpoint).origin()
        self._net: _EnvNet | None = None
        self._net_reading: asyncio.Future[_EnvNet] | None = None

    def __repr__(self) -> str:  # never shows the token
        return f"HubClient(endpoint={self.endpoint!r}, repo_id={self.repo_id!r})"

    # -- requests ------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def get(self, url: str, *, headers: dict[str, str], **kw: Any) -> AsyncIterator[aiohttp.ClientResponse]:
        """``session.get`` with the environment's proxies and ~/.netrc applied as aiohttp's
        ``trust_env`` would, but read once per client instead of on every request."""
        if self._net is None:
            # Read once however many requests start together (each its own read was 2 ms of CPU,
            # times the files in flight at a run's start).
            reading = self._net_reading
            if reading is None or reading.cancelled() or reading.get_loop() is not asyncio.get_running_loop():
                reading = self._net_reading = asyncio.ensure_future(asyncio.to_thread(_EnvNet))
            try:
                self._net = await asyncio.shield(reading)
            except Exception:
                self._net_reading = None  # the next request reads it again
                raise
        if url.startswith("https:") and lazycerts.deferred():  # loaded off the loop (``lazycerts``)
            await asyncio.to_thread(lazycerts.load_deferred)
        opts = self._net.options(url, headers)
        if "headers" in opts:
            opts = {**opts, "headers": {**headers, **opts["headers"]}}
        else:
            opts = {**opts, "headers": headers}
        async with self.session.get(url, **opts, **kw) as r:
            yield r

    # -- URLs and headers ----------------------------------------------------------------
    def _api(self, *parts: str) -> str:
        kind = "datasets" if self.repo_type == "dataset" else "models"
        return f"{self.endpoint}/api/{kind}/{self.repo_id}/" + "/".join(parts)

    def resolve_url(self, revision: str, path: str) -> str:
        check_repo_path(path)
        prefix = "datasets/" if self.repo_type == "dataset" else ""
        return f"{self.endpoint}/{prefix}{self.repo_id}/resolve/{quote(revision, safe='')}/{quote(path, safe='/')}"

    def on_hub(self, url: str | URL) -> bool:
        """Whether ``url`` is on the Hub endpoint's origin (where the token goes)."""
        return URL(str(url)).origin() == self._origin

    def redact(self, text: str) -> str:
        """``text`` (a server's words: an error page) with the token left out, should the server
        have echoed the request (a debugging proxy does): an error line is printed and kept."""
        if not self._token:
            return text
        text = text.replace(self._token, "<HF_TOKEN>")
        # A page read up to a bound can end inside the token: its start is left out too.
        for k in range(min(len(self._token), len(text)) - 1, 3, -1):
            if text.endswith(self._token[:k]):
                return text[:-k] + "<HF_TOKEN>"
        return text

    def headers_for(self, url: str | URL) -> dict[str, str]:
        """Request headers; the token only when ``url`` is on the Hub endpoint's origin."""
        h = {"Accept-Encoding": "identity", "User-Agent": "bolmo-async/0.1"}
        if self._token and self.on_hub(url):
            h["Authorization"] = f"Bearer {self._token}"
        return h

    # -- JSON API with retries -----------------------------------------------------------
    async def with_retries(self, what: str, attempt_fn: Callable[[], Awaitable[T]]) -> T:
        """Run ``attempt_fn`` through the one retry helper (``retry.retrying``); with
        ``fail_fast``, a refused connection or unknown host is an error at once."""

        async def attempt() -> T:
            try:
                return await attempt_fn()
            except aiohttp.TooManyRedirects as exc:  # (a renamed repo's one redirect is followed)
                raise HubError(
                    f"{what}: {URL(str(exc.request_info.real_url)).path} at {self.endpoint} redirects in a loop "
                    f"(after {len(exc.history)} redirects); is --endpoint ({self.endpoint}) a Hub-compatible server?"
                ) from exc
            except _BAD_REDIRECT as exc:  # aiohttp follows an API answer's redirects, http(s) only
                where = str(getattr(exc, "url", None) or (exc.args[0] if exc.args else ""))[:120]
                raise HubError(
                    f"{what}: {self.endpoint} redirects to {where!r}, which is not a valid http(s) URL; "
                    f"is --endpoint ({self.endpoint}) a Hub-compatible server?"
                ) from exc
            except aiohttp.ClientResponseError as exc:
                if not self.fail_fast or (bad := not_http(exc)) is None:
                    raise
                raise HubError(
                    f"{what}: {bad}; check --endpoint / HF_ENDPOINT ({self.endpoint}): its scheme (http or https) "
                    "and port, and that a Hub-compatible server answers there."
                ) from exc
            except aiohttp.ClientConnectorError as exc:
                # (a certificate that does not verify: ``retrying`` names it, whatever fail_fast says)
                if not self.fail_fast or isinstance(exc, aiohttp.ClientConnectorCertificateError):
                    raise
                if isinstance(exc.os_error, socket.gaierror):  # (offline: the Hub's name, which no one set)
                    raise HubError(
                        f"cannot reach {self.endpoint}: its name does not resolve ({exc.os_error.strerror}). Check "
                        "this machine's network (DNS; a proxy goes in HTTPS_PROXY) and --endpoint / HF_ENDPOINT; on a "
                        "machine without internet, HF_HUB_OFFLINE=1 runs from what the output folder already holds."
                    ) from exc
                why = "connection refused" if isinstance(exc.os_error, ConnectionRefusedError) else str(exc.os_error)
                raise HubError(
                    f"cannot reach {self.endpoint} ({why}). Check --endpoint / HF_ENDPOINT and that the server runs."
                ) from exc

        def fail(reason: str, n: int) -> HubError:
            return HubError(
                f"{what}: {reason} after {attempt_count(n)}; check the network and --endpoint ({self.endpoint}), "
                "or try again later."
            )

        return await retrying(self.retry, what, attempt, fail=fail)

    async def _get_json(self, url: str, what: str) -> tuple[Any, Any]:
        async def once() -> tuple[Any, Any]:
            headers = self.headers_for(url)
            async with self.get(url, headers=headers, timeout=self.retry.timeout()) as r:
                if r.status in RETRY_STATUSES:
                    raise Retry(f"HTTP {r.status}", r.headers, r.status)
                if r.status != 200:
                    said = self.redact((await r.content.read(2000)).decode("utf-8", "replace"))
                    raise status_error(r.status, what, said, r.headers, "Authorization" in headers)
                if r.content_length is not None and r.content_length > MAX_API_BYTES:
                    raise self._too_long(url, what)
                body = bytearray()
                async with Progress(self.retry, what) as progress:
                    async for chunk in r.content.iter_chunked(256 * 1024):
                        progress.got(len(chunk))
                        body += chunk
                        if len(body) > MAX_API_BYTES:
                            raise self._too_long(url, what)
                try:
                    if len(body) < 1 << 20:
                        return json.loads(body), r.headers
                    loop = asyncio.get_running_loop()  # a large listing page: parsed off the event loop
                    return await loop.run_in_executor(None, json.loads, body), r.headers  # (no copy of it)
                except (ValueError, RecursionError) as exc:
                    raise HubError(f"{what}: {self.endpoint} did not answer JSON; is --endpoint a Hub?") from exc

        return await self.with_retries(what, once)

    def _too_long(self, url: str, what: str) -> HubError:
        return HubError(
            f"{what}: the answer of {URL(url).path} is longer than {MAX_API_BYTES >> 20} MiB, more than any Hub API "
            f"answer; is --endpoint ({self.endpoint}) a Hub-compatible server?"
        )

    async def resolve_commit(self, revision: str) -> str:
        """Branch, tag or sha -> the 40-hex commit sha."""
        data, _ = await self._get_json(
            self._api("revision", quote(revision, safe="")), f"resolving revision {revision!r} of {self.repo_id}"
        )
        sha = data.get("sha") if isinstance(data, dict) else None
        if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{40}", sha):
            raise HubError(f"the Hub gave no commit sha for revision {revision!r} of {self.repo_id}")
        return sha

    async def list_files(self, commit: str) -> list[RepoFile]:
        """Every data file of the repo at ``commit`` (recursive tree listing, all pages); the
        others (README, images) are not kept.

        The listing is untrusted: hostile paths are refused, malformed entries are a clear
        error, a path listed twice is kept once (twice with different content is refused), an
        entry that cannot be verified (no oid, no LFS hash) is refused, and it is bounded: a
        repeated next page, more than ``MAX_PAGES`` pages or more than ``MAX_DATA_FILES`` data
        files stops it with one line."""
        bound = max_data_files()
        url: str | None = self._api("tree", quote(commit, safe="")) + "?recursive=true&expand=false"
        where = f"{self.repo_id}@{commit[:8]}"
        found: dict[str, RepoFile] = {}
        seen_urls: set[str] = set()
        pages = 0
        while url:
            if url in seen_urls or pages >= MAX_PAGES:
                raise HubError(
                    f"the listing of {where} at {self.endpoint} does not end (page {pages + 1} repeats an earlier one, "
                    f"or more than {MAX_PAGES} pages); is --endpoint a Hub-compatible server?"
                )
            seen_urls.add(url)
            data, headers = await self._get_json(url, f"listing {where}")
            pages += 1
            if not isinstance(data, list):
                raise HubError(f"unexpected tree listing from {self.endpoint}: not a list; is --endpoint a Hub?")
            for item in data:
                if not isinstance(item, dict) or item.get("type") != "file":
                    continue
                raw_path = item.get("path")
                if isinstance(raw_path, str) and not data_suffix(raw_path):
                    # A file we never read (README, images, ...): not kept (the plan never names it),
                    # and an odd entry of it (a backslash in its name, which git allows) is no
                    # reason to refuse the repo's data.
                    continue
                f = _listed_file(item, self.endpoint)
                prev = found.get(f.path)
                if prev is not None and prev != f:
                    raise HubError(
                        f"the listing of {where} names {f.path} twice with different contents; refusing an ambiguous listing."
                    )
                if prev is None and len(found) >= bound:
                    if os.environ.get(MAX_DATA_FILES_ENV, "").strip():  # (the user's bound: bolmo_mix may be listed)
                        raise HubError(
                            f"the listing of {where} at {self.endpoint} holds more than {bound:,} data files, the "
                            f"bound {MAX_DATA_FILES_ENV}={bound} sets: raise it, or unset it (the default bound is "
                            f"{MAX_DATA_FILES:,}; each file is held in memory to plan, about 1 KB)."
                        )
                    raise HubError(
                        f"the listing of {where} at {self.endpoint} holds more than {bound:,} data files, the "
                        f"most this tool plans from one listing (each is held in memory to plan, about 1 KB; "
                        f"{DEFAULT_REPO_ID} lists far fewer). Is --endpoint a Hub-compatible server and --repo-id "
                        f"the repo you meant? If so, set {MAX_DATA_FILES_ENV} to a larger number of files."
                    )
                found[f.path] = f
            del data  # (a page's parsed entries, ~0.8 KB each, are not held while the next is read)
            url = _next_link(headers.get("Link"))
            if url:
                try:
                    nxt = URL(self.endpoint).join(URL(url))
                    origin = nxt.origin()  # (yarl checks the port when it is read)
                except ValueError:
                    raise HubError(
                        f"the listing of {where} at {self.endpoint} names a next page that is not an http(s) URL "
                        f"({url[:120]!r}); is --endpoint a Hub-compatible server?"
                    ) from None
                url = str(nxt)
                if origin != self._origin:
                    raise HubError(
                        f"the listing's next page points to another host ({URL(url).host}); refusing to follow"
                    )
        log.debug("listed %d files in %d pages", len(found), pages)
        return list(found.values())


#: What aiohttp raises when an API answer redirects to a URL it cannot follow (not http(s), no
#: host, a port out of range); the subclasses that say "redirect" are aiohttp 3.10's.
_BAD_REDIRECT: tuple[type[Exception], ...] = (
    aiohttp.InvalidURL,
    getattr(aiohttp, "NonHttpUrlClientError", aiohttp.InvalidURL),
)

#: The most bytes any API (JSON) answer may have: a listing page of the Hub is ~0.3 MB, and a
#: mirror that lists 100k files on one page ~20 MB. Read incrementally, never past this.
MAX_API_BYTES = 64 << 20

#: Pages of a tree listing at most (1000 entries each on the Hub).
MAX_PAGES = 100_000

#: Data files of one listing at most (files we never read are not kept, nor counted). Each is
#: held in memory to plan: a hostile or runaway listing of 2.1 million (21 pages of 100k) took
#: a peak of 1.18 GB, past the 1 GiB a run promises; refused at this bound, 0.41 GB (0.18 of
#: it the process before listing). The largest data sets on the
#: Hub list some tens of thousands of files, bolmo_mix far fewer.
MAX_DATA_FILES = 300_000
#: Sets another bound than ``MAX_DATA_FILES`` (a repo that lists more, on a machine with the memory).
MAX_DATA_FILES_ENV = "BOLMO_ASYNC_MAX_DATA_FILES"


def max_data_files() -> int:
    """``MAX_DATA_FILES``, or the positive whole number ``BOLMO_ASYNC_MAX_DATA_FILES`` says."""
    raw = os.environ.get(MAX_DATA_FILES_ENV, "").strip()
    if not raw:
        return MAX_DATA_FILES
    try:
        n = int(raw.replace("_", "").replace(",", ""))
    except ValueError:
        n = 0
    if n <= 0:
        raise UsageError(
            f"{MAX_DATA_FILES_ENV}={raw!r} is not a number of files: give a positive whole number, or unset it."
        )
    return n


def _listed_file(item: dict[str, Any], endpoint: str) -> RepoFile:
    """One ``type: file`` entry of a tree listing, checked."""
    raw_path = item.get("path")
    path = check_repo_path(raw_path if isinstance(raw_path, str) else "")
    size, oid, lfs = item.get("size"), item.get("oid"), item.get("lfs")
    if lfs is not None and not isinstance(lfs, dict):
        raise HubError(
            f"the listing entry of {path} has a malformed 'lfs' field ({type(lfs).__name__}); is {endpoint} a Hub?"
        )
    sha256 = (lfs or {}).get("oid") or (lfs or {}).get("sha256")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise HubError(f"the listing entry of {path} has no valid size ({size!r}); is {endpoint} a Hub?")
    if sha256 is not None and not (isinstance(sha256, str) and re.fullmatch(r"[0-9a-f]{64}", sha256)):
        raise HubError(f"the listing entry of {path} has a malformed LFS sha256 ({sha256!r}); is {endpoint} a Hub?")
    if not isinstance(oid, str) or not re.fullmatch(r"[0-9a-f]{40}", oid):
        if sha256 is None:
            raise HubError(
                f"the listing entry of {path} has neither a git oid nor an LFS sha256, so the download could not be "
                f"verified; refusing it. Is {endpoint} a Hub-compatible server?"
            )
        oid = ""
    return RepoFile(path=path, size=size, oid=oid, sha256=sha256)


_LINK_NEXT = re.compile(r'<([^>]+)>\s*;\s*rel="?next"?')


def _next_link(link: str | None) -> str | None:
    if not link:
        return None
    m = _LINK_NEXT.search(link)
    return m.group(1) if m else None


def data_files(files: list[RepoFile]) -> list[RepoFile]:
    """The files we read (by suffix), sorted by path."""
    return sorted((f for f in files if data_suffix(f.path)), key=lambda f: f.path)


def listing_digest(files: list[RepoFile]) -> str:
    h = hashlib.sha256()
    for f in sorted(files, key=lambda f: f.path):
        h.update(f"{f.path}\0{f.size}\0{f.oid}\0{f.sha256 or ''}\n".encode())
    return h.hexdigest()


class _EnvNet:
    """What aiohttp's ``trust_env=True`` reads on every request, read once: the proxies of the
    environment (``HTTPS_PROXY``, ``NO_PROXY``, ...; a proxy's credentials from ~/.netrc) and
    ~/.netrc's credentials per host. Per request that was a parse of ~/.netrc and a walk of the
    environment, twice, each on a thread: about a millisecond of CPU per request, four requests
    per file. Same rules as aiohttp's: ``NO_PROXY`` hosts go direct, a netrc entry is used only
    for its own host and never next to an ``Authorization`` header (there the token wins).
    Blocking (reads ~/.netrc): built on a thread."""

    def __init__(self) -> None:
        self.proxies = aiohttp.helpers.proxies_from_env()
        self.netrc = aiohttp.helpers.netrc_from_env()
        self._hosts: dict[tuple[str, str, bool], dict[str, Any]] = {}

    def options(self, url: str, headers: dict[str, str]) -> dict[str, Any]:
        u = URL(url)
        if u.host is None:
            return {}
        authorized = any(k.lower() == "authorization" for k in headers)
        key = (u.scheme, u.host, authorized)
        opts = self._hosts.get(key)
        if opts is None:
            opts = {}
            info = None if proxy_bypass(u.host) else self.proxies.get(u.scheme)
            if info is not None:
                opts.update(proxy=info.proxy, proxy_auth=info.proxy_auth)
            if self.netrc is not None and not authorized:
                with contextlib.suppress(LookupError):
                    opts["headers"] = {
                        "Authorization": aiohttp.helpers.basicauth_from_netrc(self.netrc, u.host).encode()
                    }
            self._hosts[key] = opts
        return opts


def make_session(concurrency: int, retry: RetryPolicy) -> aiohttp.ClientSession:
    """The run's single session: connector capped at ``concurrency`` (+2 for API calls). Proxies
    and ~/.netrc are applied by ``HubClient.get`` (read once), not by aiohttp per request."""
    connector = aiohttp.TCPConnector(limit=concurrency + 2, limit_per_host=concurrency + 2, ttl_dns_cache=300)
    return aiohttp.ClientSession(connector=connector, timeout=retry.timeout(), auto_decompress=False)
