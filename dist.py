"""Several processes under `accelerate launch`: which process this is, each one's share of the work, and the
results gathered back in their order, so that the run directory does not depend on the number of processes.

    rank, size       this process and how many there are (0 and 1 without a launcher)
    mine(n)          the indices of n units of work (batches) that this process computes: every size-th one
    gather(done, n)  {index: result} of every process → the n results in order, on every process
    sum_(tensors)    summed over the processes in place (the gradients of a training step, as DDP does)
    main_first(f)    f() on the main process, then on the others (a download or a conversion into a cache)

Hugging Face Accelerate starts the processes and their process group (`accelerate launch`: gloo on CPUs, NCCL on
GPUs); this module only asks it where it is. A plain `python rpo.py` never imports accelerate: one process, and
every function here is trivial. The main process alone writes files (`rundir.RunDir`) and prints; the others
are silent but for their errors.
"""
import os
import sys
import traceback
from collections.abc import Callable

LAUNCHED = int(os.environ.get("WORLD_SIZE", "1")) > 1  # set by `accelerate launch` (and torchrun)
_state = None


def state():
    """Accelerate's PartialState (the process group, this process's device), created once; None without a
    launcher. The other processes' output goes to /dev/null, their tracebacks to the real stderr."""
    global _state
    if LAUNCHED and _state is None:
        try:
            from accelerate import PartialState
        except ImportError:
            sys.exit("several processes (WORLD_SIZE > 1) need Hugging Face Accelerate: pip install accelerate")
        _state = PartialState()
        if _state.process_index:
            real = sys.stderr
            sys.stdout = sys.stderr = open(os.devnull, "w")
            sys.excepthook = lambda *error: traceback.print_exception(*error, file=real)
    return _state


def rank() -> int:
    return state().process_index if LAUNCHED else 0


def size() -> int:
    return state().num_processes if LAUNCHED else 1


def is_main() -> bool:
    return rank() == 0


def device():
    """This process's device: its own GPU under a launcher, else the one GPU or the CPU."""
    import torch

    if LAUNCHED:
        return state().device
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def mine(n: int) -> range:
    """The units of work (of n, in order) that this process computes: every size()-th one, from its rank on."""
    return range(rank(), n, size())


def gather(done: dict, n: int) -> list:
    """The n results in order, on every process, from each process's {index: result} of `mine(n)`."""
    if not LAUNCHED:
        return [done[i] for i in range(n)]
    import torch.distributed as torch_dist

    parts = [None] * size()
    torch_dist.all_gather_object(parts, done)
    merged = {i: r for part in parts for i, r in part.items()}
    return [merged[i] for i in range(n)]


def sum_(tensors: list) -> None:
    """Each tensor summed over the processes, in place: what DDP does to the gradients before a step."""
    if LAUNCHED:
        import torch.distributed as torch_dist

        for t in tensors:
            torch_dist.all_reduce(t, op=torch_dist.ReduceOp.SUM)


def barrier() -> None:
    if LAUNCHED:
        state().wait_for_everyone()


def main_first(compute: Callable):
    """compute() on the main process first, then on the others (which then find its result in a cache)."""
    if is_main():
        result = compute()
        barrier()
        return result
    barrier()
    return compute()
