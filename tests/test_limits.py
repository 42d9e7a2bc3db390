"""The system's limits (`ulimit -n`, `-u`, `-v`, a container's pids or memory limit) are the run's
trouble, never the data's: what they refuse fails the file it hit, in one line naming the limit,
and a rerun with the limit raised gives the clean run's shards."""

from __future__ import annotations

import errno
import json
import os
import resource
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

import bolmo_async
from bolmo_async.errors import ResourceError, exhausted
from bolmo_async.filetask import Processor, TaskContext
from bolmo_async.mirror import MirrorThread
from bolmo_async.models import PlannedFile
from bolmo_async.outdir import open_output
from bolmo_async.staging import Staging
from bolmo_async.tokenize import ByteTokenizer

from .helpers import shard_hashes


def _lowest_free_fd() -> int:
    fd = os.dup(0)
    os.close(fd)
    return fd


def test_a_parquet_file_the_system_refuses_to_open_fails_never_counted_corrupt(tmp_path: Path) -> None:
    """Out of file descriptors when a --no-streaming download (or a whole parquet file) is opened
    to be read: the open's EMFILE was counted as `corrupt_file` ("not a parquet file"), the file
    staged without its documents, and a rerun with the limit raised kept it so (silent loss)."""
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "text": ["one", "two"]}), path)
    pf = PlannedFile("data/x/a.parquet", "data/x", path.stat().st_size, "0" * 40, "0" * 64)
    (tmp_path / "o").mkdir()
    with ThreadPoolExecutor(1) as executor:
        ctx = TaskContext(None, "0" * 40, Staging(open_output(tmp_path / "o")), ByteTokenizer(), executor)  # type: ignore[arg-type]
        proc = Processor(pf, ctx)
        try:
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (_lowest_free_fd(), hard))  # the next open is refused
            try:
                with pytest.raises(ResourceError, match=r"ulimit -n") as info:
                    proc._parquet_local(path)
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            assert str(info.value).startswith("data/x/a.parquet: the system refused a file descriptor")
            assert not proc.skips.counts, proc.skips.counts  # nothing blamed on the data
        finally:
            proc.abort()


def _zstd_error(data: bytes) -> Exception:
    """What zstd itself says of ``data`` (the decoder's ``StreamError`` carries its words)."""
    with pytest.raises(zstandard.ZstdError) as info:
        obj = zstandard.ZstdDecompressor().decompressobj()
        obj.decompress(data)
        if not obj.eof:
            raise zstandard.ZstdError("truncated")
    return info.value


def test_what_the_system_refuses_is_told_apart_from_damaged_data(tmp_path: Path) -> None:
    # The refusals, in the words pyarrow, Python and the OS say them (seen under `prlimit --as`
    # and a pids cgroup): each names its limit.
    said = {
        "processes": pa.ArrowException(
            "Unknown error: Failed to launch worker thread: Resource temporarily unavailable"
        ),
        "threads": RuntimeError("can't start new thread"),
        "memory": MemoryError(),
        "files": OSError(errno.EMFILE, "Too many open files"),
    }
    for kind, exc in said.items():
        refused = exhausted(exc, "data/a.parquet")
        assert refused is not None, kind
        line = str(refused)
        assert line.startswith("data/a.parquet: the system refused") and "rerun the same command" in line, line
        assert "\n" not in line
    assert "ulimit -n" in str(exhausted(said["files"]))
    assert "ulimit -u" in str(exhausted(said["threads"])) and "--processes" in str(exhausted(said["processes"]))
    assert "(MemoryError)" in str(exhausted(said["memory"]))  # (no empty "MemoryError: ")
    # A hostile stream's own complaints stay the data's (counted skips), even one about memory:
    # a zstd frame asking for a 2 GiB window says "Frame requires too much memory".
    huge = zstandard.ZstdCompressor(level=1, write_content_size=False).compress(b"x")
    header = bytearray(huge)
    header[4] = 0x00  # frame header descriptor: no single segment, so a window descriptor follows
    header[5:5] = bytes([0xF8])  # window log 41: far past the decoder's limit
    damaged = [bytes(header), os.urandom(64) + huge, huge[: len(huge) // 2] + b"\0" * 8]
    for data in damaged:
        err = _zstd_error(data)
        assert exhausted(err) is None, err
    assert exhausted(pa.ArrowInvalid("Couldn't deserialize thrift: TProtocolException: Invalid data")) is None
    assert exhausted(OSError(errno.EIO, "Input/output error")) is None


_PIDS = Path("/sys/fs/cgroup/pids")  # cgroup v1's pids controller (a container's pids limit)


@pytest.fixture
def pids_cgroup(tmp_path: Path) -> Iterator[Path]:
    """A pids cgroup of its own: the limit a container puts on processes and threads, which binds
    root too (``ulimit -u`` does not). Skipped where it cannot be made (not root, cgroup v2 only)."""
    group = _PIDS / f"bolmo-test-{os.getpid()}-{tmp_path.name}"[:60]
    try:
        group.mkdir()
    except OSError:
        pytest.skip("needs root and cgroup v1's pids controller")
    try:
        yield group
    finally:
        for _ in range(50):  # (its processes are gone once the run has exited; rmdir waits for them)
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)


@pytest.mark.parametrize("pids", [12, 14, 16])
def test_a_pids_limit_ends_the_run_in_one_line_and_the_rerun_gives_the_clean_shards(
    repos, tmp_path: Path, pids_cgroup: Path, pids: int
) -> None:
    """Under a container's pids limit the worker pool's threads and processes are refused where
    they happen to be asked: multiprocessing's traceback of a worker's start, the start thread's
    traceback ("Exception in thread bolmo-start"), the fork server's, and "worker 0 crashed:
    RuntimeError: can't start new thread" or "unexpected RuntimeError ... report the traceback"
    as the last line. Now: one line naming the limit, and a rerun without it finishes the same."""
    clean = tmp_path / "clean"
    with MirrorThread(repos) as m:
        args = ["--data-fraction", "0.5", "--max-tokens-per-file", "200000", "--no-progress", "--processes", "2"]
        cmd = [sys.executable, "-m", "bolmo_async", "prepare", "--endpoint", m.endpoint, *args]
        (pids_cgroup / "pids.max").write_text(str(pids))
        limited = subprocess.run(
            ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(pids_cgroup), *cmd, "-o", str(tmp_path / "o")],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert limited.returncode == 1, limited.stderr
        assert "Traceback" not in limited.stderr, limited.stderr
        # One line, or the failed files' list whose every reason is that line.
        said = limited.stderr[limited.stderr.rindex("error: ") :].strip().splitlines()
        if said[0].endswith("file(s) failed:"):
            assert said[-1].startswith("Rerun the same command"), said
            said = said[1:-1]
        assert said and all("ulimit -u" in line and "rerun the same command" in line for line in said), said
        for out in (tmp_path / "o", clean):
            r = subprocess.run([*cmd, "-o", str(out)], capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, r.stderr
    assert shard_hashes(json.loads((tmp_path / "o" / "manifest.json").read_text())) == shard_hashes(
        json.loads((clean / "manifest.json").read_text())
    )


@pytest.fixture
def few_inodes(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of 64 MB that holds 6 files (needs root); skipped where mounting is refused."""
    mnt = tmp_path / "few"
    mnt.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,nr_inodes=6", "tmpfs", str(mnt)]).returncode
    ):
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_disk_out_of_inodes_says_so_where_df_h_shows_free_space(mirror, few_inodes: Path) -> None:
    """ENOSPC is also what a filesystem out of inodes says: the line told of a full disk whose
    `df -h` showed 60 MB free, and the user looked for what filled it."""
    from bolmo_async.errors import DiskSpaceError

    with pytest.raises(DiskSpaceError, match=r"is full of files: it has no inode left .* are free \(`df -i`"):
        bolmo_async.prepare(few_inodes / "o", endpoint=mirror.endpoint, data_fraction=0.5, progress=False)


def test_the_refusal_of_a_descriptor_is_said_without_opening_one() -> None:
    """Out of descriptors, the line itself must open none: ``import resource`` in it could not
    open its .so, and that ImportError, raised in a file task's error handler, lost the task and
    the run waited for it for ever (1,004 files, `ulimit -n 20`)."""
    code = (  # (never imports ``resource`` itself: the run's code must)
        "import errno, os\n"
        "from bolmo_async.errors import exhausted\n"
        "held = []\n"
        "while True:\n"
        "    try:\n"
        "        held.append(os.open(os.devnull, os.O_RDONLY))\n"
        "    except OSError as exc:\n"
        "        assert exc.errno == errno.EMFILE\n"
        "        break\n"
        "print(exhausted(OSError(errno.EMFILE, 'Too many open files'), 'data/a.jsonl'))\n"
    )

    def few_files() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, preexec_fn=few_files)
    assert r.returncode == 0, r.stderr
    assert (
        "data/a.jsonl: the system refused a file descriptor" in r.stdout and "files at once (`ulimit -n`)" in r.stdout
    )


def test_a_zstd_window_the_memory_limit_refuses_fails_the_file_never_counted_corrupt() -> None:
    """A good .zst whose window (128 MiB, zstd's default limit) the memory limit leaves no room
    for: zstd says "Allocation error : not enough memory", which was counted as a `corrupt_stream`
    skip, the file staged with 0 documents (and kept so by the rerun)."""
    code = textwrap.dedent(
        """
        import resource, zstandard
        from bolmo_async.decode import LineDecoder
        from bolmo_async.errors import ResourceError
        from bolmo_async.models import SkipCounter
        params = zstandard.ZstdCompressionParameters.from_level(3, window_log=27, write_content_size=False)
        obj = zstandard.ZstdCompressor(compression_params=params).compressobj()
        data = obj.compress(b'{"id": "a", "text": "hello"}' + bytes([10])) + obj.flush()
        vm = int(next(l for l in open('/proc/self/status') if l.startswith('VmSize')).split()[1]) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (vm + (48 << 20), resource.RLIM_INFINITY))
        skips = SkipCounter()
        dec = LineDecoder('data/a.jsonl.zst', '.jsonl.zst', skips)
        try:
            out = [*dec.feed(data), *dec.finish()]
            print('decoded', sum(b.num_rows for b in out), dict(skips.counts))
        except ResourceError as exc:
            print('refused', exc, dict(skips.counts))
        """
    )
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("refused the system refused memory") and "ulimit -v" in r.stdout, r.stdout
    assert r.stdout.rstrip().endswith("{}"), r.stdout  # nothing counted as the stream's damage


def test_a_connection_refused_a_socket_is_this_machines_limit_never_the_servers_outage() -> None:
    """Out of descriptors, aiohttp's connect fails as "Cannot connect to host ... [Too many open
    files]": it counted as the server's outage ("no connection", which stops a run as the Hub
    being down) and the file's line, "gave up after 8 attempts", named no fix."""
    import asyncio

    import aiohttp

    from bolmo_async.retry import RetryPolicy, outage_cause, retrying

    async def connect() -> None:
        async with aiohttp.ClientSession() as session:
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (_lowest_free_fd(), hard))  # no socket can be made
            try:
                await session.get("http://127.0.0.1:9/")
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    async def attempt_and_see() -> Exception:
        try:
            await connect()
        except Exception as exc:
            return exc
        raise AssertionError("connected without a socket")

    exc = asyncio.run(attempt_and_see())
    assert isinstance(exc, aiohttp.ClientConnectorError), repr(exc)
    assert outage_cause(exc) is None
    policy = RetryPolicy(max_attempts=2, base_delay=0.01, max_delay=0.01)
    with pytest.raises(
        ResourceError, match=r"^data/a\.jsonl: the system refused a file descriptor .*ulimit -n"
    ) as info:
        asyncio.run(retrying(policy, "data/a.jsonl", connect))
    assert info.value.outage is None
