"""Text batches -> token ids with an EOS after every document.

- ``byte``: the released Bolmo layout: UTF-8 byte ``b`` -> id ``b + 4``, EOS ``1`` after each
  document. Built from the Arrow string buffer with numpy, no Python loop per document and no
  BPE.
- ``subword``: a ``tokenizers`` JSON (default ``allenai/dolma2-tokenizer``), EOS appended by us
  (the JSON has no post-processor). Byte-level BPE tokenizers that convert exactly (dolma2
  and its family) run on ``tiktoken`` (faster); others on ``tokenizers``. Both engines give
  the same ids (tests pin it).

Special tokens in raw text: by default a document can never produce a control token. Special
added tokens (``<|endoftext|>``, ``<|pad|>``, ``<|fim_*|>`` ...) are encoded as ordinary text;
non-special added tokens (``|||EMAIL_ADDRESS|||`` ...) stay single tokens. This is
``tokenizers``' ``encode_special_tokens = True``. ``special_tokens_as_text=False`` restores
``dolma tokens``' behaviour (special strings become their special ids). Byte mode always keeps
the raw bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .errors import TokenizerError
from .models import TokenizerInfo

log = logging.getLogger("bolmo_async")

BYTE_OFFSET = 4
BYTE_EOS = 1
BYTE_VOCAB = 256 + BYTE_OFFSET
BYTE_SPECIALS = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<bpe_token_end>": 3}


def _done(value: Any, fn: Any) -> Future[Any]:
    fut: Future[Any] = Future()
    try:
        fut.set_result(fn(value))
    except Exception as exc:
        fut.set_exception(exc)
    return fut


def _submit_bounded(budget: threading.BoundedSemaphore, submit: Callable[[], Future[Any]]) -> Future[Any]:
    """``submit()``, after waiting for a slot of ``budget``; the slot is freed when the work ends."""
    budget.acquire()
    try:
        fut = submit()
    except BaseException:
        budget.release()
        raise
    fut.add_done_callback(lambda _: budget.release())
    return fut


def large_offsets(arr: pa.Array) -> np.ndarray:
    """The int64 offsets (n + 1) of a large string/binary/list array, as a view of its buffer."""
    return np.frombuffer(arr.buffers()[1], dtype=np.int64, count=len(arr) + 1, offset=arr.offset * 8)


def value_bytes(arr: pa.Array) -> bytes:
    """The concatenated values of a large string/binary array (one copy, only its own slice)."""
    offsets = large_offsets(arr)
    start, end = int(offsets[0]), int(offsets[-1])
    return arr.buffers()[2].slice(start, end - start).to_pybytes() if end > start else b""


def tokens_column(flat: np.ndarray, offsets: np.ndarray) -> pa.Array:
    """Flat ids + document offsets -> the staged ``large_list<uint32>`` column (no copy)."""
    return pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), pa.array(flat, pa.uint32()))


def byte_ids(texts: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Bolmo byte ids of string/binary ``texts``: flat ``utf8 + 4`` with EOS ``1`` after each
    document, and the int64 document offsets into it (len n + 1). No Python loop per document."""
    arr = texts.cast(pa.large_binary())
    n = len(arr)
    if arr.null_count:
        raise ValueError("byte_ids: texts must not be null")
    if n == 0:
        return np.empty(0, np.uint32), np.zeros(1, np.int64)
    # One Arrow kernel call lays each document's bytes out followed by a placeholder byte, i.e.
    # exactly the id layout; then one vectorised add, and the EOS ids go where the placeholders are.
    nothing = pa.LargeBinaryArray.from_buffers(
        pa.large_binary(), n, [None, pa.py_buffer(np.zeros(n + 1, np.int64)), pa.py_buffer(b"")]
    )
    joined = pc.binary_join_element_wise(arr, nothing, pa.scalar(b"\0", pa.large_binary()))
    offsets = large_offsets(joined)
    start, end = int(offsets[0]), int(offsets[-1])
    data = np.frombuffer(joined.buffers()[2], dtype=np.uint8, count=end - start, offset=start)
    out = np.add(data, BYTE_OFFSET, dtype=np.uint32)
    rel = offsets - start
    out[rel[1:] - 1] = BYTE_EOS
    return out, rel


def byte_ids_slice(data: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Ids ``[lo, hi)`` of one document whose UTF-8 bytes are ``data`` (its EOS is id ``len(data)``)."""
    body = np.add(data[lo : min(hi, len(data))], BYTE_OFFSET, dtype=np.uint32)
    return np.append(body, np.uint32(BYTE_EOS)) if hi > len(data) else body


class ByteTokenizer:
    """Bolmo byte ids: ``utf8 + 4`` then EOS ``1``."""

    inflight = 0  # batches a caller may keep in flight (see ProcessTokenizer)

    def submit(self, texts: pa.Array) -> Future[pa.Array]:
        """The staged tokens column: the UTF-8 bytes themselves (see ``staging``)."""
        return _done(texts, lambda t: t.cast(pa.large_binary()))

    def __init__(self) -> None:
        self.info = TokenizerInfo(
            kind="byte",
            identifier="bolmo-byte",
            eos_token_id=BYTE_EOS,
            vocab_size=BYTE_VOCAB,
            fingerprint=hashlib.sha256(b"bolmo-byte:offset=4:eos=1:pad=0:bos=1:eos_id=2:bpe_end=3").hexdigest()[:16],
            engine="numpy",
        )

    def encode_batch(self, texts: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        return byte_ids(texts)

    def close(self) -> None:
        pass


def decode_bytes(ids: np.ndarray) -> str:
    """Byte ids (one document, EOS stripped or not) -> text."""
    ids = np.asarray(ids)
    body = ids[ids >= BYTE_OFFSET] - BYTE_OFFSET
    return body.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------------------------
# subword


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte <-> printable-unicode map used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


@dataclass(frozen=True)
class TokenizerSource:
    """Where a subword tokenizer came from: the JSON text and optional tokenizer_config."""

    identifier: str
    json_text: str
    config: dict[str, Any]


def load_tokenizer_source(identifier: str, *, endpoint: str | None = None, token: str | None = None) -> TokenizerSource:
    """A local ``tokenizer.json``, a folder holding one, or a Hub repo id (fetched with huggingface_hub)."""
    p = Path(identifier).expanduser()
    if p.is_file():
        cfg_path = p.with_name("tokenizer_config.json")
        return TokenizerSource(identifier, p.read_text(encoding="utf-8"), _read_json(cfg_path))
    if p.is_dir():
        if not (p / "tokenizer.json").is_file():
            raise TokenizerError(f"{p} has no tokenizer.json; point --tokenizer-identifier at the file or a repo id.")
        return TokenizerSource(
            identifier, (p / "tokenizer.json").read_text(encoding="utf-8"), _read_json(p / "tokenizer_config.json")
        )
    if identifier.count("/") != 1 or identifier.startswith((".", "/")):
        raise TokenizerError(
            f"--tokenizer-identifier {identifier!r} is neither a file, a folder nor a Hub repo id like 'allenai/dolma2-tokenizer'."
        )
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

    try:
        path = hf_hub_download(identifier, "tokenizer.json", endpoint=endpoint, token=token or False)
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        hint = " Set HF_TOKEN if the repo is gated." if status in (401, 403) else ""
        raise TokenizerError(
            f"could not fetch tokenizer.json of {identifier} from {endpoint or 'the Hub'}: {exc}.{hint}"
        ) from exc
    except (OSError, ValueError) as exc:
        raise TokenizerError(f"could not fetch tokenizer.json of {identifier}: {exc}") from exc
    config: dict[str, Any] = {}
    try:
        cfg = hf_hub_download(identifier, "tokenizer_config.json", endpoint=endpoint, token=token or False)
        config = _read_json(Path(cfg))
    except (EntryNotFoundError, HfHubHTTPError, OSError, ValueError):
        pass
    return TokenizerSource(identifier, Path(path).read_text(encoding="utf-8"), config)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def tiktoken_convertible(spec: dict[str, Any]) -> tuple[dict[bytes, int], str] | str:
    """(mergeable ranks, split regex) if ``spec`` converts exactly to tiktoken, else the reason not."""
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        return "model is not BPE"
    if spec.get("normalizer") is not None:
        return "it has a normalizer"
    if (
        model.get("byte_fallback")
        or model.get("dropout")
        or model.get("continuing_subword_prefix")
        or model.get("end_of_word_suffix")
    ):
        return "BPE options (byte_fallback/dropout/prefix/suffix) differ from tiktoken's"
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if not steps or len(steps) != 2:
        return "pre-tokenizer is not Split(regex) + ByteLevel"
    split, bl = steps
    if split.get("type") != "Split" or "Regex" not in (split.get("pattern") or {}):
        return "no Split regex pre-tokenizer"
    if not (split.get("behavior") == "Removed" and split.get("invert") is True):
        return "Split behaviour is not 'Removed, invert' (tiktoken's findall)"
    if bl.get("type") != "ByteLevel" or bl.get("add_prefix_space") or bl.get("use_regex"):
        return "ByteLevel step adds a prefix space or its own regex"
    post = spec.get("post_processor")
    if post is not None and post.get("type") != "ByteLevel":
        return "it has a post-processor that adds tokens"
    for added in spec.get("added_tokens", []):
        if added.get("lstrip") or added.get("rstrip") or added.get("single_word") or added.get("normalized"):
            return f"added token {added.get('content')!r} has lstrip/rstrip/single_word/normalized"
    added_ids = {a["id"] for a in spec.get("added_tokens", [])}
    u2b = {c: b for b, c in _bytes_to_unicode().items()}
    ranks: dict[bytes, int] = {}
    # Each byte-level character -> the Latin-1 character of its byte, anything else -> U+FFFF
    # (which Latin-1 cannot encode): one C-level translate + encode per entry.
    table = {cp: (chr(u2b[chr(cp)]) if chr(cp) in u2b else "\uffff") for cp in range(0x400)}
    for tok, i in model["vocab"].items():
        if i in added_ids:
            continue
        try:
            ranks[tok.translate(table).encode("latin-1")] = i
        except UnicodeEncodeError:
            return f"vocab entry {tok!r} is not byte-level"
    if any(bytes([b]) not in ranks for b in range(256)):
        return "not every single byte is in the vocabulary"
    vocab = model["vocab"]
    last = -1
    for merge in model.get("merges", []):
        a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
        merged = vocab.get(a + b)
        if merged is None or merged <= last or merged <= max(vocab.get(a, -1), vocab.get(b, -1)):
            return "merge order is not consistent with the ids"
        last = merged
    return ranks, split["pattern"]["Regex"]


class SubwordTokenizer:
    """A ``tokenizers`` JSON tokenizer with EOS appended after each document.

    Cheap to ship to worker processes: it pickles as its recipe (JSON text, tiktoken ranks) and
    each engine is built on first use, so a worker builds only the engine it runs.
    """

    def __init__(
        self,
        source: TokenizerSource,
        *,
        eos_token_id: int | None = None,
        special_tokens_as_text: bool = True,
        engine: str = "auto",
        threads: int | None = None,
    ):
        try:
            spec = json.loads(source.json_text)
            if not isinstance(spec, dict) or not isinstance(spec.get("model"), dict):
                raise ValueError("no 'model' object")
        except ValueError as exc:
            raise TokenizerError(f"{source.identifier}: not a valid tokenizers JSON ({exc})") from exc
        if engine not in ("auto", "tiktoken", "tokenizers"):
            raise TokenizerError(f"unknown --engine {engine!r}; choose auto, tiktoken or tokenizers")
        self.identifier = source.identifier
        self.source_json = source.json_text
        self.special_tokens_as_text = special_tokens_as_text
        self._hf_obj: Any = None
        self._tt_obj: Any = None
        self._ranks: dict[bytes, int] | None = None
        self._pattern = ""
        added = spec.get("added_tokens", [])
        self._special = {a["content"]: a["id"] for a in added if a.get("special")}
        self._nonspecial = {a["content"]: a["id"] for a in added if not a.get("special")}
        if engine in ("auto", "tiktoken"):
            conv = tiktoken_convertible(spec)
            if isinstance(conv, str):
                if engine == "tiktoken":
                    raise TokenizerError(f"--engine tiktoken: {source.identifier} cannot be converted exactly: {conv}.")
                log.info(
                    "tokenizer %s runs on `tokenizers` (no exact tiktoken conversion: %s)", source.identifier, conv
                )
            else:
                self._ranks, self._pattern = conv
        if self._ranks is None:
            _ = self._hf  # the general engine: build it now, so that a bad JSON fails here
        vocab = {**(spec["model"].get("vocab") or {}), **{a["content"]: a["id"] for a in added}}
        eos = eos_token_id if eos_token_id is not None else self._find_eos(source.config, vocab)
        vocab_size = len(vocab)
        if not 0 <= eos < max(vocab_size, eos + 1) or eos > np.iinfo(np.uint32).max:
            raise TokenizerError(f"EOS id {eos} is out of range; pass a valid --eos-token-id.")
        self.eos = eos
        # The EOS as text, when it is an added token (tiktoken then maps that string to the EOS id).
        self._eos_text = next((t for t, i in {**self._special, **self._nonspecial}.items() if i == eos), None)
        self._threads = threads or os.cpu_count() or 2
        self._budget = threading.BoundedSemaphore(2 * self._threads)
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._allowed = set(self._nonspecial) if special_tokens_as_text else set(self._nonspecial) | set(self._special)
        self.info = TokenizerInfo(
            kind="subword",
            identifier=source.identifier,
            eos_token_id=eos,
            vocab_size=vocab_size,
            fingerprint=hashlib.sha256(source.json_text.encode("utf-8")).hexdigest()[:16],
            engine="tiktoken" if self._ranks is not None else "tokenizers",
            special_tokens_as_text=special_tokens_as_text,
        )

    @property
    def _hf(self) -> Any:
        """The ``tokenizers`` engine (the general path and the reference), built on first use."""
        if self._hf_obj is None:
            from tokenizers import Tokenizer as HFTokenizer

            try:
                hf = HFTokenizer.from_str(self.source_json)
            except Exception as exc:  # tokenizers raises plain Exception on bad JSON
                raise TokenizerError(f"{self.identifier}: not a valid tokenizers JSON ({exc})") from exc
            hf.encode_special_tokens = self.special_tokens_as_text
            self._hf_obj = hf
        return self._hf_obj

    @property
    def _tt(self) -> Any:
        """The ``tiktoken`` engine (None when the tokenizer does not convert), built on first use."""
        if self._tt_obj is None and self._ranks is not None:
            import tiktoken

            self._tt_obj = tiktoken.Encoding(
                name=f"bolmo-async:{self.identifier}",
                pat_str=self._pattern,
                mergeable_ranks=self._ranks,
                special_tokens={**self._special, **self._nonspecial},
            )
        return self._tt_obj

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_hf_obj"] = state["_tt_obj"] = state["_pool"] = None  # rebuilt where they are used
        del state["_lock"], state["_budget"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._budget = threading.BoundedSemaphore(2 * self._threads)

    def warm(self) -> None:
        """Build the engine in use now (worker start-up) instead of at the first batch."""
        _ = self._tt if self._ranks is not None else self._hf

    def _find_eos(self, config: dict[str, Any], vocab: dict[str, int]) -> int:
        eos = config.get("eos_token")
        if isinstance(eos, dict):
            eos = eos.get("content")
        for cand in (eos, "<|endoftext|>", "</s>", "<eos>"):
            if isinstance(cand, str) and cand in vocab:
                return int(vocab[cand])
        raise TokenizerError(
            "the tokenizer has no EOS token (no eos_token in its config, no <|endoftext|>); pass --eos-token-id."
        )

    def encode_texts(self, texts: list[str]) -> list[list[int]]:
        """Ids without EOS, one list per text."""
        return [p.tolist() for p in self._encode_docs(texts)]

    #: Batches a caller may keep in flight: enough to keep every thread busy on one large file.
    @property
    def inflight(self) -> int:
        return 2 * self._threads if self._threads > 1 else 0

    def submit(self, texts: pa.Array) -> Future[pa.Array]:
        """The staged tokens column (``large_list<uint32>``, EOS included), encoded on one of
        ``threads`` threads: both engines release the GIL while they encode a batch."""
        if self._threads <= 1:
            return _done(texts, self.encode_column)
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="bolmo-bpe")
            pool = self._pool
        # At most 2 batches per thread in flight, all callers together.
        return _submit_bounded(self._budget, lambda: pool.submit(self.encode_column, texts))

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
                self._pool = None

    def encode_column(self, texts: pa.Array) -> pa.Array:
        return tokens_column(*self.encode_batch(texts))

    def _encode_docs(self, texts: list[str]) -> list[np.ndarray]:
        """Ids without EOS as uint32 arrays, one call per document."""
        if self._tt is None:
            return [np.asarray(e.ids, dtype=np.uint32) for e in self._hf.encode_batch(texts, add_special_tokens=False)]
        return [self._tiktoken(t, self._allowed) for t in texts]

    def _tiktoken(self, text: str, allowed: set[str]) -> np.ndarray:
        core = getattr(self._tt, "_core_bpe", None)
        if core is not None and hasattr(core, "encode_to_tiktoken_buffer"):  # no Python list in between
            return np.frombuffer(core.encode_to_tiktoken_buffer(text, allowed), dtype=np.uint32)
        return np.asarray(self._tt.encode(text, allowed_special=allowed, disallowed_special=()), dtype=np.uint32)

    def _encode_joined(self, texts: pa.Array) -> tuple[np.ndarray, np.ndarray] | None:
        """The whole batch in one tiktoken call (which releases the GIL throughout): documents
        joined by the EOS token's own string, which tiktoken turns into the EOS id and where it
        restarts its split, so each document is encoded exactly as alone. None when a document
        contains that string itself (the caller then encodes document by document)."""
        sep = self._eos_text
        if self._tt is None or sep is None or len(texts) == 0 or texts.null_count:
            return None
        texts = texts.cast(pa.large_string())
        if pc.any(pc.match_substring(texts, sep)).as_py():
            return None
        joined = pc.binary_join_element_wise(texts, pa.scalar("", pa.large_string()), pa.scalar(sep, pa.large_string()))
        text = value_bytes(joined).decode("utf-8")
        flat = self._tiktoken(text, self._allowed | {sep})
        ends = np.flatnonzero(flat == self.eos) + 1
        if len(ends) != len(texts) or ends[-1] != len(flat):
            return None  # cannot happen with an added-token EOS; the per-document path is the reference
        return flat, np.concatenate([np.zeros(1, np.int64), ends.astype(np.int64)])

    def encode_reference(self, text: str) -> list[int]:
        """The ``tokenizers`` engine on one text, whatever engine is in use (tests, inspection)."""
        return list(self._hf.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        return str(self._hf.decode(ids, skip_special_tokens=False))

    def encode_batch(self, texts: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        joined = self._encode_joined(texts)
        if joined is not None:
            return joined
        pieces = self._encode_docs(texts.to_pylist())
        offsets = np.zeros(len(pieces) + 1, dtype=np.int64)
        np.cumsum([len(p) + 1 for p in pieces], out=offsets[1:])
        eos = np.array([self.eos], dtype=np.uint32)
        flat = np.concatenate([x for p in pieces for x in (p, eos)]) if pieces else np.empty(0, np.uint32)
        return flat, offsets


# ---------------------------------------------------------------------------------------------
# both cores: BPE in worker processes (threads do not scale: the GIL is held between texts)

_WORKER: SubwordTokenizer | None = None


def _worker_init(recipes: Any) -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    from .util import prefer_system_allocator

    prefer_system_allocator()
    global _WORKER
    tokenizer: SubwordTokenizer | None = recipes.get()
    if tokenizer is None:  # the parent gave up before sending a tokenizer
        os._exit(0)
    tokenizer._threads = 1
    tokenizer.warm()
    _WORKER = tokenizer


def _worker_ready() -> None:
    assert _WORKER is not None


def _worker_encode(texts: pa.Array) -> pa.Array:
    assert _WORKER is not None
    return _WORKER.encode_column(texts)


class ProcessTokenizer:
    """A ``SubwordTokenizer`` running in ``processes`` spawned worker processes; same interface.

    Workers are spawned first (``__init__``) and start importing while the parent builds and
    checks the tokenizer once; ``start`` then sends them its recipe, from which each builds only
    the engine it runs. Nothing waits for them: the first batches queue meanwhile.
    """

    def __init__(self, processes: int):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        ctx = multiprocessing.get_context("spawn")
        self._processes = processes
        # The tokenizer (a few MB pickled) goes through a queue, not the spawn arguments: spawning
        # blocks until a child has read its arguments, which would start the workers one by one.
        self._recipes = ctx.Queue()
        self._started = False
        self._pool = ProcessPoolExecutor(processes, mp_context=ctx, initializer=_worker_init, initargs=(self._recipes,))
        # One call per worker: all of them start now, in parallel, not at their first batch.
        self._ready = [self._pool.submit(_worker_ready) for _ in range(processes)]

        #: Batches one file may keep in flight, so that even a single large file keeps every worker busy.
        self.inflight = processes + 1
        self._budget = threading.BoundedSemaphore(2 * processes)  # batches in flight, all files together

    def start(self, tokenizer: SubwordTokenizer) -> ProcessTokenizer:
        self.info: TokenizerInfo = tokenizer.info
        self.source_json = tokenizer.source_json
        for _ in range(self._processes):
            self._recipes.put(tokenizer)
        self._started = True
        return self

    def encode_batch(self, texts: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        col = self.submit(texts).result()
        return col.values.to_numpy(), large_offsets(col)

    def submit(self, texts: pa.Array) -> Future[pa.Array]:
        """Blocks while ``2 * processes`` batches are in flight, across all callers: what waits
        for a worker stays bounded however many files are open at once."""
        out: Future[pa.Array] = Future()
        try:
            inner = _submit_bounded(self._budget, lambda: self._pool.submit(_worker_encode, texts))
        except RuntimeError as exc:  # BrokenProcessPool, or submit after shutdown
            out.set_exception(self._failed(exc))
            return out

        def relay(f: Future[pa.Array]) -> None:
            with contextlib.suppress(InvalidStateError):  # ``out`` was cancelled meanwhile
                if f.cancelled():
                    out.cancel()
                elif (exc := f.exception()) is not None:
                    out.set_exception(exc if isinstance(exc, TokenizerError | ValueError) else self._failed(exc))
                else:
                    out.set_result(f.result())

        inner.add_done_callback(relay)
        out.add_done_callback(lambda o: inner.cancel() if o.cancelled() else None)
        return out

    def _failed(self, exc: BaseException) -> TokenizerError:
        return TokenizerError(
            f"{self.info.identifier}: a tokenizer worker process failed ({str(exc) or type(exc).__name__})"
        )

    def close(self) -> None:
        if not self._started:
            for _ in range(self._processes):
                self._recipes.put(None)
        self._pool.shutdown(wait=True, cancel_futures=True)
        # A recipe no worker read (one died while starting) must not keep the queue's feeder
        # thread, and so this close, waiting forever on a pipe nobody reads.
        self._recipes.cancel_join_thread()
        self._recipes.close()


#: Every tokenizer has ``info`` (TokenizerInfo), ``encode_batch(texts) -> (flat uint32 ids, int64
#: offsets of len n+1)`` with an EOS after each document, ``submit(texts) -> Future`` of the
#: staged ``tokens`` column (see ``staging``), and ``inflight`` (batches a caller may keep in flight).
AnyTokenizer = ByteTokenizer | SubwordTokenizer | ProcessTokenizer


def make_tokenizer(
    kind: str,
    identifier: str,
    *,
    endpoint: str | None = None,
    token: str | None = None,
    eos_token_id: int | None = None,
    special_tokens_as_text: bool = True,
    engine: str = "auto",
    processes: int = 0,
) -> AnyTokenizer:
    """Subword BPE runs in ``processes`` worker processes (0: one per core); 1 runs it on threads
    in this process instead (one per core)."""
    if kind == "byte":
        return ByteTokenizer()
    if kind == "subword":
        n = processes or os.cpu_count() or 1
        workers = ProcessTokenizer(n) if n > 1 else None  # they import while the tokenizer is built here
        try:
            src = load_tokenizer_source(identifier, endpoint=endpoint, token=token)
            tok = SubwordTokenizer(
                src, eos_token_id=eos_token_id, special_tokens_as_text=special_tokens_as_text, engine=engine
            )
        except BaseException:
            if workers is not None:
                workers.close()
            raise
        return workers.start(tok) if workers is not None else tok
    raise TokenizerError(f"--tokenizer must be 'byte' or 'subword', got {kind!r}")
