"""Shared fixtures: everything small, on CPU, with outputs and the MLflow store under tmp_path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"


@pytest.fixture(autouse=True)
def _isolate(tmp_path, monkeypatch):
    """No test writes into the checkout or a user's tracking store; torch stays single-process and seeded."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.setenv("GIT_PYTHON_REFRESH", "quiet")
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def week_bundle():
    """The real METR-LA week sample, read from its raw files (never from a processed folder)."""
    from graphtune.data.prepare import prepare_dataset

    return prepare_dataset("metr-la-week", root=REPO, use_processed=False)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def cpu_count() -> int:
    return os.cpu_count() or 1
