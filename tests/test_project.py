"""Project plumbing: pins agree, the CLI documents every option, local state stays out of git."""

from __future__ import annotations

import re
from pathlib import Path

import click
import yaml
from click.testing import CliRunner

from graphtune.cli import cli

REPO = Path(__file__).resolve().parents[1]


def _requirements() -> list[str]:
    lines = (REPO / "requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_requirements_are_exact_pins_and_torch_is_cpu_pinned():
    reqs = _requirements()
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-]+==[A-Za-z0-9_.\-+]+", r) for r in reqs), reqs
    assert "torch==2.13.0" in reqs


def test_conda_yaml_mirrors_requirements():
    env = yaml.safe_load((REPO / "conda.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert [p for p in pip if not p.startswith("-e")] == _requirements()


def test_dvc_analytics_off_and_local_state_ignored():
    config = (REPO / ".dvc" / "config").read_text()
    assert re.search(r"analytics\s*=\s*false", config)
    ignored = (REPO / ".gitignore").read_text().split()
    for entry in (".venv/", "mlflow.db", "mlruns/"):
        assert entry in ignored


def _commands(group: click.Group, prefix=()):
    for name, cmd in group.commands.items():
        yield prefix + (name,), cmd
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, prefix + (name,))


def test_every_command_and_option_has_help():
    runner = CliRunner()
    top = runner.invoke(cli, ["--help"])
    assert top.exit_code == 0
    for path, cmd in _commands(cli):
        assert cmd.help, f"command {' '.join(path)} has no help text"
        parent = top.output if len(path) == 1 else runner.invoke(cli, [*path[:-1], "--help"]).output
        assert path[-1] in parent  # listed by the group it belongs to
        for param in cmd.params:
            if isinstance(param, click.Option) and param.name not in ("help",):
                assert param.help, f"option {param.opts} of {' '.join(path)} has no help"
        result = runner.invoke(cli, [*path, "--help"])
        assert result.exit_code == 0, result.output


def test_mlproject_entry_points_are_typed():
    project = yaml.safe_load((REPO / "MLproject").read_text())
    for name, entry in project["entry_points"].items():
        for pname, spec in entry.get("parameters", {}).items():
            assert isinstance(spec, dict) and "type" in spec, f"{name}.{pname} has no type"


def test_public_api_imports_without_side_effects():
    import subprocess
    import sys

    code = ("import sys, logging, graphtune\n"
            "from graphtune import prepare_dataset, build_model, load_partial_state, list_models, profile_model\n"
            "assert 'mlflow' not in sys.modules, 'importing graphtune must not import mlflow'\n"
            "assert not logging.getLogger().handlers, 'importing graphtune must not configure logging'\n"
            "print(len(list_models()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO / "tests")
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) >= 7


def test_console_script_usage_errors_are_one_line():
    import subprocess
    import sys

    for args, needle in ((["experiment", "--epochs", "x,y"], "--epochs"), (["nosuch"], "No such command"),
                         (["prepare", "--data-source", "ftp"], "--data-source")):
        out = subprocess.run([sys.executable, "-m", "graphtune", *args], capture_output=True, text=True, cwd=REPO)
        assert out.returncode == 2
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("graphtune: error:") and needle in lines[0], out.stderr


def test_mlproject_options_reach_the_cli_resolved_and_never_empty():
    """`mlflow run . -P name=value` appends `--name value`; every documented name is a CLI option, and no
    entry point declares an empty default, which MLflow would log as the param value ''."""
    import shlex

    from mlflow.projects import _project_spec

    project = _project_spec.load_project(str(REPO))
    for name, entry in yaml.safe_load((REPO / "MLproject").read_text())["entry_points"].items():
        for pname, spec in entry.get("parameters", {}).items():
            assert spec.get("default", None) != "", f"{name}.{pname} has an empty default"
    given = {"datasets": "metr-la-west,metr-la-east", "model": "baseline", "strategy": "scratch",
             "fractions": "0.5", "fewshot_mode": "steps", "epochs": "1", "lrs": "0.003", "seed": "2",
             "device": "cpu", "system_metrics": "false", "output_dir": "out", "experiment_name": "x",
             "set": "train.batch_size=32"}
    command = project.get_entry_point("main").compute_command(given, storage_dir=None)
    argv = shlex.split(command)
    assert argv[:2] == ["graphtune", "experiment"]
    ctx = cli.commands["experiment"].make_context("experiment", argv[2:])
    assert ctx.params["fewshot_mode"] == "steps" and ctx.params["output_dir"] == "out"
    assert ctx.params["overrides"] == ("train.batch_size=32",) and ctx.params["datasets"] == "metr-la-west,metr-la-east"


def test_the_readme_layout_lists_every_module_and_only_existing_paths():
    """README's Layout: one line per path; every path it names exists, and every module of the package
    (subpackages' __init__.py aside) has its line."""
    readme = (REPO / "README.md").read_text()
    block = readme.split("## Layout", 1)[1].split("```", 2)[1]
    listed, package = set(), None
    for line in block.splitlines():
        if not line.strip():
            continue
        name = line.split()[0]
        if line.startswith("  ") and package is not None:
            listed.add(f"{package}{name}")
        else:
            listed.add(name)
            package = name if name.endswith("/") and name.startswith("src/") else package
    missing = sorted(p for p in listed if not (REPO / p).exists())
    assert not missing, f"README's Layout names paths that do not exist: {missing}"
    modules = {str(p.relative_to(REPO)) for p in (REPO / "src" / "graphtune").rglob("*.py")
               if not (p.name == "__init__.py" and p.parent.name != "graphtune")}
    unlisted = sorted(modules - listed)
    assert not unlisted, f"modules without a line in README's Layout: {unlisted}"
