"""The output folder on a POSIX filesystem.

- Every file is written to a unique temporary name in its own folder and renamed into place
  (``os.replace``): a reader sees the old file or the whole new one, a killed run leaves only
  temporaries, which ``clean_temporaries`` removes.
- Shards are written with O_DIRECT where the filesystem takes it (see ``DIRECT_IO``).
- Nothing follows a symbolic link this module did not make: files are created with
  ``O_EXCL | O_NOFOLLOW`` and renamed over whatever stands at their name (a link is replaced,
  never written through), locks are opened with ``O_NOFOLLOW``, a link where a sub-folder
  belongs is replaced by the folder, and reads refuse links.
- A full disk or quota becomes ``DiskSpaceError``, a refused write ``OutputError``, naming
  the folder and the fix.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import functools
import io
import os
import re
import secrets
import shutil
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..errors import DiskSpaceError, OutputError, StateError, UsageError
from .base import (
    DOCUMENTS,
    LOCK,
    RAW,
    SHARD_PREFIX,
    SHARD_RE,
    STAGING,
    NewFile,
    OutputDir,
    busy_message,
    fit_name,
)

#: fsync every file before renaming it into place. Off by default: the atomic rename survives a
#: killed process (a reader sees the old file or the whole new one), and fsync on every staged
#: file and shard costs a large share of the run's time on common disks. Without it a power
#: loss or kernel crash can leave a renamed file empty or short; staged files are then caught
#: by their marker's checksum and fetched again. Set BOLMO_ASYNC_FSYNC=1 where power-loss
#: durability of the shards matters more than speed.
FSYNC = os.environ.get("BOLMO_ASYNC_FSYNC", "") not in ("", "0")

#: Shards are written with O_DIRECT where the filesystem takes it (BOLMO_ASYNC_DIRECT_IO=0 turns
#: it off). A run writes 4 bytes of shard per byte of text and nothing reads them back before the
#: trainer: through the page cache every one of those pages is allocated, copied into and later
#: evicted (in the kernel, on the writing core: half the CPU of byte mode, measured), and it
#: pushes the staged files the shards are made from out of the cache.
DIRECT_IO = os.environ.get("BOLMO_ASYNC_DIRECT_IO", "1") not in ("", "0")
#: O_DIRECT wants memory, file offsets and sizes aligned to the device's block; 4096 covers them.
DIRECT_ALIGN = 4096
#: How filesystems refuse O_DIRECT (at open or at a write): then ordinary writes.
_NO_DIRECT = {errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP}
_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_REFUSED = {errno.EACCES, errno.EPERM, errno.EROFS}
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
#: A temporary's name: ``.<target name, cut>.<pid>-<pid space>-<random>.tmp``; the cut keeps it
#: under the filesystem's 255-byte limit whatever the target is called.
_TMP_NAME_BYTES = 100


@functools.cache
def ordinary_mode() -> int:
    """The mode a plain ``open(path, "w")`` gives a new file under this process's umask
    (``mkstemp`` makes 0600 files: a training job under another user could not read them)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


#: In each output's folder of the local scratch (``scratch_folder_name``): the --output-dir it
#: serves, so that a full scratch can say whose files fill it.
SCRATCH_OWNER = "output-dir.txt"
_SCRATCH_HEX = 16
#: The name of such a folder (``scratch_folder_name``): other folders are not ours to name.
_SCRATCH_FOLDER = re.compile(f"[0-9a-f]{{{_SCRATCH_HEX}}}")


def scratch_folder_name(location: str) -> str:
    """The folder of the local scratch that serves --output-dir ``location``: the first hex digits
    of the SHA-256 of its name."""
    import hashlib

    return hashlib.sha256(location.encode()).hexdigest()[:_SCRATCH_HEX]


def tree_bytes(folder: str | os.PathLike[str], limit: int = 0) -> int:
    """Bytes of the files under ``folder``, no link followed (0 when it is a link or not a folder);
    ``limit``: stop after that many entries (0: none)."""
    if os.path.islink(folder) or not os.path.isdir(folder):
        return 0
    total = seen = 0
    for top, dirs, files in os.walk(folder):  # (os.walk never descends into a link to a folder)
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(top, name)).st_size
        seen += len(dirs) + len(files)
        if limit and seen >= limit:
            break
    return total


def scratch_usage(root: str | os.PathLike[str], limit: int = 100_000) -> str:
    """What fills the local scratch ``root`` (said by a full scratch): its outputs' folders by size,
    largest first, each with the --output-dir it serves. A user-named --scratch-dir keeps the
    downloads of a --no-streaming run that did not finish (to resume it) until that run ends; a
    later run into another output then finds the disk full of them. '' when nothing is found."""
    from ..util import human_bytes

    sizes: list[tuple[int, str]] = []
    with contextlib.suppress(OSError):
        for sub in os.scandir(root):
            # Only outputs' folders: a --scratch-dir on a shared disk (/scratch, /tmp) holds other
            # folders, which "remove the folder ..." must not name.
            if not _SCRATCH_FOLDER.fullmatch(sub.name) or not sub.is_dir(follow_symlinks=False):
                continue
            total = tree_bytes(sub.path, limit)
            owner = ""
            with contextlib.suppress(OSError, UnicodeDecodeError):
                owner = Path(sub.path, SCRATCH_OWNER).read_text(encoding="utf-8").strip()[:300]
            sizes.append(
                (total, f"{human_bytes(total)} in {sub.path}" + (f" (for --output-dir {owner})" if owner else ""))
            )
    sizes = sorted((x for x in sizes if x[0]), reverse=True)
    if not sizes:
        return ""
    listed = "; ".join(text for _, text in sizes[:3]) + ("; ..." if len(sizes) > 3 else "")
    return (
        f" It holds {human_bytes(sum(n for n, _ in sizes))}: {listed}. An output's folder there keeps its cache of "
        "staged files and the downloads of a --no-streaming run that did not finish (to resume it): remove the "
        "folder of an output you are done with."
    )


def _what_is_full(exc: OSError, folder: str) -> str:
    """What of the disk holding ``folder`` is used up, where it is not its bytes: its inodes (a
    tmpfs's nr_inodes, a filesystem of many small files: ``df -h`` shows free space, and the user
    looked for what else fills it) or the user's quota. "" when it is the bytes (or unknown)."""
    from ..util import human_bytes

    if exc.errno == errno.EDQUOT:
        return " for this user (its disk quota is used up: `quota -s` shows it)"
    try:
        st = os.statvfs(folder)
    except OSError:
        return ""
    if st.f_files and not st.f_favail and st.f_bavail:
        return (
            f" of files: it has no inode left for another one, though {human_bytes(st.f_bavail * st.f_frsize)} "
            "are free (`df -i` shows it)"
        )
    return ""


def translate(exc: OSError, where: str | os.PathLike[str], folder: str, *, scratch: bool = False) -> BaseException:
    """An OSError of a write as our error: a full disk, a refused write, or itself. ``scratch``:
    ``where`` is in the local scratch of a bucket output, whose fix is another --scratch-dir, not
    another --output-dir."""
    if exc.errno in _FULL and scratch:
        return DiskSpaceError(
            f"The disk holding {where} is full: it is the local scratch of the object-store --output-dir "
            "(files in flight and a cache of staged files, BOLMO_ASYNC_SCRATCH_CACHE). Point --scratch-dir "
            "(or BOLMO_ASYNC_SCRATCH) at a local disk with more room, or free space, and rerun the same command: "
            "finished files are kept and the run resumes." + scratch_usage(folder)
        )
    if exc.errno in _FULL:
        return DiskSpaceError(
            f"The disk holding {where} is full{_what_is_full(exc, folder)}. Free space (or choose another "
            "--output-dir) and rerun the same command: finished files are kept and the run resumes."
        )
    if exc.errno in _REFUSED and scratch:
        return OutputError(
            f"{where} cannot be written ({exc.strerror or exc}): it is the local scratch of the object-store "
            "--output-dir; point --scratch-dir (or BOLMO_ASYNC_SCRATCH) at a local folder this user can write."
        )
    if exc.errno in _REFUSED:
        return OutputError(
            f"{where} cannot be written ({exc.strerror or exc}): give this user write permission on {folder} "
            "(or mount it read-write), or choose another --output-dir."
        )
    if exc.errno == errno.EISDIR:  # a folder where a file is renamed into place: never removed for us
        return OutputError(
            f"{where} is a folder, where bolmo-async writes a file (made by hand, or a copy gone wrong): "
            "move it away (it is not ours to remove) and rerun the same command: finished files are kept."
        )
    return exc


@functools.cache
def pid_space() -> str:
    """Where this process's pid means this process: 8 hex digits of the kernel's boot id and this
    process's pid namespace. ``fetch --worker`` shares in containers (a pid namespace each) or on
    machines (a boot id each) over one shared folder reuse each other's pids: a dead writer's
    temporaries are found by its pid in this space, never another share's live ones. The host's
    name where /proc tells neither."""
    import hashlib

    parts = []
    with contextlib.suppress(OSError), open("/proc/sys/kernel/random/boot_id", "rb") as f:
        parts.append(f.read().strip())
    with contextlib.suppress(OSError):
        parts.append(os.readlink("/proc/self/ns/pid").encode())
    if len(parts) < 2:
        import socket

        parts.append(socket.gethostname().encode())
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:8]


def temp_name(target: Path) -> Path:
    cut = fit_name(target.name, _TMP_NAME_BYTES)
    return target.with_name(f".{cut}.{os.getpid()}-{pid_space()}-{secrets.token_hex(4)}.tmp")


#: The temporaries this process has created and neither committed nor aborted: removed at exit
#: (``abandon_temporaries``). A stop signal can land between a temporary's creation and the
#: ``try`` of the code that would abort it (a stop right after plan.json left
#: ``.run.json.<pid>-<hex>.tmp``); registered before the file exists, no such window is left.
_open_temporaries: set[Path] = set()


def abandon_temporaries() -> int:
    """Unlink every temporary this process made and did not commit or abort (how many): at exit
    (``atexit``: the command line's ``_exit_now`` runs it too), and by a worker process before its
    ``os._exit``. A write still going on (a thread left to end with its process) lands in an
    unlinked file."""
    n = 0
    for tmp in list(_open_temporaries):
        _open_temporaries.discard(tmp)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
            n += 1
    return n


atexit.register(abandon_temporaries)


#: ``temp_name``'s names for the folder's own files (shards, their csv.gz, the metadata): what a
#: killed writer leaves in the folder (a file of the user's own that merely looks alike is not one).
_OWN_NAMES = "|".join([rf"{SHARD_PREFIX}\d{{5,}}\.(?:npy|csv\.gz)", *(re.escape(n) for n in DOCUMENTS if "/" not in n)])


def _temporaries(names: str, pid: str = r"\d+", space: str = r"(?:[0-9a-f]{8}-)?") -> re.Pattern[str]:
    """``temp_name``'s temporaries of the files ``names`` (a regex) written by process ``pid`` in
    pid space ``space`` (by default any writer, and those named before pid spaces were)."""
    return re.compile(rf"^\.(?:{names})\.{pid}-{space}[0-9a-f]{{8}}\.tmp$")


_TMP_RE = _temporaries(_OWN_NAMES)


def real_dir(path: Path, root: Path) -> Path:
    """``path`` (inside ``root``) as a real folder: made where missing; a link or a file standing at
    one of its components below ``root`` is removed first (never written through)."""
    rel = path.relative_to(root)
    cur = root
    for part in rel.parts:
        cur = cur / part
        for _ in range(8):
            try:
                if stat.S_ISDIR(os.lstat(cur).st_mode):
                    break
                # A link or a file where our folder belongs. Other threads or workers may be
                # replacing it too: whoever comes second finds it gone (FileNotFoundError) or
                # already a folder (IsADirectoryError), and looks again.
                with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                    os.unlink(cur)
            except FileNotFoundError:
                pass
            with contextlib.suppress(FileExistsError):
                os.mkdir(cur)
        else:
            raise FileExistsError(errno.EEXIST, "something keeps replacing this folder", str(cur))
    return path


def through_link(name: str, root: Path) -> bool:
    """A folder of ``name`` below ``root`` is a symbolic link (what lies behind it is not ours).
    On strings, not ``Path`` objects: looked at twice for every marker read, per file, where
    building the paths cost more than the ``lstat`` itself."""
    if "/" not in name:
        return False
    cur = os.fspath(root)
    for part in name.split("/")[:-1]:
        if part in ("", "."):
            continue
        cur = os.path.join(cur, part)
        if os.path.islink(cur):
            return True
    return False


class LocalNewFile:
    """A new file written through a temporary beside its target (see ``NewFile``).

    ``direct``: O_DIRECT where the filesystem takes it; ``write`` then wants page-aligned memory
    (``aligned_buffer``) and every write but the last a multiple of ``DIRECT_ALIGN`` bytes. A
    filesystem that refuses O_DIRECT at open (tmpfs, some FUSE mounts) or at a write gets
    ordinary writes from then on: same bytes either way."""

    def __init__(self, target: Path, folder: str, *, direct: bool = False, scratch: bool = False):
        self.target = target
        self.name = target.name
        self.folder = folder
        self.scratch = scratch  # (a bucket output's local scratch: its errors name --scratch-dir)
        self.tmp = temp_name(target)
        self.size = 0
        self.fd = -1
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC
        odirect = getattr(os, "O_DIRECT", 0) if direct and DIRECT_IO else 0
        self.direct = False
        self._buffer: io.BufferedWriter | None = None
        _open_temporaries.add(self.tmp)  # before it exists: a stop from here on cannot leave it
        try:
            if odirect:
                try:
                    self.fd = os.open(self.tmp, flags | odirect, ordinary_mode())
                    self.direct = True
                    return
                except OSError as exc:
                    if exc.errno not in _NO_DIRECT:
                        raise
            self.fd = os.open(self.tmp, flags, ordinary_mode())
        except OSError as exc:
            _open_temporaries.discard(self.tmp)
            raise translate(exc, target, folder, scratch=scratch) from exc
        except BaseException:  # a stop signal right after the open (its fd, maybe not kept: at exit)
            self.abort()
            raise
        if not direct:  # many small writes (Arrow's, gzip's): buffered
            try:
                self._buffer = io.BufferedWriter(io.FileIO(self.fd, "wb", closefd=False), 1 << 20)
            except BaseException:
                self.abort()
                raise

    def _ordinary(self) -> None:
        import fcntl

        fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        self.direct = False

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        n = len(view)
        try:
            if self._buffer is not None:
                self._buffer.write(view)
            else:
                self._write_direct(view)
        except OSError as exc:
            raise translate(exc, self.target, self.folder, scratch=self.scratch) from exc
        self.size += n
        return n

    def _write_direct(self, view: memoryview) -> None:
        if self.direct and len(view) % DIRECT_ALIGN:
            self._ordinary()  # the unaligned tail of the file
        while view:
            try:
                n = os.write(self.fd, view)
            except OSError as exc:
                if self.direct and exc.errno in _NO_DIRECT:
                    self._ordinary()
                    continue
                raise
            view = view[n:]

    def flush(self) -> None:
        if self._buffer is not None:
            try:
                self._buffer.flush()
            except OSError as exc:
                raise translate(exc, self.target, self.folder, scratch=self.scratch) from exc

    def commit(self) -> int:
        try:
            if self._buffer is not None:
                self._buffer.flush()
            if FSYNC:
                os.fsync(self.fd)
            self._close()
            os.replace(self.tmp, self.target)  # replaces a link at the target, never follows it
            _open_temporaries.discard(self.tmp)
        except OSError as exc:
            self.abort()
            raise translate(exc, self.target, self.folder, scratch=self.scratch) from exc
        return self.size

    def _close(self) -> None:
        if self.fd < 0:
            return
        fd, self.fd = self.fd, -1
        buffer, self._buffer = self._buffer, None
        try:
            if buffer is not None:
                with contextlib.suppress(OSError, ValueError):
                    buffer.close()  # closefd=False: closes only the wrapper
        finally:
            os.close(fd)

    def unlink_early(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.tmp)
        _open_temporaries.discard(self.tmp)

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self._close()
        with contextlib.suppress(OSError):
            os.unlink(self.tmp)
        _open_temporaries.discard(self.tmp)


_held: set[str] = set()  # folder locks this process holds (prepare runs plan, fetch, finalize inside)
_held_guard = threading.Lock()


def _names(folder: Path) -> list[str]:
    """The names in ``folder`` ([] when it is not a folder)."""
    try:
        return os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _replaced(fd: int, path: Path) -> bool:
    """The lock file open as ``fd`` is no longer the one at ``path`` (removed, made again)."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return True
    mine = os.fstat(fd)
    return (st.st_ino, st.st_dev) != (mine.st_ino, mine.st_dev)


def _unlink_matching(folder: Path, pattern: re.Pattern[str]) -> int:
    """Remove the entries of ``folder`` whose names match ``pattern``; how many went."""
    n = 0
    for name in _names(folder):
        if pattern.match(name):
            with contextlib.suppress(OSError):
                os.unlink(folder / name)
                n += 1
    return n


def _entries(folder: Path, keep: Callable[[str], bool]) -> list[Path]:
    """The entries of ``folder`` whose names ``keep`` accepts."""
    return [folder / name for name in _names(folder) if keep(name)]


#: Seconds a listing of ``staging/``'s temporaries is reused for (``LocalDir._staging_temporaries``).
_TMP_LIST_AGE = 1.0
_tmp_guard = threading.Lock()


def _open_nofollow(path: Path, flags: int) -> int:
    """Open (creating) a lock file; a link standing at its name is replaced by a file."""
    for _ in range(3):
        try:
            return os.open(path, flags | os.O_CREAT | _NOFOLLOW | _CLOEXEC, ordinary_mode())
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    raise StateError(f"{path} keeps being replaced by a symbolic link; remove it and rerun.")


#: Bytes kept free under PATH_MAX for the names inside the folder (``staging/<name>.arrow`` and
#: temporaries: at most 255 bytes a name).
_INNER_PATH_BYTES = 512


def _name_max(path: Path) -> int:
    """The longest name (bytes) the filesystem holding ``path`` (or its nearest existing folder) takes."""
    for p in (path, *path.parents):
        with contextlib.suppress(OSError, ValueError):
            if os.path.isdir(p):
                return int(os.pathconf(p, "PC_NAME_MAX"))
    return 255


def _show(name: str, keep: int = 40) -> str:
    return repr(name if len(name) <= keep else name[:keep] + "...")


def check_path_names(text: str, flag: str = "--output-dir") -> None:
    """A path the OS would refuse by its names, refused before anything is made: a NUL, a name
    longer than the filesystem takes, a path too long to hold the folder's own names."""
    if "\0" in text:
        raise UsageError(f"{flag} {text!r}: a path cannot hold a NUL character; name the folder without it.")
    path = Path(text)
    limit = _name_max(path)
    for part in path.parts[1:] if path.is_absolute() else path.parts:
        size = len(os.fsencode(part))
        if size > limit:
            raise UsageError(
                f"{flag} {_show(text, 60)}: the name {_show(part)} is {size} bytes long, over the {limit} bytes this "
                "filesystem takes for one name; choose a shorter name."
            )
    size = len(os.fsencode(text))
    path_max = 4096
    with contextlib.suppress(OSError, ValueError, AttributeError):
        path_max = int(os.pathconf("/", "PC_PATH_MAX"))
    if size > path_max - _INNER_PATH_BYTES:
        raise UsageError(
            f"{flag} {_show(text, 60)}: the path is {size} bytes long; with the names inside the folder it would pass "
            f"the system's limit of {path_max} bytes. Choose a shorter path."
        )


class LocalDir(OutputDir):
    local = True

    def __init__(self, location: str | os.PathLike[str]):
        check_path_names(os.path.expanduser(os.fspath(location)))
        self.root = Path(location).expanduser().resolve()
        check_path_names(str(self.root))  # (a link resolved to a long path)
        if self.root == Path(self.root.anchor):
            raise UsageError(
                f"--output-dir {os.fspath(location)}: that is the filesystem's root (an unset variable in "
                '-o "$DIR/"?); name a folder of its own, e.g. -o ./bolmo_out.'
            )
        self.location = str(self.root)
        self._created = False
        # The names a folder held when this run made its lock file there (None: the lock was
        # there already): a refused first run leaves the user's folder as it found it.
        self._found: set[str] | None = None
        self._tmp_listing: tuple[float, float, list[str]] | None = None  # when, its cost, names

    def path(self, name: str) -> Path:
        return self.root / name

    def _parent(self, name: str) -> Path:
        target = self.root / name
        if target.parent != self.root:
            real_dir(target.parent, self.root)
        return target

    # -- the folder ----------------------------------------------------------------------
    def create(self) -> None:
        try:
            if not self.root.exists():
                self.root.mkdir(parents=True)
                self._created = True
            elif not os.path.lexists(self.root / LOCK):
                self._found = set(_names(self.root))
            fd = _open_nofollow(self.root / LOCK, os.O_RDWR)
            os.close(fd)
        except OSError as exc:
            is_file = os.path.exists(self.root) and not os.path.isdir(self.root)  # (these never raise)
            why = "it is a file" if is_file else exc.strerror or str(exc)
            if exc.errno in (errno.EINVAL, errno.EILSEQ) and not is_file:
                why += ": this filesystem refuses a name in it (characters it does not take, like : or \\ on FAT/NTFS)"
            fix = (
                f"give this user write permission on {self.root} (or mount it read-write), or choose another "
                "--output-dir"
                if exc.errno in _REFUSED
                else "choose another --output-dir"
            )
            raise UsageError(f"--output-dir {self.root} cannot be used ({why}); {fix}.") from None

    def discard_if_unused(self) -> None:
        """A folder this run made and left holding nothing but its lock goes again, and in a folder
        the user had, the lock this run made goes when nothing else was added (a failed first
        command leaves nothing behind: the folder is as it was found). A run starting meanwhile
        that opened the lock file before it went takes it again (``lock`` checks its inode)."""
        with contextlib.suppress(OSError):
            if self._created and {p.name for p in self.root.iterdir()} <= {LOCK}:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.root / LOCK)
                self.root.rmdir()
                self._created = False
            elif self._found is not None and set(_names(self.root)) <= self._found | {LOCK}:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.root / LOCK)
                self._found = None

    def exists(self) -> bool:
        return self.root.is_dir()

    @contextlib.contextmanager
    def lock(self, *, shared: bool = False) -> Iterator[None]:
        """``plan``, ``fetch``, ``finalize`` and ``prepare`` hold an exclusive flock; ``fetch
        --worker I/N`` shares of one plan hold shared ones, so they run together but never beside
        another command. Released when the run ends, however it ends (the kernel drops a dead
        process's locks). Where the filesystem has no ``flock`` (some network filesystems), runs
        are not locked."""
        path = str(self.root / LOCK)
        with _held_guard:
            nested = path in _held
        if nested:  # the outer call of this process holds the lock (and releases it)
            yield
            return
        try:
            import fcntl
        except ImportError:  # not POSIX
            yield
            return
        fd, locked = self._take(fcntl, shared)
        try:
            if not shared:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                if locked:
                    self._remove_dead_temporaries()
            with _held_guard:
                _held.add(path)
            try:
                yield
            finally:
                with _held_guard:
                    _held.discard(path)
                if not shared:
                    with contextlib.suppress(OSError):
                        os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # drops the lock

    def _take(self, fcntl: Any, shared: bool) -> tuple[int, bool]:
        """The lock file, open and flocked (False: no flock on this filesystem). A lock file removed
        while this run took it (``discard_if_unused`` of a refused run) is opened again: a lock on
        a file no longer there would keep no other run out."""
        path = str(self.root / LOCK)
        for _ in range(3):
            try:
                fd = _open_nofollow(self.root / LOCK, os.O_RDWR)
            except OSError as exc:
                raise translate(exc, path, self.location) from exc
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
                os.close(fd)
                raise StateError(
                    busy_message(str(self.root), f"process {holder}" if holder.isdigit() else "shares")
                ) from None
            except OSError:
                return fd, False  # no flock here: unlocked
            if not _replaced(fd, self.root / LOCK):
                return fd, True
            os.close(fd)
        raise StateError(f"{path} keeps being removed while this run takes it; rerun the command.")

    def holder(self) -> str | None:
        """From the kernel's table of flocks (``/proc/locks``, Linux), matched by the lock file's
        device and inode: taking the lock to see, even for an instant, could refuse a run that
        starts in that instant. Runs on other machines over a network filesystem are not seen."""
        try:
            st = os.stat(self.root / LOCK, follow_symlinks=False)
            with open("/proc/locks") as f:
                table = f.read()
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        where = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        kinds: dict[str, list[str]] = {}
        for line in table.splitlines():
            cols = line.split()  # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:2158672 0 EOF" ("->" waits)
            if len(cols) >= 6 and cols[1] == "FLOCK" and cols[5] == where:
                kinds.setdefault(cols[3], []).append(cols[4])
        if "WRITE" in kinds:
            return f"a bolmo-async run (process {kinds['WRITE'][0]})"
        if "READ" in kinds:
            pids = sorted(set(kinds["READ"]), key=int)
            return f"a job-array share (`fetch --worker`, process{'es' if len(pids) > 1 else ''} {', '.join(pids)})"
        return None

    def _remove_dead_temporaries(self) -> None:
        """The temporaries of the folder's own files (shards, their csv.gz, metadata) that a killed
        run left: a file whose shards were being written while it was staged leaves up to all of
        them (gigabytes). Only under the exclusive lock, so no writer of this folder is alive."""
        _unlink_matching(self.root, _TMP_RE)

    def remove_temporaries_of(self, pid: int, held: Sequence[str] = ()) -> int:
        mine = f"{pid_space()}-"  # (a --worker share elsewhere may have a live process of that pid)
        n = _unlink_matching(self.root, _temporaries(_OWN_NAMES, str(pid), mine))
        theirs = _temporaries(".+", str(pid), mine)
        staging = self.root / STAGING
        if not staging.is_symlink():  # what lies behind a link at staging/ is not ours to clean
            n += _unlink_matching(staging, theirs)
        # And its whole-file downloads (a streaming run's parquet, raw/KEY/..KEY.whole.PID-...tmp):
        # left until the next run cleaned that file's scratch, were a rerun ever made.
        raw = self.root / RAW
        if not raw.is_symlink():
            for name in _names(raw):
                if not (raw / name).is_symlink():
                    n += _unlink_matching(raw / name, theirs)
        for key in held:  # (a --worker share may have claimed it since: then it is theirs)
            with self.claim(key) as claimed:
                if claimed:
                    n += self.clean_temporaries(key)
        return n

    def _claim_fd(self, key: str) -> int:
        return _open_nofollow(real_dir(self.root / STAGING, self.root) / f".{key}.lock", os.O_RDWR)

    @contextlib.contextmanager
    def claim(self, key: str) -> Iterator[bool]:
        try:
            import fcntl
        except ImportError:  # not POSIX: unlocked
            yield True
            return
        fd = self._claim_fd(key)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            except OSError:
                pass  # no flock on this filesystem: unlocked, as the folder lock
            yield True
        finally:
            os.close(fd)

    def reset(self) -> None:
        for name in DOCUMENTS:
            self.remove(name)
        for d in (STAGING, RAW, "tokenizer"):
            self._remove_tree(self.root / d)
        for name in self.shards():
            self.remove(name)

    def _remove_tree(self, path: Path) -> None:
        try:
            if path.is_symlink() or not path.is_dir():
                path.unlink()
                return
        except FileNotFoundError:
            return
        shutil.rmtree(path, ignore_errors=True)

    def free_bytes(self) -> int | None:
        return shutil.disk_usage(self.root).free

    def others(self) -> list[str]:
        ours = {d.split("/")[0] for d in DOCUMENTS} | {STAGING, RAW, LOCK}
        return sorted(
            n
            for n in _names(self.root)
            if n not in ours and not SHARD_RE.match(n) and not (n.startswith(".") and n.endswith(".tmp"))
        )

    # -- files -----------------------------------------------------------------------------
    def _open_read(self, name: str) -> int | None:
        if through_link(name, self.root):
            return None
        try:
            fd = os.open(self.root / name, os.O_RDONLY | _NOFOLLOW | _CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                return None  # a link where our file belongs: not ours
            raise
        if stat.S_ISDIR(os.fstat(fd).st_mode):  # a folder where our file belongs: not ours either (its
            os.close(fd)  # read failed as "unexpected IsADirectoryError"; a write names it)
            return None
        return fd

    def read_bytes(self, name: str) -> bytes | None:
        fd = self._open_read(name)
        if fd is None:
            return None
        with open(fd, "rb") as f:
            return f.read()

    def new_file(self, name: str, *, direct: bool = False) -> NewFile:
        try:
            target = self._parent(name)
        except OSError as exc:
            raise translate(exc, self.root / name, self.location) from exc
        return LocalNewFile(target, self.location, direct=direct)

    def create_bytes(self, name: str, data: bytes) -> bool:
        f = self.new_file(name)
        assert isinstance(f, LocalNewFile)
        try:
            f.write(data)
            f.flush()
            f._close()
            os.link(f.tmp, f.target)  # fails when anything (a link too) stands at the name
        except FileExistsError:
            return False
        except OSError as exc:
            raise translate(exc, f.target, self.location) from exc
        finally:
            f.abort()  # the temporary goes; the linked name stays
        return True

    def new_local_file(self, path: Path) -> NewFile:
        try:
            if path.is_relative_to(self.root):
                real_dir(path.parent, self.root)  # inside the folder: no link is followed
            else:
                path.parent.mkdir(parents=True, exist_ok=True)  # a scratch folder elsewhere
        except OSError as exc:
            raise translate(exc, path, self.location) from exc
        return LocalNewFile(path, self.location)

    def size(self, name: str) -> int | None:
        if through_link(name, self.root):
            return None
        try:
            st = os.lstat(self.root / name)
        except OSError:
            return None
        return st.st_size if stat.S_ISREG(st.st_mode) else None

    def remove(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            os.unlink(self.root / name)

    def checksum(self, name: str) -> str | None:
        from ..util import new_checksum

        fd = self._open_read(name)
        if fd is None:
            return None
        h = new_checksum()
        with open(fd, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
        return str(h.hexdigest())

    @contextlib.contextmanager
    def open_input(self, name: str) -> Iterator[Any]:
        import pyarrow as pa

        path = self.root / name
        if path.is_symlink() or through_link(name, self.root):
            raise FileNotFoundError(errno.ENOENT, "a symbolic link stands where a staged file belongs", str(path))
        with pa.memory_map(str(path), "r") as source:
            yield source

    def ref(self, name: str) -> str:
        return str(self.root / name)

    # -- staging ---------------------------------------------------------------------------
    def scratch(self, key: str) -> Path:
        return self.root / RAW / key.split("-")[0]

    def clean_temporaries(self, key: str) -> int:
        n = 0
        staging = self.root / STAGING
        prefix = f".{key}."
        leftovers = [
            staging / t for t in self._staging_temporaries() if t.startswith(prefix) and len(t) >= len(prefix) + 4
        ]
        scratch = self.scratch(key)
        if not scratch.is_symlink():
            whole = f".{key}.whole"
            leftovers += _entries(
                scratch, lambda e: e == whole or (e.startswith(".") and e.endswith(".tmp") and len(e) >= 5)
            )
        for p in leftovers:
            with contextlib.suppress(OSError):
                p.unlink()
                n += 1
        return n

    def _staging_temporaries(self) -> list[str]:
        """The temporaries' names in ``staging/``, from a listing at most ``_TMP_LIST_AGE`` old (and
        at most about 5% of the time spent listing). Listing the folder for every file, as this
        did, made a run of N files read N x 2N names: quadratic (10,000 files: 200M entries).
        Leftovers of killed runs are there before this run lists; one killed while this run goes
        on is seen at the next listing, or by the next run (names are unique per writer, so a
        stale name never points to someone else's new file)."""
        now = time.monotonic()
        with _tmp_guard:
            listed = self._tmp_listing
            if listed is not None and now - listed[0] < max(_TMP_LIST_AGE, 20 * listed[1]):
                return listed[2]
        staging = self.root / STAGING
        # Not through a link standing at staging/: what lies behind it is not ours to clean.
        names = [] if staging.is_symlink() else [e for e in _names(staging) if e.startswith(".") and e.endswith(".tmp")]
        with _tmp_guard:
            self._tmp_listing = (now, time.monotonic() - now, names)
        return names

    def staging_bytes(self) -> int:
        d = self.root / STAGING
        if not d.is_dir() or d.is_symlink():
            return 0
        with os.scandir(d) as entries:  # one lstat per file (three through pathlib)
            return sum(e.stat(follow_symlinks=False).st_size for e in entries if e.is_file(follow_symlinks=False))

    def remove_staging(self) -> None:
        self._remove_tree(self.root / STAGING)

    def staging_dropped(self) -> bool:
        return not os.path.lexists(self.root / STAGING)

    def raw_bytes(self) -> int:
        return tree_bytes(self.root / RAW)  # raw/KEY/FILE, no link followed

    # -- shards ----------------------------------------------------------------------------
    def shards(self) -> dict[str, int]:
        out: dict[str, int] = {}
        if not self.root.is_dir():
            return out
        with os.scandir(self.root) as it:
            for entry in it:
                if SHARD_RE.match(entry.name):
                    out[entry.name] = entry.stat(follow_symlinks=False).st_size
        return dict(sorted(out.items()))


def aligned_buffer(nbytes: int) -> memoryview:
    """``nbytes`` of zeroed, page-aligned memory (anonymous mmap), writable."""
    import mmap

    return memoryview(mmap.mmap(-1, nbytes))
