"""One output discipline for every file and folder moesift writes.

- Atomic: the output is written under a hidden temporary name beside the target (``.OUT.<pid>.<rand>.tmp``
  for files, ``.OUT.<pid>.<rand>.partial`` for folders) and renamed over the target only when complete.
- Exclusive: while it writes, a process holds a lock on ``.OUT.moesift-lock`` (an advisory `flock`, released
  by the kernel even after kill -9); a second writer of the same target stops with "OUT is being written by
  another moesift process (pid N)".
- Never overwrites without ``force``, never writes into a model directory (a folder with config.json and
  safetensors weights) or over the command's source model, never replaces the current directory.
- Modes follow the umask, as for any file a program creates.
- Temporary files and folders left by writers that died (their pid no longer runs) are removed at the next
  write to the same target, and named on stderr.
- A failed write (full disk, I/O error, ...) leaves the target as it was and is reported in one line.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import blake3
import numpy as np

from .errors import MoesiftError

LOCK_SUFFIX = ".moesift-lock"
# a directory written by moesift carries one of these; replacing it with --force is allowed
MOESIFT_DIR_MARKERS = ("moesift_plan.json", ".moesift-demo", ".moesift-files")
# every folder moesift writes lists its files here, so a later --force replaces it only while nobody added any
LISTING = ".moesift-files"


def is_model_dir(path: str | os.PathLike) -> bool:
    """A Hugging Face model directory: config.json beside safetensors (or pickle) weights."""
    p = Path(path)
    try:
        if not (p / "config.json").is_file():
            return False
        return any(p.glob("*.safetensors")) or any(p.glob("*.safetensors.index.json")) or any(p.glob("*.bin"))
    except OSError:
        return False


def _display(p: Path | str) -> str:
    return repr(str(p))


def check_output_path(
    path: str | os.PathLike,
    force: bool = True,
    directory: bool = False,
    protect: Iterable[str | os.PathLike] = (),
    inputs: Iterable[str | os.PathLike] = (),
) -> Path:
    """Check that `path` can be written: its folder exists, it is not inside a model directory nor over a
    protected path (the command's source model) nor one of the files the command reads (`inputs`), and
    (unless `force`) it does not exist yet. `directory`: the output is a folder (trim, demo), which may
    replace a folder moesift wrote before, as long as nobody added a file to it."""
    p = Path(path)
    ap = Path(os.path.abspath(p))
    if p.name in ("", ".", "..") or ap == Path(ap.anchor):
        raise MoesiftError(f"output {_display(path)} is not a new file or folder name; choose one, e.g. ./out")
    parent = ap.parent
    if not parent.is_dir():
        raise MoesiftError(f"output directory {_display(p.parent)} does not exist; create it first")
    rp = ap.resolve()
    cwd = Path.cwd().resolve()
    if rp == cwd or rp in cwd.parents:
        raise MoesiftError(f"output {_display(path)} is the current directory (or holds it); choose a new folder")
    for src in protect:
        rs = Path(src).resolve()
        if rs == rp or rs in rp.parents or rp in rs.parents:
            raise MoesiftError(f"output {_display(path)} overlaps the source model {_display(src)}; choose "
                               "another location")
    for src in inputs:
        with contextlib.suppress(OSError):  # an input that does not exist cannot be overwritten
            if p.exists() and os.path.samefile(src, p):
                raise MoesiftError(f"output {_display(path)} is a file this command reads ({_display(src)}); "
                                   "moesift never writes over its own input, even with --force; choose another --out")
    if is_model_dir(parent):
        raise MoesiftError(f"output {_display(path)} lies inside the model directory {_display(p.parent)}; "
                           "moesift never writes there, choose another location")
    exists = p.exists() or p.is_symlink()
    if exists and not force:
        raise MoesiftError(f"{_display(path)} already exists; pass --force to overwrite it")
    if exists and not p.is_symlink():
        if p.is_dir() and not directory:
            raise MoesiftError(f"{_display(path)} is a directory; --out takes a file name here")
        if p.is_dir() and is_model_dir(p) and not _is_moesift_dir(p):
            raise MoesiftError(f"{_display(path)} is a model directory moesift did not write; it is never "
                               "replaced, even with --force; choose another --out")
        if p.is_dir() and directory and any(p.iterdir()) and not _is_moesift_dir(p):
            raise MoesiftError(f"{_display(path)} is a non-empty directory moesift did not write; it is not "
                               "replaced, even with --force; choose another --out")
        foreign = _foreign_file(p) if p.is_dir() and directory else None
        if foreign is not None:
            raise MoesiftError(f"{_display(path)} holds {foreign!r}, which moesift did not write; the folder is not "
                               "replaced, even with --force: move that file out, or choose another --out")
        if not p.is_dir() and directory:
            raise MoesiftError(f"{_display(path)} is a file; --out takes a directory here")
    return p


def input_paths(*args: Any) -> list[str]:
    """The files among a command's arguments (paths, lists of paths, ``PATH:WEIGHT`` trace arguments; loaded
    objects and None are skipped): what its output must never replace."""
    out: list[str] = []
    for a in args:
        items = a if isinstance(a, (list, tuple)) else [a]
        for x in items:
            if not isinstance(x, (str, os.PathLike)):
                continue
            s = str(x)
            if not os.path.exists(s) and ":" in s:
                s = s.rsplit(":", 1)[0]
            if os.path.exists(s):
                out.append(s)
    return out


def _is_moesift_dir(p: Path) -> bool:
    return any((p / m).is_file() for m in MOESIFT_DIR_MARKERS)


def _files_under(root: Path) -> list[str]:
    """Relative paths of the files under `root` (symlinks as files), sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        for n in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            out.append(n if rel == "." else os.path.join(rel, n))
    return sorted(out)


def _foreign_file(p: Path) -> str | None:
    """A file in folder `p` that is not in the listing moesift wrote there, or None (also for folders written
    before moesift kept a listing)."""
    try:
        known = set(json.loads((p / LISTING).read_text()))
    except (OSError, ValueError, TypeError):
        return None
    return next((f for f in _files_under(p) if f not in known and f != LISTING), None)


# ---- exclusive claim -----------------------------------------------------------------------------------


# the hidden names beside an output add up to 34 characters to its name; names longer than this are shortened
# to their start and a hash, so that any name the filesystem takes (255 bytes) can be written
_SIDE_NAME_MAX = 200


def _side_stem(p: Path) -> str:
    """The output's name as its hidden lock and temporary names begin: the name itself, or for a long name
    its first characters and a hash of the whole."""
    name = p.name
    if len(name.encode()) <= _SIDE_NAME_MAX:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:16]
    return f"{name.encode()[:120].decode(errors='ignore')}~{digest}"


def _lock_path(p: Path) -> Path:
    return p.parent / f".{_side_stem(p)}{LOCK_SUFFIX}"


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


@contextlib.contextmanager
def claim(path: str | os.PathLike) -> Iterator[None]:
    """Hold the exclusive claim on writing `path` for the duration of the block (an advisory lock on
    `.NAME.moesift-lock` beside it, holding this pid; the kernel drops it if the process dies)."""
    p = Path(os.path.abspath(path))
    lock = _lock_path(p)
    fd = _acquire(lock, path)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()
        os.close(fd)


def _acquire(lock: Path, shown: str | os.PathLike) -> int:

    for _ in range(50):
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise MoesiftError(f"cannot write beside {_display(shown)}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                return _acquire_pidfile(lock, shown)  # a filesystem without flock (some network mounts)
            pid = _read_pid(fd)
            os.close(fd)
            who = f"pid {pid}" if pid else "pid unknown"
            raise MoesiftError(f"{_display(shown)} is being written by another moesift process ({who}); wait for "
                               "it to finish, or stop it") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the holder removed the file between our open and our lock: try again
            os.close(fd)
            continue
        _write_pid(fd, lock, shown)
        return fd
    raise MoesiftError(f"could not claim {_display(shown)} for writing (its lock file keeps changing)")


def _write_pid(fd: int, lock: Path, shown: str | os.PathLike) -> None:
    """Record this pid in a claimed lock file; if the disk refuses even that, let the claim go, remove the
    lock file and say which output could not be written."""
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError as e:
        with contextlib.suppress(OSError):
            lock.unlink()
        os.close(fd)
        raise write_failed(shown, e) from None


def _acquire_pidfile(lock: Path, shown: str | os.PathLike) -> int:
    """The claim where the filesystem has no `flock`: the lock file is created exclusively and holds the
    writer's pid; one whose pid no longer runs is stale and taken over."""
    for _ in range(50):
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            try:
                fd = os.open(lock, os.O_RDONLY)
            except FileNotFoundError:
                continue
            pid = _read_pid(fd)
            os.close(fd)
            if pid is not None and pid_alive(pid):
                raise MoesiftError(f"{_display(shown)} is being written by another moesift process (pid {pid}); "
                                   "wait for it to finish, or stop it") from None
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
            continue
        except OSError as e:
            raise MoesiftError(f"cannot write beside {_display(shown)}: {e.strerror}") from None
        _write_pid(fd, lock, shown)
        return fd
    raise MoesiftError(f"could not claim {_display(shown)} for writing (its lock file keeps changing)")


def _read_pid(fd: int) -> int | None:

    for _ in range(20):
        try:
            raw = os.pread(fd, 32, 0).decode(errors="replace").strip()
        except OSError:
            return None
        if raw.isdigit():
            return int(raw)
        time.sleep(0.01)
    return None


def _temp_re(p: Path) -> re.Pattern[str]:
    return re.compile(rf"^\.{re.escape(_side_stem(p))}\.(\d+)\.[a-z0-9]+\.(tmp|partial|old)$")


def clean_stale(path: str | os.PathLike, quiet: bool = False) -> list[str]:
    """Remove the temporary files and folders that writers of `path` left when they died (their pid no
    longer runs); call while holding the claim. Returns the names removed (also said on stderr)."""
    p = Path(os.path.abspath(path))
    pat = _temp_re(p)
    removed = []
    try:
        entries = list(os.scandir(p.parent))
    except OSError:
        return []
    for e in entries:
        m = pat.match(e.name)
        if not m or pid_alive(int(m.group(1))):
            continue
        try:
            if e.is_dir(follow_symlinks=False):
                shutil.rmtree(e.path)
            else:
                os.unlink(e.path)
        except OSError:
            continue
        removed.append(e.name)
        if not quiet:
            sys.stderr.write(f"moesift: removed {e.name} in {str(p.parent)!r}, left by moesift process "
                             f"{m.group(1)} that no longer runs\n")
    return removed


def _temp_name(p: Path, kind: str) -> Path:
    return p.parent / f".{_side_stem(p)}.{os.getpid()}.{secrets.token_hex(4)}.{kind}"


def write_failed(path: str | os.PathLike, e: OSError) -> MoesiftError:
    """One line for a write that failed (full disk, I/O error, permissions): what, where, and that the
    target was left as it was."""
    what = e.strerror or str(e)
    code = errno.errorcode.get(e.errno or 0)
    fn = str(getattr(e, "filename", None) or "")
    where = f" ({fn})" if fn and not os.path.basename(fn).startswith(f".{_side_stem(Path(path))}.") else ""
    return MoesiftError(f"writing {_display(path)} failed: {what}{f' [{code}]' if code else ''}{where}; "
                        f"{_display(path)} was left as it was and no partial output remains")


@contextlib.contextmanager
def atomic_path(
    path: str | os.PathLike, force: bool = True, protect: Iterable[str | os.PathLike] = (),
    inputs: Iterable[str | os.PathLike] = (),
) -> Iterator[Path]:
    """Yield a temporary file path beside `path` (created empty, with the umask's mode); rename it over
    `path` only if the block succeeds. The target is claimed for the whole block."""
    inputs = list(inputs)
    p = check_output_path(path, force, protect=protect, inputs=inputs)
    ap = Path(os.path.abspath(p))
    with claim(p):
        clean_stale(ap)
        check_output_path(p, force, protect=protect, inputs=inputs)  # another writer may have finished meanwhile
        tmp = _temp_name(ap, "tmp")
        try:
            try:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
                yield tmp
                if ap.is_symlink():
                    ap.unlink()
                os.replace(tmp, ap)
            except OSError as e:
                raise write_failed(path, e) from None
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()


class OutputDir:
    """A folder written atomically: `begin()` claims `path` and returns an empty temporary folder beside it
    (umask's mode); `commit()` moves it over `path` (an older folder is moved aside first and removed after);
    `abort()` removes it. Both release the claim; `abort()` after `commit()` does nothing."""

    def __init__(self, path: str | os.PathLike, force: bool = True, protect: Iterable[str | os.PathLike] = (),
                 inputs: Iterable[str | os.PathLike] = ()):
        self.shown = path
        self.force = force
        self.protect = list(protect)
        self.inputs = list(inputs)
        self.path = Path(os.path.abspath(path))
        self.tmp: Path | None = None
        self._fd: int | None = None

    def begin(self) -> Path:
        check_output_path(self.shown, self.force, directory=True, protect=self.protect, inputs=self.inputs)
        self._fd = _acquire(_lock_path(self.path), self.shown)
        try:
            clean_stale(self.path)
            check_output_path(self.shown, self.force, directory=True, protect=self.protect, inputs=self.inputs)
            tmp = _temp_name(self.path, "partial")
            try:
                os.mkdir(tmp, 0o777)
            except OSError as e:
                raise write_failed(self.shown, e) from None
            self.tmp = tmp
            return tmp
        except BaseException:
            self._release()
            raise

    def commit(self) -> Path:
        ap, old = self.path, None
        try:
            try:
                (self.tmp / LISTING).write_text(json.dumps(_files_under(self.tmp), indent=0) + "\n")
                if ap.is_symlink() or ap.is_file():
                    ap.unlink()
                elif ap.exists():
                    old = _temp_name(ap, "old")
                    os.replace(ap, old)
                os.replace(self.tmp, ap)
                self.tmp = None
            except OSError as e:
                if old is not None and not ap.exists():
                    with contextlib.suppress(OSError):
                        os.replace(old, ap)  # put the previous output back
                    old = None
                raise write_failed(self.shown, e) from None
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            self.abort()
        return Path(self.shown)

    def abort(self) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None
        self._release()

    def _release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                _lock_path(self.path).unlink()
            os.close(self._fd)
            self._fd = None


@contextlib.contextmanager
def atomic_dir(
    path: str | os.PathLike, force: bool = True, protect: Iterable[str | os.PathLike] = (),
    inputs: Iterable[str | os.PathLike] = (),
) -> Iterator[Path]:
    """`OutputDir` as a block: the folder replaces `path` only if the block succeeds."""
    w = OutputDir(path, force, protect, inputs)
    tmp = w.begin()
    try:
        try:
            yield tmp
        except OSError as e:
            raise write_failed(path, e) from None
        w.commit()
    finally:
        w.abort()


def json_default(o: Any) -> Any:
    """`json.dumps(default=...)` for numpy scalars and arrays and paths."""
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_json(path: str | os.PathLike, obj: Any, force: bool = True,
               inputs: Iterable[str | os.PathLike] = ()) -> Path:
    text = json.dumps(obj, indent=2, default=json_default) + "\n"
    with atomic_path(path, force, inputs=inputs) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_text(path: str | os.PathLike, text: str, force: bool = True,
               inputs: Iterable[str | os.PathLike] = ()) -> Path:
    with atomic_path(path, force, inputs=inputs) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_bytes(path: str | os.PathLike, data: bytes, force: bool = True,
                inputs: Iterable[str | os.PathLike] = ()) -> Path:
    with atomic_path(path, force, inputs=inputs) as tmp:
        tmp.write_bytes(data)
    return Path(path)


_NP_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "int64": "I64", "int32": "I32", "int16": "I16",
              "int8": "I8", "uint64": "U64", "uint32": "U32", "uint16": "U16", "uint8": "U8", "bool": "BOOL"}


def write_safetensors(
    path: str | os.PathLike, arrays: dict[str, Any], metadata: dict[str, str] | None = None, force: bool = True,
    inputs: Iterable[str | os.PathLike] = (),
) -> Path:
    """Write numpy `arrays` as a safetensors file through `atomic_path`, streamed array by array (no second
    copy of the data in memory)."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    items = []
    off = 0
    # widest elements first (as the safetensors library orders them): every array starts aligned to its dtype
    for name in sorted(arrays, key=lambda k: (-np.asarray(arrays[k]).dtype.itemsize, k)):
        a = np.ascontiguousarray(arrays[name])
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        code = _NP_DTYPES.get(a.dtype.name)
        if code is None:
            raise MoesiftError(f"cannot store array {name!r} of dtype {a.dtype} in {_display(path)}")
        header[name] = {"dtype": code, "shape": list(a.shape), "data_offsets": [off, off + a.nbytes]}
        off += a.nbytes
        items.append(a)
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * ((-len(hb)) % 8)
    with atomic_path(path, force, inputs=inputs) as tmp, open(tmp, "wb") as f:
        f.write(len(hb).to_bytes(8, "little"))
        f.write(hb)
        for a in items:
            if a.nbytes:
                f.write(a.reshape(-1).view(np.uint8).data)
    return Path(path)


# checksums a trim can record of its output files ("none" turns them off); blake3 is the default: it runs at
# several GB/s per core (and spreads large updates over the cores), sha256 at about 1-2 GB/s on one core
CHECKSUMS = ("blake3", "sha256")


def new_checksum(algorithm: str, threads: bool = True) -> Any:
    """A fresh hash object (`update`, `hexdigest`) of `algorithm`, one of CHECKSUMS; `threads`: blake3 spreads
    large updates over the cores (turn off where the caller already hashes beside other work)."""
    if algorithm == "blake3":
        return blake3.blake3(max_threads=blake3.blake3.AUTO if threads else 1)
    if algorithm == "sha256":
        return hashlib.sha256()
    raise MoesiftError(f"unknown checksum {algorithm!r}: use {', '.join(CHECKSUMS)} or none")


def file_checksum(path: str | os.PathLike, algorithm: str = "sha256", chunk: int = 1 << 22) -> str:
    """Hex digest of the file at `path` with `algorithm` (one of CHECKSUMS)."""
    h = new_checksum(algorithm)
    if algorithm == "blake3":
        h.update_mmap(os.fspath(path))  # memory-mapped, hashed on all cores
        return h.hexdigest()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    return file_checksum(path, "sha256", chunk)


def pread_into(fd: int, buf: memoryview, offset: int) -> int:
    """Read up to len(buf) bytes of `fd` at `offset` into `buf`; the count read (0 at the end of the file).
    `os.preadv` reads straight into the buffer; where Python lacks it (some macOS builds), `os.pread`
    and a copy."""
    if hasattr(os, "preadv"):
        return os.preadv(fd, [buf], offset)
    data = os.pread(fd, len(buf), offset)
    buf[: len(data)] = data
    return len(data)
