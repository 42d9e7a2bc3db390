"""The system's limits (`ulimit -n`, `-u`, `-v`, a container's pids or memory limit) are the run's
trouble, never the data's: what they refuse fails the file it hit, in one line naming the limit,
and a rerun with the limit raised gives the clean run's shards."""

from __future__ import annotations

import errno
import os
import resource
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from bolmo_async.errors import ResourceError, exhausted
from bolmo_async.filetask import Processor, TaskContext
from bolmo_async.models import PlannedFile
from bolmo_async.outdir import open_output
from bolmo_async.staging import Staging
from bolmo_async.tokenize import ByteTokenizer


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
