"""Side by side: ``prepare --tokenizer byte`` from several source trees, interleaved, one mirror.

    python bench/ab_trees.py CASE ROUNDS NAME=TREE [NAME=TREE ...] [-- extra prepare args]

CASE: ``small30`` / ``large30`` (the 30 ms, 12 MB/s per response, 60 MB/s link, the 35 MB corpus
of ``bench/data/wan-35-150``), ``small80`` / ``large80`` (80 ms, 6 MB/s, 40 MB/s, ``wan-55-150``),
``loop2`` (the 500 MB mix on loopback, ``--processes 2``). A tree is a folder holding
``bolmo_async`` (a git worktree, or ``git archive`` of a commit); ``AB_ENV_<NAME>=K=V,K=V`` adds
environment variables to that tree's runs (the same tree twice with a switch: an A/B of it).
Each run's wall time and CPU split (``bench/cpu_of.py``: coordinator and workers, of it kernel)
is printed, then each tree's medians; the shards of every tree are compared with the first's
after each round (a line says which differ). The corpora are the bench's cached ones.
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
LINKS = {"30": (0.03, 12e6, 60e6, "wan-35-150"), "80": (0.08, 6e6, 40e6, "wan-55-150")}


def main() -> None:
    case, rounds, rest = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    extra: list[str] = []
    if "--" in rest:
        i = rest.index("--")
        rest, extra = rest[:i], rest[i + 1 :]
    trees = dict(a.split("=", 1) for a in rest)
    sys.path.insert(0, str(HERE.parent))
    from bolmo_async.mirror import MirrorRepo, MirrorThread, WanConfig
    from bolmo_async.models import DEFAULT_REPO_ID

    if case == "loop2":
        wan = None
        repos = [MirrorRepo(DEFAULT_REPO_ID, DATA / "mix-500")]
        args = ["--repo-id", DEFAULT_REPO_ID, "--processes", "2", "--max-tokens-per-file", "100000000"]
    else:
        kind, link = case[:5], case[5:]
        rtt, per_response, total, folder = LINKS[link]
        wan = WanConfig(rtt=rtt, response_rate=per_response, link_rate=total)
        repos = [MirrorRepo(f"bench/wan-{kind}", DATA / folder / kind)]
        args = ["--repo-id", f"bench/wan-{kind}"]
    out = HERE / "out" / "ab"
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    with MirrorThread(repos, wan=wan) as mirror:
        for r in range(rounds):
            for name, tree in trees.items():
                folder_out = out / name
                shutil.rmtree(folder_out, ignore_errors=True)
                cpu = out / f"{name}.cpu.json"
                env = {**os.environ, "PYTHONPATH": tree, "HF_HOME": str(out / "hf-home")}
                for kv in filter(None, os.environ.get(f"AB_ENV_{name}", "").split(",")):
                    k, v = kv.split("=", 1)
                    env[k] = v
                cmd = [sys.executable, str(HERE / "cpu_of.py"), str(cpu), "prepare", "--output-dir", str(folder_out)]
                cmd += ["--endpoint", mirror.endpoint, "--data-fraction", "1.0", "--tokenizer", "byte", "--no-progress"]
                t0 = time.perf_counter()
                p = subprocess.run([*cmd, *args, *extra], env=env, capture_output=True, cwd=tree)
                wall = time.perf_counter() - t0
                if p.returncode:
                    raise SystemExit(p.stderr.decode()[-3000:])
                c = json.loads(cpu.read_text())
                c["wall"] = wall
                runs[name].append(c)
                print(
                    f"round {r} {name}: wall {wall:.2f} coordinator {c['coordinator']:.2f} ({c['coordinator_sys']:.2f} "
                    f"kernel) workers {c['workers']:.2f} ({c['workers_sys']:.2f} kernel), load {os.getloadavg()[0]:.1f}",
                    flush=True,
                )
            first = out / next(iter(trees))
            for name in list(trees)[1:]:
                for f in sorted(first.glob("bolmo_data_*")):
                    g = out / name / f.name
                    if not g.exists() or not filecmp.cmp(f, g, shallow=False):
                        print(f"DIFFERENT: {name} {f.name}", flush=True)
    shutil.rmtree(out, ignore_errors=True)
    for name, rs in runs.items():

        def med(k: str, rs: list[dict[str, float]] = rs) -> float:
            return statistics.median(x[k] for x in rs)

        total = statistics.median(x["coordinator"] + x["workers"] for x in rs)
        print(
            f"{name}: wall median {med('wall'):.2f} best {min(x['wall'] for x in rs):.2f}; CPU median {total:.2f} "
            f"(coordinator {med('coordinator'):.2f}, workers {med('workers'):.2f}, of it kernel {med('workers_sys'):.2f})"
        )


if __name__ == "__main__":
    main()
