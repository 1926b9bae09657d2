"""Several processes (`accelerate launch`, `torchrun`): which process this is, each one's share of the work, and the
results gathered back in their order, so that the run directory does not depend on the number of processes.

    rank, size       this process and how many there are (0 and 1 without a launcher)
    mine(n)          the indices of n units of work (batches) that this process computes: every size-th one
    merge(done)      every process's {key: result}, united, on every process
    sum_(tensors)    summed over the processes in place (the gradients of a training step, as DDP does)
    main_first(f)    f() on the main process, then on the others (a download or a conversion into a cache)
    run(f)           f(); a process that fails ends at once, so the others fail at once too instead of waiting
    broadcast(v)     the main process's v on every process (a decision all must share, such as "stage finished")

A launcher starts the processes (`accelerate launch` on GPUs, `torchrun` on CPUs: Accelerate 1.15's `--cpu
--num_processes P` starts one process) and Accelerate joins their process group (NCCL on GPUs, gloo on CPUs); this
module only asks it where it is. A plain `python rpo.py` never imports accelerate: one process, and
every function here is trivial. The main process alone writes the run's files (`rundir.RunDir`) and prints; each
process keeps its own finished parts of a running stage (`resume.Parts`); the others are silent but for their
errors.
"""
import os
import sys
import traceback
from collections.abc import Callable

LAUNCHED = int(os.environ.get("WORLD_SIZE", "1")) > 1  # set by `accelerate launch` (and torchrun)
_state = None
_stderr = sys.stderr  # the real one: the other processes' own is /dev/null


def state():
    """Accelerate's PartialState (the process group, this process's device), created once; None without a
    launcher. The other processes' output goes to /dev/null, their tracebacks to the real stderr."""
    global _state
    if LAUNCHED and _state is None:
        try:
            from accelerate import PartialState
        except ImportError:
            sys.exit("several processes (WORLD_SIZE > 1) need Hugging Face Accelerate: pip install accelerate")
        import torch

        # Without CUDA, Accelerate joins the process group (gloo) only when told that this is a CPU run.
        _state = PartialState(cpu=not torch.cuda.is_available())
        if _state.process_index:
            sys.stdout = sys.stderr = open(os.devnull, "w")
            sys.excepthook = lambda *error: traceback.print_exception(*error, file=_stderr)
    return _state


def run(compute: Callable):
    """compute(), and under a launcher, a process that fails ends at once, with its error in one line (a finished
    run's own files are already on disk): the others, blocked in a collective with it, then fail there at once
    too, instead of waiting for a timeout, and say so in one line each."""
    if not LAUNCHED:
        return compute()
    try:
        return compute()
    except BaseException as e:
        if isinstance(e, SystemExit) and e.code in (0, None):
            raise
        message = e.code if isinstance(e, SystemExit) and isinstance(e.code, str) else f"{type(e).__name__}: {e}"
        if not isinstance(e, SystemExit):
            traceback.print_exception(e, file=_stderr)
        sys.stdout.flush()
        print(f"process {rank()}: {str(message).splitlines()[0]}", file=_stderr, flush=True)
        os._exit(1)  # no process-group teardown, which can wait on the others


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


def merge(done: dict) -> dict:
    """The union of every process's {key: result}, on every process."""
    if not LAUNCHED:
        return dict(done)
    import torch.distributed as torch_dist

    parts, merged = [None] * size(), {}
    torch_dist.all_gather_object(parts, done)
    for part in parts:
        merged.update(part)
    return merged


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
    """compute() on the main process first, then on the others (which then find its result in a cache). If it fails
    on the main process, the others stop at once with its error instead of waiting for it at a barrier."""
    if not LAUNCHED:
        return compute()
    if is_main():
        try:
            result = compute()
        except BaseException as e:
            broadcast(f"{type(e).__name__}: {e}")
            raise
        broadcast(None)
        return result
    failed = broadcast(None)
    if failed:
        sys.exit(f"the main process failed first: {failed}")
    return compute()


def broadcast(value):
    """The main process's `value`, on every process."""
    if not LAUNCHED:
        return value
    import torch.distributed as torch_dist

    box = [value]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]

