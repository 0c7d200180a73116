"""Data-parallel training of one job across processes with torch.distributed: the process group and the
few collective operations `graphtune.engine` needs.

How a job runs on N processes:

    graphtune experiment --nproc 2 ...            # the CLI calls launch(argv, 2), which runs
    python -m torch.distributed.run --nproc-per-node=2 ... -m graphtune experiment ...

Each of the N workers runs the same command. It calls `init_from_env()` once (torchrun sets RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT); from then on `engine.fit` and `engine.evaluate`
see `world_size() > 1` and split the work (see engine.fit for what is exact and what is not). Only the
main process (`is_main()`, rank 0) should write files or talk to MLflow; every rank must call `fit` and
`evaluate` together, because both run collective operations that wait for all ranks.

Without a distributed job (WORLD_SIZE unset or 1) `init_from_env()` starts nothing and every function
here is a no-op for rank 0 of 1, so single-process code needs no branches.

Backends: gloo on CPU, nccl when CUDA is available (one GPU per process, cuda:LOCAL_RANK). The helpers
accept CPU tensors with either backend: under nccl they are staged through the process's GPU.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from graphtune.errors import ConfigError

_TORCHRUN_ENV = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")  # besides WORLD_SIZE


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the job: rank `rank` of `world_size`; backend None = single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_from_env(backend: str | None = None, *, timeout_s: float = 1800.0) -> DistContext:
    """Join the process group torchrun describes in the environment, once per process; returns where we stand.

    WORLD_SIZE unset or 1: nothing is started and the context is rank 0 of 1 (a plain `graphtune` run).
    Otherwise RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT must be set too (ConfigError naming the missing
    ones: start the job with torchrun or `--nproc`). backend: None = nccl when CUDA is available (this process
    then uses cuda:LOCAL_RANK), else gloo. timeout_s: how long a collective waits for the other ranks before
    failing, instead of hanging. Calling it again returns the running group's context.
    """
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return DistContext()
    if dist.is_available() and dist.is_initialized():
        return context()
    missing = [name for name in _TORCHRUN_ENV if not os.environ.get(name)]
    if missing:
        raise ConfigError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: start a distributed job with "
                          "torchrun or `graphtune ... --nproc N`")
    rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} is outside 0..{world - 1} (WORLD_SIZE={world})")
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(local)  # before the group: nccl binds each rank to its current device
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    return context()


def context() -> DistContext:
    """The running group's context (rank 0 of 1 when none is running)."""
    if not _active():
        return DistContext()
    return DistContext(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0), dist.get_backend())


def rank() -> int:
    """This process's rank in the running group; 0 without one."""
    return dist.get_rank() if _active() else 0


def world_size() -> int:
    """How many processes train the job; 1 without a running group."""
    return dist.get_world_size() if _active() else 1


def local_rank() -> int:
    """This process's index on its machine (torchrun's LOCAL_RANK): which GPU it uses; 0 without a group."""
    return _env_int("LOCAL_RANK", 0) if _active() else 0


def is_main() -> bool:
    """True on rank 0, the one process that writes files and logs runs (always true without a group)."""
    return rank() == 0


def rank_device(device) -> torch.device:
    """The device this rank trains on: a bare "cuda" becomes cuda:LOCAL_RANK in a distributed job (one GPU
    per process); anything else is returned as given."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and world_size() > 1:
        return torch.device("cuda", local_rank())
    return device


def rank_seed(seed: int) -> int:
    """The seed of this rank's global torch RNG in a distributed job: distinct, reproducible streams per rank.

    Dropout draws from the global RNG; with one seed on every rank, the k-th window of every rank's shard
    would get the same dropout mask. Single process: `seed` itself.
    """
    if world_size() == 1:
        return seed
    return int(np.random.SeedSequence([seed % 2**63, rank()]).generate_state(1, np.uint64)[0])


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s `obj` (any picklable value), returned on every rank: one rank's decision made everyone's."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` element-wise over all ranks, in place; returns it (unchanged without a group)."""
    if not _active():
        return tensor
    staged = _staged(tensor)
    dist.all_reduce(staged, op=dist.ReduceOp.SUM)
    if staged is not tensor:
        tensor.copy_(staged)
    return tensor


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite `tensor` on every rank with rank `src`'s, in place; returns it."""
    if not _active():
        return tensor
    staged = _staged(tensor)
    dist.broadcast(staged, src=src)
    if staged is not tensor:
        tensor.copy_(staged)
    return tensor


def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """Give every rank rank `src`'s buffers of `module` (BatchNorm running statistics and the like).

    Training leaves each rank's running statistics as its own shards made them; before anything that reads
    them (validation, a checkpoint) the ranks must agree, and rank 0's are the ones a single process would
    keep closest to (see engine.fit).
    """
    if not _active():
        return
    with torch.no_grad():
        for buffer in unwrap(module).buffers():
            broadcast_(buffer, src)


def barrier() -> None:
    """Wait until every rank gets here (a no-op without a group)."""
    if _active():
        dist.barrier()


def shutdown() -> None:
    """Leave the process group (call once, at the end of a worker); a no-op without one."""
    if _active():
        dist.destroy_process_group()


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel (or DataParallel); any other module as it is.

    The wrapper's state_dict prefixes every key with `module.`; the unwrapped module's state_dict loads into a
    plain model, which is what checkpoints and `FitResult.best_state` hold.
    """
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


class ShardedWindowSampler:
    """Training window starts for data-parallel steps: the single-process batches, each cut into one shard per rank.

    Sharding rule. Each epoch the global order is `starts[torch.randperm(n, generator=g)]` with one
    generator `g` seeded once with `seed`, exactly the order of `bundle.loader(..., shuffle=True, seed=seed)`,
    so a seed gives the same global batches at any world size. Global batch k is order[k*B : (k+1)*B] (the
    last may be short); `torch.tensor_split` cuts it into `world_size` contiguous parts whose sizes differ
    by at most one, and rank r trains on part r. A full batch gives every rank B / world_size windows. A
    part is empty only when the last batch has fewer windows than there are ranks.

    Iterating yields, per global batch, the tuple of every rank's part (each rank needs the others' sizes
    and labels to weight its loss; see engine.fit).
    """

    def __init__(self, starts: torch.Tensor, batch_size: int, *, seed: int, world_size: int, shuffle: bool = True):
        if batch_size < 1 or world_size < 1:
            raise ValueError(f"batch_size and world_size must be >= 1, got {batch_size} and {world_size}")
        self.starts = starts.to(torch.long)
        self.batch_size, self.world_size, self.shuffle = batch_size, world_size, shuffle
        self._generator = torch.Generator().manual_seed(seed)

    @property
    def num_samples(self) -> int:
        return int(self.starts.numel())

    def __len__(self) -> int:
        """Global batches (= optimizer steps) per epoch."""
        return -(-self.num_samples // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        order = self.starts
        if self.shuffle:
            order = order[torch.randperm(order.numel(), generator=self._generator)]
        for i in range(0, order.numel(), self.batch_size):
            yield torch.tensor_split(order[i : i + self.batch_size], self.world_size)


def launch(argv: list[str], nproc: int) -> int:
    """Run `graphtune <argv>` as one job of `nproc` processes under torchrun on this machine; its exit status.

    `--nproc N` / `--nproc=N` are removed from argv and the rest is run as
    `python -m torch.distributed.run --nproc-per-node=N --nnodes=1 --master-addr=127.0.0.1
    --master-port=<free port> -m graphtune <argv>`: torchrun's static single-machine rendezvous, its store on
    the loopback interface at a port the OS reported free, so nothing listens beyond this machine. (torchrun's
    c10d `--standalone` rendezvous is not used: it binds the store to the machine's host name, and on a host
    whose name does not resolve it waits 5 minutes and fails.) Each worker's OMP_NUM_THREADS defaults to the
    cores divided among the workers, and gloo's GLOO_SOCKET_IFNAME to the loopback interface (explicit
    settings win). The exit status is torchrun's: 0 when every worker succeeded, non-zero otherwise (torchrun
    stops the other workers when one fails). Refused (ConfigError) with nproc < 1, or from inside a
    distributed worker.
    """
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ConfigError(f"--nproc: expected a whole number of processes >= 1, got {nproc!r}")
    if _env_int("WORLD_SIZE", 1) > 1:
        raise ConfigError("--nproc: this process is already one worker of a distributed job; "
                          "start the job once, from a plain shell")
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    loopback = loopback_interface()
    if loopback:  # one machine: gloo talks over loopback (otherwise it resolves the host name, and warns)
        env.setdefault("GLOO_SOCKET_IFNAME", loopback)
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--nnodes=1",
        "--master-addr=127.0.0.1", f"--master-port={free_port()}", "--max-restarts=0",
        "-m", "graphtune", *strip_nproc(argv),
    ]
    return subprocess.run(command, env=env, check=False).returncode


def strip_nproc(argv: list[str]) -> list[str]:
    """argv without its `--nproc N` / `--nproc=N` options (up to a `--` that ends the options)."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            return out + list(argv[i:])
        if arg == "--nproc":
            i += 2  # the option and its value
            continue
        if not arg.startswith("--nproc="):
            out.append(arg)
        i += 1
    return out


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS picks it): MASTER_PORT for workers started
    on this machine (launch, the tests' and benchmarks' spawned ranks). Another process could take it before
    the rendezvous binds it; a clash fails the start, it never joins two jobs."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def loopback_interface() -> str | None:
    """The loopback network interface's name ("lo" on Linux, "lo0" on macOS), or None when none is found: gloo's
    GLOO_SOCKET_IFNAME for a job on one machine."""
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return None
    return next((name for name in names if name in ("lo", "lo0")), None)


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _staged(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`, or a copy on this rank's GPU when the backend (nccl) cannot read it where it is."""
    if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
        return tensor.to(torch.device("cuda", torch.cuda.current_device()))
    return tensor


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name}: expected a whole number (set by torchrun), got {value!r}") from None
