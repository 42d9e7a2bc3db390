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
