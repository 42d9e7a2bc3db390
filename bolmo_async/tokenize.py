"""Text batches -> token ids with an EOS after every document.

- ``byte``: the released Bolmo layout: UTF-8 byte ``b`` -> id ``b + 4``, EOS ``1`` after each
  document. Built from the Arrow string buffer with numpy, no Python loop per document and no
  BPE.
- ``subword``: a ``tokenizers`` JSON (default ``allenai/dolma2-tokenizer``), EOS appended by us
  (the JSON has no post-processor). Engines behind one interface (``encode_batch``):
  ``fastokens`` (default: it loads the JSON itself, flat uint32 output), ``tokenizers`` (the
  reference, and the fallback for anything fastokens cannot load) and ``tiktoken`` (only when
  asked for, and only for tokenizers that pass the exactness probe). Whatever engine runs, one
  document in ``check_every`` is encoded again by the reference and a mismatch stops the run.

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
import itertools
import json
import logging
import os
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias, TypeVar

import numpy as np
import pyarrow as pa

from .errors import EngineMismatch, TokenizerError
from .models import DEFAULT_CHECK_EVERY, ENGINES, TokenizerInfo, tokenizer_fingerprint
from .tokcache import PREBUILD_ENV, PREBUILD_WORKERS_ENV, cache_dir
from .util import STDERR_HOLD, release_free_memory

log = logging.getLogger("bolmo_async")
T = TypeVar("T")

BYTE_OFFSET = 4
BYTE_EOS = 1
BYTE_VOCAB = 256 + BYTE_OFFSET
BYTE_SPECIALS = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<bpe_token_end>": 3}


def large_offsets(arr: pa.Array) -> np.ndarray:
    """The int64 offsets (n + 1) of a large string/binary/list array, as a view of its buffer."""
    return np.frombuffer(arr.buffers()[1], dtype=np.int64, count=len(arr) + 1, offset=arr.offset * 8)


def tokens_column(flat: np.ndarray, offsets: np.ndarray) -> pa.Array:
    """Flat ids + document offsets -> the staged ``large_list<uint32>`` column (no copy)."""
    return pa.LargeListArray.from_arrays(numpy_array(offsets, pa.int64()), numpy_array(flat, pa.uint32()))


def numpy_array(values: np.ndarray, type_: pa.DataType) -> pa.Array:
    """A contiguous numpy array of ``type_``'s width as an Arrow array on its buffer (no copy).
    Not ``pa.array``: its first numpy input in a process imports ``numpy.ma`` (10-30 ms of a
    small run's start, in every worker). Values of a type that may not fit (signed or wider ids
    for uint32) are refused by their dtype, not wrapped (-1 staged as 4294967295): no scan."""
    target = np.dtype(type_.to_pandas_dtype())
    if not np.can_cast(values.dtype, target, casting="safe"):
        raise TypeError(f"numpy_array: {values.dtype} values as {target} could wrap; give {target} (or narrower)")
    values = np.ascontiguousarray(values, dtype=target)
    return pa.Array.from_buffers(type_, len(values), [None, pa.py_buffer(values)])


def byte_ids(texts: pa.Array, out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Bolmo byte ids of string/binary ``texts``: flat ``utf8 + 4`` with EOS ``1`` after each
    document, and the int64 document offsets into it (len n + 1). No Python loop per document.
    ``out``: where to put the ids (exactly their number of uint32), instead of a new array."""
    import pyarrow.compute as pc  # not at import: the coordinator never needs it (start-up CPU)

    # Staged byte columns are large_binary already: no cast call (a tenth of this function's time).
    arr = texts if texts.type == pa.large_binary() else texts.cast(pa.large_binary())
    n = len(arr)
    if arr.null_count:
        raise ValueError("byte_ids: texts must not be null")
    if n == 0:
        return (np.empty(0, np.uint32) if out is None else out), np.zeros(1, np.int64)
    # One Arrow kernel call lays each document's bytes out followed by a placeholder byte, i.e.
    # exactly the id layout; then one vectorised add, and the EOS ids go where the placeholders are.
    nothing = pa.LargeBinaryArray.from_buffers(
        pa.large_binary(), n, [None, pa.py_buffer(np.zeros(n + 1, np.int64)), pa.py_buffer(b"")]
    )
    joined = pc.binary_join_element_wise(arr, nothing, pa.scalar(b"\0", pa.large_binary()))
    offsets = large_offsets(joined)
    start, end = int(offsets[0]), int(offsets[-1])
    data = np.frombuffer(joined.buffers()[2], dtype=np.uint8, count=end - start, offset=start)
    out = np.add(data, BYTE_OFFSET, dtype=np.uint32, out=out)
    rel = offsets - start
    out[rel[1:] - 1] = BYTE_EOS
    return out, rel


#: Document texts: an Arrow string column, or Python str (what BPE engines take).
Texts: TypeAlias = "pa.Array | list[str]"


def string_array(texts: list[str]) -> pa.Array:
    """``texts`` as an Arrow ``large_string`` array, built from one ``bytes`` of their UTF-8 (no
    Arrow builder: its growing buffers were fresh memory every batch, a seventh of byte mode's CPU
    in page faults on this machine, against two plain copies here)."""
    parts = [t.encode("utf-8") for t in texts]
    offsets = np.zeros(len(parts) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, parts), dtype=np.int64, count=len(parts)), out=offsets[1:])
    return pa.LargeStringArray.from_buffers(len(parts), pa.py_buffer(offsets), pa.py_buffer(b"".join(parts)))


def terminated_bytes(texts: list[str]) -> pa.Array:
    """Byte mode's staged column (``staging``): each text's UTF-8 followed by a byte ``0``, as a
    ``large_binary`` array, built like ``string_array`` (the join puts the zeros in)."""
    parts = [t.encode("utf-8") for t in texts]
    offsets = np.zeros(len(parts) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, parts), dtype=np.int64, count=len(parts)) + 1, out=offsets[1:])
    parts.append(b"")  # the last text's 0 too, in the same one copy
    data = b"\0".join(parts)
    return pa.Array.from_buffers(pa.large_binary(), len(texts), [None, pa.py_buffer(offsets), pa.py_buffer(data)])


def _arrow_texts(texts: Texts) -> pa.Array:
    return string_array(texts) if isinstance(texts, list) else texts


def _python_texts(texts: Texts) -> list[str]:
    return texts if isinstance(texts, list) else texts.to_pylist()


class ByteTokenizer:
    """Bolmo byte ids: ``utf8 + 4`` then EOS ``1``."""

    def tokens_column(self, texts: Texts) -> pa.Array:
        """The staged tokens column: the UTF-8 bytes themselves, a ``0`` after each document (see
        ``staging``)."""
        return terminated_bytes(_python_texts(texts))

    def keep(self, texts: Texts) -> np.ndarray | None:
        """Every document is kept (no BPE, nothing to refuse)."""
        return None

    def __init__(self) -> None:
        self.info = TokenizerInfo(
            kind="byte",
            identifier="bolmo-byte",
            eos_token_id=BYTE_EOS,
            vocab_size=BYTE_VOCAB,
            fingerprint=hashlib.sha256(b"bolmo-byte:offset=4:eos=1:pad=0:bos=1:eos_id=2:bpe_end=3").hexdigest()[:16],
            engine="numpy",
        )

    def encode_batch(self, texts: Texts) -> tuple[np.ndarray, np.ndarray]:
        return byte_ids(_arrow_texts(texts))

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


def _read_tokenizer_file(identifier: str, path: Path) -> str:
    size = path.stat().st_size
    if size > MAX_TOKENIZER_BYTES:
        raise TokenizerError(
            f"{identifier}: {path} is {size / 1e6:.0f} MB, over the {MAX_TOKENIZER_BYTES >> 20} MiB a tokenizer "
            "JSON may have here; check --tokenizer-identifier."
        )
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenizerError(f"{identifier}: cannot read {path} ({exc}); check --tokenizer-identifier.") from exc


#: ``fetch(repo_id, filename) -> bytes | None`` (None: the repo has no such file); raises
#: TokenizerError for anything else. ``api`` gives one that uses the run's Hub client.
Fetch = Callable[[str, str], "bytes | None"]


def save_pretrained_hint(identifier: str) -> str:
    """How a tokenizer without tokenizer.json (a slow one's vocab.json + merges.txt, which the
    original prepare_bolmo_data.py loaded through transformers) gets one."""
    return f"transformers writes one: AutoTokenizer.from_pretrained({identifier!r}).save_pretrained(DIR)"


def load_tokenizer_source(identifier: str, *, fetch: Fetch | None = None) -> TokenizerSource:
    """A local ``tokenizer.json``, a folder holding one, or a Hub repo id (read with ``fetch``)."""
    p = Path(identifier).expanduser()
    if p.is_file():
        return TokenizerSource(
            identifier, _read_tokenizer_file(identifier, p), _read_json(p.with_name("tokenizer_config.json"))
        )
    if p.is_dir():
        if not (p / "tokenizer.json").is_file():
            raise TokenizerError(
                f"{p} has no tokenizer.json; point --tokenizer-identifier at the file or a repo id "
                f"({save_pretrained_hint(str(p))})."
            )
        return TokenizerSource(
            identifier, _read_tokenizer_file(identifier, p / "tokenizer.json"), _read_json(p / "tokenizer_config.json")
        )
    if identifier.count("/") != 1 or identifier.startswith((".", "/")) or fetch is None:
        raise TokenizerError(
            f"--tokenizer-identifier {identifier!r} is neither a file, a folder nor a Hub repo id like 'allenai/dolma2-tokenizer'."
        )
    data = fetch(identifier, "tokenizer.json")
    if data is None:
        raise TokenizerError(
            f"tokenizer {identifier} has no tokenizer.json: pass a local tokenizer.json (or its folder) as "
            f"--tokenizer-identifier ({save_pretrained_hint(identifier)}), set HF_TOKEN if the repo is gated, "
            "or serve it from a mirror with `mirror serve --model-repo ID=FOLDER`."
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TokenizerError(f"tokenizer {identifier}: tokenizer.json is not UTF-8 text") from exc
    config: dict[str, Any] = {}
    raw_config = fetch(identifier, "tokenizer_config.json")
    if raw_config is not None:
        with contextlib.suppress(ValueError, RecursionError):
            loaded = json.loads(raw_config)
            config = loaded if isinstance(loaded, dict) else {}
    return TokenizerSource(identifier, text, config)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError, RecursionError):
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


#: A tokenizer JSON larger than this is refused (dolma2's is 2.7 MB; the largest common ones ~35 MB).
MAX_TOKENIZER_BYTES = 128 * 1024 * 1024
#: A document holding a run without whitespace longer than this (UTF-8 bytes) is not tokenized
#: in subword mode (see ``SubwordTokenizer.keep``).
MAX_WORD_BYTES = 1 << 20


_ASCII_SPACE = np.zeros(256, dtype=bool)
_ASCII_SPACE[[0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x20]] = True


def _longest_run(data: np.ndarray) -> int:
    """Bytes of the longest run of ``data`` (UTF-8) without ASCII whitespace."""
    spaces = np.flatnonzero(_ASCII_SPACE[data])
    if not len(spaces):
        return len(data)
    edges = np.concatenate(([-1], spaces, [len(data)]))
    return int(np.diff(edges).max()) - 1


#: The name (prefix) of a subword tokenizer's one encoding thread (``SubwordTokenizer._on_bpe_thread``).
BPE_THREAD = "bolmo-bpe"
#: Growth of the process (RSS) after which that thread, and fastokens' caches with it, is replaced
#: by a fresh one. Measured on the bench's scripts (words that never repeat) its caches reach
#: 210 MB, 150 with this budget, at the same CPU; on prose 150 MB, 100 with it, at about 5% more
#: CPU where the budget is reached (once per 100-200 MB of text).
BPE_CACHE_BUDGET = 96 << 20


def _rss() -> int:
    """This process's resident set size in bytes (Linux; 0 elsewhere, where nothing is replaced)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def fastokens_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("fastokens") is not None


def fastokens_fit(spec: dict[str, Any]) -> str | None:
    """None if ``spec`` is of the kind fastokens is proven to encode exactly as the reference
    (byte-level BPE where every byte has a token, as dolma2 and GPT-2-style tokenizers are: the
    exactness harness and the tests run it on them), else why it is not. Elsewhere it can differ
    where no sampled check looks: with no pre-tokenizer, a character outside the vocabulary makes
    fastokens split the word where ``tokenizers`` drops it and merges across."""
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        return "its model is not BPE"
    if spec.get("normalizer") is not None:
        return "it has a normalizer"
    if model.get("byte_fallback") or model.get("dropout") or model.get("continuing_subword_prefix"):
        return "its BPE has byte_fallback, dropout or a subword prefix"
    if model.get("end_of_word_suffix"):
        return "its BPE has an end-of-word suffix"
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    if not isinstance(steps, list) or not all(isinstance(x, dict) for x in steps):
        return "its pre-tokenizer is malformed"
    kinds = [x.get("type") for x in steps]
    if "ByteLevel" not in kinds or not set(kinds) <= {"ByteLevel", "Split"}:
        return "its pre-tokenizer is not byte-level (ByteLevel, optionally after a Split regex)"
    vocab = model.get("vocab") or {}
    if any(ch not in vocab for ch in _bytes_to_unicode().values()):
        return "not every byte has a token"
    return None


def resolve_engine(engine: str, spec: dict[str, Any] | None = None) -> str:
    """``auto`` -> the engine a run uses: fastokens for the kind of tokenizer it is proven equal to
    the reference on (``fastokens_fit``), the reference for any other; an unknown name is a usage
    error."""
    if engine not in ENGINES:
        raise TokenizerError(f"unknown --engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if engine == "auto":
        if not fastokens_available():
            return "tokenizers"
        why = fastokens_fit(spec) if spec is not None else None
        if why is not None:
            log.info("engine: tokenizers, the reference (%s; --engine fastokens to insist)", why)
            return "tokenizers"
        return "fastokens"
    return engine


def _is_panic(exc: BaseException) -> bool:
    """A Rust panic inside a tokenizer library (pyo3's PanicException, a BaseException)."""
    return type(exc).__name__ == "PanicException"


@contextlib.contextmanager
def _panics_as_errors(identifier: str) -> Iterator[None]:
    """A panic of the tokenizer library -> TokenizerError (one line; the run stops on it)."""
    try:
        yield
    except BaseException as exc:
        if not _is_panic(exc):
            raise
        raise TokenizerError(
            f"{identifier}: the tokenizer library crashed on this tokenizer (a panic: {str(exc)[:200]}). "
            "Fix the tokenizer JSON (its normalizer or pre-tokenizer) or choose another --tokenizer-identifier."
        ) from None


@contextlib.contextmanager
def _stderr_held() -> Iterator[None]:
    """File descriptor 2 goes to a temporary file for the block, and what it got is written out
    after it, unless the block raised (then it was a Rust panic's backtrace, which the error
    replaces). What another thread says meanwhile waits for the block (``util.stderr_free``)."""
    with STDERR_HOLD:
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError):
            yield
            return
        with tempfile.TemporaryFile() as held:
            os.dup2(held.fileno(), 2)
            ok = False
            try:
                yield
                ok = True
            finally:
                with contextlib.suppress(OSError, ValueError):
                    sys.stderr.flush()
                os.dup2(saved, 2)
                os.close(saved)
                if ok and held.tell():
                    held.seek(0)
                    with contextlib.suppress(OSError):
                        os.write(2, held.read())


#: Texts every tokenizer encodes once when it is loaded: a tokenizer that panics on them, or that
#: cannot be built, is refused before anything is downloaded.
PROBE_TEXTS = (
    "Hello world",
    "  two  spaces\tand a tab\n\nnew lines\r\n",
    "é东京 ß ж ह 🚀 👩‍👩‍👧 a\u0301 'll 's 123456",
    "<|endoftext|>",
    "",
)


#: The reference engine this process's last probe built (JSON text, special_tokens_as_text,
#: engine), for a worker on a thread of the same process (a small run, ``processes=1``): building
#: dolma2's again took 0.3 s of its 0.1% run. ``forget_probed`` lets it go (tens of MB) where the
#: workers are other processes.
_PROBED: list[tuple[str, bool, Any]] = []


def forget_probed() -> None:
    _PROBED.clear()


#: The reference engine the fork server built ahead (``prebuild_reference``): the sha256 of its
#: JSON's UTF-8 and the engine, taken by the first tokenizer of a worker forked from the server
#: whose JSON is exactly that one.
_PREBUILT: list[tuple[bytes, Any]] = []


def _json_digest(json_text: str) -> bytes:
    return hashlib.sha256(json_text.encode("utf-8", "surrogatepass")).digest()


def prebuild_reference() -> None:
    """In the fork server (``bolmo_async.preload``), when the command line named a tokenizer JSON
    (``tokcache.PREBUILD_ENV``: the local file, or the copy the last run kept of the Hub's): the
    ``tokenizers`` reference engine is built from it once, before any worker is forked, and every
    worker starts with it (copy-on-write) instead of building its own: 0.3 s of CPU each for
    dolma2, holding the GIL (nothing else of the worker ran meanwhile), on the path of every run
    whose engine it is (small plans) or that cross-checks. It is only built here, never used: the
    library's thread pool does not exist before the fork (``tokenizers`` turns its parallelism
    off in a child forked after it had used it). A guess: a worker takes it only when its own JSON
    is exactly this one, and lets it go otherwise (``SubwordTokenizer._build_reference``);
    anything wrong here (a file unreadable, too large, refused, a panic) only means each worker
    builds its own, as before.

    Once it has forked the workers it was built for (``PREBUILD_WORKERS_ENV``), the server lets
    its own copy go: each worker keeps its copy-on-write one, and the server's resident memory,
    which a sum of the tree's RSS counts once more, is back to its imports."""
    path = os.environ.pop(PREBUILD_ENV, "")
    workers = os.environ.pop(PREBUILD_WORKERS_ENV, "")
    if not path:
        return
    try:
        if os.stat(path).st_size > MAX_TOKENIZER_BYTES:
            return
        text = Path(path).read_text(encoding="utf-8")
        from tokenizers import Tokenizer as HFTokenizer

        with _stderr_held():  # a panic's backtrace: a file the run would refuse, said by the run itself
            engine = HFTokenizer.from_str(text)
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            raise
        log.debug("tokenizer not built ahead from %s (%s: %s)", path, type(exc).__name__, exc)
        return
    _PREBUILT[:] = [(_json_digest(text), engine)]
    del engine, text
    if workers.isdigit() and int(workers) > 0:
        left = [int(workers)]

        def forked() -> None:  # in the server, after each fork (the child has the engine)
            left[0] -= 1
            if not left[0] and _PREBUILT:
                _PREBUILT.clear()
                release_free_memory(0)

        os.register_at_fork(after_in_parent=forked)


class SubwordTokenizer:
    """A ``tokenizers`` JSON tokenizer with EOS appended after each document.

    Built from its recipe (the JSON text and options): the engine is built on first use, so a
    worker process builds only what it runs. Every engine gives the ids of ``tokenizers``
    (the reference), which re-encodes one document in ``check_every`` as a run-time check.
    """

    def __init__(
        self,
        source: TokenizerSource,
        *,
        eos_token_id: int | None = None,
        special_tokens_as_text: bool = True,
        engine: str = "auto",
        check_every: int = DEFAULT_CHECK_EVERY,
        checked: TokenizerInfo | None = None,
    ):
        """``checked``: what the coordinator already found for this very source and these
        options; a worker then skips parsing the JSON (tens of MB of Python objects per process)."""
        if engine not in ENGINES:
            resolve_engine(engine)  # the usage error
        if check_every < 0:
            raise TokenizerError("--check-every must be 0 (off) or a positive number of documents")
        self.identifier = source.identifier
        self.source_json = source.json_text
        self.special_tokens_as_text = special_tokens_as_text
        self.check_every = check_every
        self._engine_obj: Any = None
        self._hf_obj: Any = None
        self._build_lock = threading.Lock()  # engines are built once, whichever thread asks first
        self._bpe_thread: ThreadPoolExecutor | None = None  # see ``_on_bpe_thread``
        self._bpe_rss = 0  # this process's RSS when that thread started
        self._seen = 0
        if checked is not None and engine != "tiktoken":
            self.engine = checked.engine if engine == "auto" else engine
            self._special = self._nonspecial = {}
            self._allowed: set[str] = set()
            self.eos, self.info = checked.eos_token_id, checked
            return
        spec = parse_tokenizer_json(source)
        self.engine = resolve_engine(engine, spec)
        added = spec.get("added_tokens", [])
        self._special = {a["content"]: a["id"] for a in added if a.get("special")}
        self._nonspecial = {a["content"]: a["id"] for a in added if not a.get("special")}
        if self.engine == "fastokens" and not fastokens_available():
            raise TokenizerError("--engine fastokens: the fastokens package is not installed (pip install fastokens).")
        self._probe(spec)
        if self.engine == "tiktoken":
            why = tiktoken_exact(spec, self._reference)
            if why is not None:
                raise TokenizerError(f"--engine tiktoken: {source.identifier} cannot be converted exactly: {why}.")
        vocab = {**(spec["model"].get("vocab") or {}), **{a["content"]: a["id"] for a in added}}
        eos = eos_token_id if eos_token_id is not None else self._find_eos(source.config, vocab)
        vocab_size = len(vocab)
        if not 0 <= eos < max(vocab_size, eos + 1) or eos > np.iinfo(np.uint32).max:
            raise TokenizerError(f"EOS id {eos} is out of range; pass a valid --eos-token-id.")
        self.eos = eos
        self._allowed = set(self._nonspecial) if special_tokens_as_text else set(self._nonspecial) | set(self._special)
        self.info = TokenizerInfo(
            kind="subword",
            identifier=source.identifier,
            eos_token_id=eos,
            vocab_size=vocab_size,
            fingerprint=tokenizer_fingerprint(source.json_text),
            engine=self.engine,
            special_tokens_as_text=special_tokens_as_text,
        )
        _PROBED[:] = [(self.source_json, special_tokens_as_text, self._hf_obj)]

    # -- engines, built on first use ------------------------------------------------------
    def _reference(self) -> Any:
        """The ``tokenizers`` engine (the reference and the general path)."""
        if self._hf_obj is not None:
            return self._hf_obj
        with self._build_lock:
            return self._build_reference()

    def _build_reference(self) -> Any:
        for json_text, special, probed in _PROBED:  # built by this process's probe: no second build
            if self._hf_obj is None and special == self.special_tokens_as_text and json_text == self.source_json:
                self._hf_obj = probed
        if self._hf_obj is None and _PREBUILT:
            # Built by the fork server this worker was forked from: taken for this very JSON; for
            # another (the Hub's changed since the last run) let go, as no other is built here.
            digest, prebuilt = _PREBUILT.pop()
            if digest == _json_digest(self.source_json):
                prebuilt.encode_special_tokens = self.special_tokens_as_text
                self._hf_obj = prebuilt
        if self._hf_obj is None:
            from tokenizers import Tokenizer as HFTokenizer

            try:
                hf = HFTokenizer.from_str(self.source_json)
            except BaseException as exc:  # tokenizers raises plain Exception on bad JSON, or panics
                if not isinstance(exc, Exception) and not _is_panic(exc):
                    raise
                raise TokenizerError(f"{self.identifier}: not a valid tokenizers JSON ({exc})") from None
            hf.encode_special_tokens = self.special_tokens_as_text
            self._hf_obj = hf
        return self._hf_obj

    def _engine(self) -> Any:
        if self._engine_obj is not None:
            return self._engine_obj
        with self._build_lock:
            return self._build_engine()

    def _build_engine(self) -> Any:
        if self._engine_obj is None:
            if self.engine == "tokenizers":
                self._engine_obj = self._build_reference()
            elif self.engine == "fastokens":
                import fastokens

                try:
                    self._engine_obj = fastokens.Tokenizer.from_json_str(self.source_json)
                except Exception as exc:
                    raise TokenizerError(
                        f"{self.identifier}: fastokens cannot load this tokenizer ({exc}); rerun with --engine tokenizers."
                    ) from exc
            else:
                self._engine_obj = self._tiktoken_encoding()
        return self._engine_obj

    def _tiktoken_encoding(self) -> Any:
        import tiktoken

        conv = tiktoken_convertible(json.loads(self.source_json))
        assert not isinstance(conv, str)  # checked in __init__
        ranks, pattern = conv
        return tiktoken.Encoding(
            name=f"bolmo-async:{self.identifier}",
            pat_str=pattern,
            mergeable_ranks=ranks,
            special_tokens={**self._special, **self._nonspecial},
        )

    def warm(self) -> None:
        """Build the engine now (worker start-up) instead of at the first batch."""
        with _panics_as_errors(self.identifier):
            self._engine()

    def _probe(self, spec: dict[str, Any]) -> None:
        """Build the reference engine and encode ``PROBE_TEXTS`` and a few vocabulary entries with
        it, once, where the tokenizer is loaded: a JSON it refuses (negative ids, bad merges, a bad
        regex), one it panics on (pyo3's PanicException, a BaseException that would escape every
        handler of a worker), or one that encodes text to nothing is a TokenizerError before
        anything is downloaded. The panic's own message (written to stderr by Rust) is held back:
        the error says it in one line."""
        vocab = spec["model"].get("vocab")
        if vocab is not None and not vocab:
            raise TokenizerError(
                f"{self.identifier}: the tokenizer's vocabulary is empty: every document would become just EOS. "
                "Check --tokenizer-identifier (a tokenizer.json with its model's vocabulary)."
            )
        texts = [*PROBE_TEXTS, *itertools.islice(vocab or {}, 8)]
        with _stderr_held(), _panics_as_errors(self.identifier):
            # Built in the coordinator (0.3 s for dolma2, on a thread while the repo is listed).
            encodings = self._reference().encode_batch(texts, add_special_tokens=False)
        if not any(e.ids for e in encodings):
            raise TokenizerError(
                f"{self.identifier}: the tokenizer encodes every probe text (and its own vocabulary) to no tokens: "
                "every document would become just EOS. Check --tokenizer-identifier."
            )

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_engine_obj"] = state["_hf_obj"] = state["_bpe_thread"] = None  # rebuilt where they are used
        del state["_build_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._build_lock = threading.Lock()

    def _on_bpe_thread(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` (an engine's encode) on this tokenizer's one BPE thread, whichever thread asks.

        fastokens keeps its caches of encoded words per thread, for the thread's life (a table of
        up to 2M entries, a long-word cache, scratch: 150-200 MB on text whose words do not
        repeat, as unspaced CJK or Thai runs), so a worker whose decoding threads all encoded held
        one set per thread (600 MB workers on the bench's scripts). Encoding on one thread keeps
        one set, as warm as if every file went through it; the engine releases the GIL, so the
        calling thread's decoding of other files goes on meanwhile. Once the process has grown
        more than ``BPE_CACHE_BUDGET`` since that thread started, the thread is replaced by a
        fresh one after its batch: its caches go with it (on such text they were not helping)."""
        if threading.current_thread().name.startswith(BPE_THREAD):
            return fn()
        with self._build_lock:
            if self._bpe_thread is None:
                self._bpe_thread = ThreadPoolExecutor(1, thread_name_prefix=BPE_THREAD)
                self._bpe_rss = _rss()
            pool = self._bpe_thread
            # Submitted under the lock: another caller's replacement shuts ``pool`` down under it,
            # and a submit after that is a RuntimeError (the batch failed, its file with it).
            future = pool.submit(fn)
        out = future.result()
        if _rss() - self._bpe_rss > BPE_CACHE_BUDGET:
            with self._build_lock:
                if self._bpe_thread is pool:
                    self._bpe_thread = None
                    pool.shutdown(wait=False)  # its thread ends after any batch still queued
        return out

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

    # -- encoding -------------------------------------------------------------------------
    def _ids(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Ids without EOS, flat, and the int64 offsets of each text (len n + 1)."""
        with _panics_as_errors(self.identifier):
            eng = self._engine()
            if self.engine == "fastokens":
                ids, offs = self._on_bpe_thread(
                    lambda: eng.encode_batch_flat(
                        texts, add_special_tokens=False, split_special_tokens=self.special_tokens_as_text
                    )
                )
                return np.frombuffer(ids, dtype="<u4"), np.frombuffer(offs, dtype="<u8").astype(np.int64)
            if self.engine == "tokenizers":
                encodings = eng.encode_batch(texts, add_special_tokens=False)
                pieces = [np.asarray(e.ids, dtype=np.uint32) for e in encodings]
            else:
                pieces = [
                    np.asarray(eng.encode(t, allowed_special=self._allowed, disallowed_special=()), dtype=np.uint32)
                    for t in texts
                ]
        offsets = np.zeros(len(pieces) + 1, dtype=np.int64)
        np.cumsum([len(p) for p in pieces], out=offsets[1:])
        flat = np.concatenate(pieces) if pieces else np.empty(0, np.uint32)
        return flat.astype(np.uint32, copy=False), offsets

    def encode_reference(self, text: str) -> list[int]:
        """The ``tokenizers`` engine on one text, whatever engine is in use."""
        with _panics_as_errors(self.identifier):
            return list(self._reference().encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        with _panics_as_errors(self.identifier):
            return str(self._reference().decode(ids, skip_special_tokens=False))

    def encode_batch(self, texts: Texts) -> tuple[np.ndarray, np.ndarray]:
        """Flat uint32 ids with an EOS after every document, and the int64 document offsets."""
        docs = _python_texts(texts)
        ids, offs = self._ids(docs)
        self._cross_check(docs, ids, offs)
        n = len(docs)
        new_offs = offs + np.arange(n + 1, dtype=np.int64)
        out = np.empty(len(ids) + n, dtype=np.uint32)
        eos_at = new_offs[1:] - 1
        keep = np.ones(len(out), dtype=bool)
        keep[eos_at] = False
        out[keep] = ids
        out[eos_at] = self.eos
        return out, new_offs

    def tokens_column(self, texts: Texts) -> pa.Array:
        """The staged ``large_list<uint32>`` column (EOS included)."""
        return tokens_column(*self.encode_batch(texts))

    def keep(self, texts: Texts) -> np.ndarray | None:
        """None, or a mask of the documents to tokenize: a document holding a "word" (a run with
        no ASCII whitespace) longer than ``MAX_WORD_BYTES`` is refused. BPE cost and memory grow
        with the longest pre-token (one 50 MB run of a letter: 31 s and 2.6 GB in fastokens), and
        such runs are not text. Only documents that may be longer than the cap are looked at."""
        docs = _python_texts(texts)
        mask: np.ndarray | None = None
        for i, text in enumerate(docs):
            if len(text) * 4 <= MAX_WORD_BYTES:  # UTF-8 is at most 4 bytes a character
                continue
            data = np.frombuffer(text.encode("utf-8", "surrogatepass"), dtype=np.uint8)
            if len(data) > MAX_WORD_BYTES and _longest_run(data) > MAX_WORD_BYTES:
                if mask is None:
                    mask = np.ones(len(docs), dtype=bool)
                mask[i] = False
        return mask

    def _cross_check(self, docs: list[str], ids: np.ndarray, offs: np.ndarray) -> None:
        """Every ``check_every``-th document (counted over this tokenizer's life) is encoded again by
        the reference; a difference stops the run (an engine that is wrong must never be quiet)."""
        if self.engine == "tokenizers" or not self.check_every:
            return
        # Documents check_every - 1, 2 * check_every - 1, ...: a run shorter than that (a smoke
        # test) never pays for building the reference engine.
        first = (self.check_every - 1 - self._seen) % self.check_every
        self._seen += len(docs)
        for i in range(first, len(docs), self.check_every):
            got = ids[offs[i] : offs[i + 1]].tolist()
            want = self.encode_reference(docs[i])
            if got != want:
                raise EngineMismatch(
                    f"the {self.engine} engine gave different ids than the tokenizers reference for a document "
                    f"({len(docs[i])} characters, starting {docs[i][:40]!r}). Nothing wrong was staged for it. Rerun "
                    "with --engine tokenizers, and please report the document."
                )


# ---------------------------------------------------------------------------------------------
# the probe's result, remembered


#: The version of what the probe checks (``SubwordTokenizer.__init__``, ``_probe``, ``PROBE_TEXTS``):
#: bump it when a check changes, and every remembered result is probed again.
PROBE_VERSION = 1


#: Where passed probes are remembered (``tokcache.cache_dir``).
probe_cache_dir = cache_dir


def _package_identity(name: str) -> str:
    """An installed package as the probe's result depends on it: its version (the name of its
    dist-info folder) and the size and time of each of its top-level files (a rebuild of the
    same version counts as another engine); ``absent`` when it is not installed."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(name)
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        if not locations:
            return f"{name}: absent"
        pkg = Path(locations[0])
        files = sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(pkg) if e.is_file())
        dists = sorted(
            e.name for e in os.scandir(pkg.parent) if e.name.startswith(f"{name}-") and e.name.endswith(".dist-info")
        )
    except (OSError, ImportError, ValueError) as exc:
        return f"{name}: unknown ({exc})"  # a key no entry is stored under twice alike: probed again
    return json.dumps([name, dists, files])


def _probe_key(source: TokenizerSource, eos_token_id: int | None, special_tokens_as_text: bool, engine: str) -> str:
    """Everything the probe's result depends on, hashed: the tokenizer JSON and config, the
    options, what the probe checks and the engines installed (the reference runs the probe;
    fastokens' presence decides ``auto``)."""
    material = {
        "probe": PROBE_VERSION,
        "texts": list(PROBE_TEXTS),
        "tokenizer_json": hashlib.sha256(source.json_text.encode("utf-8", "surrogatepass")).hexdigest(),
        "config": json.dumps(source.config, sort_keys=True, default=repr),
        "eos_token_id": eos_token_id,
        "special_tokens_as_text": special_tokens_as_text,
        "engine": engine,
        "engines": [_package_identity("tokenizers"), _package_identity("fastokens")],
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode("utf-8")).hexdigest()


def _remembered(
    folder: Path,
    key: str,
    source: TokenizerSource,
    eos_token_id: int | None,
    special_tokens_as_text: bool,
    engine: str,
) -> TokenizerInfo | None:
    """The result stored under ``key`` (None: none, one that does not read back whole, or one that
    contradicts what can be checked without parsing the JSON: this file's fingerprint, the
    options, an engine the probe could have chosen, an EOS that fits uint32). Workers build
    from it as it is: an entry copied under another key must not give its EOS to these shards."""
    try:
        entry = json.loads((folder / f"probe-{key}.json").read_text(encoding="utf-8"))
        if entry.get("key") != key:
            return None
        info = TokenizerInfo(**{**entry["info"], "identifier": source.identifier})
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        log.debug("probe cache: entry %s unreadable (%s): probing again", key[:12], exc)
        return None
    if info.kind != "subword" or not isinstance(info.eos_token_id, int) or not isinstance(info.vocab_size, int):
        return None
    consistent = (
        info.fingerprint == tokenizer_fingerprint(source.json_text)
        and info.special_tokens_as_text is special_tokens_as_text
        and info.engine in ("fastokens", "tokenizers")
        and engine in ("auto", info.engine)
        and eos_token_id in (None, info.eos_token_id)
        and 0 <= info.eos_token_id < 2**32
        and info.vocab_size > 0
    )
    if not consistent:
        log.debug("probe cache: entry %s does not match its tokenizer: probing again", key[:12])
        return None
    return info


def _remember(folder: Path, key: str, info: TokenizerInfo) -> None:
    """Store a passed probe's result (written whole, then renamed; a failure only costs a probe)."""
    record = {k: v for k, v in info.to_json().items() if k != "identifier"}
    tmp = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".probe-", suffix=".tmp", dir=folder)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"key": key, "info": record}, f)
        os.replace(tmp, folder / f"probe-{key}.json")
        tmp = None
    except OSError as exc:
        log.debug("probe cache: could not write to %s (%s)", folder, exc)
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def checked_info(
    source: TokenizerSource,
    *,
    eos_token_id: int | None = None,
    special_tokens_as_text: bool = True,
    engine: str = "auto",
    check_every: int = DEFAULT_CHECK_EVERY,
) -> TokenizerInfo:
    """What the coordinator checks once per run: the tokenizer loads, passes the probe, has an EOS
    (``SubwordTokenizer``'s checks), as the ``TokenizerInfo`` workers build from (``checked``).

    A passed probe is remembered (``probe_cache_dir``) under everything that decides its result
    (``_probe_key``): the same tokenizer and options with the same engines installed are not
    probed again (parsing the JSON and building the reference engine: 0.4 s of a 0.1% run for
    dolma2, holding the GIL). Another tokenizer file, config, option, engine version or probe
    version is another key, probed afresh; a refused tokenizer is never remembered. tiktoken's
    own exactness check is not remembered (its engine needs the parsed JSON anyway)."""
    if engine not in ENGINES:
        resolve_engine(engine)  # the usage error
    if check_every < 0:
        raise TokenizerError("--check-every must be 0 (off) or a positive number of documents")
    folder = probe_cache_dir() if engine != "tiktoken" else None
    key = _probe_key(source, eos_token_id, special_tokens_as_text, engine) if folder is not None else ""
    if folder is not None:
        info = _remembered(folder, key, source, eos_token_id, special_tokens_as_text, engine)
        if info is not None:
            log.debug("tokenizer %s: passed the probe before (%s): not probed again", source.identifier, key[:12])
            return info
    probe = SubwordTokenizer(
        source,
        eos_token_id=eos_token_id,
        special_tokens_as_text=special_tokens_as_text,
        engine=engine,
        check_every=check_every,
    )
    if folder is not None:
        _remember(folder, key, probe.info)
    return probe.info


def parse_tokenizer_json(source: TokenizerSource) -> dict[str, Any]:
    """The tokenizer JSON as a dict, or a TokenizerError naming what is wrong with it."""
    if len(source.json_text) > MAX_TOKENIZER_BYTES:
        raise TokenizerError(
            f"{source.identifier}: the tokenizer JSON is {len(source.json_text) / 1e6:.0f} MB, over the "
            f"{MAX_TOKENIZER_BYTES >> 20} MiB this tool accepts; check --tokenizer-identifier."
        )
    try:
        spec = json.loads(source.json_text)
    except RecursionError as exc:
        raise TokenizerError(f"{source.identifier}: the tokenizer JSON nests too deep to be a tokenizer") from exc
    except ValueError as exc:
        raise TokenizerError(f"{source.identifier}: not a valid tokenizers JSON ({exc})") from exc
    if not isinstance(spec, dict) or not isinstance(spec.get("model"), dict):
        raise TokenizerError(f"{source.identifier}: not a tokenizers JSON (no 'model' object)")
    added = spec.get("added_tokens", [])
    if not isinstance(added, list) or not all(
        isinstance(a, dict) and isinstance(a.get("content"), str) and isinstance(a.get("id"), int) for a in added
    ):
        raise TokenizerError(f"{source.identifier}: malformed 'added_tokens' in the tokenizer JSON")
    vocab = spec["model"].get("vocab")
    if vocab is not None and not isinstance(vocab, dict):
        raise TokenizerError(f"{source.identifier}: the tokenizer's vocabulary is not an object")
    return spec


def tiktoken_exact(spec: dict[str, Any], reference: Callable[[], Any]) -> str | None:
    """None if tiktoken gives the reference's ids for ``spec``, else the reason it does not.

    The structure must convert (``tiktoken_convertible``), and then every vocabulary entry that
    is valid UTF-8 is encoded by both engines: tiktoken merges by the rank of the *result*,
    ``tokenizers`` only along its listed merges, so a vocabulary reachable by a merge tiktoken
    would take but the merge list does not (e.g. ``bc``, ``ab``, ``abc`` with merges ``b c``,
    ``a b``, ``ab c``) shows up as a difference on that entry's own text.
    """
    conv = tiktoken_convertible(spec)
    if isinstance(conv, str):
        return conv
    import tiktoken

    ranks, pattern = conv
    added = {a["content"]: a["id"] for a in spec.get("added_tokens", [])}
    enc = tiktoken.Encoding(name="probe", pat_str=pattern, mergeable_ranks=ranks, special_tokens=added)
    texts = []
    for tok in ranks:
        with contextlib.suppress(UnicodeDecodeError):
            texts.append(tok.decode("utf-8"))
    hf = reference()
    ref = hf.encode_batch(texts, add_special_tokens=False)
    for text, r in zip(texts, ref, strict=True):
        got = enc.encode(text, allowed_special=set(), disallowed_special=())
        if got != r.ids:
            return f"tiktoken encodes {text!r} as {got}, tokenizers as {r.ids}"
    return None


#: Every tokenizer has ``info`` (TokenizerInfo), ``encode_batch(texts) -> (flat uint32 ids, int64
#: offsets of len n+1)`` with an EOS after each document, and ``tokens_column(texts)``: the
#: staged ``tokens`` column (see ``staging``).
AnyTokenizer = ByteTokenizer | SubwordTokenizer


@dataclass(frozen=True)
class TokenizerSpec:
    """What a worker needs to build the run's tokenizer (picklable, a few MB for subword)."""

    kind: str
    source: TokenizerSource | None = None
    eos_token_id: int | None = None
    special_tokens_as_text: bool = True
    engine: str = "auto"
    check_every: int = DEFAULT_CHECK_EVERY
    checked: TokenizerInfo | None = None  # set by the coordinator once it has checked the source

    def build(self) -> AnyTokenizer:
        if self.kind == "byte":
            return ByteTokenizer()
        if self.kind != "subword" or self.source is None:
            raise TokenizerError(f"--tokenizer must be 'byte' or 'subword', got {self.kind!r}")
        return SubwordTokenizer(
            self.source,
            eos_token_id=self.eos_token_id,
            special_tokens_as_text=self.special_tokens_as_text,
            engine=self.engine,
            check_every=self.check_every,
            checked=self.checked,
        )
