"""Output folders: replaced atomically, and never at the cost of a file GraphTune did not write.

`with atomic_directory(out) as tmp:` yields an empty folder next to `out`; the caller writes its files
there. When the block completes, GraphTune adds MANIFEST (`.graphtune-output.json`: the sorted list of
the files it wrote, byte-stable, since DVC hashes these folders) and the new folder takes `out`'s place:

* on Linux in one step, `renameat2(RENAME_EXCHANGE)`: a reader sees the old folder or the new one, never
  a missing or half-written one. The old contents, now at the temporary path, are then deleted;
* where the exchange is unavailable (other systems, older kernels, some file systems), file by file with
  `os.replace`: each file is replaced atomically, the folder itself is never absent, the manifest comes last.

An existing `out` is replaced only when GraphTune owns it: every entry under it is listed in its manifest,
or, for a folder an older GraphTune wrote before manifests existed, every entry is one of the caller's
`legacy_names`. Anything else (the user's notes, a symbolic link, the working directory or a folder above
it) is refused with a one-line OutputError before the caller does any work, and nothing is written or
deleted. Only files the old folder's record lists are ever deleted, each looked at again right before;
never a whole tree. If the block raises, the temporary folder is removed and `out` is left as it was.

Several processes may write the same folder at once: the replacement itself (the last ownership check, the
swap, the deletion of the old files) runs under an exclusive lock (flock) on the parent folder, so each
writer replaces a complete folder and the last one wins; `since=check_owned(out)` makes a writer warn when
another one replaced the folder after it started. A full disk, a read-only file system or a folder without
write permission is a one-line OutputError (the parent's writability is checked before any work), with
nothing half-written left behind.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import os
import secrets
import shutil
import stat
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

from graphtune.errors import GraphTuneNotice, OutputError

MANIFEST = ".graphtune-output.json"
_WRITER = "graphtune"
_SHOWN = 5  # foreign entries a refusal names; the rest are counted, so the message stays one readable line
_AT_FDCWD = -100  # <fcntl.h>: renameat2 resolves relative paths against the working directory
_RENAME_EXCHANGE = 2  # <linux/fs.h>: swap two existing paths atomically (Linux 3.15+, glibc 2.28+)
# errno values that mean "this system or file system cannot exchange": fall back to moving files one by one.
# EBUSY is what a mount point answers; EXDEV cannot happen for siblings but is harmless to include.
_NO_EXCHANGE = frozenset({errno.ENOSYS, errno.EINVAL, errno.EXDEV, errno.EOPNOTSUPP, errno.EBUSY,
                          getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)})


# errno values that mean "this place cannot take the files": a one-line OutputError, not a traceback
_CANNOT_WRITE = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                 errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                 errno.EPERM: "operation not permitted"}


def _cannot_write(out: Path, err: OSError) -> OutputError:
    why = _CANNOT_WRITE.get(err.errno, err.strerror or str(err))
    return OutputError(f"{out}: cannot write the output folder ({why}); nothing was written there: free space, "
                       "fix the permissions or choose another folder (--output-dir)")


@contextmanager
def _writing(out: Path, *, near: Path | None = None) -> Iterator[None]:
    """Turn the OSErrors of a full, read-only or forbidden place into a one-line OutputError.

    near: only a permission error on a path under this folder counts (the caller's block may read other
    files, whose permission errors are not about the output); a full or read-only disk always does."""
    try:
        yield
    except OSError as err:
        ours = near is None or err.errno not in (errno.EACCES, errno.EPERM) or (
            err.filename is not None and Path(os.fsdecode(err.filename)).resolve().is_relative_to(near.resolve()))
        if err.errno in _CANNOT_WRITE and ours:
            raise _cannot_write(out, err) from None
        raise


@contextmanager
def _parent_lock(out: Path) -> Iterator[None]:
    """An exclusive flock on `out`'s parent folder (a directory descriptor: no lock file is left behind)."""
    import fcntl

    fd = os.open(out.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _fingerprint(out: Path) -> str:
    """What `out` is now, to tell later whether another writer replaced it: its inode and manifest bytes."""
    try:
        st = os.lstat(out)
        manifest = (out / MANIFEST).read_bytes() if stat.S_ISDIR(st.st_mode) else b""
    except OSError:
        return "absent"
    return f"{st.st_ino}:{hash(manifest)}"


@contextmanager
def atomic_directory(out: str | os.PathLike, *, legacy_names: Iterable[str] = (),
                     since: str | None = None) -> Iterator[Path]:
    """Yield an empty folder next to `out`; when the block completes, it replaces `out` atomically.

    `legacy_names`: relative POSIX paths of the files older GraphTune versions wrote into such a folder
    without a manifest; a folder holding only those is replaced too. Raises OutputError (one line, nothing
    written, nothing deleted) when `out` is the working directory or a folder above it, the filesystem
    root or the home folder, not a folder, or holds anything GraphTune did not write, and when the place
    cannot be written (full, read-only, no permission). On any error in the block the temporary folder is
    removed and `out` is left untouched.

    since: `check_owned(out)`'s answer when the caller started its work: a notice names a folder that
    another writer replaced in the meantime (this writer's output then replaces it: the last one wins).
    """
    out = Path(out)
    legacy = frozenset(legacy_names) - {MANIFEST}  # a manifest is never "legacy": it must parse as ours
    _refuse_protected(out)
    _owned_files(out, legacy)  # refuse now, before the caller spends any work on a folder it cannot have
    with _writing(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = _make_temp(out)
    swapped = False
    try:
        with _writing(out, near=tmp):  # the caller's own writes into the folder: a full disk is one line too
            yield tmp
        with _writing(out):
            written = _seal(tmp)
        with _writing(out), _parent_lock(out):  # one writer at a time from the last check to the old files' removal
            _refuse_protected(out)  # the working directory may have changed while the caller worked
            old = _owned_files(out, legacy)  # and so may the folder: check again right before replacing it
            if since is not None and _fingerprint(out) != since:
                warnings.warn(f"{out}: another run replaced this folder after this one started; this run's "
                              "results replace it (give concurrent runs their own folders)", GraphTuneNotice,
                              stacklevel=3)
            if old is None:
                os.rename(tmp, out)
                return
            swapped = _exchange(tmp, out)
            if not swapped:
                _move_files_in(tmp, out, written, old)
            else:
                _discard_old(tmp, old, out)
    except BaseException:
        if not swapped:  # after a swap `tmp` holds the old contents: never removed wholesale
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not swapped:
        shutil.rmtree(tmp)  # our own folder, emptied: only the sub-folders the files moved out of are left


def check_owned(out: str | os.PathLike, *, legacy_names: Iterable[str] = ()) -> str:
    """Raise OutputError (one line) unless `atomic_directory(out, legacy_names=...)` may replace `out` and its
    parent can be written: for commands that should refuse a folder before they start long work, not only
    when they write. Returns the folder's fingerprint, for `atomic_directory(..., since=...)`."""
    out = Path(out)
    _refuse_protected(out)
    _owned_files(out, frozenset(legacy_names) - {MANIFEST})
    _check_writable(out)
    return _fingerprint(out)


def _check_writable(out: Path) -> None:
    """OutputError when the nearest existing folder at or above `out`'s parent cannot take a new entry."""
    place = out.parent
    while not place.exists() and place.parent != place:
        place = place.parent
    with _writing(out):
        probe = place / f".{out.name}.{secrets.token_hex(4)}.probe"
        os.mkdir(probe)
        os.rmdir(probe)


def manifest_bytes(files: Iterable[str]) -> bytes:
    """The manifest for `files` (relative POSIX paths): sorted, no timestamps, so equal outputs hash equal."""
    record = {"files": sorted(set(files)), "writer": _WRITER}
    return (json.dumps(record, indent=1, sort_keys=True) + "\n").encode()


# ----------------------------------------------------------------------------- what is there, and whose
class _Scan(NamedTuple):
    """A folder's entries as relative POSIX paths, sorted, parents before children. Links are never followed."""

    files: tuple[str, ...]  # regular files
    dirs: tuple[str, ...]  # real folders (not links to folders)
    others: tuple[str, ...]  # symbolic links, sockets, FIFOs, devices: never GraphTune's


def _scan(root: Path) -> _Scan:
    files, dirs, others = [], [], []

    def walk(folder: str, prefix: str) -> None:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            rel = prefix + entry.name
            if entry.is_symlink():
                others.append(rel)
            elif entry.is_dir(follow_symlinks=False):
                dirs.append(rel)
                walk(entry.path, rel + "/")
            elif entry.is_file(follow_symlinks=False):
                files.append(rel)
            else:
                others.append(rel)

    walk(os.fspath(root), "")
    return _Scan(tuple(files), tuple(dirs), tuple(others))


def _ancestors(names: Iterable[str]) -> set[str]:
    """Every folder above each relative path: "a/b/c" -> {"a", "a/b"}."""
    out = set()
    for name in names:
        parts = name.split("/")
        out.update("/".join(parts[:i]) for i in range(1, len(parts)))
    return out


def _read_manifest(folder: Path) -> frozenset[str] | None:
    """The files `folder`'s manifest lists, or None when it has none that GraphTune wrote (absent, a link, not ours)."""
    path = folder / MANIFEST
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return None
        record = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("writer") != _WRITER or not isinstance(record.get("files"), list):
        return None
    return frozenset(f for f in record["files"] if isinstance(f, str) and f != MANIFEST)


def _owned_files(out: Path, legacy: frozenset[str]) -> frozenset[str] | None:
    """The files of existing folder `out` GraphTune may replace or delete (its manifest included), None when
    `out` does not exist. Raises OutputError when `out` is not a real folder or holds anything else."""
    try:
        mode = os.lstat(out).st_mode
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(mode):
        raise OutputError(f"{out}: is a symbolic link; GraphTune replaces only a real folder "
                          f"(give the folder it points to, or another path)")
    if not stat.S_ISDIR(mode):
        raise OutputError(f"{out}: exists and is not a folder; choose another path")
    scan = _scan(out)
    listed = _read_manifest(out)
    owned = listed | {MANIFEST} if listed is not None else legacy
    foreign = [f for f in scan.files if f not in owned] + list(scan.others)
    needed = _ancestors(owned)
    for d in reversed(scan.dirs):  # children first, so only the outermost of nested empty folders is named
        if d not in needed and not any(f.startswith(d + "/") for f in foreign):
            foreign.append(d + "/")
    if foreign:
        raise OutputError(_refusal(out, foreign))
    return frozenset(scan.files)


def _refusal(out: Path, foreign: list[str]) -> str:
    foreign = sorted(foreign)
    more = f" and {len(foreign) - _SHOWN} more" if len(foreign) > _SHOWN else ""
    return (f"{out}: holds files GraphTune did not write ({', '.join(foreign[:_SHOWN])}{more}); "
            f"choose another folder or move them")


def _refuse_protected(out: Path) -> None:
    """OutputError when `out` is the working directory or above it, the filesystem root, or home or above it."""
    target = out.resolve()
    cwd = Path.cwd().resolve()
    try:
        home = Path.home().resolve()
    except (RuntimeError, KeyError):  # no HOME and no passwd entry: there is no home folder to protect
        home = None
    if target.parent == target:  # above every working directory too; named first for a clearer message
        what = "the filesystem root"
    elif target == cwd or target in cwd.parents:
        what = "the working directory (or a folder above it)"
    elif home is not None and (target == home or target in home.parents):
        what = "the home folder (or a folder above it)"
    else:
        return
    raise OutputError(f"{out}: refusing to replace {what}; choose a subfolder such as outputs/run")


# ----------------------------------------------------------------------------- writing
def _make_temp(out: Path) -> Path:
    """An empty hidden sibling of `out` (same file system, so renames are atomic) with `out`'s permissions.

    Created with os.mkdir rather than tempfile.mkdtemp: mkdtemp's 0o700 would become the output folder's
    mode, hiding results from the group; a new folder gets the umask's mode, a replacement the old one's.
    """
    for _ in range(100):
        tmp = out.parent / f".{out.name}.{secrets.token_hex(4)}.tmp"
        try:
            os.mkdir(tmp)
        except FileExistsError:
            continue
        try:
            os.chmod(tmp, stat.S_IMODE(os.stat(out).st_mode))
        except FileNotFoundError:
            pass
        return tmp
    raise FileExistsError(errno.EEXIST, "no free temporary name next to the output folder", str(out))


def _seal(tmp: Path) -> frozenset[str]:
    """Check what the caller wrote into `tmp`, drop empty sub-folders, and write the manifest last."""
    scan = _scan(tmp)
    if scan.others:  # a link would be refused as foreign by the next run: a bug in the caller, not user input
        raise ValueError(f"{tmp}: atomic_directory writes regular files only, got {', '.join(scan.others)}")
    if MANIFEST in scan.files:
        raise ValueError(f"{tmp}: {MANIFEST} is written by atomic_directory itself")
    for d in reversed(scan.dirs):  # children first; a folder with files in it stays
        try:
            os.rmdir(tmp / d)
        except OSError as err:
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
    (tmp / MANIFEST).write_bytes(manifest_bytes(scan.files))
    return frozenset(scan.files)


@functools.lru_cache(maxsize=1)
def _renameat2():
    """libc's renameat2, or None where there is none (not Linux, or a C library without it)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return fn


def _exchange(a: Path, b: Path) -> bool:
    """Swap existing paths `a` and `b` in one step. False, with nothing changed, where this system cannot."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _NO_EXCHANGE:
        return False
    raise OSError(err, os.strerror(err), str(b))


def _discard_old(old_root: Path, owned: frozenset[str], out: Path) -> None:
    """After the swap: delete the old contents (now at `old_root`) that the old folder's record listed."""
    left = _delete_owned(old_root, owned)
    if left:  # something appeared in `out` after the last check: keep it where the user can find it
        warnings.warn(f"{out}: {len(left)} entries GraphTune did not write appeared while it replaced the "
                      f"folder ({', '.join(left[:_SHOWN])}); they were moved to {old_root}", GraphTuneNotice,
                      stacklevel=4)
    else:
        os.rmdir(old_root)


def _delete_owned(root: Path, owned: frozenset[str]) -> list[str]:
    """Delete from `root` the regular files named in `owned`, each looked at again right before, and the
    folders above them that this leaves empty. Returns what is left, as relative POSIX paths."""
    scan = _scan(root)
    for rel in scan.files:
        if rel in owned:
            os.unlink(root / rel)
    needed = _ancestors(owned)
    for d in reversed(scan.dirs):
        if d in needed:
            try:
                os.rmdir(root / d)
            except OSError as err:
                if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
    left = _scan(root)
    return sorted(left.files + left.others + left.dirs)


def _move_files_in(tmp: Path, out: Path, new: frozenset[str], old: frozenset[str]) -> None:
    """Without an exchange: move the new files into `out` one by one (each os.replace is atomic and the
    folder is never absent), then delete the old files the new output no longer has, then the manifest."""
    # While files move, `out` holds old and new files together. Record all of them first, so that an
    # interruption leaves a folder GraphTune still owns: the next run replaces it instead of refusing it.
    fd, union = _temp_file(tmp)
    with os.fdopen(fd, "wb") as f:
        f.write(manifest_bytes((old | new) - {MANIFEST}))
    os.replace(union, out / MANIFEST)
    for rel in sorted(new):
        _make_room(out, rel, old)
        os.replace(tmp / rel, out / rel)
    stale = old - new - {MANIFEST}
    for rel in sorted(stale):
        path = out / rel
        try:
            if stat.S_ISREG(os.lstat(path).st_mode):  # looked at again: only a regular file we listed
                os.unlink(path)
        except (FileNotFoundError, NotADirectoryError):  # gone, or a folder above it became a new file
            pass
    for d in sorted(_ancestors(stale) - _ancestors(new), key=lambda d: d.count("/"), reverse=True):
        try:
            os.rmdir(out / d)
        except OSError as err:
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT, errno.ENOTDIR):
                raise
    os.replace(tmp / MANIFEST, out / MANIFEST)


def _temp_file(folder: Path) -> tuple[int, Path]:
    """A new file in `folder` with a name no other entry has (O_EXCL): the staging place of the interim manifest."""
    for _ in range(100):
        path = folder / f".manifest.{secrets.token_hex(4)}"
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(folder))


def _make_room(out: Path, rel: str, old: frozenset[str]) -> None:
    """Make `out/rel` replaceable by a file: create missing folders above it, and delete old owned entries
    in the way (a file where a folder now goes, or a folder where a file now goes). Anything else refuses."""
    parts = rel.split("/")
    for i in range(1, len(parts)):
        above = "/".join(parts[:i])
        path = out / above
        mode = _lmode(path)
        if mode is None:
            os.mkdir(path)
        elif stat.S_ISREG(mode) and above in old:
            os.unlink(path)
            os.mkdir(path)
        elif not stat.S_ISDIR(mode):
            raise OutputError(_refusal(out, [above]))
    mode = _lmode(out / rel)
    if mode is None or (stat.S_ISREG(mode) and rel in old):
        return  # os.replace overwrites an old file of ours atomically
    if stat.S_ISDIR(mode):
        inside = frozenset(n[len(rel) + 1:] for n in old if n.startswith(rel + "/"))
        left = _delete_owned(out / rel, inside)
        if not left:
            os.rmdir(out / rel)
            return
        raise OutputError(_refusal(out, [f"{rel}/{name}" for name in left]))
    raise OutputError(_refusal(out, [rel]))


def _lmode(path: Path) -> int | None:
    try:
        return os.lstat(path).st_mode
    except FileNotFoundError:
        return None
