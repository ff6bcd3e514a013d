"""The power-loss filesystem (``chaos_tests/powerfs.py``) on a real FUSE mount: what survives a
cut of the power and what does not. These tests fail, never skip, where FUSE cannot run."""

from __future__ import annotations

import errno
import mmap
import os
import random
import threading

import pytest

from chaos_tests.powerfs import PAGE_BYTES, PowerFS, PowerLossOperations, supported


@pytest.fixture
def fs(tmp_path):
    ok, why = supported()
    assert ok, f"the power-loss filesystem cannot run here: {why}"
    powerfs = PowerFS(str(tmp_path / "disk"), str(tmp_path / "mnt"), log_path=str(tmp_path / "powerfs.log"))
    try:
        yield powerfs.mount()
    finally:
        pid = powerfs.process.pid if powerfs.process is not None else None
        powerfs.stop()
        assert pid is None or not os.path.exists(f"/proc/{pid}"), "the daemon is gone after stop"


def _write(path: str, data: bytes, *, fsync: bool = False, mode: str = "wb") -> None:
    with open(path, mode) as f:
        f.write(data)
        f.flush()
        if fsync:
            os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _power_cycle(fs: PowerFS, *, tear_seed: int | None = None) -> dict:
    """Cut the power, unmount, mount again on what was durable."""
    dropped = fs.cut(tear_seed=tear_seed)
    fs.unmount()
    fs.mount()
    return dropped


def test_reads_see_unsynced_writes_before_the_cut(fs):
    _write(fs.path("a"), b"x" * 10000)
    _write(fs.path("a"), b"tail", mode="ab")
    assert _read(fs.path("a")) == b"x" * 10000 + b"tail"
    with open(fs.path("a"), "r+b") as f:
        f.truncate(3)
        f.seek(PAGE_BYTES + 5)
        f.write(b"!")
    assert _read(fs.path("a")) == b"xxx" + bytes(PAGE_BYTES + 2) + b"!"
    assert os.listdir(fs.path()) == ["a"]
    assert fs.status()["dirty_files"] == 1


def test_a_write_without_fsync_is_gone_after_the_cut(fs):
    _write(fs.path("durable"), b"old", fsync=True)
    _fsync_dir(fs.path())
    _write(fs.path("durable"), b"new, never synced")
    _write(fs.path("never-named"), b"data", fsync=True)  # its directory never fsynced
    dropped = _power_cycle(fs)
    assert dropped["dirty_files"] == 1
    assert os.listdir(fs.path()) == ["durable"]
    assert _read(fs.path("durable")) == b"old"


def test_a_write_with_fsync_survives_the_cut(fs):
    os.mkdir(fs.path("sub"))
    _write(fs.path("sub/f"), b"a" * 5000, fsync=True)
    _write(fs.path("sub/f"), b"b" * 100, mode="ab", fsync=True)
    _fsync_dir(fs.path("sub"))
    _fsync_dir(fs.path())
    _power_cycle(fs)
    assert _read(fs.path("sub/f")) == b"a" * 5000 + b"b" * 100


def test_the_last_unsynced_write_is_torn_to_a_seeded_prefix(fs):
    _write(fs.path("log"), b"." * 3000, fsync=True)
    _fsync_dir(fs.path())
    _write(fs.path("log"), b"A" * 500, mode="ab")  # unsynced, not the last write
    with open(fs.path("log"), "r+b") as f:
        f.seek(1000)
        f.write(b"B" * 700)  # the last unsynced write
    dropped = _power_cycle(fs, tear_seed=42)
    kept = random.Random(42).randrange(700)
    assert dropped["torn"] == {"inode": dropped["torn"]["inode"], "offset": 1000, "length": 700, "kept": kept}
    assert 0 < kept < 700
    assert _read(fs.path("log")) == b"." * 1000 + b"B" * kept + b"." * (2000 - kept)


def test_a_rename_without_fsync_of_the_file_loses_its_content(fs):
    _write(fs.path("meta"), b"term 1", fsync=True)
    _fsync_dir(fs.path())
    # The pattern of a write-then-rename without fsync of the file: the name is durable, the
    # content is not.
    _write(fs.path("meta.tmp"), b"term 2")
    os.replace(fs.path("meta.tmp"), fs.path("meta"))
    _fsync_dir(fs.path())
    assert _read(fs.path("meta")) == b"term 2"
    _power_cycle(fs)
    assert os.listdir(fs.path()) == ["meta"]
    assert _read(fs.path("meta")) == b""


@pytest.mark.parametrize("fsync_dir, survives", [(False, b"term 1"), (True, b"term 2")])
def test_a_synced_rename_needs_the_directory_fsync(fs, fsync_dir, survives):
    _write(fs.path("meta"), b"term 1", fsync=True)
    _fsync_dir(fs.path())
    _write(fs.path("meta.tmp"), b"term 2", fsync=True)
    os.replace(fs.path("meta.tmp"), fs.path("meta"))
    if fsync_dir:
        _fsync_dir(fs.path())
    _power_cycle(fs)
    assert os.listdir(fs.path()) == ["meta"]
    assert _read(fs.path("meta")) == survives


def test_mmap_writes_do_not_bypass_the_model(fs):
    size = 4 * PAGE_BYTES
    for name in ("unsynced", "msynced"):
        _write(fs.path(name), bytes(size), fsync=True)
    _fsync_dir(fs.path())
    mapped = []
    for name in ("unsynced", "msynced"):
        f = open(fs.path(name), "r+b")
        m = mmap.mmap(f.fileno(), 0)
        m[PAGE_BYTES : PAGE_BYTES + 6] = name.encode()[:6]
        mapped.append((f, m))
    mapped[1][1].flush()  # msync(MS_SYNC): the dirty pages as writes, then an fsync
    # Both mappings see their writes; the other side of the mount sees them too.
    assert _read(fs.path("unsynced"))[PAGE_BYTES : PAGE_BYTES + 6] == b"unsync"
    fs.cut()
    for f, m in mapped:  # the killed process's mappings go away after the cut
        m.close()
        f.close()
    fs.unmount()
    fs.mount()
    assert _read(fs.path("unsynced")) == bytes(size)
    assert _read(fs.path("msynced"))[PAGE_BYTES : PAGE_BYTES + 6] == b"msynce"


def test_after_the_cut_everything_fails_until_mounted_again(fs):
    _write(fs.path("f"), b"x", fsync=True)
    _fsync_dir(fs.path())
    handle = open(fs.path("f"), "r+b", buffering=0)
    fs.cut()
    with pytest.raises(OSError) as raised:
        handle.write(b"y")
    assert raised.value.errno == errno.EIO
    with pytest.raises(OSError):
        open(fs.path("g"), "wb")
    handle.close()
    fs.unmount()
    fs.mount()
    assert os.listdir(fs.path()) == ["f"] and _read(fs.path("f")) == b"x"


def test_an_unlinked_file_comes_back_without_a_directory_fsync(fs):
    _write(fs.path("segment"), b"records", fsync=True)
    _fsync_dir(fs.path())
    os.unlink(fs.path("segment"))
    assert os.listdir(fs.path()) == []
    _power_cycle(fs)
    assert _read(fs.path("segment")) == b"records"
    os.unlink(fs.path("segment"))
    _fsync_dir(fs.path())
    _power_cycle(fs)
    assert os.listdir(fs.path()) == []
    assert os.listdir(os.path.join(fs.backing, "inodes")) == [], "the inode no durable name reaches is removed"


def test_the_dirty_limit_writes_the_fullest_file_back_to_the_disk(tmp_path):
    """The model without FUSE: past the dirty limit a file's pages reach the disk without an
    fsync (writeback under memory pressure), and the dirty memory stays bounded."""
    ops = PowerLossOperations(str(tmp_path / "disk"), dirty_bytes_max=4 * PAGE_BYTES)
    handle = ops.create("/log", 0o600, os.O_WRONLY)
    ops.fsyncdir("/", 0, 0)
    for i in range(10):
        ops.write("/log", bytes([65 + i]) * PAGE_BYTES, i * PAGE_BYTES, handle)
        assert ops.dirty_pages <= 4
    assert ops.writebacks == 2 and ops.fsyncs == 0
    ops.cut(None)
    ops.close()
    after = PowerLossOperations(str(tmp_path / "disk"))
    fh = after.open("/log", os.O_RDONLY)
    assert after.read("/log", 10 * PAGE_BYTES, 0, fh) == b"".join(bytes([65 + i]) * PAGE_BYTES for i in range(8))
    after.close()


# --- disk faults ------------------------------------------------------------------------------


def test_a_stall_holds_fsyncs_under_its_prefix_and_nothing_else(fs):
    os.mkdir(fs.path("raft"))
    fd = os.open(fs.path("raft/log-1"), os.O_WRONLY | os.O_CREAT, 0o644)
    other = os.open(fs.path("journal"), os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        fs.fault("stall", prefix="/raft/log-")
        synced = threading.Event()
        worker = threading.Thread(target=lambda: (os.fsync(fd), synced.set()), daemon=True)
        worker.start()
        # Other files go on meanwhile: written, synced, read.
        os.write(other, b"journal record")
        os.fsync(other)
        assert _read(fs.path("journal")) == b"journal record"
        assert not synced.wait(0.5), "the stalled fsync returned"
        assert fs.status()["fsyncs"] == 1  # only the journal's
        counters = fs.fault("none")
        assert counters["stalled_calls"] == 1
        assert synced.wait(5), "the fsync went on once the stall ended"
    finally:
        os.close(fd)
        os.close(other)


def test_eio_fails_fsyncs_and_enospc_fails_writes_and_reports_a_full_disk(fs):
    _write(fs.path("before"), b"x")
    fs.fault("eio")
    with pytest.raises(OSError) as failed:
        _write(fs.path("before"), b"y", fsync=True, mode="ab")
    assert failed.value.errno == errno.EIO
    fs.fault("enospc")
    assert os.statvfs(fs.path()).f_bavail == 0
    with pytest.raises(OSError) as full:
        _write(fs.path("before"), b"z", mode="ab")
    assert full.value.errno == errno.ENOSPC
    with pytest.raises(OSError) as full:
        _write(fs.path("new"), b"z")
    assert full.value.errno == errno.ENOSPC
    fs.fault("none")
    _write(fs.path("new"), b"space again", fsync=True)
    assert _read(fs.path("new")) == b"space again"
    assert os.statvfs(fs.path()).f_bavail > 0
