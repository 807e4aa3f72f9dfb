"""One writer per cache, readers that see a consistent cache: advisory locks on CACHE/.lock.

    with lock_cache(path, exclusive=True, what="build"):      # dataprep build, stats.json
        ...
    handle = lock_cache(path, exclusive=False, what="read")   # CacheReader, for its lifetime
    handle.release()

Writers (a build, `--force`, `dataprep stats` writing CACHE/stats.json) hold the lock
exclusively; readers (train, evaluate, stats, verify: every CacheReader) hold it shared, so
any number of readers run together, and a writer and a reader never do. A request that cannot
be granted now is refused at once with a CacheBusy error that names the holders (PID and
command line), or, with wait=True (`--wait`), waits for them.

Why flock(2). The lock file is a plain file in the cache folder (`.lock`: not a Zarr node, not
one of the contract's names, so zarr and xarray ignore it). flock locks belong to an open file
description, not to a process: two handles in one process conflict as two processes do, a
lock is never dropped because some other code in the process closed another descriptor of
the same file (the trap of POSIX fcntl/lockf locks, which sqlite has to work around), and the
kernel releases it whenever the holder dies, SIGKILL included: no stale lock file to clean up
(git's and Mercurial's O_EXCL lock files need that). HDF5 takes the same route (flock, with
HDF5_USE_FILE_LOCKING to turn it off on file systems without locks). Forked children share
the descriptor (a DataLoader worker keeps its parent's read lock; build workers are started
before the lock is taken). Network file systems: Linux emulates flock on NFS with whole-file
POSIX locks through the server (NFSv4, or NLM/lockd for v3), so a lock is seen by every client
as long as the mount has locking (not `nolock` / `local_lock=all`); a client that loses
contact with the server longer than its lease can lose its lock. Lustre needs the `flock` mount
option (`localflock` makes locks node-local). Where flock fails (ENOLCK, EOPNOTSUPP, ENOSYS)
the error says so, and CITYSCAPES_CACHE_LOCKING=off runs without locks, at the user's risk.

Within one process the locks of a path are counted, not stacked: a second reader shares the
process's hold, a writer in a process that already reads converts the hold to exclusive (if no
other process reads), and readers in a writing process share the writer's hold.

The holder of the exclusive lock writes its PID, host, start time and command line into the
lock file (and empties it on release), for the refusal message when /proc/locks cannot say
(another NFS client, not Linux).
"""
from __future__ import annotations

import errno
import fcntl
import os
import shlex
import socket
import sys
import threading
import time
from dataclasses import dataclass

from cache.errors import UserError

LOCK_FILE = ".lock"
LOCKING_VAR = "CITYSCAPES_CACHE_LOCKING"  # "off": take no locks (a file system without them)
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
_NO_WRITE = {errno.EROFS, errno.EACCES, errno.EPERM}


class CacheBusy(UserError):
    """Another process holds the cache's lock in a mode that excludes this request."""


@dataclass
class _Hold:
    fd: int
    exclusive: bool
    readers: int = 0
    writers: int = 0


_HOLDS: dict[str, _Hold] = {}  # lock file path -> this process's hold
_GUARD = threading.RLock()


def _forget_inherited_holds() -> None:
    """In a forked child: the parent's holds are the parent's (the child keeps the descriptors,
    and so the locks, until it exits; it never unlocks or converts them)."""
    _HOLDS.clear()


os.register_at_fork(after_in_child=_forget_inherited_holds)


class CacheLock:
    """One hold on a cache's lock; release() (or leaving `with`) gives it back. Idempotent, and
    a no-op in a forked child (the hold is the parent's)."""

    def __init__(self, key: str | None, exclusive: bool):
        self.key, self.exclusive, self._pid = key, exclusive, os.getpid()

    @property
    def held(self) -> bool:
        return self.key is not None

    def release(self) -> None:
        key, self.key = self.key, None
        if key is None or os.getpid() != self._pid:
            return
        with _GUARD:
            hold = _HOLDS.get(key)
            if hold is None:
                return
            if self.exclusive:
                hold.writers -= 1
            else:
                hold.readers -= 1
            if hold.writers == 0 and hold.exclusive:
                _clear_holder(hold.fd)
                if hold.readers > 0:  # readers of this process go on: back to shared
                    try:
                        fcntl.flock(hold.fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                        hold.exclusive = False
                    except OSError:  # another writer got in between: it is its turn now
                        hold.exclusive = False
            if hold.readers <= 0 and hold.writers <= 0:
                del _HOLDS[key]
                os.close(hold.fd)  # closing the last descriptor releases the lock

    def __enter__(self) -> "CacheLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __reduce__(self):  # a pickled copy (e.g. inside a CacheReader sent to a worker) holds nothing
        return (CacheLock, (None, self.exclusive))


def locking_enabled() -> bool:
    return os.environ.get(LOCKING_VAR, "").strip().lower() not in ("off", "0", "no", "false")


def lock_cache(path: str | os.PathLike, *, exclusive: bool, wait: bool = False, what: str = "",
               on_wait=None) -> CacheLock:
    """Take the cache's lock at `path` (a folder that exists): exclusive for a writer, shared
    for a reader. CacheBusy naming the holders if it is taken and not `wait`; with `wait`,
    `on_wait(message)` is called once and the call blocks until the lock is granted.

    A reader of a cache it cannot write (read-only file system, another user's cache without a
    lock file) proceeds without a lock: nobody can be writing it through this file system."""
    if not locking_enabled():
        return CacheLock(None, exclusive)
    lock_path = os.path.join(os.path.abspath(os.fspath(path)), LOCK_FILE)
    key = os.path.realpath(lock_path)
    with _GUARD:
        hold = _HOLDS.get(key)
        if hold is not None:
            return _join(hold, key, exclusive, wait, what, on_wait)
        fd = _open_lock_file(lock_path, exclusive)
        if fd is None:
            return CacheLock(None, exclusive)
        try:
            _flock(fd, lock_path, exclusive, wait, what, on_wait)
        except BaseException:
            os.close(fd)
            raise
        if exclusive:
            _record_holder(fd)
        _HOLDS[key] = _Hold(fd, exclusive, readers=0 if exclusive else 1, writers=1 if exclusive else 0)
        return CacheLock(key, exclusive)


def _join(hold: _Hold, key: str, exclusive: bool, wait: bool, what: str, on_wait) -> CacheLock:
    """A further hold of this process on a lock it holds already."""
    if exclusive and not hold.exclusive:  # a reader of this process starts to write
        try:
            _flock(hold.fd, key, True, wait, what, on_wait)
        except CacheBusy:
            # a refused conversion drops the shared lock (flock(2)): take it back
            fcntl.flock(hold.fd, fcntl.LOCK_SH)
            raise
        hold.exclusive = True
        _record_holder(hold.fd)
    if exclusive:
        hold.writers += 1
    else:
        hold.readers += 1
    return CacheLock(key, exclusive)


def _open_lock_file(lock_path: str, exclusive: bool) -> int | None:
    try:
        return os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        if exc.errno not in _NO_WRITE and exc.errno != errno.ENOENT:
            raise
        if exclusive:
            raise UserError(f"{lock_path}: cannot create or open the cache's lock file "
                            f"({exc.strerror}); is the cache writable?") from None
    try:
        return os.open(lock_path, os.O_RDONLY)
    except OSError:
        return None  # read-only and no lock file: nobody writes here


def _flock(fd: int, lock_path: str, exclusive: bool, wait: bool, what: str, on_wait) -> None:
    mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        pass
    except OSError as exc:
        _unsupported(lock_path, exc)
    cache = os.path.dirname(lock_path)
    holders = describe_holders(lock_path, fd)
    if not wait:
        raise CacheBusy(_refusal(cache, holders, exclusive, what))
    if on_wait is not None:
        on_wait(f"waiting for {holders} to finish with {cache} (--wait) ...")
    try:
        fcntl.flock(fd, mode)
    except OSError as exc:
        _unsupported(lock_path, exc)


def _unsupported(lock_path: str, exc: OSError):
    if exc.errno in _UNSUPPORTED:
        raise UserError(f"{lock_path}: this file system does not support file locks "
                        f"({exc.strerror}); set {LOCKING_VAR}=off to run without them (then make sure "
                        "yourself that no build runs while the cache is read)") from None
    raise exc


def _refusal(cache: str, holders: str, exclusive: bool, what: str) -> str:
    doing = f"cannot {what}: " if what else ""
    if exclusive:
        return (f"{doing}{cache} is in use by {holders}; a writer needs it alone. Wait for that "
                "to finish (or pass --wait to wait for it)")
    return (f"{doing}{cache} is being written by {holders}; reading it now would mix old and new "
            "data. Run this again once that has finished")


# -- who holds it ------------------------------------------------------------------
def describe_holders(lock_path: str, fd: int | None = None) -> str:
    """'PID 123 (dataprep build ...)' for each process holding the lock, as far as this machine
    can tell (/proc/locks), else what the writer recorded in the lock file."""
    found = []
    for pid, write in _proc_lock_holders(lock_path):
        if pid == os.getpid():
            continue
        command = _command_of(pid)
        role = "writer" if write else "reader"
        found.append(f"{role} PID {pid}" + (f" ({command})" if command else ""))
    if found:
        return ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
    recorded = _read_holder(lock_path)
    if recorded:
        return f"writer {recorded}"
    return "another process (on another machine, or one this system does not show)"


def _proc_lock_holders(lock_path: str) -> list[tuple[int, bool]]:
    """(pid, exclusive) of the FLOCK holders of this file in /proc/locks (Linux); waiters,
    shown with '->', are left out."""
    try:
        st = os.stat(lock_path)
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    holders = []
    for line in lines:
        parts = line.split()
        if len(parts) < 6 or parts[1] == "->" or parts[1] != "FLOCK":
            continue
        try:
            inode = int(parts[5].rsplit(":", 1)[1])
            pid = int(parts[4])
        except (IndexError, ValueError):
            continue
        if inode == st.st_ino and pid > 0:
            holders.append((pid, parts[3] == "WRITE"))
    return holders


def _command_of(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return ""
    return _short_command(args)


def _short_command(args: list[str]) -> str:
    if not args:
        return ""
    if len(args) > 1 and os.path.basename(args[0]).startswith("python") and args[1].endswith(
            ("/dataprep", "/train", "/evaluate")):
        args = args[1:]
    args = [os.path.basename(args[0])] + list(args[1:])
    text = " ".join(shlex.join(args).split())  # one line, whatever the arguments hold
    return text if len(text) <= 200 else text[:197] + "..."


def _record_holder(fd: int) -> None:
    text = (f"PID {os.getpid()} on {socket.gethostname()} since "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')} ({_short_command(sys.argv)})\n")
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, text.encode(), 0)
    except OSError:  # a read-only descriptor or a full disk: the lock holds all the same
        pass


def _clear_holder(fd: int) -> None:
    try:
        os.ftruncate(fd, 0)
    except OSError:
        pass


def _read_holder(lock_path: str) -> str:
    try:
        with open(lock_path, encoding="utf-8", errors="replace") as f:
            return f.read(1000).strip()
    except OSError:
        return ""
