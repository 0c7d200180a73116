"""deploy/kubernetes, checked by MLflow's own code as `mlflow run --backend kubernetes` uses it, without a cluster.

MLflow loads the project (a docker_env with an image), validates it for Docker, parses the backend config
(which loads the job template), and renders the Job for an image and an entry point's command. Nothing here
contacts a cluster, a registry or a Docker daemon. Rendering needs the `kubernetes` client package (MLflow's
kubernetes module imports it, and so does any real submission); that test is skipped where it is missing.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from mlflow.projects import _parse_kubernetes_config
from mlflow.projects._project_spec import load_project
from mlflow.projects.docker import validate_docker_env
from mlflow.projects.utils import get_entry_point_command, get_run_env_vars

from graphtune.cli import cli

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy" / "kubernetes"
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")  # Kubernetes names of Jobs and containers
IMAGE = "registry.example.com/graphtune/graphtune:0.2.0"
DIGEST = "sha256:" + "0" * 64
# each entry point with values for its required parameters, as -P would give them
PARAMETERS = {"main": {"datasets": "metr-la-west,metr-la-east", "epochs": "1"}, "pretrain": {"city": "metr-la-west"},
              "finetune": {"source": "models:/graphtune-source/1", "datasets": "metr-la-east"}, "compress": {},
              "suite": {"file": "suites/compression.yaml"}}


@pytest.fixture
def project():
    return load_project(str(DEPLOY))


@pytest.fixture
def kube_config(monkeypatch):
    """The backend config as MLflow reads it, from the repository root where `mlflow run` is started."""
    monkeypatch.chdir(REPO)
    return _parse_kubernetes_config(json.loads((DEPLOY / "kubernetes_config.json").read_text()))


def test_the_project_is_a_docker_project_mlflow_accepts(project):
    assert project.name == "graphtune" and project.env_type == "docker_env"
    validate_docker_env(project)  # MLflow's own check before it builds or pushes anything
    assert project.docker_env["image"].split("/")[0] == "registry.example.com"  # a registry the cluster pulls from
    assert set(project._entry_points) == set(PARAMETERS)


def test_entry_points_run_the_main_projects_commands_and_graphtune_accepts_them(project, tmp_path):
    main = load_project(str(REPO))
    assert main.docker_env is None and main.env_type == "conda_env"  # `make run` (--env-manager local) unchanged
    for name, parameters in PARAMETERS.items():
        assert project.get_entry_point(name).command == main.get_entry_point(name).command, name
        argv = get_entry_point_command(project, name, parameters, str(tmp_path))[0].split()
        assert argv[0] == "graphtune"
        r = CliRunner().invoke(cli, [*argv[1:], "--help"])  # an unknown command or option fails before --help
        assert r.exit_code == 0, f"{name}: {' '.join(argv)}\n{r.output}"


def test_the_backend_config_names_its_context_registry_and_template(kube_config):
    assert kube_config["kube-context"] and kube_config["repository-uri"].startswith("registry.example.com/")
    job = kube_config["kube-job-template"]  # the template, loaded by MLflow from kube-job-template-path
    assert job["apiVersion"] == "batch/v1" and job["kind"] == "Job"
    assert job["metadata"]["namespace"]  # MLflow submits into it: a KeyError at submission time otherwise
    assert job["spec"]["backoffLimit"] == 0 and job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert {"cpu", "memory"} <= set(container["resources"]["requests"]) and container["resources"]["limits"]["memory"]
    tracking = [e["value"] for e in container["env"] if e["name"] == "MLFLOW_TRACKING_URI"]
    assert len(tracking) == 1 and re.match(r"^http://[a-z0-9.-]+\.svc\.cluster\.local:\d+$", tracking[0])


def test_mlflow_renders_a_job_kubernetes_accepts(project, kube_config, monkeypatch, tmp_path):
    pytest.importorskip("kubernetes", reason="MLflow's kubernetes backend needs the kubernetes client package")
    from mlflow.projects.kubernetes import _get_kubernetes_job_definition, _get_run_command

    service = next(e["value"] for e in kube_config["kube-job-template"]["spec"]["template"]["spec"]["containers"][0]
                   ["env"] if e["name"] == "MLFLOW_TRACKING_URI")
    monkeypatch.setenv("KUBE_MLFLOW_TRACKING_URI", service)  # as the README says to submit
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")  # the submitter's own, meaningless in a pod
    for name, parameters in PARAMETERS.items():
        command = _get_run_command(get_entry_point_command(project, name, parameters, str(tmp_path)))
        template = yaml.safe_load((DEPLOY / "kubernetes_job_template.yaml").read_text())
        env = get_run_env_vars(run_id="0" * 32, experiment_id="1")
        job = _get_kubernetes_job_definition(project.name, IMAGE, DIGEST, command, env, template)

        assert not re.search(r"\{(replaced|appended) with", json.dumps(job)), f"{name}: a placeholder is left"
        name_ = job["metadata"]["name"]
        assert DNS_LABEL.match(name_) and len(name_) <= 63, name_
        container = job["spec"]["template"]["spec"]["containers"][0]
        assert DNS_LABEL.match(container["name"]) and container["image"] == f"{IMAGE}@{DIGEST}"
        assert container["command"][0] == "graphtune" and all("'" not in a for a in container["command"]), command
        values = {}
        for entry in container["env"]:  # Kubernetes: the last entry of a name wins
            values[entry["name"]] = entry["value"]
        assert values["MLFLOW_TRACKING_URI"] == service and values["MLFLOW_RUN_ID"] == "0" * 32
        assert values["MLFLOW_EXPERIMENT_ID"] == "1"
    assert container["command"] == ["graphtune", "suite", "run", "suites/compression.yaml"]


def test_the_image_holds_what_the_commands_read_where_mlflow_runs_them():
    """Not built here (no Docker): every COPY source is a git-tracked part of the build context (the repository
    root) that Dockerfile.dockerignore lets through, and the working folder is the one MLflow's own image layer
    (`mlflow run --build-image`) works in."""
    import subprocess

    from mlflow.projects.utils import MLFLOW_DOCKER_WORKDIR_PATH

    lines = [line.split() for line in (DEPLOY / "Dockerfile").read_text().splitlines()]
    assert ["WORKDIR", MLFLOW_DOCKER_WORKDIR_PATH.rstrip("/")] in lines
    sources = [s for line in lines if line[:1] == ["COPY"] for s in line[1:-1] if not s.startswith("--")]
    assert {"requirements.txt", "pyproject.toml", "src", "params.yaml", "data/sample", "suites"} <= set(sources)
    allowed = {line[1:] for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
               if line.startswith("!")}
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for source in sources:
        assert source in allowed, f"{source}: left out of the build context by Dockerfile.dockerignore"
        assert any(f == source or f.startswith(source + "/") for f in tracked), f"{source}: not in a clone"
