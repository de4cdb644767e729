"""Write one output file of a trim from header bytes and byte ranges of the source files, with its checksum
computed beside the copy (`RangeWriter`), and several files at once (`FileJobs`); used by the safetensors
and the GGUF trim."""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from pathlib import Path
from typing import Any

from ..core.errors import MoesiftError
from ..core.io import new_checksum, pread_into

_BUF = 8 << 20  # the copy buffer where the kernel cannot copy
_HASH_BUF = 1 << 20  # read-back buffer of the checksum thread: hashed while it is still in the core's L2 cache
_AHEAD = 128 << 20  # source bytes asked of the kernel ahead of the copy (`expect`)
_ADVISE = getattr(os, "posix_fadvise", None)  # not on macOS: no read-ahead hints there


class RangeWriter:
    """Writes one output file from bytes (`write`) and byte ranges of open source files (`copy`). Byte ranges
    are copied by the kernel (`copy_file_range`, no trip through this process's memory; plain reads and
    writes where the filesystem cannot); the checksum of the file (`checksum`: an algorithm of CHECKSUMS, or
    None) is computed in a second thread that reads the same ranges back from the source (`preadv` into a
    fixed buffer) while the copy proceeds, so hashing overlaps copying and memory stays bounded. (Writes
    to one file take the file's lock in the kernel: copies run in parallel only into different files.)
    `existing`: `path` is an empty file already claimed for the output (opened without truncation: ext4
    would write a file truncated on open back to disk when it is closed); else it is created or truncated.
    `source` names the input in the error a short source file gives."""

    def __init__(self, path: Path, checksum: str | None = "blake3", existing: bool = False,
                 source: str = "checkpoint"):
        self.h = new_checksum(checksum, threads=False) if checksum else None  # the copy runs beside it
        flags = os.O_WRONLY if existing else os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        self.fd = os.open(path, flags, 0o666)
        self.source = source
        self.q: queue.Queue = queue.Queue(maxsize=64)
        self.error: BaseException | None = None
        self.t = threading.Thread(target=self._hash, daemon=True) if checksum else None
        if self.t:
            self.t.start()
        self.closed = False
        self.kernel_copy = hasattr(os, "copy_file_range")  # Linux; macOS copies with reads and writes
        self.pending: tuple[int, int, int, str] | None = None
        self.aborted = False
        self.hash_told = False  # the checksum thread has been sent its end
        self.hinter: threading.Thread | None = None
        self.more = threading.Event()  # set when the copy has moved on: the hint thread may ask further ahead
        self.advised, self.copied = 0, 0

    def expect(self, ranges: list[tuple[int, int, int]]) -> None:
        """The source ranges (fd, offset, length) that `copy` will be given next, in order. A thread asks the
        kernel for each (POSIX_FADV_WILLNEED) up to a window ahead of the copy, so that from a cold page cache
        the reads of scattered experts queue up on the disk instead of waiting one range at a time; the hints
        are off the copy's path (on cached pages each still costs a walk of the page cache)."""
        self._stop_hints()
        joined: list[tuple[int, int, int]] = []
        for fd, off, n in ranges:  # one hint per run of neighbouring ranges
            if joined and joined[-1][0] == fd and joined[-1][1] + joined[-1][2] == off:
                joined[-1] = (fd, joined[-1][1], joined[-1][2] + n)
            else:
                joined.append((fd, off, n))
        self.advised, self.copied = 0, 0
        if _ADVISE is None or not joined:
            return
        self.more.clear()
        self.hinter = threading.Thread(target=self._hints, args=(joined, _ADVISE), name="moesift-hints",
                                       daemon=True)
        self.hinter.start()

    def _hints(self, joined: list[tuple[int, int, int]], advise: Any) -> None:
        for fd, off, k in joined:
            while self.advised >= self.copied + _AHEAD and self.hinter is not None:
                self.more.wait()
                self.more.clear()
            if self.hinter is None:  # the file is finished (or failed): its sources may close
                return
            try:
                advise(fd, off, k, os.POSIX_FADV_WILLNEED)
            except OSError:
                return  # a file system without the hint: the copy goes on without it
            self.advised += k

    def _stop_hints(self) -> None:
        t, self.hinter = self.hinter, None
        if t is not None:
            self.more.set()
            t.join()

    def _hash(self) -> None:
        buf = bytearray(_HASH_BUF)
        mv = memoryview(buf)
        try:
            while True:
                item = self.q.get()
                if item is None:
                    return
                if self.aborted:
                    continue
                if isinstance(item, tuple):
                    fd, off, n = item
                    while n > 0:
                        k = pread_into(fd, mv[: min(n, _HASH_BUF)], off)
                        if k <= 0:
                            raise OSError(f"short read at {off}")
                        self.h.update(mv[:k])
                        off += k
                        n -= k
                else:
                    self.h.update(item)
        except BaseException as e:  # noqa: BLE001 - reported by close()
            self.error = e
            while self.q.get() is not None:
                pass

    def _write_all(self, data: Any) -> None:
        mv = memoryview(data)
        n = 0
        while n < len(mv):
            n += os.write(self.fd, mv[n:])

    def write(self, data: bytes) -> None:
        self.flush()
        self._write_all(data)
        if self.h is not None:
            self.q.put(data)

    def copy(self, src_fd: int, off: int, n: int, name: str) -> None:
        """Append bytes [off, off + n) of the open source file `src_fd` (contiguous ranges are joined and
        copied in one go: neighbouring resident experts are neighbours on disk)."""
        self.copied += n
        if self.hinter is not None and self.advised < self.copied + _AHEAD:
            self.more.set()
        p = self.pending
        if p is not None and p[0] == src_fd and p[1] + p[2] == off and p[2] < (1 << 30):
            self.pending = (src_fd, p[1], p[2] + n, name)
            return
        self.flush()
        self.pending = (src_fd, off, n, name)

    def flush(self) -> None:
        if self.pending is None:
            return
        src_fd, off, n, name = self.pending
        self.pending = None
        start, left = off, n
        while left > 0:
            k = 0
            if self.kernel_copy:
                try:
                    k = os.copy_file_range(src_fd, self.fd, min(left, 1 << 30), start)
                except OSError:
                    self.kernel_copy = False  # other filesystems: plain reads and writes
            if not self.kernel_copy:
                chunk = os.pread(src_fd, min(left, _BUF), start)
                k = len(chunk)
                if k:
                    self._write_all(chunk)
            if k <= 0:
                raise MoesiftError(f"{name!r} ended early (truncated?); the source {self.source} is damaged")
            start += k
            left -= k
        if self.h is not None:
            self.q.put((src_fd, off, n))

    def _teardown(self) -> None:
        """Stop the hints and the checksum's input, then close the file, each step even when another was cut
        short (SIGTERM unwinds as an exception); a second call completes an interrupted one."""
        try:
            self._stop_hints()
        finally:
            try:
                if self.t is not None and not self.hash_told:
                    self.q.put(None)
                    self.hash_told = True
            finally:
                if self.fd >= 0:
                    os.close(self.fd)
                    self.fd = -1

    def finish(self) -> None:
        """Write what is pending and close the file; its hash may still be computing (close() waits)."""
        try:
            if not self.closed:
                self.closed = True
                self.flush()
        except BaseException:
            self.aborted = True
            raise
        finally:
            self._teardown()  # also completes a teardown an interrupt cut short

    def abort(self) -> None:
        """After an error: drop what is pending, stop the threads and close the file."""
        self.aborted, self.pending, self.closed = True, None, True
        self._teardown()
        if self.t:
            self.t.join()

    def close(self) -> str | None:
        """finish(), wait for the hash, and return its hex digest (None without checksums)."""
        self.finish()
        if self.t:
            self.t.join()
        if self.error is not None:
            raise MoesiftError(f"could not checksum the output: {self.error}")
        return self.h.hexdigest() if self.h is not None else None


def files_at_once(n_files: int) -> int:
    """Output files written at once: one per core, at most 4. From the page cache a copy is bound by one
    core's memory copy, and the kernel takes a file's lock for each write into it, so copies run in parallel
    only into different files; from a disk, more streams than that only contend for it."""
    return max(1, min(4, os.cpu_count() or 1, n_files))


class Stopped(Exception):
    """Another file's writer failed: this one stops too."""


class FileJobs:
    """Writes several output files at once, `threads` at a time, each by a job that opens its writer with
    `writer()`, calls `check()` before each range and returns the writer finished. A finished file's checksum
    may still be computing while its thread writes the next file (sha256 runs at about 1-2 GB/s on one core,
    slower than a kernel copy); it is awaited before the one after. The first error stops every job and is
    raised by `run`; every writer left unfinished is aborted before `run` returns, so the caller may close
    the source files then."""

    def __init__(self, threads: int):
        self.threads = threads
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.writers: list[RangeWriter] = []

    def writer(self, path: Path, **kwargs: Any) -> RangeWriter:
        w = RangeWriter(path, **kwargs)
        with self.lock:
            self.writers.append(w)
        return w

    def check(self) -> None:
        if self.stop.is_set():
            raise Stopped

    def run(self, jobs: list[tuple[str, Any]]) -> dict[str, str | None]:
        """Run `jobs` ((name, job) pairs; job() writes one file); the checksum of each file by name."""
        todo = list(jobs)
        hashes: dict[str, str | None] = {}
        errors: list[BaseException] = []

        def worker() -> None:
            behind: tuple[str, RangeWriter] | None = None
            try:
                while not self.stop.is_set():
                    with self.lock:
                        if not todo:
                            break
                        name, job = todo.pop(0)
                    w = job()
                    if behind is not None:
                        hashes[behind[0]] = behind[1].close()
                    behind = (name, w)
                if behind is not None and not self.stop.is_set():
                    hashes[behind[0]] = behind[1].close()
            except Stopped:
                pass
            except BaseException as e:  # noqa: BLE001 - raised by the calling thread
                errors.append(e)
                self.stop.set()

        threads = [threading.Thread(target=worker, name="moesift-file", daemon=True)
                   for _ in range(min(self.threads, len(todo)) or 1)]
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if errors:
                raise errors[0]
        finally:
            self.stop.set()  # after an error or an interrupt (SIGTERM unwinds here): every job stops at its next range
            for t in threads:
                if t.is_alive():
                    t.join()
            for w in self.writers:  # every unfinished writer's threads end before the source files may close
                with contextlib.suppress(Exception):
                    w.abort()  # a no-op on a writer already closed
        return {name: hashes[name] for name, _ in jobs}
