"""Issue 24's fixed cost, side by side: a 0.1% run end to end of two (or more) source trees on the
same mirror, interleaved round by round (the order alternates), in byte and subword mode, with
automatic processes and ``--processes 2``.

    python bench/fixed_ab.py /work/main /work/wt/fixed --rounds 7

Each run is ``bench/cpu_of.py`` of its tree with that tree first on the path: wall seconds (the
whole command, interpreter start to exit) and CPU seconds (the command and its children).
Reported per tree and case: the median and best wall, the median CPU, and each tree's median
over the first's. The shards of every tree are compared with the first tree's (byte-identical).
Uses the cached bench mix (``bench/data/mix-500``); the trees' bytecode is compiled first (an
installed package has it; a checkout run with PYTHONDONTWRITEBYTECODE would not).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import DOLMA2, start_mirror  # noqa: E402

CASES = {
    "byte auto": ("byte", 0),
    "byte -p2": ("byte", 2),
    "subword auto": ("subword", 0),
    "subword -p2": ("subword", 2),
}


def one(tree: Path, mode: str, processes: int, endpoint: str, out: Path, env: dict[str, str]) -> dict[str, float]:
    shutil.rmtree(out, ignore_errors=True)
    cpu = out.with_suffix(".cpu.json")
    cmd = [sys.executable, str(tree / "bench" / "cpu_of.py"), str(cpu), "prepare", "--output-dir", str(out)]
    cmd += ["--endpoint", endpoint, "--data-fraction", "0.001", "--tokenizer", mode]
    cmd += ["--max-tokens-per-file", "100000000", "--no-progress"]
    if processes:
        cmd += ["--processes", str(processes)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env={**env, "PYTHONPATH": str(tree)}, capture_output=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"{tree}: {' '.join(cmd[2:])} failed:\n{proc.stderr.decode()[-2000:]}")
    c = json.loads(cpu.read_text())
    return {"wall": wall, "cpu": c["coordinator"] + c["workers"], "coordinator": c["coordinator"]}


def shards(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.npy"))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("trees", nargs="+", type=Path)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated, of: " + ", ".join(CASES))
    args = ap.parse_args()
    cases = [c for c in args.cases.split(",") if c]
    trees = [t.resolve() for t in args.trees]
    for t in trees:
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(t / "bolmo_async")], check=True)
    work = HERE / "out" / "fixed_ab"
    work.mkdir(parents=True, exist_ok=True)
    tok_dir = None
    if DOLMA2.exists():
        tok_dir = work / "dolma2"
        tok_dir.mkdir(exist_ok=True)
        (tok_dir / "tokenizer.json").write_bytes(DOLMA2.read_bytes())
        (tok_dir / "tokenizer_config.json").write_text('{"eos_token": "<|endoftext|>"}')
    env = {**os.environ, "HF_HOME": str(work / "hf-home")}
    mirror, endpoint = start_mirror(HERE / "data" / "mix-500", tok_dir)
    runs: dict[tuple[str, int], list[dict[str, float]]] = {(c, i): [] for c in cases for i in range(len(trees))}
    try:
        for c in cases:  # warm-up: caches (probe, tokenizer JSON), and the shards compared
            mode, pn = CASES[c]
            ref = None
            for i, t in enumerate(trees):
                out = work / f"o{i}"
                one(t, mode, pn, endpoint, out, env)
                got = shards(out)
                if ref is None:
                    ref = got
                elif got != ref:
                    raise SystemExit(f"{c}: the shards of {t} differ from {trees[0]}'s")
        for r in range(args.rounds):
            load = os.getloadavg()[0]
            for c in cases:
                mode, pn = CASES[c]
                order = list(range(len(trees)))
                if r % 2:
                    order.reverse()
                for i in order:
                    runs[c, i].append(one(trees[i], mode, pn, endpoint, work / f"o{i}", env))
            print(f"round {r + 1}/{args.rounds} done (load {load:.1f})", flush=True)
    finally:
        mirror.terminate()
        mirror.wait()
    print(f"\n{args.rounds} rounds interleaved; wall s median (best), CPU s median; ratio = median / first tree's")
    print("| case | " + " | ".join(t.name for t in trees) + " |")
    print("|---|" + "---|" * len(trees))
    for c in cases:
        cells = []
        base = statistics.median(x["wall"] for x in runs[c, 0])
        for i in range(len(trees)):
            rs = runs[c, i]
            med = statistics.median(x["wall"] for x in rs)
            cell = f"{med:.3f} ({min(x['wall'] for x in rs):.3f}), CPU {statistics.median(x['cpu'] for x in rs):.2f}"
            if i:
                cell += f", x{med / base:.2f}"
            cells.append(cell)
        print(f"| {c} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
