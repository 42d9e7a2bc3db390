"""Byte layout (FORMATS.md), dolma2 facts, tiktoken == tokenizers, special tokens in raw text."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bolmo_async.errors import TokenizerError
from bolmo_async.models import tokenizer_fingerprint
from bolmo_async.tokenize import (
    BYTE_EOS,
    ByteTokenizer,
    SubwordTokenizer,
    TokenizerSource,
    decode_bytes,
    load_tokenizer_source,
    tokens_column,
)

from .conftest import DOLMA2, needs_dolma2
from .helpers import readme_bpe_json


def encode_texts(tok: SubwordTokenizer, texts: list[str]) -> list[list[int]]:
    """Ids without EOS, one list per text, through the run's own batch path."""
    flat, offsets = tok.encode_batch(texts)
    return [flat[offsets[i] : offsets[i + 1] - 1].tolist() for i in range(len(texts))]


def _byte(texts):
    return ByteTokenizer().encode_batch(pa.array(texts, pa.large_string()))


def test_byte_layout_is_utf8_plus_4_then_eos_1():
    flat, offsets = _byte(["Aé", "東"])
    # 'A' = 0x41 -> 69; 'é' = c3 a9 -> 199 173; EOS 1; '東' = e6 9d b1 -> 234 161 181; EOS 1
    assert flat.dtype == np.uint32
    assert flat.tolist() == [69, 199, 173, 1, 234, 161, 181, 1]
    assert offsets.tolist() == [0, 4, 8]
    info = ByteTokenizer().info
    assert (info.eos_token_id, info.vocab_size) == (1, 260)


def test_byte_mode_keeps_special_strings_as_raw_bytes():
    flat, _ = _byte(["<|endoftext|>"])
    assert flat.tolist() == [b + 4 for b in b"<|endoftext|>"] + [1]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(min_size=1), min_size=1, max_size=20))
def test_byte_round_trip(texts):
    try:
        [t.encode("utf-8") for t in texts]
    except UnicodeEncodeError:
        return
    flat, offsets = _byte(texts)
    assert len(flat) == sum(len(t.encode()) + 1 for t in texts)
    for i, t in enumerate(texts):
        doc = flat[offsets[i] : offsets[i + 1]]
        assert doc[-1] == BYTE_EOS and decode_bytes(doc[:-1]) == t
        assert doc[:-1].min(initial=4) >= 4 and doc.max() <= 259


def test_byte_tokenizer_handles_sliced_arrays():
    arr = pa.array(["zero", "one", "two"], pa.large_string()).slice(1, 2)
    flat, offsets = ByteTokenizer().encode_batch(arr)
    assert decode_bytes(flat[: offsets[1] - 1]) == "one" and decode_bytes(flat[offsets[1] : -1]) == "two"


def test_the_staged_column_is_built_on_numpy_buffers_without_numpy_ma():
    """``tokens_column`` wraps the ids and offsets as they are (strided or another width
    included), and not through ``pa.array``, whose first numpy input imports numpy.ma."""
    import subprocess
    import sys

    flat = np.arange(20, dtype=np.uint16)[::2]  # strided, and narrower than the uint32 staged
    col = tokens_column(flat, np.array([0, 3, 3, 10], dtype=np.int32))
    assert col.type == pa.large_list(pa.uint32())
    assert col.to_pylist() == [[0, 2, 4], [], [6, 8, 10, 12, 14, 16, 18]]
    code = (
        "import sys, numpy as np\n"
        "from bolmo_async.tokenize import tokens_column\n"
        "tokens_column(np.arange(4, dtype=np.uint32), np.array([0, 4]))\n"
        "print('numpy.ma' in sys.modules)"
    )
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
        == "False"
    )


def test_ids_of_a_type_that_may_not_fit_are_refused_not_wrapped():
    """A signed or wider id array (an engine's int64 ids, -1 for "none") was cast to the staged
    uint32 as it stood: -1 became 4294967295, a token id no vocabulary has, staged without a word.
    Refused by its dtype (no scan of the ids): every engine here gives uint32."""
    offsets = np.array([0, 2])
    for flat in (np.array([5, -1], dtype=np.int64), np.array([5, 2**32], dtype=np.uint64), np.array([5.0, 1.5])):
        with pytest.raises(TypeError, match=f"{flat.dtype} values as uint32"):
            tokens_column(flat, offsets)
    with pytest.raises(TypeError, match="uint64 values as int64"):
        tokens_column(np.array([5, 6], dtype=np.uint32), np.array([0, 2], dtype=np.uint64))


@pytest.fixture(scope="module")
def dolma2_source():
    if not DOLMA2.exists():
        pytest.skip("dolma2 tokenizer JSON absent")
    return load_tokenizer_source(str(DOLMA2))


@needs_dolma2
def test_dolma2_facts(dolma2_source):
    tok = SubwordTokenizer(dolma2_source)
    assert tok.eos == 100257
    assert tok.info.vocab_size == 100278
    assert tok._reference().token_to_id("<|pad|>") == 100277
    spec = json.loads(dolma2_source.json_text)
    assert spec["post_processor"] is None  # encoding adds no special tokens: we append EOS
    assert tok.info.engine == "fastokens"  # the default engine where it is installed
    # (offline matches the folder's and the cache's copies of the JSON by this one helper)
    assert tok.info.fingerprint == tokenizer_fingerprint(dolma2_source.json_text) == "3ca996cca8afea58"
    flat, _ = tok.encode_batch(pa.array(["Hello world"], pa.large_string()))
    assert flat.tolist() == [9906, 1917, 100257]


ALL_ENGINES = ("fastokens", "tiktoken", "tokenizers")


@needs_dolma2
@pytest.mark.parametrize("engine", ALL_ENGINES)
def test_special_tokens_in_text_default_and_dolma_mode(dolma2_source, engine):
    text = "a <|endoftext|> b <|pad|> c |||EMAIL_ADDRESS||| d"
    ids = encode_texts(SubwordTokenizer(dolma2_source, engine=engine), [text])[0]
    assert 100257 not in ids and 100277 not in ids  # special strings stay text
    assert 100262 in ids  # non-special added token stays one token
    assert ids == SubwordTokenizer(dolma2_source).encode_reference(text)
    ids = encode_texts(SubwordTokenizer(dolma2_source, engine=engine, special_tokens_as_text=False), [text])[0]
    assert 100257 in ids and 100277 in ids and 100262 in ids


@needs_dolma2
@pytest.mark.parametrize("engine", ALL_ENGINES)
def test_engine_passes_the_exactness_harness(dolma2_source, sample_dir, engine):
    """The harness (adversarial corpus, every added token inside text, random Unicode, the
    sample's documents; both special-token policies) finds no difference from the reference."""
    from bolmo_async.exactness import adversarial_texts, compare, sample_texts

    texts = adversarial_texts(dolma2_source, seed=1, random_count=300) + sample_texts(sample_dir)[:400]
    assert len(texts) > 700
    assert compare(dolma2_source, engine, texts) == []


@needs_dolma2
@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=120)
        | st.sampled_from([" ", "  \n", "x ", " y", "\n\n", "|||EMAIL_ADDRESS|||", "a<|endoftext|>", "1 "]),
        min_size=1,
        max_size=10,
    )
)
def test_fastokens_batches_equal_each_document_alone(texts):
    """A batch in one fastokens call gives exactly each document's reference ids, then EOS;
    whitespace and special strings at document edges are where a batch could leak."""
    fast, ref = _engines()
    arr = pa.array(texts, pa.large_string())
    flat, offsets = fast.encode_batch(arr)
    want = [ref.encode_reference(t) for t in texts]
    assert flat.tolist() == [i for ids in want for i in [*ids, 100257]]
    assert offsets.tolist() == np.cumsum([0] + [len(x) + 1 for x in want]).tolist()


_ENGINES: dict = {}


def _engines():
    if not _ENGINES:
        src = load_tokenizer_source(str(DOLMA2))
        _ENGINES["fast"] = SubwordTokenizer(src, engine="fastokens", check_every=0)
        _ENGINES["hf"] = SubwordTokenizer(src, engine="tokenizers")
    return _ENGINES["fast"], _ENGINES["hf"]


@needs_dolma2
def test_byte_ids_equal_dolma2_encode_then_expand(sample_dir):
    """FORMATS.md: byte ids == dolma2 ids expanded to their bytes (+4), with EOS 1 for <|endoftext|>."""
    from .helpers import read_documents

    _, hf = _engines()
    texts = [t for p in sorted(sample_dir.rglob("data/*/*"))[:6] for _, _, t in read_documents(p)][:300]
    flat, offsets = _byte(texts)
    for i, t in enumerate(texts):
        ids = encode_texts(hf, [t])[0]
        expanded = b"".join(_id_bytes(hf, x) for x in ids)
        assert [b + 4 for b in expanded] + [1] == flat[offsets[i] : offsets[i + 1]].tolist()


def _id_bytes(tok, i: int) -> bytes:
    from bolmo_async.tokenize import _bytes_to_unicode

    if "u2b" not in _ENGINES:
        _ENGINES["u2b"] = {c: b for b, c in _bytes_to_unicode().items()}
    return bytes(_ENGINES["u2b"][c] for c in tok._reference().id_to_token(i))


def _tiny_bpe(vocab_extra: dict[str, int], merges: list[str]) -> TokenizerSource:
    """A byte-level BPE with all 256 bytes plus ``vocab_extra``, split regex + ByteLevel."""
    from bolmo_async.tokenize import _bytes_to_unicode

    vocab = {c: b for b, c in _bytes_to_unicode().items()}
    vocab.update(vocab_extra)
    n = max(vocab.values()) + 1
    spec = {
        "version": "1.0",
        "added_tokens": [
            {
                "id": n,
                "content": "<|endoftext|>",
                "special": True,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
            }
        ],
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": "\\S+|\\s+"}, "behavior": "Removed", "invert": True},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ],
        },
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": merges,
        },
    }
    return TokenizerSource("tiny", json.dumps(spec), {})


def test_tiktoken_is_refused_where_it_would_encode_differently():
    """vocab bc, ab, abc with merges `b c`, `a b`, `ab c`: tiktoken merges by the rank of the
    result and gives "abc" -> [abc]; tokenizers only follows listed merges: [a, bc]. The
    structural check alone accepts this BPE; the probe refuses it, and auto never picks tiktoken."""
    from bolmo_async.tokenize import tiktoken_convertible

    src = _tiny_bpe({"bc": 256, "ab": 257, "abc": 258}, ["b c", "a b", "ab c"])
    assert not isinstance(tiktoken_convertible(json.loads(src.json_text)), str)
    with pytest.raises(TokenizerError, match=r"cannot be converted exactly.*'abc'"):
        SubwordTokenizer(src, engine="tiktoken")
    ref = SubwordTokenizer(src, engine="tokenizers")
    assert encode_texts(ref, ["abc"]) == [[97, 256]]
    auto = SubwordTokenizer(src)
    assert auto.info.engine != "tiktoken" and encode_texts(auto, ["abc"]) == [[97, 256]]
    consistent = _tiny_bpe({"ab": 256, "abc": 257}, ["a b", "ab c"])
    assert encode_texts(SubwordTokenizer(consistent, engine="tiktoken"), ["abc"]) == [[257]]


def test_the_run_time_cross_check_stops_a_wrong_engine(monkeypatch):
    """An engine that disagrees with the reference on a checked document stops the run loudly."""
    from bolmo_async.tokenize import EngineMismatch

    src = _tiny_bpe({"ab": 256, "abc": 257}, ["a b", "ab c"])
    tok = SubwordTokenizer(src, engine="fastokens", check_every=3)
    texts = pa.array(["abc", "ab", "cab", "abcabc", "b"], pa.large_string())
    assert tok.encode_batch(texts)[0].tolist() == [257, 258, 256, 258, 99, 256, 258, 257, 257, 258, 98, 258]
    real = tok._ids

    def wrong(docs):
        flat, offs = real(docs)
        flat = flat.copy()
        flat[offs[-2]] = 0  # the last document's first id is wrong
        return flat, offs

    monkeypatch.setattr(tok, "_ids", wrong)
    tok._seen = 0
    tok.encode_batch(pa.array(["x", "ab"], pa.large_string()))  # documents 0, 1: none is checked
    with pytest.raises(EngineMismatch, match="--engine tokenizers"):
        tok.encode_batch(pa.array(["ab"], pa.large_string()))  # document 2 (every 3rd) is checked
    assert SubwordTokenizer(src, engine="fastokens", check_every=0).check_every == 0


@needs_dolma2
def test_unloadable_or_absurd_tokenizers_are_clear_errors(dolma2_source, tmp_path):
    spec = json.loads(dolma2_source.json_text)
    spec["normalizer"] = {"type": "NFC"}
    src = TokenizerSource("custom", json.dumps(spec), {})
    assert SubwordTokenizer(src, engine="tokenizers").info.engine == "tokenizers"
    with pytest.raises(TokenizerError, match="cannot be converted"):
        SubwordTokenizer(src, engine="tiktoken")
    deep = TokenizerSource("deep", "[" * 200_000 + "]" * 200_000, {})
    with pytest.raises(TokenizerError, match="nests too deep"):
        SubwordTokenizer(deep)
    with pytest.raises(TokenizerError, match="not a tokenizers JSON"):
        SubwordTokenizer(TokenizerSource("list", "[1, 2]", {}))
    big = tmp_path / "tokenizer.json"
    with open(big, "wb") as f:
        f.truncate(129 * 1024 * 1024)  # sparse: no real disk used
    with pytest.raises(TokenizerError, match="MiB"):
        load_tokenizer_source(str(big))


@needs_dolma2
def test_eos_override_and_missing_eos(dolma2_source):
    assert SubwordTokenizer(dolma2_source, eos_token_id=100277).eos == 100277
    spec = json.loads(dolma2_source.json_text)
    spec["added_tokens"] = [a for a in spec["added_tokens"] if a["content"] != "<|endoftext|>"]
    spec["model"]["vocab"].pop("<|endoftext|>", None)
    with pytest.raises(TokenizerError, match="--eos-token-id"):
        SubwordTokenizer(TokenizerSource("x", json.dumps(spec), {}), engine="tokenizers")


def test_bad_identifier_is_a_clear_error(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer"):
        load_tokenizer_source(str(tmp_path))  # a folder without tokenizer.json
    with pytest.raises(TokenizerError, match="neither a file"):
        load_tokenizer_source("not-a-repo-id")


def test_every_encode_runs_on_the_tokenizers_one_thread_whichever_thread_asks():
    """fastokens keeps its caches of encoded words per thread (100-200 MB each on words that do not
    repeat, as unspaced CJK runs): a tokenizer encodes on its one BPE thread, so a worker whose
    several decoding threads all tokenize holds one set of caches, not one per thread."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    tok = SubwordTokenizer(_tiny_bpe({"ab": 256, "abc": 257}, ["a b", "ab c"]), engine="fastokens", check_every=0)
    tok.warm()
    engine, threads = tok._engine_obj, set()

    class Recorder:  # the real engine, noting which thread runs it
        def encode_batch_flat(self, *args, **kwargs):
            threads.add(threading.current_thread().name)
            return engine.encode_batch_flat(*args, **kwargs)

    tok._engine_obj = Recorder()
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda n: encode_texts(tok, ["abc ab"] * n), range(1, 17)))
    want = tok.encode_reference("abc ab")
    assert len(want) == 3 and all(out == [want] * n for n, out in enumerate(outs, 1))
    assert len(threads) == 1 and threads.pop().startswith("bolmo-bpe")


def test_the_bpe_thread_is_replaced_once_the_process_grew_past_the_budget(monkeypatch):
    """fastokens' caches live as long as their thread: past ``BPE_CACHE_BUDGET`` of growth the
    thread is replaced after its batch (its caches freed with it), with the same ids."""
    import threading

    from bolmo_async import tokenize

    tok = SubwordTokenizer(_tiny_bpe({"ab": 256}, ["a b"]), engine="fastokens", check_every=0)
    tok.warm()
    engine, threads = tok._engine_obj, []

    class Recorder:  # the real engine, noting which thread runs it
        def encode_batch_flat(self, *args, **kwargs):
            threads.append(threading.current_thread())
            return engine.encode_batch_flat(*args, **kwargs)

    tok._engine_obj = Recorder()
    want = encode_texts(tok, ["ab a"])
    assert [encode_texts(tok, ["ab a"]) for _ in range(2)] == [want] * 2
    assert len(set(threads)) == 1  # within the budget: one thread
    monkeypatch.setattr(tokenize, "BPE_CACHE_BUDGET", -1)  # every batch is past it
    assert [encode_texts(tok, ["ab a"]) for _ in range(3)] == [want] * 3
    replaced = threads[2:]  # the first thread's last batch, then three on new threads
    assert len(set(replaced)) == 3
    for t in replaced[:-1]:
        t.join(5)  # ended: its caches are gone with it
        assert not t.is_alive()


def test_callers_on_several_threads_never_submit_to_a_replaced_bpe_thread(monkeypatch):
    """Decoding threads encode at once; one of them replacing the BPE thread (past the budget)
    shut it down between another's taking it and submitting to it: 'cannot schedule new futures
    after shutdown', a failed batch (a few in 1,800 here)."""
    import threading

    from bolmo_async import tokenize

    tok = SubwordTokenizer(_tiny_bpe({"ab": 256}, ["a b"]), engine="fastokens", check_every=0)
    tok.warm()
    want = encode_texts(tok, ["ab a"])
    monkeypatch.setattr(tokenize, "BPE_CACHE_BUDGET", -1)  # every batch replaces the thread
    errors: list[str] = []
    wrong: list[object] = []

    def caller() -> None:
        for _ in range(300):
            try:
                got = encode_texts(tok, ["ab a"])
            except Exception as exc:
                errors.append(repr(exc))
            else:
                if got != want:
                    wrong.append(got)

    threads = [threading.Thread(target=caller) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and wrong == []


def test_a_worker_in_the_probing_process_reuses_the_probes_reference_engine():
    """A small run's worker runs on a thread of the coordinator, which has just built the reference
    engine to probe the tokenizer: it takes that one (building dolma2's again was 0.3 s of a 0.1%
    run) until ``forget_probed``, which runs where the workers are other processes."""
    from bolmo_async.tokenize import TokenizerSpec, forget_probed

    src = _tiny_bpe({"ab": 256}, ["a b"])
    probe = SubwordTokenizer(src, engine="tokenizers")
    built = probe._hf_obj
    assert built is not None  # the probe built it
    spec = TokenizerSpec("subword", src, probe.eos, True, "tokenizers", 1000, probe.info)
    assert spec.build()._reference() is built
    other = TokenizerSpec("subword", src, probe.eos, False, "tokenizers", 1000, probe.info)
    assert other.build()._reference() is not built  # other options: its own engine
    forget_probed()
    again = spec.build()
    assert again._reference() is not built and encode_texts(again, ["ab"]) == [[256]]


@needs_dolma2
def test_the_tokenizer_pickles_as_its_recipe(dolma2_source):
    import pickle

    tok = SubwordTokenizer(dolma2_source)
    tok.warm()
    clone = pickle.loads(pickle.dumps(tok))
    assert clone._engine_obj is None and clone._hf_obj is None  # engines are rebuilt where used
    arr = pa.array(["round trip |||EMAIL_ADDRESS|||"], pa.large_string())
    assert clone.encode_batch(arr)[0].tolist() == tok.encode_batch(arr)[0].tolist()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=50), min_size=1, max_size=10), st.data())
def test_staged_byte_documents_expand_to_the_byte_layout(texts, data):
    """Byte mode stages each document's UTF-8 bytes and a 0 where its EOS goes; `expand` gives the
    ids of any range of documents, or any token range of one document (a document split across
    shards), exactly, and the same as `byte_ids` on the texts."""
    from bolmo_async.staging import expand, token_lengths
    from bolmo_async.tokenize import byte_ids, string_array

    texts = [t.encode("utf-8", "surrogatepass").decode("utf-8", "replace") for t in texts]
    docs = [t.encode("utf-8") for t in texts]
    col = ByteTokenizer().tokens_column(texts)
    assert col.type == pa.large_binary() and col.to_pylist() == [d + b"\0" for d in docs]
    ref = [[b + 4 for b in d] + [1] for d in docs]
    assert byte_ids(string_array(texts))[0].tolist() == [i for r in ref for i in r]
    assert token_lengths(col).tolist() == [len(r) for r in ref]
    lo = data.draw(st.integers(0, len(docs) - 1))
    hi = data.draw(st.integers(lo + 1, len(docs)))
    assert expand(col, lo, hi).tolist() == [i for r in ref[lo:hi] for i in r]
    a = data.draw(st.integers(0, len(ref[lo]) - 1))
    b = data.draw(st.integers(a + 1, len(ref[lo])))
    assert expand(col, lo, lo + 1, a, b).tolist() == ref[lo][a:b]
    out = np.full(b - a, 7, dtype=np.uint32)  # into a block, as shards are written
    assert expand(col, lo, lo + 1, a, b, out=out) is out and out.tolist() == ref[lo][a:b]
    sliced = col.slice(1)
    assert expand(sliced, 0, len(sliced)).tolist() == [i for r in ref[1:] for i in r]


def test_importing_the_tokenizer_stays_light():
    """``bolmo_async.tokenize`` (and the package) must not pull in the HTTP stack or the pipeline
    modules on import, while the package's public functions still resolve on first use."""
    import subprocess
    import sys

    code = (
        "import sys, bolmo_async.tokenize\n"
        "heavy = sorted(m for m in ('aiohttp', 'huggingface_hub', 'bolmo_async.api', 'bolmo_async.pool') if m in sys.modules)\n"
        "import bolmo_async\n"
        "from bolmo_async import finalize\n"
        "print(heavy, bolmo_async.fetch.__module__, finalize.__module__, bolmo_async.prepare.__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["[]", "bolmo_async.api", "bolmo_async.api", "prepare"]


def test_string_array_is_the_utf8_of_every_text():
    """Byte mode stages the texts' UTF-8 built from one bytes (not Arrow's builder): the same
    column Arrow would build, for ASCII, multi-byte, astral and empty texts alike."""
    from bolmo_async.tokenize import string_array

    texts = ["plain", "", "é東", "🚀 rocket", "x" * 70_000, "\x00nul"]
    got = string_array(texts)
    assert got.type == pa.large_string()
    assert got.equals(pa.array(texts, pa.large_string()))
    assert string_array([]).to_pylist() == []


# -- hostile tokenizers: refused at load, in one line -------------------------------------------


def _with(src: TokenizerSource, **changes) -> TokenizerSource:
    spec = json.loads(src.json_text)
    for path, value in changes.items():
        *parents, last = path.split("__")
        node = spec
        for p in parents:
            node = node[p]
        node[last] = value
    return TokenizerSource("crafted", json.dumps(spec), {})


PANICS = {"normalizer": {"type": "Replace", "pattern": {"Regex": ""}, "content": "x"}}


def test_a_tokenizer_that_panics_is_refused_at_load_in_one_line(capfd):
    """A Replace normalizer with an empty pattern makes `tokenizers` panic (pyo3's PanicException,
    a BaseException that escaped every handler and hung the run). The load-time probe refuses it
    with a TokenizerError, and Rust's own panic message is not printed."""
    src = _with(_tiny_bpe({}, []), **PANICS)
    for engine in ("auto", "fastokens", "tokenizers"):
        with pytest.raises(TokenizerError, match=r"crashed on this tokenizer.*panic"):
            SubwordTokenizer(src, engine=engine, check_every=1)
    assert "panicked" not in capfd.readouterr().err


def test_a_panic_while_encoding_is_a_tokenizer_error():
    """Past the probe (a worker builds from what the coordinator checked), a panic on some document
    is a TokenizerError, which stops the run in one line, never a BaseException."""
    from bolmo_async.models import TokenizerInfo

    src = _with(_tiny_bpe({}, []), **PANICS)
    info = TokenizerInfo("subword", "crafted", 256, 257, "f", "tokenizers")
    tok = SubwordTokenizer(src, engine="tokenizers", checked=info)
    with pytest.raises(TokenizerError, match="panic"):
        tok.encode_batch(["hello world"])


def test_an_empty_vocabulary_is_refused():
    """Every document would become just EOS (400 documents -> 400 tokens, exit 0, before)."""
    src = _with(_tiny_bpe({}, []), model__vocab={}, model__merges=[])
    with pytest.raises(TokenizerError, match="vocabulary is empty"):
        SubwordTokenizer(src)


def _readme_bpe() -> TokenizerSource:
    return TokenizerSource("readme-bpe", readme_bpe_json(), {})


def test_auto_picks_fastokens_only_for_byte_level_bpe_with_every_byte():
    """fastokens splits "ab c" at the unknown space where tokenizers drops it and merges across:
    auto runs such a tokenizer on the reference; a GPT-2-style byte-level BPE gets fastokens."""
    from bolmo_async.tokenize import fastokens_available

    if not fastokens_available():
        pytest.skip("fastokens is not installed")
    readme = SubwordTokenizer(_readme_bpe())
    assert readme.info.engine == "tokenizers"
    assert encode_texts(readme, ["ab c"]) == encode_texts(
        SubwordTokenizer(_readme_bpe(), engine="tokenizers"), ["ab c"]
    )
    assert SubwordTokenizer(_readme_bpe(), engine="fastokens").info.engine == "fastokens"  # when asked
    assert SubwordTokenizer(_tiny_bpe({"ab": 256}, ["a b"])).info.engine == "fastokens"
    missing_byte = _with(_tiny_bpe({}, []), model__vocab={c: i for i, c in enumerate("abcdefghij")})
    assert SubwordTokenizer(missing_byte).info.engine == "tokenizers"
    assert SubwordTokenizer(_with(_tiny_bpe({}, []), normalizer={"type": "NFC"})).info.engine == "tokenizers"


@needs_dolma2
def test_dolma2_still_gets_fastokens():
    from bolmo_async.tokenize import fastokens_available

    if not fastokens_available():
        pytest.skip("fastokens is not installed")
    assert SubwordTokenizer(load_tokenizer_source(str(DOLMA2))).info.engine == "fastokens"


# -- the probe's result, remembered ----------------------------------------------------------


def _probed_now(src: TokenizerSource, **options) -> bool:
    """``checked_info`` on ``src``: whether it probed (built the reference engine) this time."""
    from bolmo_async import tokenize

    tokenize.forget_probed()
    tokenize.checked_info(src, **options)
    return bool(tokenize._PROBED)


def test_a_passed_probe_is_remembered_outside_the_output(tmp_path, monkeypatch):
    """The same tokenizer, options and engines: probed once, then read back (the same info, named
    by this run's identifier), from the user's cache folder ($XDG_CACHE_HOME/bolmo-async)."""
    from bolmo_async.tokenize import checked_info, probe_cache_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert probe_cache_dir() == tmp_path / "xdg" / "bolmo-async"
    src = _tiny_bpe({"ab": 256}, ["a b"])
    first = checked_info(src, engine="tokenizers")
    assert len(list((tmp_path / "xdg" / "bolmo-async").glob("probe-*.json"))) == 1
    assert not _probed_now(src, engine="tokenizers")
    again = checked_info(TokenizerSource("elsewhere/same", src.json_text, src.config), engine="tokenizers")
    assert again == dataclasses.replace(first, identifier="elsewhere/same")
    # Other options are other results: probed.
    assert _probed_now(src, engine="tokenizers", special_tokens_as_text=False)
    assert _probed_now(src, engine="tokenizers", eos_token_id=5)
    assert _probed_now(TokenizerSource(src.identifier, src.json_text, {"eos_token": "a"}), engine="tokenizers")
    monkeypatch.setenv("BOLMO_ASYNC_CACHE", "")  # set empty: nothing remembered, nothing read
    assert probe_cache_dir() is None
    assert _probed_now(src, engine="tokenizers")


def test_a_changed_tokenizer_file_is_probed_again(tmp_path):
    """One byte of the JSON changed (even a space): probed again, and a tokenizer the probe
    refuses is refused, though a passing one of the same name was remembered."""
    from bolmo_async.tokenize import checked_info

    good = _tiny_bpe({"ab": 256}, ["a b"])
    assert _probed_now(good, engine="tokenizers")
    assert not _probed_now(good, engine="tokenizers")
    other = TokenizerSource(good.identifier, good.json_text + " ", good.config)
    assert _probed_now(other, engine="tokenizers")
    panics = _with(good, **PANICS)
    for _ in range(2):  # refused, and never remembered
        with pytest.raises(TokenizerError, match="crashed on this tokenizer"):
            checked_info(panics, engine="tokenizers")


def test_another_engine_version_is_probed_again(monkeypatch):
    """An entry stands for the engines installed when it was probed: another version of the
    reference (or fastokens installed, removed, rebuilt) probes again."""
    from bolmo_async import tokenize

    src = _tiny_bpe({"ab": 256}, ["a b"])
    assert _probed_now(src)
    assert not _probed_now(src)
    real = tokenize._package_identity
    assert "tokenizers-" in real("tokenizers") and real("no_such_engine_pkg") == "no_such_engine_pkg: absent"
    monkeypatch.setattr(
        tokenize, "_package_identity", lambda name: real(name) + (" upgraded" if name == "tokenizers" else "")
    )
    assert _probed_now(src)
    assert not _probed_now(src)
    monkeypatch.setattr(
        tokenize, "_package_identity", lambda name: real(name) + (" rebuilt" if name == "fastokens" else "")
    )
    assert _probed_now(src)
    monkeypatch.setattr(tokenize, "PROBE_VERSION", tokenize.PROBE_VERSION + 1)  # what the probe checks changed
    assert _probed_now(src)


def test_a_damaged_entry_is_probed_again_and_replaced(tmp_path, monkeypatch):
    from bolmo_async.tokenize import checked_info

    monkeypatch.setenv("BOLMO_ASYNC_CACHE", str(tmp_path / "c"))
    src = _tiny_bpe({"ab": 256}, ["a b"])
    info = checked_info(src, engine="tokenizers")
    (entry,) = (tmp_path / "c").glob("probe-*.json")
    for damage in ("", "{", '{"key": "x", "info": {}}', json.dumps({"key": entry.stem[6:], "info": {"kind": 1}})):
        entry.write_text(damage)
        assert _probed_now(src, engine="tokenizers")
        assert checked_info(src, engine="tokenizers") == info
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("BOLMO_ASYNC_CACHE", str(tmp_path / "a-file"))  # a cache it cannot write: probed, no error
    assert checked_info(src, engine="tokenizers") == info
    assert _probed_now(src, engine="tokenizers")


def test_a_tokenizer_repos_files_are_fetched_together(tmp_path):
    """tokenizer.json and tokenizer_config.json of a Hub repo: requested at the same time (on a
    link with a 1 s round trip, one after the other took 2 s), each answer or error given when its
    file is asked for."""
    import time

    from bolmo_async.api import _model_file_fetcher
    from bolmo_async.mirror import MirrorRepo, MirrorThread, WanConfig
    from bolmo_async.tokenize import load_tokenizer_source

    src = _tiny_bpe({"ab": 256}, ["a b"])
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text(src.json_text)
    (tmp_path / "tok" / "tokenizer_config.json").write_text('{"eos_token": "<|endoftext|>"}')
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README.md").write_text("no tokenizer here")
    repos = [MirrorRepo("demo/tok", tmp_path / "tok", "model"), MirrorRepo("demo/empty", tmp_path / "empty", "model")]
    with MirrorThread(repos, wan=WanConfig(rtt=1.0)) as m:
        started = time.perf_counter()
        got = load_tokenizer_source("demo/tok", fetch=_model_file_fetcher(m.endpoint))
        took = time.perf_counter() - started
        assert got.json_text == src.json_text and got.config == {"eos_token": "<|endoftext|>"}
        assert took < 1.8, f"{took:.2f} s: the two files were fetched one after the other"
        with pytest.raises(TokenizerError, match=r"has no tokenizer\.json"):
            load_tokenizer_source("demo/empty", fetch=_model_file_fetcher(m.endpoint))


def test_an_entry_that_contradicts_its_tokenizer_is_probed_again(tmp_path, monkeypatch):
    """Workers build from a remembered entry as it is (its EOS goes after every document): one
    that reads back whole but does not belong to this file and these options (copied under
    another key, another tool's, edited) is probed again and replaced, never used."""
    from bolmo_async.tokenize import checked_info

    monkeypatch.setenv("BOLMO_ASYNC_CACHE", str(tmp_path / "c"))
    src = _tiny_bpe({"ab": 256}, ["a b"])
    info = checked_info(src, engine="tokenizers")
    (entry,) = (tmp_path / "c").glob("probe-*.json")
    good = json.loads(entry.read_text())
    for change in (
        {"fingerprint": "0" * 16},  # another tokenizer file's result
        {"special_tokens_as_text": not info.special_tokens_as_text},
        {"engine": "tiktoken"},
        {"engine": "no-such-engine"},
        {"eos_token_id": -1},
        {"eos_token_id": 2**32},
        {"vocab_size": 0},
    ):
        entry.write_text(json.dumps({**good, "info": {**good["info"], **change}}))
        assert _probed_now(src, engine="tokenizers"), change
        assert checked_info(src, engine="tokenizers") == info
