"""Data parallelism over ``torchrun`` processes, through ``torch.distributed``.

``torchrun --nproc-per-node N ...`` starts N processes with ``RANK`` and ``WORLD_SIZE``
set; :func:`init_from_env` joins them into one process group (NCCL on CUDA, gloo on
the CPU, so the same code runs and is tested here). Every rank runs the same program
on the same inputs; the training loops split each step's rows (the search: its
architecture samples; recovery: its batch rows) with :func:`share`, and sum the
gradients with :func:`all_reduce_grads` before the optimizer step, as
``DistributedDataParallel`` does. Random draws are made on every rank alike, so the
architecture parameters and the recovered weights stay identical on every rank, and
a run on N processes chooses what one process chooses (up to the order of float sums).
Only rank 0 writes (:func:`is_main`): the pipeline runs every write to the run directory, every export and
every latency measurement through :func:`main_only`, which the other ranks wait out and whose result they
receive, so each rank goes on with the same values and nothing runs beside a measurement.

Without ``torchrun`` (or with one process) every function here is the identity: one
process owns every row and nothing is reduced.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import TypeVar

import torch

T = TypeVar("T")
# How long a rank waits for the others (NCCL or gloo): long enough for rank 0 alone to export a large model and
# build and time its engine while the others wait in :func:`main_only` (torch's default is 10-30 minutes).
TIMEOUT = timedelta(hours=4)
_alone = False  # rank 0 inside main_only: a nested main_only must not wait for ranks that wait for it


def available() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if available() else 0


def launched_rank() -> int:
    """This process's rank as ``torchrun`` set it (0 without torchrun), known before :func:`init_from_env`."""
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return torch.distributed.get_world_size() if available() else 1


def is_main() -> bool:
    """True on the one process that writes files (rank 0; the only process without torchrun)."""
    return rank() == 0


def init_from_env() -> bool:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1); False when there is none.

    Backend: NCCL when CUDA is present, else gloo. Idempotent.
    """
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        if torch.cuda.is_available():  # each rank its own GPU: `--device cuda` means the current one
            torch.cuda.set_device(local_rank())
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo", timeout=TIMEOUT)
    return True


def local_rank() -> int:
    """This process's rank on its machine as ``torchrun`` set it (0 without torchrun): its GPU's index."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def share(n: int) -> range:
    """The indices of ``n`` items (rows, samples) this rank handles: ``rank, rank + size, ...``."""
    return range(rank(), n, world_size())


def all_reduce_grads(params: Iterable[torch.Tensor]) -> None:
    """Sum every parameter's gradient over the ranks, in place.

    A parameter no rank has a gradient for keeps ``None`` (an optimizer skips it, as in one process); one that
    some ranks have a gradient for gets the sum, the others contributing zeros.
    """
    if world_size() == 1:
        return
    import torch.distributed as dist

    params = list(params)
    # on the parameters' device: NCCL reduces GPU tensors only
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=params[0].device)
    dist.all_reduce(has)
    for p, any_grad in zip(params, has.tolist(), strict=True):
        if not any_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum over the ranks of a tensor (detached; the identity with one process)."""
    x = x.detach().clone()
    if world_size() > 1:
        torch.distributed.all_reduce(x)
    return x


def barrier() -> None:
    if world_size() > 1:
        torch.distributed.barrier()


def main_only(fn: Callable[[], T]) -> T:
    """``fn()`` on rank 0 alone (a write to the run directory, an export, a measurement); every rank returns
    rank 0's result (pickled to the others), or raises what it raised.

    Every rank first waits for all the others, so a check for a file that comes before this write in the
    program has been made on every rank before the file exists (and all ranks take the same branch); then
    the others wait, idle, until rank 0 is done, so nothing of this run competes with a measurement.
    With one process, or inside another ``main_only`` (where rank 0 is alone already), it is just ``fn()``.
    ``fn`` must not reach a collective (a training loop, a lazily made value the others make outside): rank 0
    would wait in it for ranks that wait in the broadcast below. Values ``fn`` reads lazily are made before.
    """
    global _alone
    if world_size() == 1 or _alone:
        return fn()
    barrier()
    import pickle

    box: list = [None]
    error: BaseException | None = None
    if is_main():
        _alone = True
        try:
            box[0] = (True, fn())
        except BaseException as e:  # the others must not wait for a result that never comes
            error, box[0] = e, (False, e)
        finally:
            _alone = False
        try:
            pickle.dumps(box[0])
        except Exception:  # noqa: BLE001 - an unpicklable exception or result still ends the others' wait
            box[0] = (False, RuntimeError(f"rank 0: {error!r}" if error else "rank 0's result cannot be sent"))
    torch.distributed.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    ok, value = box[0]
    if not ok:
        raise value
    return value
