"""Data-parallel training (graphtune.distributed + engine.fit/evaluate) against one process.

The slow tests start two real CPU processes (torch.multiprocessing spawn, gloo over loopback) on the real
METR-LA week sample and compare with a single-process fit of the same global batch in the test process.

Tolerance. A rank's shard runs a forward over half the windows of a batch, and its gradient is scaled by
world_size x its share of the batch's observed labels, then averaged by DDP: the same gradient as one
process's, reached through different float32 operations (the smaller GEMMs, the scale, the all-reduce's
sum and division). Those differ by float32 rounding (~1e-7 relative) per step; Adam carries them through
the epoch. Measured here: train loss ~5e-8 and val MAE/RMSE ~4e-9 relative apart, parameters ~1e-6 at the
largest. The tests allow rel 1e-5: two orders above the measurement, and two below what a real mistake
costs: averaging the two shards' masked means instead of weighting them by their labels moves the val MAE
by 1.4e-3 after this epoch, and per-shard BatchNorm statistics (GWNet) move losses and metrics by 1e-4 to
1e-3 after two epochs, which is why the comparison uses HyperNet (no BatchNorm) with dropout 0 (each rank
draws its own masks).
The validation metrics of the starting weights need no tolerance at all: the same weights, the same
batches, the per-batch sums added in the same order.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn

from graphtune import distributed
from graphtune.config import TrainConfig
from graphtune.data.synthetic import synthetic_bundle
from graphtune.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]

REL = 1e-5  # see the module docstring
BATCH = 16  # the global batch: 8 windows per rank
WINDOWS = 97  # training windows: 6 full batches and one of a single window (rank 1's shard is then padded)
MODEL_KWARGS = {"hidden": 16, "prompt_hidden": 16, "dropout": 0.0}
JOIN_TIMEOUT_S = 240  # a rank waiting forever fails the test instead of hanging it


def _week_fit_inputs():
    from graphtune.data.prepare import prepare_dataset
    from graphtune.models import build_model

    bundle = prepare_dataset("metr-la-week", root=REPO, use_processed=False)
    torch.manual_seed(0)
    model = build_model("hypernet", bundle, **MODEL_KWARGS)
    starts = bundle.window_starts("train")[::10][:WINDOWS]  # spread over the week
    return bundle, model, starts


def _train(epochs=1, **kwargs) -> TrainConfig:
    return TrainConfig(epochs=[epochs], lrs=[kwargs.pop("lr", 3e-3)], batch_size=kwargs.pop("batch_size", BATCH),
                       **kwargs)


def _without_times(history):
    return [{k: v for k, v in entry.items() if not k.endswith("time_s")} for entry in history]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    """One rank of the job: everything the parent checks is saved to out/rank<r>.pt."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    if distributed.loopback_interface():  # as launch() sets it: gloo over loopback, without a warning
        os.environ["GLOO_SOCKET_IFNAME"] = distributed.loopback_interface()
    torch.set_num_threads(1)
    from graphtune.engine import fit

    ctx = distributed.init_from_env(timeout_s=120)
    report = {"context": ctx}
    bundle, model, starts = _week_fit_inputs()
    linear = nn.Linear(2, 2)
    report["unwrap"] = distributed.unwrap(nn.parallel.DistributedDataParallel(linear)) is linear
    report["decision"] = distributed.broadcast_object(f"rank {rank}'s")
    report["sum"] = distributed.all_reduce_sum(torch.tensor([rank + 1.0])).item()
    report["seeds"] = (distributed.rank_seed(11), distributed.rank_seed(11))

    result = fit(model, bundle, _train(), seed=0, train_starts=starts)
    report.update(history=result.history, start_val=result.start_val, best_val=result.best_val,
                  best_state=result.best_state, best_epoch=result.best_epoch, steps=result.steps,
                  samples=result.samples, stopped=result.stopped_reason)

    # After fit, the model trains alone: the wrapper's all-reduce hooks are gone (otherwise rank 1 would wait
    # here for a rank 0 that never joins, and the test would time out).
    if rank == 1:
        x, y = bundle.batch(starts[:2])
        model(x).sum().backward()

    # Decisions are rank 0's even when the ranks were told otherwise: rank 0 alone is out of time or patience.
    quick = fit(model, bundle, _train(epochs=3), seed=0, train_starts=starts,
                time_budget_s=0.0 if rank == 0 else None)
    report["time_budget"] = (quick.stopped_reason, quick.steps, len(quick.history))
    frozen = _train(epochs=3, lr=0.0, weight_decay=0.0, early_stop_patience=1 if rank == 0 else 0)
    still = fit(model, bundle, frozen, seed=0, train_starts=starts, max_steps_per_epoch=1)
    report["early_stop"] = (still.stopped_reason, len(still.history), still.best_epoch)
    try:
        fit(model, bundle, _train(batch_size=15), seed=0, train_starts=starts)
    except ConfigError as err:
        report["indivisible"] = str(err)
    torch.save(report, os.path.join(out, f"rank{rank}.pt"))
    distributed.barrier()
    distributed.shutdown()


def _spawn(world: int, out) -> list[dict]:
    """Run _worker on `world` processes; their reports, by rank. Fails (never hangs) when a rank does."""
    context = mp.start_processes(_worker, args=(world, distributed.free_port(), str(out)), nprocs=world,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    try:
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                pytest.fail(f"the {world} ranks did not finish within {JOIN_TIMEOUT_S} s (a rank waits forever?)")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return _spawn(2, tmp_path_factory.mktemp("ddp"))


@pytest.fixture(scope="module")
def single():
    """The same fit in this process, one thread as each rank has."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from graphtune.engine import fit

        bundle, model, starts = _week_fit_inputs()
        return fit(model, bundle, _train(), seed=0, train_starts=starts)
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------ two processes
@pytest.mark.slow
def test_the_process_group_helpers_work_across_ranks(two_ranks):
    assert [r["context"] for r in two_ranks] == [distributed.DistContext(0, 2, 0, "gloo"),
                                                 distributed.DistContext(1, 2, 1, "gloo")]
    assert [r["decision"] for r in two_ranks] == ["rank 0's", "rank 0's"]
    assert [r["sum"] for r in two_ranks] == [3.0, 3.0]
    assert all(r["unwrap"] for r in two_ranks)
    (seed0, again0), (seed1, again1) = (r["seeds"] for r in two_ranks)
    assert seed0 == again0 and seed1 == again1 and seed0 != seed1 != 11  # own dropout streams, reproducible


@pytest.mark.slow
def test_two_ranks_train_like_one_process_with_the_same_global_batch(two_ranks, single):
    rank0, rank1 = two_ranks
    assert _without_times(rank0["history"]) == _without_times(rank1["history"])  # the ranks agree exactly
    assert rank0["start_val"] == rank1["start_val"] and rank0["best_val"] == rank1["best_val"]
    assert (rank0["steps"], rank0["samples"]) == (single.steps, single.samples) == (7, WINDOWS)
    assert rank0["start_val"] == pytest.approx(single.start_val, rel=1e-12)  # same weights, same batches
    (ddp,), (one,) = rank0["history"], single.history
    for key in ("train_loss", "val_mae", "val_rmse"):
        assert ddp[key] == pytest.approx(one[key], rel=REL), key
    assert rank0["best_val"] == pytest.approx(single.best_val, rel=REL)
    assert rank0["best_epoch"] == single.best_epoch == 1 and rank0["stopped"] == single.stopped_reason


@pytest.mark.slow
def test_best_state_is_the_plain_module_s_and_the_same_on_every_rank(two_ranks, single):
    rank0, rank1 = two_ranks
    assert list(rank0["best_state"]) == list(single.best_state)  # no "module." prefix
    assert not any(key.startswith("module.") for key in rank0["best_state"])
    assert all(torch.equal(rank0["best_state"][k], rank1["best_state"][k]) for k in rank0["best_state"])
    for key, value in single.best_state.items():
        assert torch.allclose(rank0["best_state"][key], value, rtol=1e-4, atol=1e-6), key


@pytest.mark.slow
def test_rank_0_decides_when_to_stop(two_ranks):
    # rank 0 alone had a time budget of 0 s: both stop after one step
    assert [r["time_budget"] for r in two_ranks] == [("time_budget", 1, 1)] * 2
    # rank 0 alone had patience 1 (rank 1: never stop early); nothing improves at lr 0
    assert [r["early_stop"] for r in two_ranks] == [("early_stopping", 1, 0)] * 2


@pytest.mark.slow
def test_a_batch_size_the_world_size_does_not_divide_is_refused_on_every_rank(two_ranks):
    assert [r["indivisible"] for r in two_ranks] == [
        "train.batch_size: 15 is not divisible by the 2 processes of this job (each trains an equal share of "
        "every batch); use a multiple of 2"] * 2


@pytest.mark.slow
def test_launch_runs_graphtune_on_two_processes(capfd):
    assert distributed.launch(["models", "--nproc", "2"], 2) == 0
    out = capfd.readouterr().out
    assert out.count("hypernet") >= 2  # each worker listed the models
    assert distributed.launch(["no-such-command"], 2) != 0


# ------------------------------------------------------------------------------------------------ one process
def test_the_sampler_cuts_the_single_process_batches_into_rank_shards():
    bundle = synthetic_bundle(num_nodes=4, num_steps=300, seed=0)
    starts = bundle.window_starts("train")[:37]  # batches of 8: 4 full ones and one of 5
    for world in (1, 2, 4):
        loader = bundle.loader("train", batch_size=8, shuffle=True, seed=5, starts=starts)
        sampler = distributed.ShardedWindowSampler(starts, 8, seed=5, world_size=world)
        assert len(sampler) == len(loader) == 5
        epochs = [list(sampler), list(sampler)]  # the order changes with the epoch, as the loader's
        loader_epochs = [[x for x, _ in loader], [x for x, _ in loader]]
        for shards, batches in zip(epochs, loader_epochs):
            for parts, x in zip(shards, batches):
                assert len(parts) == world
                assert torch.equal(bundle.batch(torch.cat(parts))[0], x)  # the same windows, the same order
                sizes = [part.numel() for part in parts]
                assert max(sizes) - min(sizes) <= 1
            assert [part.numel() for part in shards[0]] == [8 // world] * world
        assert not torch.equal(torch.cat(epochs[0][0]), torch.cat(epochs[1][0]))
    last = list(distributed.ShardedWindowSampler(starts, 8, seed=5, world_size=4))[-1]
    assert [part.numel() for part in last] == [2, 1, 1, 1]  # 5 windows over 4 ranks


def test_without_a_process_group_every_helper_is_rank_0_of_1(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.init_from_env() == distributed.DistContext(0, 1, 0, None)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.init_from_env() == distributed.DistContext()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    obj, t = {"stop": True}, torch.tensor([1.5, 2.0])
    assert distributed.broadcast_object(obj) is obj
    assert distributed.all_reduce_sum(t) is t and t.tolist() == [1.5, 2.0]
    assert distributed.rank_seed(7) == 7 and distributed.rank_device("cuda") == torch.device("cuda")
    distributed.barrier()
    distributed.shutdown()
    model = nn.Linear(2, 2)
    assert distributed.unwrap(model) is model


def test_a_world_size_without_the_rest_of_torchrun_s_environment_is_a_config_error(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError) as err:
        distributed.init_from_env()
    assert str(err.value) == ("WORLD_SIZE=2 but LOCAL_RANK, MASTER_ADDR, MASTER_PORT not set: start a distributed "
                              "job with torchrun or `graphtune ... --nproc N`")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ConfigError, match=r"^WORLD_SIZE: expected a whole number \(set by torchrun\), got 'two'$"):
        distributed.init_from_env()


def test_launch_refuses_a_bad_process_count_and_a_nested_launch(monkeypatch):
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match=r"^--nproc: expected a whole number of processes >= 1, got "):
            distributed.launch(["models"], bad)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="already one worker of a distributed job"):
        distributed.launch(["models"], 2)


def test_strip_nproc_removes_only_the_nproc_option():
    assert distributed.strip_nproc(["experiment", "--nproc", "2", "--epochs", "3"]) == ["experiment", "--epochs", "3"]
    assert distributed.strip_nproc(["experiment", "--nproc=4", "--seed", "1"]) == ["experiment", "--seed", "1"]
    assert distributed.strip_nproc(["series", "--", "--nproc", "2"]) == ["series", "--", "--nproc", "2"]
    assert distributed.strip_nproc(["experiment", "--nprocs-like", "x"]) == ["experiment", "--nprocs-like", "x"]
