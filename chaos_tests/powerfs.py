"""A power-loss filesystem for the chaos suite: a FUSE filesystem over a backing directory that
holds, in the daemon's memory, everything not yet made durable, and drops it when the power is
cut.

**The model.** The backing directory is the disk: it holds what is durable. The daemon's memory
is the page cache: every change is applied there first and served from there (reads see
unsynced writes), and reaches the backing directory only when the program asks for it:

- *file data and size*: a ``write`` or ``truncate`` stays in memory (as dirty 4 KiB pages and a
  size) until ``fsync``/``fdatasync`` of that file (either one: both persist data and size);
  ``msync`` of a shared mapping is a write of its dirty pages followed by an fsync;
- *names* — create, mkdir, rename, unlink, rmdir, chmod: a directory's entries become durable
  only with an fsync of *that directory* (which persists every entry it holds, as it holds them
  then). A rename is durable in the new directory once that one is fsynced and gone from the
  old one once the old one is; one fsync of a shared parent covers both. An fsync of a file
  never makes its name durable.
- Files are inodes: a name points to an inode, an inode's durable data lives in
  ``BACKING/inodes/N``, the durable entries of every directory in ``BACKING/namespace.json``.
  So writing a temporary file, renaming it over the real one and fsyncing the directory without
  fsyncing the file leaves, after a cut, the real name pointing to an *empty* file: exactly the
  bug of a rename without fsync.

Nothing reaches the disk on its own: there is no periodic writeback (a real kernel writes
dirty pages back after ~30 s), only writeback under memory pressure (``DIRTY_BYTES_MAX``). That is the worst case a power cut can produce, the one issue 15
measured with the kernel's writeback switched off; with writeback the window of loss is the
last ~30 s instead of everything, the class of loss the same.

**Cutting the power** (``cut``): every unsynced write, truncation and name change is dropped;
with a tear seed, a seeded random prefix (0 .. n-1 bytes) of the last unsynced write reaches the
disk at its offset, as a write torn by the power loss would. From then on every operation fails
with EIO until the filesystem is mounted again (a new daemon on the same backing directory,
which is then exactly what was durable). **mmap**: FUSE without the writeback cache sees the
writes to a shared mapping as ``write`` requests when the kernel writes the dirty pages back
(periodically, on ``msync``, on unmount); they enter the model like any other write, and those
the kernel flushes after the cut (when the killed node's mapping goes away, at unmount) are
refused and discarded.

**Disk faults** (``PowerFS.fault(mode, prefix)``), on the files whose path in the mount starts
with ``prefix`` (``"/raft/log-"``: the Raft log's segments), until ``fault("none")``:

- ``"stall"``: an ``fsync``/``fdatasync`` waits (the FUSE call is held outside the model's
  lock, so every other call goes on): a disk whose flushes hang;
- ``"eio"``: an ``fsync`` fails with EIO: a disk that could not write what it was given;
- ``"enospc"``: ``write``, ``create`` and ``mkdir`` fail with ENOSPC: a full disk (with no
  prefix ``statfs`` reports no free space too; with one, free space looks ample, as when the
  disk fills between two checks). A write fails whole: fewer bytes than asked are never written.

**The daemon** (``PowerFS``) is a process of its own, ``unshare -m`` then this file run as a
script with ``serve``: its mount lives in a private mount namespace (the node runs under
``nsenter --mount=/proc/PID/ns/mnt``; this process reaches the files through
``/proc/PID/root``), so a test that dies leaves no mount behind. It is controlled through its
stdin and stdout, one JSON object per line (``status``, ``cut``, ``unmount``); when its stdin
closes (the harness died) it unmounts and exits, and the kernel sends it SIGTERM when the
process that started it dies.
"""

from __future__ import annotations

import errno
import json
import os
import random
import select
import stat
import subprocess
import sys
import threading
import time

PAGE_BYTES = 4096
#: Dirty memory a daemon holds at most, as the kernel's dirty limit: beyond it the file with the
#: most dirty pages is written to the disk (made durable without an fsync, as writeback under
#: memory pressure would) before the write goes on. Bounds a long run in which a node never
#: fsyncs (the journal's ``never`` policy).
DIRTY_BYTES_MAX = 256 << 20
#: From starting the daemon to its filesystem answering.
READY_TIMEOUT_S = 10.0
#: For one control request, and for the daemon to exit after ``unmount``.
CONTROL_TIMEOUT_S = 10.0
UNMOUNT_TIMEOUT_S = 10.0
ROOT_INODE = 1
NAMESPACE_FILE = "namespace.json"
NAMESPACE_VERSION = 1
INODES_DIR = "inodes"
FILE, DIRECTORY = "f", "d"
DIR_MODE_DEFAULT = 0o700
#: The options of every mount: no attribute cache to speak of (sizes change under a cut), and
#: ``hard_remove`` so an unlinked open file stays an inode, not a hidden file.
#: ``PowerFS.fault`` modes (see the module doc).
FAULT_MODES = ("none", "stall", "eio", "enospc")
#: The calls an "enospc" fault refuses: those that take space.
_TAKES_SPACE = frozenset({"write", "create", "mkdir"})
FUSE_OPTIONS = {"fsname": "powerfs", "hard_remove": True, "attr_timeout": 0, "entry_timeout": 0, "negative_timeout": 0}


def supported() -> tuple[bool, str]:
    """Whether a powerfs can be mounted here (and why not)."""
    if os.geteuid() != 0:
        return False, "needs root (unshare -m, mounting FUSE)"
    if not os.path.exists("/dev/fuse"):
        return False, "no /dev/fuse (apt-get install -y fuse3; a container needs --device /dev/fuse)"
    for tool in ("unshare", "nsenter", "fusermount3"):
        if subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True).returncode != 0:
            return False, f"{tool} not found (apt-get install -y fuse3 util-linux)"
    try:
        import mfusepy  # noqa: F401 - only whether it loads (it needs libfuse3)
    except (ImportError, OSError) as exc:
        return False, f"the mfusepy binding does not load: {exc} (pip install mfusepy; apt-get install -y fuse3)"
    return True, ""


# --- the daemon's side: the model --------------------------------------------------------


class _Inode:
    __slots__ = ("ino", "kind", "mode", "size", "pages", "backing_valid", "entries", "nlink", "opens", "times_ns")

    def __init__(self, ino: int, kind: str, mode: int, *, size: int = 0) -> None:
        self.ino = ino
        self.kind = kind
        self.mode = mode
        self.size = size
        #: Dirty pages: page index -> PAGE_BYTES bytes (what a read returns before the size cut).
        self.pages: dict[int, bytearray] = {}
        #: Bytes of the durable file that still hold this inode's content (a truncation since
        #: the last fsync shortens it; bytes past it read as zeros).
        self.backing_valid = size
        self.entries: dict[str, int] = {} if kind == DIRECTORY else None
        self.nlink = 0
        self.opens = 0
        now = time.time_ns()
        self.times_ns = [now, now, now]  # atime, mtime, ctime


class PowerLossOperations:
    """The FUSE operations (mfusepy's path API) over the model. One lock serialises them."""

    use_ns = True

    def __init__(self, backing: str, *, dirty_bytes_max: int = DIRTY_BYTES_MAX) -> None:
        self.backing = os.path.abspath(backing)
        self.dirty_pages_max = max(1, dirty_bytes_max // PAGE_BYTES)
        self.dirty_pages = 0
        #: Files written to the disk because the dirty limit was reached.
        self.writebacks = 0
        self.lock = threading.Lock()
        self.cut_done = False
        self.inodes: dict[int, _Inode] = {}
        self.handles: dict[int, int] = {}
        self._next_handle = 1
        self._fds: dict[int, int] = {}
        self.fsyncs = 0
        self.dir_fsyncs = 0
        self.writes = 0
        self.write_bytes = 0
        #: Name changes (create, mkdir, rename, unlink, rmdir, chmod) since the mount.
        self.name_changes = 0
        self.last_write: tuple[int, int, bytes] | None = None
        self.ready = threading.Event()
        #: The disk fault injected (``FAULT_MODES``), on paths starting with ``fault_prefix``.
        self.fault = "none"
        self.fault_prefix = ""
        #: Set while no "stall" fault holds fsyncs back.
        self.unstalled = threading.Event()
        self.unstalled.set()
        #: Calls the faults held back (stall) or failed (eio, enospc).
        self.stalled_calls = 0
        self.failed_calls = 0
        os.makedirs(os.path.join(self.backing, INODES_DIR), exist_ok=True)
        self._load()

    # durable state

    def _data_path(self, ino: int) -> str:
        return os.path.join(self.backing, INODES_DIR, str(ino))

    def _load(self) -> None:
        """The volatile state = exactly what is durable; inode files no name reaches are removed."""
        try:
            with open(os.path.join(self.backing, NAMESPACE_FILE)) as f:
                document = json.load(f)
        except FileNotFoundError:
            document = {"version": NAMESPACE_VERSION, "next_ino": ROOT_INODE + 1, "root_mode": DIR_MODE_DEFAULT, "dirs": {}}
        assert document["version"] == NAMESPACE_VERSION, f"{NAMESPACE_FILE}: version {document['version']}"
        self.durable_dirs: dict[str, dict[str, list]] = document["dirs"]
        self.root_mode = document["root_mode"]
        root = _Inode(ROOT_INODE, DIRECTORY, self.root_mode)
        root.nlink = 2
        self.inodes[ROOT_INODE] = root
        pending = [root]
        while pending:
            directory = pending.pop()
            for name, (ino, kind, mode) in self.durable_dirs.get(str(directory.ino), {}).items():
                child = self.inodes.get(ino)
                if child is None:
                    size = 0
                    if kind == FILE:
                        try:
                            size = os.path.getsize(self._data_path(ino))
                        except FileNotFoundError:
                            pass
                    child = self.inodes[ino] = _Inode(ino, kind, mode, size=size)
                    if kind == DIRECTORY:
                        pending.append(child)
                child.nlink += 1
                directory.entries[name] = ino
        self.next_ino = max(document["next_ino"], max(self.inodes) + 1)
        # Entries of directories no durable name reaches any more (removed, or never named).
        self.durable_dirs = {key: entries for key, entries in self.durable_dirs.items() if int(key) in self.inodes}
        for name in os.listdir(os.path.join(self.backing, INODES_DIR)):
            if not name.isdigit() or int(name) not in self.inodes:
                os.unlink(os.path.join(self.backing, INODES_DIR, name))

    def _write_namespace(self) -> None:
        document = {"version": NAMESPACE_VERSION, "next_ino": self.next_ino, "root_mode": self.root_mode, "dirs": self.durable_dirs}
        path = os.path.join(self.backing, NAMESPACE_FILE)
        with open(path + ".tmp", "w") as f:
            json.dump(document, f)
        os.replace(path + ".tmp", path)

    def _fd(self, ino: int) -> int:
        fd = self._fds.get(ino)
        if fd is None:
            fd = self._fds[ino] = os.open(self._data_path(ino), os.O_RDWR | os.O_CREAT, 0o600)
        return fd

    def _persist_data(self, inode: _Inode) -> None:
        fd = self._fd(inode.ino)
        os.ftruncate(fd, min(inode.backing_valid, os.fstat(fd).st_size))
        os.ftruncate(fd, inode.size)
        for index in sorted(inode.pages):
            start = index * PAGE_BYTES
            if start < inode.size:
                os.pwrite(fd, inode.pages[index][: min(PAGE_BYTES, inode.size - start)], start)
        self.dirty_pages -= len(inode.pages)
        inode.pages.clear()
        inode.backing_valid = inode.size
        if self.last_write is not None and self.last_write[0] == inode.ino:
            self.last_write = None

    def _persist_dir(self, directory: _Inode) -> None:
        self.durable_dirs[str(directory.ino)] = {
            name: [ino, self.inodes[ino].kind, self.inodes[ino].mode] for name, ino in directory.entries.items()
        }
        if directory.ino == ROOT_INODE:
            self.root_mode = directory.mode
        self._write_namespace()

    # the power

    def cut(self, tear_seed: int | None) -> dict:
        """Drop everything unsynced (optionally tearing the last unsynced write); refuse
        everything from now on."""
        torn = None
        if tear_seed is not None and self.last_write is not None:
            ino, offset, data = self.last_write
            kept = random.Random(tear_seed).randrange(len(data))
            if kept:
                os.pwrite(self._fd(ino), data[:kept], offset)
            torn = {"inode": ino, "offset": offset, "length": len(data), "kept": kept}
        self.cut_done = True
        dropped = {**self._dirty(), "torn": torn}
        self.inodes.clear()
        self.handles.clear()
        return dropped

    def set_fault(self, mode: str, prefix: str) -> dict:
        if mode not in FAULT_MODES:
            raise ValueError(f"fault mode must be one of {FAULT_MODES}, got {mode!r}")
        self.fault, self.fault_prefix = mode, prefix
        if mode == "stall":
            self.unstalled.clear()
        else:
            self.unstalled.set()
        return {"fault": mode, "prefix": prefix, "stalled_calls": self.stalled_calls, "failed_calls": self.failed_calls}

    def _faulted(self, path: str | None) -> bool:
        return self.fault != "none" and (not self.fault_prefix or (path is not None and path.startswith(self.fault_prefix)))

    def hold_if_stalled(self, name: str, path: str | None) -> None:
        """Outside the lock: an fsync under a "stall" fault waits until the fault ends."""
        if name == "fsync" and self.fault == "stall" and self._faulted(path):
            self.stalled_calls += 1
            self.unstalled.wait()

    def fault_errno(self, name: str, path: str | None) -> int:
        """Under the lock: the error a fault makes `name` on `path` fail with (0: none)."""
        if not self._faulted(path):
            return 0
        if (self.fault == "eio" and name == "fsync") or (self.fault == "enospc" and name in _TAKES_SPACE):
            self.failed_calls += 1
            return errno.EIO if self.fault == "eio" else errno.ENOSPC
        return 0

    def _dirty(self) -> dict:
        """What a cut now would drop: files with unsynced data, their dirty pages."""
        dirty = [inode for inode in self.inodes.values() if inode.pages or inode.size != inode.backing_valid]
        return {"dirty_files": len(dirty), "dirty_pages": self.dirty_pages}

    def status(self) -> dict:
        return {
            "cut": self.cut_done,
            "fsyncs": self.fsyncs,
            "dir_fsyncs": self.dir_fsyncs,
            "writes": self.writes,
            "write_bytes": self.write_bytes,
            "name_changes": self.name_changes,
            "writebacks": self.writebacks,
            **({} if self.cut_done else self._dirty()),
        }

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    # lookups

    def _resolve(self, path: str) -> _Inode:
        inode = self.inodes[ROOT_INODE]
        for part in path.strip("/").split("/"):
            if not part:
                continue
            if inode.kind != DIRECTORY:
                raise OSError(errno.ENOTDIR, path)
            ino = inode.entries.get(part)
            if ino is None:
                raise OSError(errno.ENOENT, path)
            inode = self.inodes[ino]
        return inode

    def _parent(self, path: str) -> tuple[_Inode, str]:
        head, _, name = path.rstrip("/").rpartition("/")
        parent = self._resolve(head or "/")
        if parent.kind != DIRECTORY:
            raise OSError(errno.ENOTDIR, path)
        return parent, name

    def _inode(self, path: str | None, fh: int | None) -> _Inode:
        if fh is not None and fh in self.handles:
            return self.inodes[self.handles[fh]]
        if path is None:
            raise OSError(errno.EBADF, "no path and no handle")
        return self._resolve(path)

    def _new_inode(self, kind: str, mode: int) -> _Inode:
        inode = _Inode(self.next_ino, kind, stat.S_IMODE(mode))
        self.next_ino += 1
        self.inodes[inode.ino] = inode
        return inode

    def _link(self, parent: _Inode, name: str, inode: _Inode) -> None:
        parent.entries[name] = inode.ino
        inode.nlink += 1
        parent.times_ns[1] = parent.times_ns[2] = time.time_ns()
        self.name_changes += 1

    def _unlink(self, parent: _Inode, name: str) -> None:
        inode = self.inodes[parent.entries.pop(name)]
        inode.nlink -= 1
        parent.times_ns[1] = parent.times_ns[2] = time.time_ns()
        self.name_changes += 1
        self._forget_if_unused(inode)

    def _forget_if_unused(self, inode: _Inode) -> None:
        # Its durable file stays until a mount finds no durable name for it.
        if inode.nlink <= 0 and inode.opens <= 0 and inode.ino != ROOT_INODE:
            self.inodes.pop(inode.ino, None)
            self.dirty_pages -= len(inode.pages)

    def _open_handle(self, inode: _Inode) -> int:
        handle = self._next_handle
        self._next_handle += 1
        self.handles[handle] = inode.ino
        inode.opens += 1
        return handle

    # data

    def _page(self, inode: _Inode, index: int) -> bytearray:
        page = inode.pages.get(index)
        if page is None:
            page = bytearray(PAGE_BYTES)
            start = index * PAGE_BYTES
            if start < inode.backing_valid:
                chunk = os.pread(self._fd(inode.ino), min(PAGE_BYTES, inode.backing_valid - start), start)
                page[: len(chunk)] = chunk
            inode.pages[index] = page
            self.dirty_pages += 1
        return page

    def _write_back_if_full(self) -> None:
        """At the dirty limit, the file with the most dirty pages goes to the disk."""
        if self.dirty_pages >= self.dirty_pages_max:
            fullest = max(self.inodes.values(), key=lambda inode: len(inode.pages))
            self._persist_data(fullest)
            self.writebacks += 1

    def _read(self, inode: _Inode, size: int, offset: int) -> bytes:
        end = min(offset + size, inode.size)
        if offset >= end:
            return b""
        out = bytearray(end - offset)
        if offset < inode.backing_valid:
            chunk = os.pread(self._fd(inode.ino), min(end, inode.backing_valid) - offset, offset)
            out[: len(chunk)] = chunk
        for index in range(offset // PAGE_BYTES, (end - 1) // PAGE_BYTES + 1):
            page = inode.pages.get(index)
            if page is not None:
                start = max(index * PAGE_BYTES, offset)
                stop = min((index + 1) * PAGE_BYTES, end)
                out[start - offset : stop - offset] = page[start - index * PAGE_BYTES : stop - index * PAGE_BYTES]
        return bytes(out)

    def _write(self, inode: _Inode, data: bytes, offset: int) -> int:
        self._write_back_if_full()
        position = offset
        view = memoryview(data)
        while view:
            index, within = divmod(position, PAGE_BYTES)
            n = min(PAGE_BYTES - within, len(view))
            self._page(inode, index)[within : within + n] = view[:n]
            view = view[n:]
            position += n
        inode.size = max(inode.size, offset + len(data))
        inode.times_ns[1] = inode.times_ns[2] = time.time_ns()
        self.writes += 1
        self.write_bytes += len(data)
        self.last_write = (inode.ino, offset, bytes(data))
        return len(data)

    def _truncate(self, inode: _Inode, length: int) -> None:
        if inode.kind != FILE:
            raise OSError(errno.EISDIR, "truncate of a directory")
        if length < inode.size:
            for index in [i for i in inode.pages if i * PAGE_BYTES >= length]:
                del inode.pages[index]
                self.dirty_pages -= 1
            index, within = divmod(length, PAGE_BYTES)
            if within and index in inode.pages:
                inode.pages[index][within:] = bytes(PAGE_BYTES - within)
            inode.backing_valid = min(inode.backing_valid, length)
        inode.size = length
        inode.times_ns[1] = inode.times_ns[2] = time.time_ns()
        self.writes += 1

    # --- FUSE operations (mfusepy's names and arguments) ---------------------------------

    def init(self, path: str) -> None:
        self.ready.set()

    def getattr(self, path: str | None, fh: int | None = None) -> dict:
        inode = self._inode(path, fh)
        kind = stat.S_IFDIR if inode.kind == DIRECTORY else stat.S_IFREG
        atime, mtime, ctime = inode.times_ns
        return {
            "st_mode": kind | inode.mode,
            "st_ino": inode.ino,
            "st_nlink": max(inode.nlink, 1) + (1 if inode.kind == DIRECTORY else 0),
            "st_size": inode.size if inode.kind == FILE else PAGE_BYTES,
            "st_uid": os.getuid(),
            "st_gid": os.getgid(),
            "st_blksize": PAGE_BYTES,
            "st_blocks": (inode.size + 511) // 512,
            "st_atime": atime,
            "st_mtime": mtime,
            "st_ctime": ctime,
        }

    def access(self, path: str, amode: int) -> int:
        self._resolve(path)
        return 0

    def statfs(self, path: str) -> dict:
        v = os.statvfs(self.backing)
        found = {
            key: getattr(v, key) for key in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree", "f_namemax")
        }
        if self.fault == "enospc" and not self.fault_prefix:
            found["f_bfree"] = found["f_bavail"] = 0
        return found

    def readdir(self, path: str, fh: int) -> list[str]:
        directory = self._resolve(path)
        if directory.kind != DIRECTORY:
            raise OSError(errno.ENOTDIR, path)
        return [".", "..", *directory.entries]

    def mkdir(self, path: str, mode: int) -> int:
        parent, name = self._parent(path)
        if name in parent.entries:
            raise OSError(errno.EEXIST, path)
        self._link(parent, name, self._new_inode(DIRECTORY, mode))
        return 0

    def rmdir(self, path: str) -> int:
        parent, name = self._parent(path)
        directory = self._resolve(path)
        if directory.kind != DIRECTORY:
            raise OSError(errno.ENOTDIR, path)
        if directory.entries:
            raise OSError(errno.ENOTEMPTY, path)
        self._unlink(parent, name)
        return 0

    def create(self, path: str, mode: int, flags: int = 0) -> int:
        parent, name = self._parent(path)
        if name in parent.entries:
            if flags & os.O_EXCL:
                raise OSError(errno.EEXIST, path)
            return self.open(path, flags)
        inode = self._new_inode(FILE, mode)
        self._link(parent, name, inode)
        return self._open_handle(inode)

    def open(self, path: str, flags: int) -> int:
        inode = self._resolve(path)
        if flags & os.O_TRUNC and inode.kind == FILE:
            self._truncate(inode, 0)
        return self._open_handle(inode)

    def read(self, path: str | None, size: int, offset: int, fh: int) -> bytes:
        return self._read(self._inode(path, fh), size, offset)

    def write(self, path: str | None, data: bytes, offset: int, fh: int) -> int:
        return self._write(self._inode(path, fh), data, offset)

    def truncate(self, path: str | None, length: int, fh: int | None = None) -> int:
        self._truncate(self._inode(path, fh), length)
        return 0

    def fsync(self, path: str | None, datasync: int, fh: int) -> int:
        inode = self._inode(path, fh)
        if inode.kind == FILE:
            self._persist_data(inode)
        self.fsyncs += 1
        return 0

    def fsyncdir(self, path: str | None, datasync: int, fh: int) -> int:
        directory = self._resolve(path or "/")
        self._persist_dir(directory)
        self.dir_fsyncs += 1
        return 0

    def flush(self, path: str | None, fh: int) -> int:
        return 0

    def release(self, path: str | None, fh: int) -> int:
        ino = self.handles.pop(fh, None)
        inode = self.inodes.get(ino) if ino is not None else None
        if inode is not None:
            inode.opens -= 1
            self._forget_if_unused(inode)
        return 0

    def unlink(self, path: str) -> int:
        parent, name = self._parent(path)
        if name not in parent.entries:
            raise OSError(errno.ENOENT, path)
        if self.inodes[parent.entries[name]].kind == DIRECTORY:
            raise OSError(errno.EISDIR, path)
        self._unlink(parent, name)
        return 0

    def rename(self, old: str, new: str) -> int:
        old_parent, old_name = self._parent(old)
        new_parent, new_name = self._parent(new)
        if old_name not in old_parent.entries:
            raise OSError(errno.ENOENT, old)
        moving = self.inodes[old_parent.entries[old_name]]
        target_ino = new_parent.entries.get(new_name)
        if target_ino == moving.ino:
            return 0
        if target_ino is not None:
            target = self.inodes[target_ino]
            if target.kind == DIRECTORY and (moving.kind != DIRECTORY or target.entries):
                raise OSError(errno.ENOTEMPTY if target.entries else errno.EISDIR, new)
            if moving.kind == DIRECTORY and target.kind != DIRECTORY:
                raise OSError(errno.ENOTDIR, new)
            self._unlink(new_parent, new_name)
        moving.nlink += 1  # kept alive between the unlink and the link
        self._unlink(old_parent, old_name)
        self._link(new_parent, new_name, moving)
        moving.nlink -= 1
        return 0

    def chmod(self, path: str | None, mode: int) -> int:
        inode = self._resolve(path)
        inode.mode = stat.S_IMODE(mode)
        inode.times_ns[2] = time.time_ns()
        self.name_changes += 1
        return 0

    def chown(self, path: str | None, uid: int, gid: int) -> int:
        self._resolve(path)
        return 0

    def utimens(self, path: str | None, times: tuple[int, int] | None = None) -> int:
        inode = self._resolve(path)
        now = time.time_ns()
        atime, mtime = times if times is not None else (now, now)
        inode.times_ns = [atime, mtime, now]
        return 0


#: Operations still answered after the cut (the kernel closing files, unmounting).
_AFTER_CUT = {"release", "flush", "statfs", "init"}


def _guarded(operations: PowerLossOperations):
    """The operations as FUSE calls them: under the lock, EIO after the cut, errors as errno."""
    import mfusepy

    class Guarded(mfusepy.Operations):
        use_ns = True

    def wrap(name, method):
        def call(self, *args):
            path = args[0] if args else None
            operations.hold_if_stalled(name, path)
            with operations.lock:
                if operations.cut_done and name not in _AFTER_CUT:
                    raise mfusepy.FuseOSError(errno.EIO)
                fault = operations.fault_errno(name, path)
                if fault:
                    raise mfusepy.FuseOSError(fault)
                try:
                    return method(*args)
                except OSError as exc:
                    raise mfusepy.FuseOSError(exc.errno or errno.EIO) from None

        call.__name__ = name
        return call

    for name in [
        "init", "getattr", "access", "statfs", "readdir", "mkdir", "rmdir", "create", "open", "read", "write",
        "truncate", "fsync", "fsyncdir", "flush", "release", "unlink", "rename", "chmod", "chown", "utimens",
    ]:  # fmt: skip
        setattr(Guarded, name, wrap(name, getattr(operations, name)))
    return Guarded()


def _answer(lock: threading.Lock, message: dict) -> None:
    with lock:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()


def _control(operations: PowerLossOperations, mountpoint: str, out_lock: threading.Lock) -> None:
    """Requests on stdin, one JSON object a line; answers on stdout. EOF: unmount."""
    for line in sys.stdin:
        try:
            request = json.loads(line)
            op = request["op"]
            with operations.lock:
                if op == "status":
                    answer = operations.status()
                elif op == "cut":
                    answer = operations.cut(request.get("tear_seed"))
                elif op == "fault":
                    answer = operations.set_fault(request["mode"], request.get("prefix", ""))
                elif op == "unmount":
                    answer = {"unmounting": True}
                else:
                    answer = {"error": f"unknown op {op!r}"}
        except (ValueError, KeyError, TypeError, OSError) as exc:
            answer = {"error": f"{type(exc).__name__}: {exc}"}
            op = ""
        _answer(out_lock, answer)
        if op == "unmount":
            break
    operations.unstalled.set()  # a stalled fsync must not hold the unmount
    subprocess.run(["fusermount3", "-u", "-z", mountpoint], capture_output=True, timeout=UNMOUNT_TIMEOUT_S)


def serve(backing: str, mountpoint: str) -> int:
    """The daemon: mount, answer control requests, return once unmounted."""
    import mfusepy

    operations = PowerLossOperations(backing)
    out_lock = threading.Lock()

    def announce() -> None:
        if operations.ready.wait(READY_TIMEOUT_S):
            _answer(out_lock, {"ready": True, "pid": os.getpid()})
            _control(operations, mountpoint, out_lock)

    threading.Thread(target=announce, name="powerfs-control", daemon=True).start()
    try:
        mfusepy.FUSE(_guarded(operations), mountpoint, foreground=True, **FUSE_OPTIONS)
    finally:
        operations.close()
    return 0


# --- the harness's side --------------------------------------------------------------------


class PowerFSError(RuntimeError):
    """The daemon did not start, or did not answer."""


class PowerFS:
    """One power-loss filesystem: `backing` (the disk) mounted at `mountpoint` inside the
    daemon's own mount namespace. ``mount`` starts a daemon (again after an ``unmount``),
    ``cut`` cuts the power, ``unmount`` ends the daemon, ``stop`` ends it whatever its state.
    Every daemon's stderr goes to `log_path`."""

    def __init__(self, backing: str, mountpoint: str, *, log_path: str) -> None:
        self.backing = os.path.abspath(backing)
        self.mountpoint = os.path.abspath(mountpoint)
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self.mounts = 0
        os.makedirs(self.backing, mode=0o700, exist_ok=True)
        os.makedirs(self.mountpoint, mode=0o700, exist_ok=True)

    @property
    def pid(self) -> int:
        if self.process is None:
            raise PowerFSError(f"{self.mountpoint} is not mounted")
        return self.process.pid

    @property
    def mounted(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def mount_namespace(self) -> str:
        """The mount namespace file for ``nsenter --mount=``."""
        return f"/proc/{self.pid}/ns/mnt"

    def path(self, inside: str = "") -> str:
        """A path below the mountpoint as this process reaches it (or the mountpoint)."""
        return os.path.join(f"/proc/{self.pid}/root{self.mountpoint}", inside)

    def mount(self) -> PowerFS:
        """Start a daemon on what is durable in the backing directory; return once it answers."""
        if self.mounted:
            raise PowerFSError(f"{self.mountpoint} is mounted already (daemon pid {self.process.pid})")
        from raftseq.cluster.local import die_with_parent

        command = ["unshare", "-m", "--propagation", "private", sys.executable, "-P", os.path.abspath(__file__)]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [*command, "serve", self.backing, self.mountpoint],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                preexec_fn=die_with_parent,
            )
        try:
            answer = self._read_answer(READY_TIMEOUT_S, what="mounting")
            if not answer.get("ready"):
                raise PowerFSError(f"the powerfs daemon for {self.mountpoint} said {answer}")
        except BaseException:
            self.stop()
            raise
        self.mounts += 1
        return self

    def _read_answer(self, timeout_s: float, *, what: str) -> dict:
        ready, _, _ = select.select([self.process.stdout], [], [], timeout_s)
        line = self.process.stdout.readline() if ready else b""
        if not line:
            raise PowerFSError(f"the powerfs daemon of {self.mountpoint} gave no answer {what} within {timeout_s} s; {self._log_tail()}")
        return json.loads(line)

    def _log_tail(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return "its log ends: " + f.read()[-2000:].decode(errors="replace")
        except OSError:
            return "no log"

    def request(self, op: str, **fields) -> dict:
        if not self.mounted:
            raise PowerFSError(f"{self.mountpoint} is not mounted")
        self.process.stdin.write((json.dumps({"op": op, **fields}) + "\n").encode())
        self.process.stdin.flush()
        answer = self._read_answer(CONTROL_TIMEOUT_S, what=f"to {op}")
        if "error" in answer:
            raise PowerFSError(f"powerfs {op}: {answer['error']}")
        return answer

    def status(self) -> dict:
        return self.request("status")

    def cut(self, *, tear_seed: int | None = None) -> dict:
        """Cut the power: unsynced changes dropped (the last write torn with `tear_seed`),
        every later operation fails with EIO. Returns what was dropped."""
        return self.request("cut", tear_seed=tear_seed)

    def fault(self, mode: str, *, prefix: str = "") -> dict:
        """Inject a disk fault (``FAULT_MODES``; "none" ends it) on the paths in the mount that
        start with `prefix` (every path when empty). Returns the daemon's fault counters."""
        return self.request("fault", mode=mode, prefix=prefix)

    def unmount(self) -> None:
        """Unmount and wait for the daemon to exit (killed, by its pid, if it does not)."""
        if not self.mounted:
            self._reap()
            return
        try:
            self.request("unmount")
            self.process.wait(UNMOUNT_TIMEOUT_S)
        finally:
            self._reap()

    def _reap(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.kill()
            process.wait()
        for stream in (process.stdin, process.stdout):
            if stream is not None and not stream.closed:
                try:
                    stream.close()
                except OSError:
                    pass

    def stop(self) -> None:
        """End the daemon whatever its state (its mount namespace, and the mount, go with it)."""
        try:
            if self.mounted:
                try:
                    self.request("unmount")
                    self.process.wait(UNMOUNT_TIMEOUT_S)
                except (PowerFSError, OSError, ValueError, subprocess.TimeoutExpired):
                    pass
        finally:
            self._reap()

    def __enter__(self) -> PowerFS:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "serve":
        return serve(argv[1], argv[2])
    print("usage: powerfs.py serve BACKING MOUNTPOINT (started by chaos_tests.powerfs.PowerFS)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
