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

import hashlib
import json
import logging
import os
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from .errors import TokenizerError
from .models import TokenizerInfo

log = logging.getLogger("bolmo_async")

BYTE_OFFSET = 4
BYTE_EOS = 1
BYTE_VOCAB = 256 + BYTE_OFFSET
BYTE_SPECIALS = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<bpe_token_end>": 3}


def _done(texts: pa.Array, encode: Any) -> Future[tuple[np.ndarray, np.ndarray]]:
    fut: Future[tuple[np.ndarray, np.ndarray]] = Future()
    try:
        fut.set_result(encode(texts))
    except Exception as exc:
        fut.set_exception(exc)
    return fut


class ByteTokenizer:
    """Bolmo byte ids: ``utf8 + 4`` then EOS ``1``."""

    inflight = 0  # batches a caller may keep in flight (see ProcessTokenizer)

    def submit(self, texts: pa.Array) -> Future[tuple[np.ndarray, np.ndarray]]:
        return _done(texts, self.encode_batch)

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
        arr = texts.cast(pa.large_string()) if texts.type != pa.large_string() else texts
        n = len(arr)
        if n == 0:
            return np.empty(0, np.uint32), np.zeros(1, np.int64)
        _, off_buf, data_buf = arr.buffers()
        offsets = np.frombuffer(off_buf, dtype=np.int64, count=n + 1, offset=arr.offset * 8)
        start, end = int(offsets[0]), int(offsets[-1])
        data = (
            np.frombuffer(data_buf, dtype=np.uint8, count=end - start, offset=start)
            if end > start
            else np.empty(0, np.uint8)
        )
        rel = offsets - start
        out = np.empty(len(data) + n, dtype=np.uint32)
        # Document i's bytes land at [rel[i] + i, rel[i+1] + i); its EOS at rel[i+1] + i.
        eos_pos = rel[1:] + np.arange(n, dtype=np.int64)
        is_byte = np.ones(len(out), dtype=bool)
        is_byte[eos_pos] = False
        out[is_byte] = data
        out += BYTE_OFFSET
        out[eos_pos] = BYTE_EOS
        out_offsets = np.empty(n + 1, dtype=np.int64)
        out_offsets[0] = 0
        out_offsets[1:] = eos_pos + 1
        return out, out_offsets


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
    for tok, i in model["vocab"].items():
        if i in added_ids:
            continue
        try:
            ranks[bytes(u2b[c] for c in tok)] = i
        except KeyError:
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
    """A ``tokenizers`` JSON tokenizer with EOS appended after each document."""

    def __init__(
        self,
        source: TokenizerSource,
        *,
        eos_token_id: int | None = None,
        special_tokens_as_text: bool = True,
        engine: str = "auto",
        threads: int | None = None,
    ):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self._spec = json.loads(source.json_text)
            self._hf = HFTokenizer.from_str(source.json_text)
        except Exception as exc:  # tokenizers raises plain Exception on bad JSON
            raise TokenizerError(f"{source.identifier}: not a valid tokenizers JSON ({exc})") from exc
        self._hf.encode_special_tokens = special_tokens_as_text
        self.source_json = source.json_text
        self.special_tokens_as_text = special_tokens_as_text
        added = self._spec.get("added_tokens", [])
        self._special = {a["content"]: a["id"] for a in added if a.get("special")}
        self._nonspecial = {a["content"]: a["id"] for a in added if not a.get("special")}
        eos = eos_token_id if eos_token_id is not None else self._find_eos(source.config)
        vocab_size = self._hf.get_vocab_size(with_added_tokens=True)
        if not 0 <= eos < max(vocab_size, eos + 1) or eos > np.iinfo(np.uint32).max:
            raise TokenizerError(f"EOS id {eos} is out of range; pass a valid --eos-token-id.")
        self.eos = eos
        self._threads = threads or os.cpu_count() or 2
        self._tt: Any = None
        chosen = "tokenizers"
        if engine in ("auto", "tiktoken"):
            conv = tiktoken_convertible(self._spec)
            if isinstance(conv, str):
                if engine == "tiktoken":
                    raise TokenizerError(f"--engine tiktoken: {source.identifier} cannot be converted exactly: {conv}.")
                log.info(
                    "tokenizer %s runs on `tokenizers` (no exact tiktoken conversion: %s)", source.identifier, conv
                )
            else:
                import tiktoken

                ranks, pattern = conv
                self._tt = tiktoken.Encoding(
                    name=f"bolmo-async:{source.identifier}",
                    pat_str=pattern,
                    mergeable_ranks=ranks,
                    special_tokens={**self._special, **self._nonspecial},
                )
                chosen = "tiktoken"
        elif engine != "tokenizers":
            raise TokenizerError(f"unknown --engine {engine!r}; choose auto, tiktoken or tokenizers")
        self._allowed = set(self._nonspecial) if special_tokens_as_text else set(self._nonspecial) | set(self._special)
        self.info = TokenizerInfo(
            kind="subword",
            identifier=source.identifier,
            eos_token_id=eos,
            vocab_size=vocab_size,
            fingerprint=hashlib.sha256(source.json_text.encode("utf-8")).hexdigest()[:16],
            engine=chosen,
            special_tokens_as_text=special_tokens_as_text,
        )

    def _find_eos(self, config: dict[str, Any]) -> int:
        eos = config.get("eos_token")
        if isinstance(eos, dict):
            eos = eos.get("content")
        for cand in (eos, "<|endoftext|>", "</s>", "<eos>"):
            if isinstance(cand, str):
                i = self._hf.token_to_id(cand)
                if i is not None:
                    return int(i)
        raise TokenizerError(
            "the tokenizer has no EOS token (no eos_token in its config, no <|endoftext|>); pass --eos-token-id."
        )

    def encode_texts(self, texts: list[str]) -> list[list[int]]:
        """Ids without EOS, one list per text."""
        if self._tt is not None:
            if self._threads <= 1:  # tiktoken's own batch thread pool is slower than a loop here
                return [self._tt.encode(t, allowed_special=self._allowed, disallowed_special=()) for t in texts]
            return self._tt.encode_batch(
                texts, num_threads=self._threads, allowed_special=self._allowed, disallowed_special=()
            )
        return [e.ids for e in self._hf.encode_batch(texts, add_special_tokens=False)]

    inflight = 0

    def submit(self, texts: pa.Array) -> Future[tuple[np.ndarray, np.ndarray]]:
        return _done(texts, self.encode_batch)

    def _encode_arrays(self, texts: list[str]) -> list[np.ndarray]:
        """Ids without EOS as uint32 arrays; straight from tiktoken's buffer when single-threaded."""
        core = getattr(self._tt, "_core_bpe", None)
        if core is not None and self._threads <= 1 and hasattr(core, "encode_to_tiktoken_buffer"):
            allowed = self._allowed
            return [np.frombuffer(core.encode_to_tiktoken_buffer(t, allowed), dtype=np.uint32) for t in texts]
        return [np.asarray(ids, dtype=np.uint32) for ids in self.encode_texts(texts)]

    def encode_reference(self, text: str) -> list[int]:
        """The ``tokenizers`` engine on one text, whatever engine is in use (tests, inspection)."""
        return list(self._hf.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        return str(self._hf.decode(ids, skip_special_tokens=False))

    def encode_batch(self, texts: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        pieces = self._encode_arrays(texts.to_pylist())
        offsets = np.zeros(len(pieces) + 1, dtype=np.int64)
        np.cumsum([len(p) + 1 for p in pieces], out=offsets[1:])
        eos = np.array([self.eos], dtype=np.uint32)
        flat = np.concatenate([x for p in pieces for x in (p, eos)]) if pieces else np.empty(0, np.uint32)
        return flat, offsets


# ---------------------------------------------------------------------------------------------
# both cores: BPE in worker processes (threads do not scale: the GIL is held between texts)

_WORKER: SubwordTokenizer | None = None


def _worker_init(source: TokenizerSource, kwargs: dict[str, Any]) -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    global _WORKER
    _WORKER = SubwordTokenizer(source, threads=1, **kwargs)


def _worker_info() -> TokenizerInfo:
    assert _WORKER is not None
    return _WORKER.info


def _worker_encode(texts: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    assert _WORKER is not None
    return _WORKER.encode_batch(texts)


class ProcessTokenizer:
    """A ``SubwordTokenizer`` running in ``processes`` spawned worker processes; same interface."""

    def __init__(self, source: TokenizerSource, processes: int, **kwargs: Any):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self._pool = ProcessPoolExecutor(
            processes,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_worker_init,
            initargs=(source, kwargs),
        )
        try:
            # One call per worker at once: every worker starts now, in parallel, not at its first batch.
            infos = [self._pool.submit(_worker_info) for _ in range(processes)]
            self.info: TokenizerInfo = infos[0].result()
            for f in infos[1:]:
                f.result()
        except Exception as exc:
            self._pool.shutdown(wait=False, cancel_futures=True)
            if isinstance(exc, TokenizerError):
                raise
            raise TokenizerError(f"{source.identifier}: the tokenizer workers failed to start ({exc})") from exc
        self.source_json = source.json_text

        #: Batches one file may keep in flight, so that even a single large file keeps every worker busy.
        self.inflight = 2 * processes

    def encode_batch(self, texts: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        return self.submit(texts).result()

    def submit(self, texts: pa.Array) -> Future[tuple[np.ndarray, np.ndarray]]:
        return self._pool.submit(_worker_encode, texts)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


#: Every tokenizer has ``info`` (TokenizerInfo), ``encode_batch(texts) -> (flat uint32 ids, int64
#: offsets of len n+1)`` with an EOS after each document, ``submit(texts) -> Future`` of the same,
#: and ``inflight`` (batches a caller may keep in flight).
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
    """``processes`` > 1 runs subword BPE in that many worker processes (0: one per core)."""
    if kind == "byte":
        return ByteTokenizer()
    if kind == "subword":
        src = load_tokenizer_source(identifier, endpoint=endpoint, token=token)
        kwargs: dict[str, Any] = {
            "eos_token_id": eos_token_id,
            "special_tokens_as_text": special_tokens_as_text,
            "engine": engine,
        }
        n = processes or os.cpu_count() or 1
        if n > 1:
            return ProcessTokenizer(src, n, **kwargs)
        return SubwordTokenizer(src, **kwargs)
    raise TokenizerError(f"--tokenizer must be 'byte' or 'subword', got {kind!r}")
