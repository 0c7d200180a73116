"""atomic_directory: owned folders are replaced in one step; anything GraphTune did not write is never deleted."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import threading
from pathlib import Path

import pytest

import graphtune.fileio as fileio
from graphtune.errors import OutputError
from graphtune.fileio import MANIFEST, atomic_directory


def _write(out: Path, files: dict[str, str], **kwargs) -> None:
    with atomic_directory(out, **kwargs) as tmp:
        for name, text in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(text)


def _tree(folder: Path) -> dict[str, str]:
    """Every file under `folder` (relative POSIX path -> text)."""
    return {p.relative_to(folder).as_posix(): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


def _manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST).read_bytes())


@pytest.fixture(params=["exchange", "fallback-no-renameat2", "fallback-enosys"])
def swap_mode(request, monkeypatch):
    """Run a test through the one-step exchange, and through the file-by-file fallback (forced two ways)."""
    used = []
    real = fileio._move_files_in
    monkeypatch.setattr(fileio, "_move_files_in", lambda *a: used.append(1) or real(*a))
    if request.param == "exchange":
        if fileio._renameat2() is None:
            pytest.skip("renameat2 is not available here")
    elif request.param == "fallback-no-renameat2":
        monkeypatch.setattr(fileio, "_renameat2", lambda: None)
    else:
        def enosys(*args):
            ctypes.set_errno(errno.ENOSYS)
            return -1

        monkeypatch.setattr(fileio, "_renameat2", lambda: enosys)
    yield request.param
    assert bool(used) == request.param.startswith("fallback")  # the path under test is the one that ran


# ----------------------------------------------------------------------------- refusals
def test_foreign_file_is_refused_with_one_line_and_survives(tmp_path):
    out = tmp_path / "outputs" / "x"
    out.mkdir(parents=True)
    (out / "notes.txt").write_text("my notes")
    ran = []
    with pytest.raises(OutputError) as info:
        with atomic_directory(out):
            ran.append(1)
    assert str(info.value) == (f"{out}: holds files GraphTune did not write (notes.txt); "
                               f"choose another folder or move them")
    assert ran == []  # refused before the caller did any work
    assert _tree(out) == {"notes.txt": "my notes"}
    assert os.listdir(out.parent) == ["x"]  # no temporary folder left behind


def test_files_added_to_an_owned_folder_are_named_and_kept(tmp_path):
    out = tmp_path / "x"
    _write(out, {"results.json": "{}"})
    (out / "data").mkdir()
    (out / "data" / "a.csv").write_text("1,2")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputError) as info:
        _write(out, {"results.json": "{}"})
    assert str(info.value) == (f"{out}: holds files GraphTune did not write (data/a.csv, notes.txt); "
                               f"choose another folder or move them")
    assert _tree(out) == {MANIFEST: (out / MANIFEST).read_text(), "results.json": "{}", "data/a.csv": "1,2",
                          "notes.txt": "mine"}


def test_many_foreign_entries_name_five_then_count(tmp_path):
    out = tmp_path / "x"
    out.mkdir()
    for i in range(7):
        (out / f"f{i}.txt").write_text(str(i))
    with pytest.raises(OutputError) as info:
        _write(out, {"a": "1"})
    message = str(info.value)
    assert "(f0.txt, f1.txt, f2.txt, f3.txt, f4.txt and 2 more)" in message and "\n" not in message
    assert len(list(out.iterdir())) == 7


def test_symlinks_are_foreign_and_never_followed(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("precious")
    out = tmp_path / "x"
    _write(out, {"a.txt": "1"})
    (out / "link").symlink_to(elsewhere)
    with pytest.raises(OutputError, match=r"\(link\)"):
        _write(out, {"a.txt": "2"})
    assert (elsewhere / "keep.txt").read_text() == "precious" and (out / "a.txt").read_text() == "1"
    linked = tmp_path / "linked"
    linked.symlink_to(out)
    with pytest.raises(OutputError, match="is a symbolic link"):
        _write(linked, {"a.txt": "3"})
    assert (out / "a.txt").read_text() == "1"


def test_file_appearing_during_the_block_is_refused_before_the_swap(tmp_path):
    out = tmp_path / "x"
    _write(out, {"a.txt": "1"})
    with pytest.raises(OutputError, match=r"\(late\.txt\)"):
        with atomic_directory(out) as tmp:
            (tmp / "a.txt").write_text("2")
            (out / "late.txt").write_text("user's")
    assert _tree(out) == {MANIFEST: (out / MANIFEST).read_text(), "a.txt": "1", "late.txt": "user's"}
    assert sorted(os.listdir(tmp_path)) == ["x"]


@pytest.mark.parametrize("target", [".", "cwd", "..", "above"])
def test_working_directory_and_folders_above_it_are_refused(tmp_path, monkeypatch, target):
    work = tmp_path / "work"
    work.mkdir()
    (work / "code.py").write_text("print(1)")
    monkeypatch.chdir(work)
    out = {".": Path("."), "cwd": work, "..": Path(".."), "above": tmp_path}[target]
    with pytest.raises(OutputError) as info:
        _write(out, {"a.txt": "1"})
    assert str(info.value) == (f"{out}: refusing to replace the working directory (or a folder above it); "
                               f"choose a subfolder such as outputs/run")
    assert _tree(work) == {"code.py": "print(1)"} and sorted(os.listdir(tmp_path)) == ["work"]


def test_root_home_and_non_folders_are_refused(tmp_path, monkeypatch):
    # The root is checked through the pure check alone: a broken atomic_directory given "/" would delete
    # the whole file system, so no test ever hands it a real folder outside tmp_path.
    with pytest.raises(OutputError, match="^/: refusing to replace the filesystem root"):
        fileio._refuse_protected(Path("/"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    with pytest.raises(OutputError, match="refusing to replace the home folder"):
        _write(tmp_path / "home", {"a": "1"})
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(OutputError, match="file: exists and is not a folder"):
        _write(tmp_path / "file", {"a": "1"})
    assert (tmp_path / "file").read_text() == "not a folder"


# ----------------------------------------------------------------------------- replacing
def test_new_folder_gets_files_and_manifest(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    _write(out, {"r.json": "{}", "sub/p.png": "png"})
    assert _tree(out) == {MANIFEST: (out / MANIFEST).read_text(), "r.json": "{}", "sub/p.png": "png"}
    assert _manifest(out) == {"files": ["r.json", "sub/p.png"], "writer": "graphtune"}
    assert os.listdir(out.parent) == ["out"]


def test_owned_folder_is_replaced_and_stale_files_go(tmp_path, swap_mode):
    out = tmp_path / "x"
    _write(out, {"a.txt": "old", "sub/b.txt": "old", "gone.txt": "old", "grow": "a file", "shrink/c.txt": "c"})
    (out.parent / "sibling.txt").write_text("untouched")
    with atomic_directory(out) as tmp:
        (tmp / "a.txt").write_text("new")
        (tmp / "grow").mkdir()  # a file becomes a folder, and a folder a file
        (tmp / "grow" / "d.txt").write_text("d")
        (tmp / "shrink").write_text("now a file")
        (tmp / "empty").mkdir()  # empty folders are not kept: the manifest lists files only
    assert _tree(out) == {MANIFEST: (out / MANIFEST).read_text(), "a.txt": "new", "grow/d.txt": "d",
                          "shrink": "now a file"}
    assert not (out / "sub").exists() and not (out / "empty").exists()
    assert _manifest(out) == {"files": ["a.txt", "grow/d.txt", "shrink"], "writer": "graphtune"}
    assert sorted(os.listdir(tmp_path)) == ["sibling.txt", "x"]
    _write(out, {"a.txt": "again"})  # the result is itself an owned folder
    assert _tree(out) == {MANIFEST: (out / MANIFEST).read_text(), "a.txt": "again"}


def test_legacy_folder_without_manifest_is_replaced(tmp_path, swap_mode):
    legacy = ("series.npy", "meta.json", "coords.npy")
    out = tmp_path / "city"
    out.mkdir()
    (out / "series.npy").write_text("old series")
    (out / "meta.json").write_text("old meta")
    _write(out, {"series.npy": "new series", "meta.json": "new meta"}, legacy_names=legacy)
    assert _tree(out) == {MANIFEST: (out / MANIFEST).read_text(), "series.npy": "new series",
                          "meta.json": "new meta"}
    empty = tmp_path / "empty"
    empty.mkdir()
    _write(empty, {"a": "1"})  # an empty folder holds nothing to lose
    assert _tree(empty) == {MANIFEST: (empty / MANIFEST).read_text(), "a": "1"}


def test_legacy_names_do_not_cover_other_files(tmp_path):
    out = tmp_path / "city"
    out.mkdir()
    (out / "series.npy").write_text("old")
    (out / "mine.csv").write_text("keep")
    with pytest.raises(OutputError, match=r"\(mine\.csv\)"):
        _write(out, {"series.npy": "new"}, legacy_names=("series.npy",))
    assert _tree(out) == {"series.npy": "old", "mine.csv": "keep"}


def test_exception_in_block_leaves_old_folder_intact(tmp_path):
    out = tmp_path / "x"
    _write(out, {"a.txt": "old", "sub/b.txt": "old"})
    before = _tree(out)
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(out) as tmp:
            (tmp / "a.txt").write_text("new")
            raise RuntimeError("boom")
    assert _tree(out) == before and MANIFEST in before
    assert sorted(os.listdir(tmp_path)) == ["x"]


def test_unexpected_exchange_error_leaves_old_folder_intact(tmp_path, monkeypatch):
    out = tmp_path / "x"
    _write(out, {"a.txt": "old"})
    before = _tree(out)

    def eacces(*args):
        ctypes.set_errno(errno.EACCES)
        return -1

    monkeypatch.setattr(fileio, "_renameat2", lambda: eacces)
    with pytest.raises(OutputError, match="permission denied"):  # one line, not a traceback
        _write(out, {"a.txt": "new"})
    assert _tree(out) == before and sorted(os.listdir(tmp_path)) == ["x"]


def test_manifest_is_byte_stable(tmp_path):
    files = {"sub/b.txt": "b", "a.txt": "a"}
    _write(tmp_path / "one", files)
    _write(tmp_path / "two", dict(reversed(files.items())))
    first = (tmp_path / "one" / MANIFEST).read_bytes()
    assert first == b'{\n "files": [\n  "a.txt",\n  "sub/b.txt"\n ],\n "writer": "graphtune"\n}\n'
    assert (tmp_path / "two" / MANIFEST).read_bytes() == first
    _write(tmp_path / "one", files)
    assert (tmp_path / "one" / MANIFEST).read_bytes() == first


def test_reader_never_sees_the_folder_missing_or_half_written(tmp_path, swap_mode):
    """A reader polling during 200 replacements always finds the folder, a whole manifest and whole files."""
    out = tmp_path / "x"
    names = [f"f{i:02d}.json" for i in range(10)] + ["sub/g.json"]
    pad = "x" * 4096  # large enough that a torn write would show as JSON that does not parse

    def generation(k: int) -> dict[str, str]:
        return {name: json.dumps({"gen": k, "pad": pad}) for name in names}

    _write(out, generation(0))
    stop = threading.Event()
    problems: list[str] = []
    looks = [0]

    def reader() -> None:
        while not stop.is_set():
            try:
                if not out.is_dir():
                    problems.append("folder missing")
                    continue
                listed = json.loads((out / MANIFEST).read_bytes())["files"]
                if not set(names) <= set(listed):
                    problems.append(f"manifest lists {listed}")
                for name in names:
                    if json.loads((out / name).read_text())["pad"] != pad:
                        problems.append(f"{name} incomplete")
                looks[0] += 1
            except (OSError, ValueError, KeyError) as err:
                problems.append(f"{type(err).__name__}: {err}")

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for k in range(1, 201):
            _write(out, generation(k))
    finally:
        stop.set()
        thread.join()
    assert problems == []
    assert looks[0] > 20  # the reader really looked while the folder was being replaced
    assert _tree(out) == {MANIFEST: (out / MANIFEST).read_text(), **generation(200)}
    assert sorted(os.listdir(tmp_path)) == ["x"]


# ----------------------------------------------------------------------------- several writers, full and read-only disks
def _writer(out: str, tag: str, rounds: int, barrier, queue) -> None:
    """One process writing `out` `rounds` times; reports each failure or notice, then ("done", count)."""
    import warnings

    barrier.wait()  # all four start together: the most contention
    problems = 0
    for k in range(rounds):
        try:
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                with atomic_directory(out) as tmp:
                    for name in ("a.txt", "b.txt", "sub/c.txt"):
                        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                        (tmp / name).write_text(f"{tag}-{k}")
            for w in seen:  # e.g. "entries appeared while it replaced the folder": two writers crossed
                problems += 1
                queue.put(str(w.message))
        except Exception as err:  # noqa: BLE001  (counted: the test asserts there are none)
            problems += 1
            queue.put(repr(err))
    queue.put(("done", problems))


def test_four_processes_writing_one_folder_never_fail_and_leave_one_writers_files(tmp_path):
    """Processes, not threads: each replaces a complete folder, none fails or crosses another, the last one
    wins, and no temporary folder is left (without the lock, writers crossed and left the old contents)."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    queue, barrier = ctx.Queue(), ctx.Barrier(4)
    out = tmp_path / "shared"
    procs = [ctx.Process(target=_writer, args=(str(out), f"w{i}", 500, barrier, queue)) for i in range(4)]
    for p in procs:
        p.start()
    results, errors = [], []
    while len(results) < len(procs):
        item = queue.get(timeout=300)
        (results if isinstance(item, tuple) else errors).append(item)
    for p in procs:
        p.join(timeout=30)
    assert errors == [] and sum(f for _, f in results) == 0
    contents = {(out / n).read_text() for n in ("a.txt", "b.txt", "sub/c.txt")}
    assert len(contents) == 1  # one writer's files, never a mix
    assert json.loads((out / MANIFEST).read_text())["files"] == ["a.txt", "b.txt", "sub/c.txt"]
    assert sorted(os.listdir(tmp_path)) == ["shared"]  # no temporary folder left behind


def test_a_writer_is_told_when_another_replaced_the_folder_since_it_started(tmp_path):
    from graphtune.errors import GraphTuneNotice
    from graphtune.fileio import check_owned

    out = tmp_path / "x"
    _write(out, {"a.txt": "first"})
    since = check_owned(out)
    _write(out, {"a.txt": "another run"})
    with pytest.warns(GraphTuneNotice, match="another run replaced this folder"):
        with atomic_directory(out, since=since) as tmp:
            (tmp / "a.txt").write_text("mine")
    assert (out / "a.txt").read_text() == "mine"


def _unshare_works() -> bool:
    import shutil
    import subprocess

    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0


needs_mounts = pytest.mark.skipif(not _unshare_works(), reason="needs `unshare -rm` to mount a small tmpfs")

_IN_SMALL_DISK = """
import sys
from pathlib import Path
from graphtune.errors import OutputError
from graphtune.fileio import atomic_directory, check_owned
out = Path(sys.argv[1]) / "out"
try:
    check_owned(out)
    with atomic_directory(out) as tmp:
        (tmp / "small.txt").write_text("x")
        (tmp / "big.bin").write_bytes(b"0" * (1 << 20))  # 1 MiB into a 256 KiB file system
except OutputError as err:
    print("ERROR", err)
import os
print("LEFT", sorted(os.listdir(sys.argv[1])))
"""


@needs_mounts
def test_a_full_disk_is_one_line_and_leaves_nothing_half_written(tmp_path):
    import subprocess
    import sys

    disk = tmp_path / "disk"
    disk.mkdir()
    script = f'mount -t tmpfs -o size=256k tmpfs "{disk}" && "{sys.executable}" -c \'{_IN_SMALL_DISK}\' "{disk}"'
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("ERROR") and "no space left on the device" in lines[0] and "Traceback" not in done.stderr
    assert lines[1] == "LEFT []"  # neither the output folder nor its temporary sibling


@needs_mounts
def test_a_read_only_place_is_refused_before_any_work(tmp_path):
    import subprocess
    import sys

    disk = tmp_path / "disk"
    disk.mkdir()
    code = ("import sys; from graphtune.fileio import check_owned; from graphtune.errors import OutputError\n"
            "try:\n    check_owned(sys.argv[1] + '/out'); print('ACCEPTED')\n"
            "except OutputError as err:\n    print('ERROR', err)\n")
    script = (f'mount -t tmpfs -o size=256k tmpfs "{disk}" && mount -o remount,ro "{disk}" && '
              f'"{sys.executable}" -c "{code}" "{disk}"')
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ERROR") and "read-only" in done.stdout, done.stdout
