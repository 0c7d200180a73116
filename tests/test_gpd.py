"""GPD in GraphTune: node models, the parameter dataset, generation, the leakage rule, the strategy end to end."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from graphtune.cli import cli
from graphtune.config import GpdConfig, TransferConfig
from graphtune.data.synthetic import synthetic_bundle
from graphtune.errors import ConfigError, DataError
from graphtune.generative.paramset import ParamSet
from graphtune.generative.pipeline import collect, diffuse, generate, prompt_view
from graphtune.models import build_model
from graphtune.transfer.budget import budget_points

REPO = Path(__file__).resolve().parents[1]
TINY = GpdConfig(collect_epochs=1, collect_stride=8, iterations=12, eval_every=6, diffusion_steps=20, ddim_steps=4,
                 d_model=16, depth=1, heads=2, token_size=64, prompt_days=1.5, model_kwargs={"neighbours": 3})


@pytest.fixture(scope="module")
def cities():
    """Three synthetic cities (labelled synthetic: seeded random graphs and series) of 10-14 nodes, 3 days at 5 min."""
    return [dataclasses.replace(synthetic_bundle(num_nodes=n, num_steps=864, seed=s), name=f"synthetic-{s}")
            for n, s in ((12, 1), (10, 2), (14, 3))]


@pytest.fixture(scope="module")
def trained(cities):
    ps = collect(cities[:2], TINY, batch_size=64, seed=0)
    return ps, diffuse(ps, TINY, seed=0)


# ----------------------------------------------------------------------------- the node model
def test_node_vectors_round_trip_bit_exact_and_grouped_equals_per_node(cities):
    b = cities[0]
    net = build_model("node-gwn", b, neighbours=3, shared_init=False)
    v = net.vectors()
    assert v.shape == (b.num_nodes, sum(int(np.prod(s)) for s in net.param_shapes.values()))
    other = build_model("node-gwn", b, neighbours=3)
    other.load_vectors(v)
    assert torch.equal(other.vectors(), v)
    x, _ = b.batch(b.window_starts("train")[:5])
    out = net(x)
    assert out.shape == (5, b.t_out, b.num_nodes)
    torch.testing.assert_close(out, net.forward_each(x), rtol=1e-5, atol=1e-5)  # the grouped GEMMs = NodeGWN per node
    torch.testing.assert_close(other(x), out, rtol=0, atol=0)
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())  # no dead parameter


def test_shared_init_is_one_draw_and_nodes_only_see_their_ego_subgraph(cities):
    b = cities[0]
    torch.manual_seed(3)
    v = build_model("node-gwn", b, neighbours=3).vectors()
    assert torch.equal(v, v[:1].expand_as(v))
    torch.manual_seed(3)
    independent = build_model("node-gwn", b, neighbours=3, shared_init=False).vectors()
    assert not torch.equal(independent[0], independent[1]) and torch.equal(independent[0], v[0])
    net = build_model("node-gwn", b, neighbours=3, shared_init=False)
    x, _ = b.batch(b.window_starts("train")[:2])
    members = set(net.ego_index[0][net.ego_valid[0]].tolist())
    outside = next(i for i in range(b.num_nodes) if i not in members)
    x2 = x.clone()
    x2[:, :, outside, 0] += 5.0
    assert torch.equal(net(x)[..., 0], net(x2)[..., 0])  # node 0's model reads its ego-subgraph only


def test_a_city_smaller_than_an_ego_subgraph_is_refused_by_gpd_and_padded_by_the_model(cities):
    from graphtune.generative.strategy import check_sources

    with pytest.raises(ConfigError, match="synthetic-1 has 12 nodes, fewer than the 21"):
        check_sources([], [cities[0]], TINY, {"neighbours": 20})
    net = build_model("node-gwn", cities[0], neighbours=20)  # the model itself pads the missing slots
    assert net.ego_valid.sum(1).max() < 21 and torch.isfinite(net(cities[0].batch(torch.arange(2))[0])).all()


# ----------------------------------------------------------------------------- the parameter dataset
def test_param_dataset_files_round_trip_and_refuse_another_model(trained, tmp_path):
    ps, _ = trained
    ps.save(tmp_path / "params")
    back = ParamSet.load(tmp_path / "params", model="node-gwn", model_kwargs=ps.model_kwargs)
    assert back.hash == ps.hash and np.array_equal(back.vectors, ps.vectors)
    np.testing.assert_allclose(back.denormalise(back.normalise(ps.vectors)), ps.vectors, rtol=1e-5, atol=1e-6)
    meta = json.loads((tmp_path / "params" / "meta.json").read_text())
    assert [t["name"] for t in meta["layout"]][:2] == ["start.weight", "temporal.0.weight"]
    assert meta["cities"] == ["synthetic-1", "synthetic-2"] and meta["rows"] == 22
    with pytest.raises(DataError, match="node model options"):
        ParamSet.load(tmp_path / "params", model_kwargs=dict(ps.model_kwargs, neighbours=4))
    meta["version"] = 0
    (tmp_path / "params" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="format version"):
        ParamSet.load(tmp_path / "params")


def test_normalisation_is_fitted_on_training_rows_only(trained):
    ps, _ = trained
    changed = dataclasses.replace(ps, vectors=ps.vectors.copy())
    changed.vectors[~ps.train_mask] += 100.0  # the held-out rows
    changed.fit_normalisation()
    assert np.array_equal(changed.mean, ps.mean) and np.array_equal(changed.std, ps.std)
    assert (~ps.train_mask).sum() >= 2  # each source city holds nodes out for checkpoint selection


# ----------------------------------------------------------------------------- generation and leakage
def test_generation_reads_only_what_the_point_may_see(trained, cities):
    _, result = trained
    target = cities[2]
    view = prompt_view(target, TINY.prompt_days)
    first = generate(result.generator, view, seed=0)
    assert first.shape == (target.num_nodes, result.generator["mean"].numel())
    poked = target.target.clone()
    lo, hi = target.splits["train"]
    poked[hi:] += 50.0  # validation and test readings
    poked[lo:lo + 100] += 50.0  # training readings outside the prompt window
    view2 = prompt_view(dataclasses.replace(target, target=poked), TINY.prompt_days)
    assert torch.equal(generate(result.generator, view2, seed=0), first)
    poked[hi - 10:hi] += 50.0  # inside the prompt window: the prompts, and so the vectors, change
    view3 = prompt_view(dataclasses.replace(target, target=poked), TINY.prompt_days)
    assert not torch.equal(generate(result.generator, view3, seed=0), first)


def test_baselines_and_the_checkpoint_chosen_on_held_out_source_nodes(trained, cities):
    ps, result = trained
    view = prompt_view(cities[2], TINY.prompt_days)
    g = result.generator
    assert generate(g, view, init="random") is None
    mean = generate(g, view, init="mean")
    np.testing.assert_array_equal(mean.numpy(), np.tile(ps.mean, (view.num_nodes, 1)))
    nearest = generate(g, view, init="nearest").numpy()
    rows = {tuple(r) for r in ps.vectors[ps.train_mask]}
    assert all(tuple(r) in rows for r in nearest)  # a copy of a source node the denoiser trained on
    assert not torch.equal(generate(g, view, init="shuffled"), generate(g, view, init="diffusion"))
    assert result.best_step in [h["step"] for h in result.history]
    best = min(result.history, key=lambda h: h["heldout_mse"])
    assert best["step"] == result.best_step  # selected on the held-out SOURCE nodes' parameter error
    assert g["param_hash"] == ps.hash and g["cities"] == ["synthetic-1", "synthetic-2"]


def test_learned_temporal_encoder_trains_on_sources_and_travels_with_the_generator(cities, tmp_path):
    from graphtune.generative.encoder import list_encoders

    assert list_encoders() == ["masked-ae", "stats"]
    g = dataclasses.replace(TINY, temporal_encoder="masked-ae")
    ps = collect(cities[:2], g, batch_size=64, seed=0)
    name, state = ps.encoder
    assert name == "masked-ae" and state["last_loss"] < state["first_loss"]  # the reconstruction was learned
    assert ps.temporal.shape[1] == state["dim"] + 2 and ps.temporal_names[-2:] == ["mean", "std"]
    ps.save(tmp_path / "p")
    back = ParamSet.load(tmp_path / "p")
    assert back.encoder[0] == "masked-ae"
    assert all(torch.equal(back.encoder[1]["state"][k], v) for k, v in state["state"].items())
    result = diffuse(back, g, seed=0)
    view = prompt_view(cities[2], g.prompt_days)
    assert generate(result.generator, view, seed=0).shape[0] == cities[2].num_nodes


def test_target_days_are_the_most_recent_windows(cities):
    b = cities[0]
    starts = b.window_starts("train")
    points = budget_points(starts, TransferConfig(target_days=[0.5, 1.0, 99.0]), b.steps_per_day, 0)
    assert [p[2] for p in points] == [0.5, 1.0, 99.0]
    assert points[0][1].tolist() == starts[-144:].tolist() and points[1][1].numel() == 288
    assert points[2][1].numel() == starts.numel() and points[2][0] == 1.0


# ----------------------------------------------------------------------------- end to end
GPD_FAST = ["--params", str(REPO / "params.yaml"), "--epochs", "1", "--set", "train.batch_size=128",
            "--set", "gpd.sources=[metr-la-r2]", "--set", "gpd.collect_epochs=1", "--set", "gpd.collect_stride=12",
            "--set", "gpd.iterations=6", "--set", "gpd.eval_every=3", "--set", "gpd.diffusion_steps=20",
            "--set", "gpd.ddim_steps=3", "--set", "gpd.d_model=16", "--set", "gpd.depth=1"]


def _runs(tmp_path):
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


@pytest.mark.slow
def test_gpd_experiment_end_to_end_ranks_on_the_leaderboard(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, ["experiment", "--strategy", "gpd", "--datasets", "metr-la-r1", "--target-days", "1",
                                 *GPD_FAST, "--set", f"prepare.processed_dir={tmp_path}/processed",
                                 "--output-dir", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    stage = res["stages"][0]
    assert res["model"] == "node-gwn" and res["strategy"] == "gpd" and stage["kind"] == "transfer"
    assert stage["transfer"]["share"] == 1.0 and stage["zero_shot_test"]["mae"] > 0
    assert stage["curve"][0]["target_days"] == 1.0
    runs = _runs(tmp_path)
    names = {run.info.run_name for run in runs}
    assert {"gpd-collect", "gpd-diffuse", "stage1-transfer-metr-la-r1"} <= names
    parent = next(run for run in runs if run.data.tags.get("graphtune.kind") == "experiment")
    collect_run = next(run for run in runs if run.info.run_name == "gpd-collect")
    assert collect_run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert len(collect_run.data.params["param_hash"]) == 64
    assert all(run.info.status == "FINISHED" for run in runs)
    board = CliRunner().invoke(cli, ["compare", "--output-dir", str(tmp_path / "board"), "--params",
                                     str(REPO / "params.yaml")], catch_exceptions=False)
    assert board.exit_code == 0 and "gpd" in (tmp_path / "board" / "leaderboard.csv").read_text()


@pytest.mark.parametrize("args, message", [
    (["--datasets", "metr-la-r2"], "gpd.sources: metr-la-r2 is also a target"),
    (["--datasets", "metr-la-r1", "--set", "gpd.model_kwargs={neighbours: 30}"], "city metr-la-r2 has 28 nodes, fewer than the 31"),
    (["--datasets", "metr-la-r1", "--set", "gpd.conditioning=film"], "gpd.conditioning: unknown denoiser 'film'"),
    (["--datasets", "metr-la-r1", "--set", "transfer.prompt_days=1"], "transfer.prompt_days: a gpd run"),
    (["--datasets", "metr-la-r1", "--set", "gpd.generator=missing.pt"], "gpd.generator: missing.pt not found"),
    (["--datasets", "metr-la-r1", "--model", "gwnet"], "--model: strategy gpd generates node-gwn"),
])
def test_gpd_bad_input_fails_before_any_run(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(REPO)
    r = CliRunner().invoke(cli, ["experiment", "--strategy", "gpd", *GPD_FAST, *args,
                                 "--set", f"prepare.processed_dir={tmp_path}/processed",
                                 "--output-dir", str(tmp_path / "out")])
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.output
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "mlflow.db").exists() or _runs(tmp_path) == []


def test_a_node_without_readings_in_the_prompt_window_is_named(cities):
    from graphtune.generative.pipeline import prompts_of

    b = cities[0]
    target = b.target.clone()
    target[:, 4] = float("nan")
    view = prompt_view(dataclasses.replace(b, target=target), 1.5)
    with pytest.raises(DataError, match=f"node {b.sensor_ids[4]}"):
        prompts_of(view, TINY, {"neighbours": 3}, "synthetic-1")
