"""`graphtune suite`: grid expansion and job ids, one-line validation errors that write nothing, --dry-run,
kill -9 then --resume with real jobs, a changed grid, --jobs 2, failures, SIGTERM and the summary files.

Most tests run their jobs through a stand-in for `python -m graphtune` (FAKE below: it parses the same
command line, sleeps briefly, writes results.json/results.csv into --output-dir and can fail on request),
so that the suite's own behaviour is checked in seconds; the kill -9 test runs real `graphtune experiment`
jobs on the embedded sample.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from graphtune import suite as suite_mod
from graphtune.cli import cli
from graphtune.errors import ConfigError, OutputError
from graphtune.suite import JobsFailed, load_suite, read_events, run_suite

REPO = Path(__file__).resolve().parents[1]

# A stand-in for `python -m graphtune experiment ...`: test MAE = 100 * lr + seed (results.json, and a
# results.csv whose LAST row holds it), its start/end times in times.json, exit 3 when --lrs is 0.5.
FAKE = textwrap.dedent("""
    import json, os, sys, time
    args = sys.argv[1:]
    opts = {args[i][2:]: args[i + 1] for i in range(len(args) - 1) if args[i].startswith("--")}
    start = time.time()
    print("fake", " ".join(args), flush=True)
    time.sleep(float(os.environ.get("FAKE_SLEEP", "0.3")))
    lr, seed = float(opts["lrs"]), int(opts.get("seed", 0))
    if lr == 0.5:
        print("diverged", file=sys.stderr)
        sys.exit(3)
    out = opts["output-dir"]
    os.makedirs(out, exist_ok=True)
    mae = 100 * lr + seed
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"score": -mae, "stages": [{"test": {"mae": 99.0}}, {"test": {"mae": mae}}]}, f)
    with open(os.path.join(out, "results.csv"), "w") as f:
        f.write(f"stage,test_mae\\n0,99\\n1,{mae}\\n")
    with open(os.path.join(out, "times.json"), "w") as f:
        json.dump([start, time.time()], f)
""")


def _suite_doc(**changes) -> dict:
    doc = {"name": "sweep", "command": "experiment",
           "options": {"datasets": "metr-la-west", "model": "baseline", "epochs": 1},
           "grid": {"lrs": [0.001, 0.01], "seed": [0, 1]},
           "summary": {"file": "results.json", "metrics": {"test_mae": "stages.-1.test.mae", "score": "score"},
                       "x": "lrs", "y": "test_mae", "series": "seed"}}
    doc.update(changes)
    return doc


def _write(path: Path, doc) -> Path:
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False))
    return path


def _listing(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under root with its size and mtime: any write shows."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture
def fake(tmp_path, monkeypatch) -> list[str]:
    script = tmp_path.parent / f"{tmp_path.name}-fake.py"  # outside tmp_path: listings stay the test's own
    script.write_text(FAKE)
    launcher = [sys.executable, str(script)]
    monkeypatch.setattr(suite_mod, "LAUNCHER", launcher)
    return launcher


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------- expansion and ids
def test_grid_expands_in_file_order_with_stable_readable_ids(tmp_path):
    suite = load_suite(_write(tmp_path / "a.yaml", _suite_doc()), cli)
    assert [j.params for j in suite.jobs] == [{"lrs": "0.001", "seed": "0"}, {"lrs": "0.001", "seed": "1"},
                                              {"lrs": "0.01", "seed": "0"}, {"lrs": "0.01", "seed": "1"}]
    assert all(re.fullmatch(r"lrs=[0-9.]+-seed=[01]-[0-9a-f]{8}", j.id) for j in suite.jobs)
    assert suite.jobs[0].id == "lrs=0.001-seed=0-8566daf8"  # pinned: the same configuration, the same id, always
    assert list(suite.jobs[3].args) == ["experiment", "--datasets", "metr-la-west", "--model", "baseline",
                                        "--epochs", "1", "--lrs", "0.01", "--seed", "1"]
    # the same configuration spelled differently (option order and aliases, values as strings, another name
    # and summary): the same ids; another option value: other ids
    same = _suite_doc(name="other", options={"epochs": "1", "model": "baseline", "datasets": "metr-la-west"},
                      grid={"lrs": ["0.001", "0.01"], "seed": ["0", "1"]}, summary=None)
    assert [j.id for j in load_suite(_write(tmp_path / "b.yaml", same), cli).jobs] == [j.id for j in suite.jobs]
    other = _suite_doc(options={"datasets": "metr-la-west", "model": "baseline", "epochs": 2})
    ids = {j.id for j in load_suite(_write(tmp_path / "c.yaml", other), cli).jobs}
    assert not ids & {j.id for j in suite.jobs}
    # nested commands, repeatable options (a grid axis adds to the fixed values) and flags
    gpd = {"name": "g", "command": "gpd collect", "options": {"set": ["gpd.collect_epochs=1"], "no-tracking": True},
           "grid": {"set": ["gpd.collect_lr=0.01", "gpd.collect_lr=0.02"]}}
    jobs = load_suite(_write(tmp_path / "g.yaml", gpd), cli).jobs
    assert list(jobs[1].args) == ["gpd", "collect", "--set", "gpd.collect_epochs=1", "--set", "gpd.collect_lr=0.02",
                                  "--no-tracking"]


BAD = [
    ("missing", None, "{file}: suite file not found"),
    ("yaml", "name: [unclosed\n", "{file}: invalid YAML: "),
    ("not a mapping", "- a\n- b\n", "{file}: expected a mapping with keys name, command, options, grid, summary; "
                                    "got a list"),
    ("top key", _suite_doc(sweep=1), "{file}: unknown key(s) sweep; allowed: "),
    ("command", _suite_doc(command="expriment"), ("{file}: command: unknown graphtune command 'expriment'; known: "
                                                  "cities, compare, ", " experiment, ", " gpd collect, gpd diffuse, ")),
    ("group", _suite_doc(command="gpd"), "{file}: command: unknown graphtune command 'gpd'; known: "),
    ("option", _suite_doc(options={"lr": 0.1}), "{file}: options.lr: 'experiment' has no option --lr; its options: "
                                                "--datasets, --device, --epochs, "),
    ("grid option", _suite_doc(grid={"sead": [0, 1]}), "{file}: grid.sead: 'experiment' has no option --sead; "),
    ("empty axis", _suite_doc(grid={"lrs": [], "seed": [0]}), "{file}: grid.lrs: empty list; give at least one value"),
    ("scalar axis", _suite_doc(grid={"lrs": 0.1}), "{file}: grid.lrs: expected a list of values, got 0.1"),
    ("output dir", _suite_doc(options={"output_dir": "x"}), "{file}: options.output_dir: the suite gives every job "
                                                            "its own output folder"),
    ("twice", _suite_doc(options={"seed": 1}), "{file}: grid.seed: --seed is also set by options.seed; "),
    ("duplicate", _suite_doc(grid={"lrs": [0.01, "0.01"]}, summary=None),
     "{file}: grid: jobs {{'lrs': '0.01'}} and {{'lrs': '0.01'}} have the same configuration"),
    ("bad value", {"name": "g", "command": "gpd collect", "grid": {"seed": ["abc"]}},
     "{file}: job seed=abc-"),
    ("flag", _suite_doc(options={"no-tracking": "yes"}), "{file}: options.no-tracking: --no-tracking of 'experiment' "
                                                         "is a flag: expected true or false, got 'yes'"),
    ("summary key", _suite_doc(summary={"file": "results.json", "metrics": {"m": "score"}, "colour": "red"}),
     "{file}: summary: unknown key(s) colour; allowed: file, metrics, x, y, series"),
    ("summary file", _suite_doc(summary={"file": "/abs/results.json", "metrics": {"m": "score"}}),
     "{file}: summary.file: expected a .json or .csv file inside the job's output folder"),
    ("summary metrics", _suite_doc(summary={"file": "results.json", "metrics": {}}), "{file}: summary.metrics: "),
    ("summary x", _suite_doc(summary={"file": "results.json", "metrics": {"m": "score"}, "x": "epochs"}),
     "{file}: summary.x: expected a grid axis (lrs, seed), got 'epochs'"),
    ("summary y", _suite_doc(summary={"file": "results.json", "metrics": {"m": "score"}, "y": "mae"}),
     "{file}: summary.y: expected one of the metrics (m), got 'mae'"),
    ("summary series", _suite_doc(summary={"file": "results.json", "metrics": {"m": "score"}, "series": "lrs"}),
     "{file}: summary.series: expected a grid axis other than x, or a list of them (seed), got 'lrs'"),
    ("summary no output", {"name": "p", "command": "prepare", "grid": {"city": ["metr-la-week"]},
                           "summary": {"file": "results.json", "metrics": {"m": "score"}}},
     "{file}: summary: 'prepare' has no --output-dir"),
]


@pytest.mark.parametrize("case,doc,message", BAD, ids=[b[0] for b in BAD])
def test_bad_suite_files_fail_in_one_line_with_exit_2_and_write_nothing(tmp_path, monkeypatch, case, doc, message):
    monkeypatch.chdir(tmp_path)  # the default suite folder would be tmp_path/outputs/suites/<name>
    file = tmp_path / "suite.yaml"
    if doc is not None:
        _write(file, doc)
    before = _listing(tmp_path)
    r = CliRunner().invoke(cli, ["suite", "run", str(file)])
    assert r.exit_code == 2, r.output
    assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output, r.output
    prefix, *fragments = message if isinstance(message, tuple) else (message,)  # (the other commands: elsewhere)
    assert r.output.startswith("graphtune: error: " + prefix.format(file=file)), r.output
    assert all(fragment in r.output for fragment in fragments), r.output
    assert _listing(tmp_path) == before


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, monkeypatch, fake):
    monkeypatch.chdir(tmp_path)
    file = _write(tmp_path / "s.yaml", _suite_doc())
    before = _listing(tmp_path)
    r = CliRunner().invoke(cli, ["suite", "run", str(file), "--dry-run", "--jobs", "2"])
    assert r.exit_code == 0, r.output
    lines = r.output.strip().splitlines()
    assert lines[0] == ("suite sweep: 4 jobs, 0 finished, 4 to run; folder outputs/suites/sweep "
                        "(dry run: nothing written)")
    ids = [j.id for j in load_suite(file, cli).jobs]
    assert [line.split()[:3] for line in lines[1:]] == [["to", "run", i] for i in ids]
    assert lines[1].endswith(f"--lrs 0.001 --seed 0 --output-dir outputs/suites/sweep/jobs/{ids[0]}/out")
    assert _listing(tmp_path) == before  # not even outputs/ or the suite folder
    # after a partial run, the dry run of --resume says which jobs are finished, and still writes nothing
    with pytest.raises(JobsFailed):
        run_suite(load_suite(_write(tmp_path / "f.yaml", _suite_doc(grid={"lrs": [0.001, 0.5], "seed": [0]})),
                             cli), tmp_path / "f", echo=lambda _: None)
    before = _listing(tmp_path)
    r = CliRunner().invoke(cli, ["suite", "run", str(tmp_path / "f.yaml"), "--output-dir", str(tmp_path / "f"),
                                 "--dry-run", "--resume"])
    assert r.exit_code == 0, r.output
    assert [line.split()[0] for line in r.output.strip().splitlines()[1:]] == ["finished", "to"]
    assert _listing(tmp_path) == before


# ----------------------------------------------------------------------------- running
def test_jobs_2_runs_two_at_once_and_gives_the_sequential_summary(tmp_path, fake, monkeypatch):
    monkeypatch.setenv("FAKE_SLEEP", "1.0")
    suite = load_suite(_write(tmp_path / "s.yaml", _suite_doc()), cli)
    one = run_suite(suite, tmp_path / "one", jobs=1, echo=lambda _: None)
    two = run_suite(suite, tmp_path / "two", jobs=2, echo=lambda _: None)
    assert one.finished == two.finished == [j.id for j in suite.jobs]

    def spans(folder):
        return sorted(json.loads((folder / "jobs" / j.id / "out" / "times.json").read_text()) for j in suite.jobs)

    def most_at_once(intervals):
        return max(sum(s <= t < e for s, e in intervals) for t, _ in intervals)

    assert most_at_once(spans(tmp_path / "one")) == 1
    assert most_at_once(spans(tmp_path / "two")) == 2  # (the first job runs alone: it creates a new MLflow store)
    strip = [{k: v for k, v in row.items() if k != "wall_s"} for row in _rows(tmp_path / "one" / "summary_all.csv")]
    assert strip == [{k: v for k, v in row.items() if k != "wall_s"}
                     for row in _rows(tmp_path / "two" / "summary_all.csv")]


def test_summary_csv_md_png_and_a_failed_job(tmp_path, fake):
    doc = _suite_doc(grid={"lrs": [0.001, 0.01, 0.5], "seed": [0, 1]})
    suite = load_suite(_write(tmp_path / "s.yaml", doc), cli)
    out = tmp_path / "suite"
    lines = []
    with pytest.raises(JobsFailed) as failure:
        run_suite(suite, out, jobs=2, echo=lines.append)
    bad = [j.id for j in suite.jobs if j.params["lrs"] == "0.5"]
    message = str(failure.value)
    assert "\n" not in message and message.startswith("2 of 6 jobs failed: ")
    assert all(f"{i} (exit 3; log {out / 'jobs' / i / 'log.txt'})" in message for i in bad)
    assert "diverged" in (out / "jobs" / bad[0] / "log.txt").read_text()  # stderr captured
    assert not (out / "jobs" / bad[0] / "job.json").exists()
    rows = _rows(out / "summary_all.csv")
    assert list(rows[0]) == ["job", "lrs", "seed", "status", "wall_s", "test_mae", "score"]
    assert [(r["lrs"], r["seed"], r["status"]) for r in rows] == [
        ("0.001", "0", "finished"), ("0.001", "1", "finished"), ("0.01", "0", "finished"), ("0.01", "1", "finished"),
        ("0.5", "0", "failed"), ("0.5", "1", "failed")]
    for r in rows:
        expected = 100 * float(r["lrs"]) + int(r["seed"]) if r["status"] == "finished" else None
        assert (float(r["test_mae"]) if r["test_mae"] else None) == pytest.approx(expected)
        assert float(r["wall_s"]) > 0.2
    md = (out / "summary.md").read_text()
    assert "6 jobs, 4 finished, 2 failed, 0 not run." in md
    assert "| job | lrs | seed | status | wall_s | test_mae | score |" in md
    assert f"| {suite.jobs[3].id} | 0.01 | 1 | finished |" in md
    png = (out / "summary.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    record = json.loads((out / "jobs" / suite.jobs[0].id / "job.json").read_text())
    assert record["status"] == "finished" and record["job"] == suite.jobs[0].id and record["returncode"] == 0
    # a CSV summary: the last row; `suite summary` rewrites from the records without running anything
    csv_doc = _suite_doc(grid=doc["grid"], summary={"file": "results.csv", "metrics": {"mae": "test_mae"}, "x": "lrs"})
    file = _write(tmp_path / "s.yaml", csv_doc)
    starts = len([e for e in read_events(out) if e["event"] == "start"])
    r = CliRunner().invoke(cli, ["suite", "summary", str(file), "--output-dir", str(out)])
    assert r.exit_code == 0, r.output
    assert r.output.startswith("suite sweep: 4 of 6 jobs finished; written: ")
    assert [row["mae"] for row in _rows(out / "summary_all.csv")][:2] == ["0.1", "1.1"]
    assert len([e for e in read_events(out) if e["event"] == "start"]) == starts


def test_a_folder_with_a_plan_is_never_restarted_and_a_changed_grid_is_named(tmp_path, fake):
    file = _write(tmp_path / "s.yaml", _suite_doc(grid={"lrs": [0.001, 0.01], "seed": [0]}))
    out = tmp_path / "suite"
    old = load_suite(file, cli)
    run_suite(old, out, echo=lambda _: None)
    before = _listing(tmp_path)
    r = CliRunner().invoke(cli, ["suite", "run", str(file), "--output-dir", str(out)])
    assert r.exit_code == 2 and r.output.strip() == (
        f"graphtune: error: {out}: already holds a suite (plan.json); add --resume to run its unfinished jobs, "
        f"or choose another --output-dir"), r.output
    assert _listing(tmp_path) == before
    _write(file, _suite_doc(grid={"lrs": [0.01, 0.03], "seed": [0]}))
    new = load_suite(file, cli)
    before = _listing(tmp_path)
    for command in (["suite", "run", str(file), "--resume"], ["suite", "summary", str(file)]):
        r = CliRunner().invoke(cli, [*command, "--output-dir", str(out)])
        assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
        assert r.output.strip() == (
            f"graphtune: error: {file}: the grid or options changed since {out / 'plan.json'} was written: "
            f"new jobs {new.jobs[1].id}; gone jobs {old.jobs[0].id} "
            f"(restore the file, or run the new suite into another --output-dir)"), r.output
    assert _listing(tmp_path) == before
    # a folder of the user's own is not a suite folder
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(OutputError, match="holds files GraphTune did not write"):
        run_suite(old, tmp_path / "mine", echo=lambda _: None)
    with pytest.raises(ConfigError, match="nothing to resume"):
        run_suite(old, tmp_path / "empty", resume=True, echo=lambda _: None)


def test_resume_clears_only_what_the_suite_wrote_in_an_unfinished_job(tmp_path, fake):
    suite = load_suite(_write(tmp_path / "s.yaml", _suite_doc(grid={"lrs": [0.001, 0.5], "seed": [0]})), cli)
    out = tmp_path / "suite"
    with pytest.raises(JobsFailed):
        run_suite(suite, out, echo=lambda _: None)
    failed = out / "jobs" / suite.jobs[1].id
    (failed / "out").mkdir()
    (failed / "out" / "half.bin").write_bytes(b"x")  # what a killed job may leave in its output folder
    (failed / ".out.1234abcd.tmp").mkdir()  # ... and the command's temporary folder beside it
    (failed / "notes.txt").write_text("mine")
    before = _listing(tmp_path)
    with pytest.raises(OutputError, match=r"holds files the suite did not write \(notes.txt\)"):
        run_suite(suite, out, resume=True, echo=lambda _: None)
    assert _listing(tmp_path) == before  # refused before anything was touched
    (failed / "notes.txt").unlink()
    with pytest.raises(JobsFailed):  # lrs 0.5 fails again: it ran again, from a cleared folder
        run_suite(suite, out, resume=True, echo=lambda _: None)
    assert sorted(os.listdir(failed)) == ["log.txt"]
    starts = [e["job"] for e in read_events(out) if e["event"] == "start"]
    assert starts == [suite.jobs[0].id, suite.jobs[1].id, suite.jobs[1].id]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")  # a zombie has ended; only its parent's reaping is left


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _starts(out: Path) -> list[dict]:
    return [e for e in read_events(out) if e.get("event") == "start"]


def test_sigterm_stops_the_running_job_and_leaves_it_unfinished(tmp_path, fake):
    file = _write(tmp_path / "s.yaml", _suite_doc(grid={"lrs": [0.001, 0.01], "seed": [0]}))
    out = tmp_path / "suite"
    code = (f"import graphtune.suite as s, sys; s.LAUNCHER = {fake!r}\n"
            "from graphtune.cli import main\nmain()")
    env = dict(os.environ, FAKE_SLEEP="60")
    proc = subprocess.Popen([sys.executable, "-c", code, "suite", "run", str(file), "--output-dir", str(out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    start = _wait_for(lambda: _starts(out), 30, "the first job")[0]
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM, (stdout, stderr)
    assert stderr.strip().splitlines()[-1].startswith("graphtune: suite interrupted (SIGTERM): 0 of 2 jobs finished")
    assert not _alive(start["pid"])
    assert not (out / "jobs" / start["job"] / "job.json").exists() and not (out / "summary_all.csv").exists()
    assert [e["event"] for e in read_events(out)][-2:] == ["start", "interrupted"]


@pytest.mark.slow
def test_kill_9_then_resume_runs_each_job_once_more_only_if_it_was_lost(tmp_path):
    """Three real `graphtune experiment` jobs; the suite is SIGKILLed while job 2 runs, then resumed."""
    doc = {"name": "kill", "command": "experiment",
           "options": {"datasets": "metr-la-west", "model": "baseline", "epochs": 1, "params": str(REPO / "params.yaml"),
                       "set": ["prepare.stride=12", "train.batch_size=256"]},
           "grid": {"seed": [0, 1, 2]},
           "summary": {"file": "results.json", "metrics": {"test_mae": "stages.-1.test.mae"}, "x": "seed"}}
    file = _write(tmp_path / "kill.yaml", doc)
    out = tmp_path / "suite"
    argv = [sys.executable, "-m", "graphtune", "suite", "run", str(file), "--output-dir", str(out)]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        second = _wait_for(lambda: _starts(out)[1:], 120, "job 2 to start")[0]
        time.sleep(0.5)  # job 2 is under way
    finally:
        proc.kill()  # SIGKILL: the suite cannot catch it
        proc.wait()
    _wait_for(lambda: not _alive(second["pid"]), 30, "the orphaned job 2 to end")  # PR_SET_PDEATHSIG
    ids = [j.id for j in load_suite(file, cli).jobs]
    assert second["job"] == ids[1] and (out / "jobs" / ids[0] / "job.json").exists()
    assert not (out / "jobs" / ids[1] / "job.json").exists()
    r = subprocess.run([*argv, "--resume"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("suite kill: 3 jobs, 1 finished, 2 to run")
    starts = [e["job"] for e in _starts(out)]
    assert {i: starts.count(i) for i in ids} == {ids[0]: 1, ids[1]: 2, ids[2]: 1}
    rows = _rows(out / "summary_all.csv")
    assert [(row["seed"], row["status"]) for row in rows] == [("0", "finished"), ("1", "finished"), ("2", "finished")]
    assert all(float(row["test_mae"]) > 0 for row in rows)
    assert not any(_alive(e["pid"]) for e in _starts(out))
    db = os.environ["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///")  # each job is a tracked run in the store
    with sqlite3.connect(db) as con:
        names = {n for (n,) in con.execute("select name from runs where status = 'FINISHED'")}
    assert {f"baseline-full-metr-la-west-s{seed}" for seed in (0, 1, 2)} <= names
