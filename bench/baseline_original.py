"""A baseline that works the way the original `prepare_bolmo_data.py` does, for `make bench`.

HF `datasets` streaming over the same files (through the same HTTP mirror), one tokenizer call
per document, all tokens kept in a Python list, written at the end. Byte mode: dolma2-encode,
then expand every id to its bytes in Python (+4, EOS 1), as the original did.

    python bench/baseline_original.py OUT_DIR ENDPOINT REPO_ID {byte,subword} TOKENIZER_JSON
"""

from __future__ import annotations

import json
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np


def main() -> None:
    out, endpoint, repo_id, mode, tok_json = sys.argv[1:6]
    from datasets import load_dataset
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=tok_json)
    with urllib.request.urlopen(f"{endpoint}/api/datasets/{repo_id}/tree/main?recursive=true") as r:
        listing = json.load(r)
    base = f"{endpoint}/datasets/{repo_id}/resolve/main/"
    json_files = [base + e["path"] for e in listing if e["type"] == "file" and ".json" in e["path"]]
    pq_files = [base + e["path"] for e in listing if e["type"] == "file" and e["path"].endswith(".parquet")]
    streams = [load_dataset("json", data_files=json_files, split="train", streaming=True)]
    if pq_files:
        streams.append(load_dataset("parquet", data_files=pq_files, split="train", streaming=True))
    all_tokens: list[int] = []
    docs = text_bytes = 0
    byte_table = None
    if mode == "byte":
        vocab = tok.convert_ids_to_tokens(list(range(len(tok))))
        from bolmo_async.tokenize import _bytes_to_unicode

        u2b = {c: b for b, c in _bytes_to_unicode().items()}
        byte_table = [[u2b[c] + 4 for c in (t or "")] if all(c in u2b for c in (t or "")) else [] for t in vocab]
    t0 = time.perf_counter()
    for ds in streams:
        for ex in ds:
            text = ex.get("text")
            if not text:
                continue
            ids = tok.encode(text, add_special_tokens=False)
            if byte_table is not None:
                for i in ids:
                    all_tokens.extend(byte_table[i])
                all_tokens.append(1)
            else:
                all_tokens.extend(ids)
                all_tokens.append(100257)
            docs += 1
            text_bytes += len(text.encode("utf-8"))
    arr = np.array(all_tokens, dtype=np.uint32)
    Path(out).mkdir(parents=True, exist_ok=True)
    arr.tofile(Path(out) / "bolmo_data_00000.npy")
    print(
        json.dumps(
            {"documents": docs, "text_bytes": text_bytes, "tokens": len(arr), "seconds": time.perf_counter() - t0}
        )
    )


if __name__ == "__main__":
    main()
