"""`make trainer-check`: our output read by the real trainer code, OLMo-core's numpy datasets.

The README says the shards and `data_sources.txt` are what OLMo-core reads: raw uint32, an EOS
after every document, a `.csv.gz` beside each shard, `s3://` URLs read directly. This script
checks that with OLMo-core itself (installed by `make trainer-check` in its own venv,
`.venv-olmo`: torch and OLMo-core are too heavy for the project's venv and for CI):

1. a sample mix (`mirror sample`) served by the project's own mirror; a moto S3 server on loopback;
2. `prepare` in byte mode and in subword mode (dolma2 when its tokenizer JSON is there, else the
   mirror's demo tokenizer), each into a local folder and into a bucket (byte mode also as
   `r2://`), with a small `--max-tokens-per-file` so there are many shards and a document longer
   than the bound is cut into pieces;
3. in `.venv-olmo`, this file again (`--olmo-side SPEC`): OLMo-core's dataset configs built from
   the lines of `data_sources.txt` as a training config builds them (`NumpyFSLDatasetConfig`,
   `NumpyPaddedFSLDatasetConfig`, `NumpyPackedFSLDatasetConfig`; `s3://` URLs with the endpoint in
   `AWS_ENDPOINT_URL`, `r2://` ones with `R2_PROFILE` and `R2_ENDPOINT_URL`), every instance
   compared with our shards' tokens and our documents.

Prints one PASS/FAIL line per check and exits 1 on any FAIL. A 4 MB sample: about a minute to
make the five outputs, four to five for OLMo-core to read them all (every instance in a bucket is
its own ranged GET) on two busy cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OLMO_PY = ROOT / ".venv-olmo" / "bin" / "python"
DOLMA2 = Path(os.environ.get("BOLMO_DOLMA2_JSON", str(ROOT.parent / "shared" / "tokenizers" / "dolma2-tokenizer.json")))
R2_PROFILE = "trainer-check-r2"
S3_KEY, S3_SECRET, S3_REGION, BUCKET = (
    "TRAINERCHECKKEY00001",
    "trainer-check-secret-not-a-credential",
    "us-east-1",
    "trainer",
)
# Shard bounds: small enough for many shards and for the sample's longest document (18 KB of code)
# to be cut into pieces in both modes.
BOUND = {"byte": 16384, "subword": 2048}
HOSTILE_IDS = ["plain-0", "two\nlines", "cr\rhere", "x\n5,7,z", 'q"u,ote', "sep\u2028line", "plain-6"]
# The fixed-length dataset's sequence length (several instances per shard, tails dropped).
SEQ = {"byte": 2048, "subword": 512}


# -- our side (the project's venv) ------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_mirror(mix: Path, tok_dir: Path | None, ready: Path) -> tuple[subprocess.Popen[bytes], str]:
    cmd = [sys.executable, "-m", "bolmo_async", "mirror", "serve", str(mix), "--ready-file", str(ready)]
    if tok_dir is not None:
        cmd += ["--model-repo", f"allenai/dolma2-tokenizer={tok_dir}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        if ready.exists() and ready.read_text().strip():
            return proc, ready.read_text().strip()
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the mirror did not start")


def start_s3() -> tuple[subprocess.Popen[bytes], str]:
    """moto's S3 server in its own process on a free loopback port, with the bucket ``trainer``."""
    import boto3  # moto's own dependency

    port = free_port()
    code = f"from moto.server import main; main(['-H', '127.0.0.1', '-p', '{port}'])"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    client = s3_client(endpoint)
    for _ in range(300):
        try:
            client.create_bucket(Bucket=BUCKET)
            return proc, endpoint
        except Exception:
            time.sleep(0.1)
    proc.kill()
    del boto3
    raise RuntimeError("the S3 server did not start")


def s3_client(endpoint: str) -> Any:
    import boto3

    return boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id=S3_KEY, aws_secret_access_key=S3_SECRET, region_name=S3_REGION
    )


def s3_env(endpoint: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "S3_PROFILE")}
    env.update(
        AWS_ACCESS_KEY_ID=S3_KEY,
        AWS_SECRET_ACCESS_KEY=S3_SECRET,
        AWS_REGION=S3_REGION,
        AWS_DEFAULT_REGION=S3_REGION,
        AWS_ENDPOINT_URL=endpoint,
    )
    return env


def prepare(
    out: str, mode: str, endpoint: str, tokenizer: str | None, env: dict[str, str], fraction: float = 0.3
) -> None:
    cmd = [sys.executable, "-m", "bolmo_async", "prepare", "--output-dir", out, "--endpoint", endpoint]
    cmd += [
        "--data-fraction",
        str(fraction),
        "--tokenizer",
        mode,
        "--max-tokens-per-file",
        str(BOUND[mode]),
        "--no-progress",
    ]
    if tokenizer:
        cmd += ["--tokenizer-identifier", tokenizer]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"prepare {out} failed ({r.returncode}):\n{r.stderr[-3000:]}")


def read_object(location: str, name: str, endpoint: str) -> bytes:
    """A file of an output, read without OLMo-core: a plain read, or boto3 straight from moto."""
    if location.startswith(("s3://", "r2://")):
        bucket, _, prefix = location[5:].partition("/")
        body = s3_client(endpoint).get_object(Bucket=bucket, Key=f"{prefix}/{name}")["Body"].read()
        return bytes(body)
    return (Path(location) / name).read_bytes()


def truth(location: str, endpoint: str, into: Path) -> dict[str, Any]:
    """Our output as the check's reference: each shard's bytes and its `.csv.gz` rows copied to
    ``into`` (read without OLMo-core), the lines of `data_sources.txt`, the manifest."""
    import numpy as np

    from bolmo_async import api
    from bolmo_async.inspector import parse_index

    into.mkdir(parents=True)
    manifest = json.loads(read_object(location, "manifest.json", endpoint))
    sources = read_object(location, "data_sources.txt", endpoint).decode().strip().splitlines()
    shards = []
    for i, line in enumerate(sources):
        name = line.rsplit("/", 1)[-1]
        data = read_object(location, name, endpoint)
        rows = parse_index(read_object(location, name.replace(".npy", ".csv.gz"), endpoint))  # a CSV reader
        starts_ends = np.array([r[:2] for r in rows], dtype=np.int64).reshape(-1, 2)
        ids = [r[2] for r in rows]
        (into / f"{i}.bin").write_bytes(data)
        np.save(into / f"{i}.docs.npy", starts_ends)
        shards.append({"url": line, "bin": str(into / f"{i}.bin"), "docs": str(into / f"{i}.docs.npy"), "ids": ids})
    tok = manifest["tokenizer"]
    mode = tok["kind"]
    rep = api.inspect(location, sequence_length=SEQ[mode])  # `bolmo-async inspect D --sequence-length N`
    return {
        "location": location,
        "mode": mode,
        "paths": sources,
        "shards": shards,
        "manifest": {"totals": manifest["totals"], "shards": manifest["shards"], "dtype": manifest["dtype"]},
        "tokenizer": {"vocab_size": tok["vocab_size"], "eos": tok["eos_token_id"], "identifier": tok["identifier"]},
        "seq": SEQ[mode],
        "bound": manifest["max_tokens_per_file"],
        "readme_instances": rep["fixed_length"]["instances"],  # what README and `inspect` tell a user
        "inspect_problems": rep["problems"],
    }


def run(args: argparse.Namespace) -> int:
    from bolmo_async.mirror import build_sample

    if not OLMO_PY.exists():
        print(f"{OLMO_PY} is missing: run `make trainer-check` (it installs OLMo-core there)", file=sys.stderr)
        return 2
    version = subprocess.run(
        [str(OLMO_PY), "-c", "import importlib.metadata as m; print(m.version('ai2-olmo-core'), m.version('torch'))"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="trainer-check-", dir=args.work_dir))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        t0 = time.monotonic()
        mix = work / "mix"
        build_sample(mix, size_mb=4.0, seed=0)
        tok_dir: Path | None = None
        tokenizer: str | None = None
        if DOLMA2.exists():
            tok_dir = work / "dolma2"
            tok_dir.mkdir()
            shutil.copy(DOLMA2, tok_dir / "tokenizer.json")
            tokenizer = str(tok_dir / "tokenizer.json")
            tok_note = f"dolma2 ({DOLMA2})"
        else:
            from bolmo_async.mirror.sample import train_demo_tokenizer

            tok_dir = work / "demo-tok"
            train_demo_tokenizer(mix, tok_dir)
            tokenizer = str(tok_dir)
            tok_note = "the mirror's demo BPE (dolma2's JSON is absent: set BOLMO_DOLMA2_JSON)"
        mirror, endpoint = start_mirror(mix, None, work / "endpoint")
        procs.append(mirror)
        moto, s3 = start_s3()
        procs.append(moto)
        env = {**s3_env(s3), "HF_HOME": str(work / "hf-home"), "BOLMO_ASYNC_SCRATCH": str(work / "scratch")}
        os.environ.update(env)  # `inspect` of the bucket's output, in this process
        outputs = []
        for mode in ("byte", "subword"):
            tok = tokenizer if mode == "subword" else None
            # r2:// (Cloudflare R2's scheme, as OLMo-core names it): our tool reaches it through
            # AWS_ENDPOINT_URL, OLMo-core through R2_PROFILE and R2_ENDPOINT_URL; byte mode only.
            for where in ("local", "s3", "r2") if mode == "byte" else ("local", "s3"):
                loc = str(work / f"out-{mode}") if where == "local" else f"{where}://{BUCKET}/out-{mode}-{where}"
                prepare(loc, mode, endpoint, tok, env)
                outputs.append({"name": f"{mode}/{where}", **truth(loc, s3, work / "truth" / f"{mode}-{where}")})
        # Document ids are untrusted data: ids with line breaks, quotes and commas (one made to
        # look like `start,end` after its line break), in a folder and in the bucket.
        hostile = work / "hostile"
        (hostile / "data" / "web").mkdir(parents=True)
        (hostile / "data" / "web" / "web-0000.jsonl").write_text(
            "".join(json.dumps({"id": i, "text": f"document {k} " * 40}) + "\n" for k, i in enumerate(HOSTILE_IDS))
        )
        mirror2, endpoint2 = start_mirror(hostile, None, work / "hostile-ep")
        procs.append(mirror2)
        for where in ("local", "s3"):
            loc = str(work / "out-hostile") if where == "local" else f"s3://{BUCKET}/out-hostile"
            prepare(loc, "byte", endpoint2, None, env, fraction=1.0)
            t = truth(loc, s3, work / "truth" / f"hostile-{where}")
            outputs.append({**t, "name": f"byte/{where}, odd document ids", "mode": "byte-hostile"})
        print(
            f"trainer check: OLMo-core {version[0]} (torch {version[1]}) reading bolmo-async's output; "
            f"subword tokenizer: {tok_note}; outputs made in {time.monotonic() - t0:.0f} s",
            flush=True,
        )
        spec = work / "spec.json"
        spec.write_text(json.dumps({"outputs": outputs, "work": str(work / "olmo")}))
        (work / "aws-credentials").write_text(
            f"[{R2_PROFILE}]\naws_access_key_id = {S3_KEY}\naws_secret_access_key = {S3_SECRET}\n"
        )
        (work / "aws-config").write_text(f"[profile {R2_PROFILE}]\nregion = auto\n")
        child_env = {
            **s3_env(s3),
            "R2_PROFILE": R2_PROFILE,
            "R2_ENDPOINT_URL": s3,
            "AWS_SHARED_CREDENTIALS_FILE": str(work / "aws-credentials"),
            "AWS_CONFIG_FILE": str(work / "aws-config"),
            "CACHED_PATH_CACHE_ROOT": str(work / "cached-path"),
            "OLMO_DATA_PREP_WORKERS": "2",
        }
        r = subprocess.run([str(OLMO_PY), __file__, "--olmo-side", str(spec)], env=child_env, check=False)
        results = json.loads((work / "olmo" / "results.json").read_text()) if r.returncode == 0 else []
        if r.returncode != 0:
            print(f"FAIL  the OLMo-core side crashed (exit {r.returncode}); see its traceback above")
            return 1
        # The bucket's output is the local one's, byte for byte (determinism across backends).
        for b in outputs:
            a = next(o for o in outputs if o["mode"] == b["mode"])  # the local folder's
            if a is b:
                continue
            same = [
                Path(x["bin"]).read_bytes() == Path(y["bin"]).read_bytes()
                for x, y in zip(a["shards"], b["shards"], strict=False)
            ]
            results.append(
                {
                    "check": f"{b['name']}: the bucket's shards equal the local folder's",
                    "ok": len(a["shards"]) == len(b["shards"]) and all(same),
                    "detail": f"{len(a['shards'])} vs {len(b['shards'])} shards",
                }
            )
        failed = [x for x in results if not x["ok"]]
        for x in results:
            print(f"{'PASS' if x['ok'] else 'FAIL'}  {x['check']}" + (f"  ({x['detail']})" if x.get("detail") else ""))
        print(
            f"trainer check: {len(results) - len(failed)} passed, {len(failed)} failed "
            f"(OLMo-core {version[0]}, {time.monotonic() - t0:.0f} s)"
        )
        return 1 if failed else 0
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=30)
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


# -- the trainer's side (.venv-olmo: OLMo-core, torch; no bolmo_async) ------------------------------
def olmo_side(spec_path: str) -> None:
    import logging

    import numpy as np
    from olmo_core.data import (
        NumpyDatasetDType,
        NumpyFSLDatasetConfig,
        NumpyPackedFSLDatasetConfig,
        NumpyPaddedFSLDatasetConfig,
        TokenizerConfig,
    )

    logging.basicConfig(level=logging.WARNING)
    spec = json.loads(Path(spec_path).read_text())
    work = Path(spec["work"])
    work.mkdir(parents=True)
    results: list[dict[str, Any]] = []
    builds = iter(range(10**6))

    def check(name: str, ok: bool, detail: str = "") -> None:
        results.append({"check": name, "ok": bool(ok), "detail": detail})

    def one_output(out: dict[str, Any]) -> None:
        name, mode, seq, bound = out["name"], out["mode"], out["seq"], out["bound"]
        tok = out["tokenizer"]
        if mode == "subword" and tok["vocab_size"] == 100278:
            tokenizer = TokenizerConfig.dolma2()  # what an OLMo-core / bolmo-core config names
            check(f"{name}: our manifest's EOS is dolma2()'s", tok["eos"] == tokenizer.eos_token_id, str(tok))
        else:
            # No preset for Bolmo's byte ids (or the demo BPE): the values of our manifest; pad 0
            # is Bolmo's <pad> (byte mode).
            tokenizer = TokenizerConfig(vocab_size=tok["vocab_size"], eos_token_id=tok["eos"], pad_token_id=0)
        eos = tokenizer.eos_token_id
        arrays = [np.frombuffer(Path(s["bin"]).read_bytes(), dtype="<u4") for s in out["shards"]]
        docs = [np.load(s["docs"]) for s in out["shards"]]
        ours = [a[s:e] for a, d in zip(arrays, docs, strict=True) for s, e in d]  # every document, in order
        total_docs = sum(len(d) for d in docs)
        pieces = sum(len(s["ids"]) - len(set(s["ids"])) for s in out["shards"]) + sum(
            1 for i in range(1, len(out["shards"])) if out["shards"][i]["ids"][:1] == out["shards"][i - 1]["ids"][-1:]
        )

        # Our own invariants first, so a failure below is OLMo-core's reading, not our file.
        check(
            f"{name}: `bolmo-async inspect` finds no problem",
            not out["inspect_problems"],
            str(out["inspect_problems"])[:300],
        )
        ok = all(
            len(d) and d[0][0] == 0 and d[-1][1] == len(a) and (d[1:, 0] == d[:-1, 1]).all()
            for a, d in zip(arrays, docs, strict=True)
        )
        ok = ok and all(len(x) and x[-1] == eos and not (x[:-1] == eos).any() for x in ours)
        check(f"{name}: our .csv.gz rows tile each shard; each document ends with its only EOS", ok)
        shape = f"{len(arrays)} shards, {total_docs} documents (incl. {pieces} extra piece(s) of long documents cut at the bound)"
        shape_ok, need = len(arrays) > 1 and pieces > 0, "the sample must give several shards and a cut document"
        if out["mode"] == "byte-hostile":
            shape = f"{len(arrays)} shard, {total_docs} documents: a .csv.gz row for each of {len(HOSTILE_IDS)} odd ids"
            shape_ok, need = len(arrays) == 1 and pieces == 0 and total_docs == len(HOSTILE_IDS), ""
        check(f"{name}: {shape}", shape_ok and total_docs - pieces == out["manifest"]["totals"]["documents"], need)

        def config(
            cls: Any, tokenizer: Any = tokenizer, paths: tuple[str, ...] = tuple(out["paths"]), **kw: Any
        ) -> Any:
            return cls(
                tokenizer=tokenizer,
                paths=list(paths),
                work_dir=str(work / f"w{next(builds)}"),  # never a cache of another build
                **kw,
            )

        # dtype: given as uint32, and what OLMo-core infers when a config leaves it out.
        inferred = config(NumpyFSLDatasetConfig, sequence_length=seq).get_dtype()
        if tok["vocab_size"] > 65536:
            check(f"{name}: OLMo-core infers uint32 from the vocabulary ({tok['vocab_size']})", inferred == np.uint32)
        else:
            # README: a vocabulary under 65536 (byte ids, a small BPE) makes OLMo-core infer a
            # narrower dtype; the config must say dtype=uint32. Pinned so the README stays true.
            check(
                f"{name}: OLMo-core infers {np.dtype(inferred).name} from a vocabulary of {tok['vocab_size']} "
                "(README: set dtype=uint32)",
                inferred != np.uint32,
            )
        dtype = NumpyDatasetDType.uint32

        # 1. Fixed-length: concatenated tokens cut into `seq`-token instances, each file's tail dropped.
        def fixed_length() -> None:
            ds = config(NumpyFSLDatasetConfig, sequence_length=seq, dtype=dtype, generate_doc_lengths=True).build()
            ds.prepare()
            check(f"{name}: NumpyFSLDataset dtype is uint32", ds.dtype == np.uint32, str(ds.dtype))
            expected = sum(len(a) // seq for a in arrays)
            check(
                f"{name}: NumpyFSLDataset at {seq}: {len(ds)} instances = README's tokens // sequence_length per shard",
                len(ds) == expected == out["readme_instances"],
                f"OLMo-core {len(ds)}, ours {expected}, README/inspect {out['readme_instances']}",
            )
            bad_tok = bad_len = 0
            i = 0
            for a, d in zip(arrays, docs, strict=True):
                ends = d[:, 1]
                for k in range(len(a) // seq):
                    item = ds[i]
                    i += 1
                    lo, hi = k * seq, (k + 1) * seq
                    if not np.array_equal(item["input_ids"].numpy(), a[lo:hi].astype(np.int64)):
                        bad_tok += 1
                    cuts = [lo] + [int(e) for e in ends if lo < e <= hi]
                    if cuts[-1] != hi:
                        cuts.append(hi)
                    if item["doc_lens"].tolist() != list(np.diff(cuts)):
                        bad_len += 1
            check(
                f"{name}: NumpyFSLDataset: every token of every instance equals our shard's at that position",
                bad_tok == 0,
                f"{bad_tok} instance(s) differ",
            )
            check(
                f"{name}: NumpyFSLDataset: the document lengths it derives (doc_lens) are our documents'",
                bad_len == 0,
                f"{bad_len} instance(s) differ",
            )

        # 2. Padded: one instance per document (sequence length = our bound: no document is cut).
        def padded(how: str, env: str | None) -> None:
            if env is None:
                os.environ.pop("OLMO_DATA_PREP_USE_ARRAY_IF_LOCAL", None)
            else:
                os.environ["OLMO_DATA_PREP_USE_ARRAY_IF_LOCAL"] = env
            try:
                ds = config(NumpyPaddedFSLDatasetConfig, sequence_length=bound, dtype=dtype).build()
                ds.prepare()
            finally:
                os.environ.pop("OLMO_DATA_PREP_USE_ARRAY_IF_LOCAL", None)
            n_bad = 0
            for j in range(len(ds)):
                item = ds[j]
                n = int(item["label_mask"].sum())
                ids = item["input_ids"].numpy()
                if (
                    j >= len(ours)
                    or not np.array_equal(ids[:n], ours[j].astype(np.int64))
                    or (ids[n:] != tokenizer.pad_token_id).any()
                ):
                    n_bad += 1
            check(
                f"{name}: NumpyPaddedFSLDataset, boundaries from {how}: one instance per document, each ours",
                len(ds) == total_docs and n_bad == 0,
                f"{len(ds)} instances, {total_docs} documents, {n_bad} differ",
            )

        # 3. Packed (best-fit decreasing): every document exactly once, whole, in some instance.
        def packed(how: str, local_array: bool | None) -> None:
            ds = config(
                NumpyPackedFSLDatasetConfig,
                sequence_length=bound,
                dtype=dtype,
                generate_doc_lengths=True,
                use_array_if_local=local_array,
            ).build()
            ds.prepare()
            got = []
            for j in range(len(ds)):
                item = ds[j]
                n = int(item["label_mask"].sum())
                ids = item["input_ids"].numpy()[:n]
                at = 0
                for length in item["doc_lens"].tolist():
                    if at < n:
                        got.append(ids[at : at + length].tobytes())
                    at += length
            want = sorted(x.astype(np.int64).tobytes() for x in ours)
            check(
                f"{name}: NumpyPackedFSLDataset, boundaries from {how}: {len(ds)} instances hold every document once, whole",
                sorted(got) == want,
                f"{len(got)} documents read, {len(want)} ours",
            )

        remote = "://" in out["paths"][0]
        runs: list[tuple[str, Any]] = [("NumpyFSLDataset", fixed_length)]
        if remote:
            runs.append(
                (
                    "NumpyPaddedFSLDataset, boundaries from csv.gz (remote: the only way)",
                    lambda: padded("csv.gz (remote: the only way)", None),
                )
            )
            runs.append(("NumpyPackedFSLDataset, boundaries from csv.gz", lambda: packed("csv.gz", None)))
        else:
            runs.append(
                ("NumpyPaddedFSLDataset, boundaries from EOS (the default)", lambda: padded("EOS (the default)", None))
            )
            runs.append(("NumpyPaddedFSLDataset, boundaries from csv.gz", lambda: padded("csv.gz", "0")))
            runs.append(
                ("NumpyPackedFSLDataset, boundaries from EOS (the default)", lambda: packed("EOS (the default)", None))
            )
            runs.append(("NumpyPackedFSLDataset, boundaries from csv.gz", lambda: packed("csv.gz", False)))
        for label, fn in runs:
            try:
                fn()
            except Exception as e:  # OLMo-core refused or crashed on our output: a FAIL, and go on
                check(f"{name}: {label}: OLMo-core raised", False, f"{type(e).__name__}: {str(e)[:200]}")

    for out in spec["outputs"]:
        one_output(out)
    (work / "results.json").write_text(json.dumps(results))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--olmo-side", metavar="SPEC", help=argparse.SUPPRESS)
    ap.add_argument("--work-dir", default=None, help="where the temporary folder goes (default: TMPDIR)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (outputs, spec, OLMo-core's caches)")
    args = ap.parse_args()
    if args.olmo_side:
        olmo_side(args.olmo_side)
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
