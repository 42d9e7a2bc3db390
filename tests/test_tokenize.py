"""Byte layout (FORMATS.md), dolma2 facts, tiktoken == tokenizers, special tokens in raw text."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bolmo_async.errors import TokenizerError
from bolmo_async.tokenize import (
    BYTE_EOS,
    ByteTokenizer,
    SubwordTokenizer,
    TokenizerSource,
    decode_bytes,
    load_tokenizer_source,
)

from .conftest import DOLMA2, needs_dolma2


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
    assert tok._hf.token_to_id("<|pad|>") == 100277
    spec = json.loads(dolma2_source.json_text)
    assert spec["post_processor"] is None  # encoding adds no special tokens: we append EOS
    assert tok.info.engine == "tiktoken"
    flat, _ = tok.encode_batch(pa.array(["Hello world"], pa.large_string()))
    assert flat.tolist() == [9906, 1917, 100257]


@needs_dolma2
def test_special_tokens_in_text_default_and_dolma_mode(dolma2_source):
    text = "a <|endoftext|> b <|pad|> c |||EMAIL_ADDRESS||| d"
    default = SubwordTokenizer(dolma2_source)
    for engine in ("tiktoken", "tokenizers"):
        ids = SubwordTokenizer(dolma2_source, engine=engine).encode_texts([text])[0]
        assert 100257 not in ids and 100277 not in ids  # special strings stay text
        assert 100262 in ids  # non-special added token stays one token
        assert ids == default.encode_reference(text)
    for engine in ("tiktoken", "tokenizers"):
        ids = SubwordTokenizer(dolma2_source, engine=engine, special_tokens_as_text=False).encode_texts([text])[0]
        assert 100257 in ids and 100277 in ids and 100262 in ids


@needs_dolma2
@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200), min_size=1, max_size=8))
def test_tiktoken_equals_tokenizers_on_random_unicode(texts):
    tt, hf = _engines()
    assert tt.encode_texts(texts) == hf.encode_texts(texts)


_ENGINES: dict = {}


def _engines():
    if not _ENGINES:
        src = load_tokenizer_source(str(DOLMA2))
        _ENGINES["tt"] = SubwordTokenizer(src, engine="tiktoken")
        _ENGINES["hf"] = SubwordTokenizer(src, engine="tokenizers")
    return _ENGINES["tt"], _ENGINES["hf"]


@needs_dolma2
def test_tiktoken_equals_tokenizers_on_the_sample(sample_dir):
    from .helpers import read_documents

    tt, hf = _engines()
    texts = [t for p in sorted(sample_dir.rglob("data/*/*")) for _, _, t in read_documents(p)]
    assert len(texts) > 500
    assert tt.encode_texts(texts) == hf.encode_texts(texts)


@needs_dolma2
def test_byte_ids_equal_dolma2_encode_then_expand(sample_dir):
    """FORMATS.md: byte ids == dolma2 ids expanded to their bytes (+4), with EOS 1 for <|endoftext|>."""
    from .helpers import read_documents

    _, hf = _engines()
    texts = [t for p in sorted(sample_dir.rglob("data/*/*"))[:6] for _, _, t in read_documents(p)][:300]
    flat, offsets = _byte(texts)
    for i, t in enumerate(texts):
        ids = hf.encode_texts([t])[0]
        expanded = b"".join(_id_bytes(hf, x) for x in ids)
        assert [b + 4 for b in expanded] + [1] == flat[offsets[i] : offsets[i + 1]].tolist()


def _id_bytes(tok, i: int) -> bytes:
    from bolmo_async.tokenize import _bytes_to_unicode

    if "u2b" not in _ENGINES:
        _ENGINES["u2b"] = {c: b for b, c in _bytes_to_unicode().items()}
    return bytes(_ENGINES["u2b"][c] for c in tok._hf.id_to_token(i))


@needs_dolma2
def test_unconvertible_tokenizer_falls_back_to_tokenizers(dolma2_source, caplog):
    spec = json.loads(dolma2_source.json_text)
    spec["normalizer"] = {"type": "NFC"}
    src = TokenizerSource("custom", json.dumps(spec), {})
    with caplog.at_level("INFO", logger="bolmo_async"):
        tok = SubwordTokenizer(src)
    assert tok.info.engine == "tokenizers"
    assert "normalizer" in caplog.text
    with pytest.raises(TokenizerError, match="cannot be converted"):
        SubwordTokenizer(src, engine="tiktoken")


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


def _with_eos(per_doc: list[list[int]], eos: int) -> list[int]:
    return [i for ids in per_doc for i in [*ids, eos]]


@needs_dolma2
@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=120)
        | st.sampled_from([" ", "  \n", "x ", " y", "\n\n", "|||EMAIL_ADDRESS|||", "a|||IP_ADDRESS|||", "1 "]),
        min_size=1,
        max_size=10,
    )
)
def test_a_batch_in_one_call_equals_each_document_alone(texts):
    """The joined fast path (documents separated by the EOS string in one tiktoken call) gives
    exactly the ids of encoding each document alone with `tokenizers`, then EOS; whitespace at
    document edges is where a join could leak across documents."""
    tt, hf = _engines()
    arr = pa.array(texts, pa.large_string())
    assert tt._encode_joined(arr) is not None  # the fast path is the one under test
    flat, offsets = tt.encode_batch(arr)
    assert flat.tolist() == _with_eos(hf.encode_texts(texts), 100257)
    assert offsets.tolist() == np.cumsum([0] + [len(x) + 1 for x in hf.encode_texts(texts)]).tolist()


@needs_dolma2
def test_a_batch_holding_the_eos_string_is_encoded_per_document(dolma2_source):
    texts = ["before", "a <|endoftext|> b", "after "]
    for as_text in (True, False):
        tok = SubwordTokenizer(dolma2_source, special_tokens_as_text=as_text)
        arr = pa.array(texts, pa.large_string())
        assert tok._encode_joined(arr) is None
        flat, offsets = tok.encode_batch(arr)
        assert flat.tolist() == _with_eos(tok.encode_texts(texts), 100257)
        assert len(offsets) == 4 and offsets[-1] == len(flat)
        assert (100257 in flat[offsets[1] : offsets[2] - 1].tolist()) is not as_text


@needs_dolma2
def test_batches_on_the_sample_equal_tokenizers_in_both_modes(sample_dir, dolma2_source):
    from .helpers import read_documents

    texts = [t for p in sorted(sample_dir.rglob("data/*/*")) for _, _, t in read_documents(p)]
    for as_text in (True, False):
        tt = SubwordTokenizer(dolma2_source, special_tokens_as_text=as_text)
        hf = SubwordTokenizer(dolma2_source, special_tokens_as_text=as_text, engine="tokenizers")
        for i in range(0, len(texts), 97):
            chunk = texts[i : i + 97]
            flat, _ = tt.encode_batch(pa.array(chunk, pa.large_string()))
            assert flat.tolist() == _with_eos(hf.encode_texts(chunk), tt.eos)


@needs_dolma2
def test_threads_and_worker_processes_give_the_same_ids(dolma2_source):
    from bolmo_async.tokenize import ProcessTokenizer

    texts = pa.array(["Hello world", "  spaces  ", "é東 |||PHONE_NUMBER|||", "<|pad|> x"] * 50, pa.large_string())
    threaded = SubwordTokenizer(dolma2_source, threads=2)
    procs = ProcessTokenizer(2).start(SubwordTokenizer(dolma2_source))
    try:
        expected = threaded.encode_batch(texts)
        got = procs.submit(texts).result()
        assert got.values.to_numpy().tolist() == expected[0].tolist()
        assert threaded.submit(texts).result().equals(got)
        assert procs.info == threaded.info
    finally:
        threaded.close()
        procs.close()


@needs_dolma2
def test_batches_in_flight_are_bounded_across_all_callers(dolma2_source):
    """However many files submit at once, at most 2 batches per worker wait in flight (memory is
    bounded by the configuration, not by how many files are open); every batch still completes."""
    import threading

    from bolmo_async.tokenize import ProcessTokenizer

    texts = pa.array(["a fairly ordinary sentence, tokenized again and again"] * 2000, pa.large_string())
    for tok in (SubwordTokenizer(dolma2_source, threads=2), ProcessTokenizer(2).start(SubwordTokenizer(dolma2_source))):
        futures: list = []
        seen: list[int] = []
        lock = threading.Lock()

        def caller(n: int, tok=tok, futures=futures, seen=seen, lock=lock) -> None:
            for _ in range(n):
                fut = tok.submit(texts)
                with lock:
                    futures.append(fut)
                    seen.append(sum(not f.done() for f in futures))

        try:
            threads = [threading.Thread(target=caller, args=(5,)) for _ in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            results = [f.result() for f in futures]
        finally:
            tok.close()
        assert len(results) == 20 and all(r.equals(results[0]) for r in results)
        assert max(seen) <= 4, seen


@needs_dolma2
def test_a_dead_worker_process_is_a_tokenizer_error(dolma2_source):
    import os
    import signal

    from bolmo_async.tokenize import ProcessTokenizer

    procs = ProcessTokenizer(2).start(SubwordTokenizer(dolma2_source))
    try:
        procs.submit(pa.array(["warm up"], pa.large_string())).result()
        for pid in list(procs._pool._processes):
            os.kill(pid, signal.SIGKILL)
        with pytest.raises(TokenizerError, match="worker process failed"):
            for _ in range(20):  # the pool notices the death at the next call at the latest
                procs.submit(pa.array(["x"], pa.large_string())).result(timeout=60)
    finally:
        procs.close()


def test_worker_processes_closed_before_a_tokenizer_arrives_exit_cleanly():
    from bolmo_async.tokenize import ProcessTokenizer

    ProcessTokenizer(2).close()  # must not hang waiting for workers that wait for a recipe


@needs_dolma2
def test_the_tokenizer_pickles_as_its_recipe(dolma2_source):
    import pickle

    tok = SubwordTokenizer(dolma2_source)
    tok.warm()
    clone = pickle.loads(pickle.dumps(tok))
    assert clone._tt_obj is None and clone._hf_obj is None  # engines are rebuilt where used
    arr = pa.array(["round trip |||EMAIL_ADDRESS|||"], pa.large_string())
    assert clone.encode_batch(arr)[0].tolist() == tok.encode_batch(arr)[0].tolist()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=50), min_size=1, max_size=10), st.data())
def test_staged_byte_documents_expand_to_the_byte_layout(docs, data):
    """Byte mode stages UTF-8 bytes; `expand` gives the ids of any range of documents, or any
    token range of one document (a document split across shards), exactly."""
    from bolmo_async.staging import expand, token_lengths

    col = pa.array(docs, pa.large_binary())
    ref = [[b + 4 for b in d] + [1] for d in docs]
    assert token_lengths(col).tolist() == [len(r) for r in ref]
    lo = data.draw(st.integers(0, len(docs) - 1))
    hi = data.draw(st.integers(lo + 1, len(docs)))
    assert expand(col, lo, hi).tolist() == [i for r in ref[lo:hi] for i in r]
    a = data.draw(st.integers(0, len(ref[lo]) - 1))
    b = data.draw(st.integers(a + 1, len(ref[lo])))
    assert expand(col, lo, lo + 1, a, b).tolist() == ref[lo][a:b]
    sliced = col.slice(1)
    assert expand(sliced, 0, len(sliced)).tolist() == [i for r in ref[1:] for i in r]


@needs_dolma2
def test_a_worker_killed_before_reading_its_tokenizer_does_not_hang_close(dolma2_source):
    import os
    import signal

    from bolmo_async.tokenize import ProcessTokenizer

    procs = ProcessTokenizer(2)
    for pid in list(procs._pool._processes):
        os.kill(pid, signal.SIGKILL)  # before any of them could read the recipe
    procs.start(SubwordTokenizer(dolma2_source))
    procs.close()  # returns (the test would time out otherwise)


def test_worker_processes_import_only_what_tokenizing_needs():
    """Spawned tokenizer workers import bolmo_async.tokenize: that must not pull in the HTTP
    stack (aiohttp, huggingface_hub) nor the pipeline modules, while the package's public
    functions still resolve on first use."""
    import subprocess
    import sys

    code = (
        "import sys, bolmo_async.tokenize\n"
        "heavy = sorted(m for m in ('aiohttp', 'huggingface_hub', 'bolmo_async.api', 'bolmo_async.fetcher') if m in sys.modules)\n"
        "import bolmo_async\n"
        "from bolmo_async import finalize\n"
        "print(heavy, bolmo_async.fetch.__module__, finalize.__module__, bolmo_async.prepare.__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["[]", "bolmo_async.api", "bolmo_async.api", "prepare"]
