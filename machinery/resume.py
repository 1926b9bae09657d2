"""What a stopped stage resumes from, in one place: its finished parts, the chunked runner that keeps them as they
end (each process its share, an out-of-memory error answered by halving the rows), and training's saved state.

    Stage       what a running stage gives the step it runs: its label, its parts, where its records go
    progress_bar  a stage's bar: every 0.1 s on a terminal, every 30 s into a log file
    Parts       a stage's finished parts: JSON Lines files, one per unit of work, written atomically
    in_chunks   compute over chunks of work, every P-th chunk on this process, each kept in the stage's parts as it
                ends, halved on out-of-memory; every process's results merged
    TrainState  training's last step, records and best checkpoint, saved with the weights, the optimizer's state and
                every process's random generators
"""
import glob
import os
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from tqdm.auto import tqdm

from machinery import dist
from machinery.files import atomic, discard, read, write


class Parts:
    """The finished parts of a stage that is still running: a folder of JSON Lines files, each written atomically
    by one process (its rank in the name) as a unit of work ends, each record a key (a row, a pair) and its value.
    Nothing in it is a stage's output: the stage's own file exists only once every part is done, and a restarted
    stage reads the parts back (`read`) and computes only what is missing. `sub(name)`: a folder of its own inside,
    for a part of the stage that has parts of its own (a held-out check inside training)."""

    def __init__(self, folder: str):
        self.folder, self.count = folder, 0

    def sub(self, name: str) -> "Parts":
        return Parts(os.path.join(self.folder, name))

    def read(self) -> dict:
        """{key: value} of every part file (a key that was a list comes back a tuple)."""
        found = {}
        for path in sorted(glob.glob(os.path.join(self.folder, "part-*.jsonl"))):
            try:
                records = [(r["key"], r["value"]) for r in read(path)]
            except (ValueError, UnicodeDecodeError, KeyError, TypeError, FileNotFoundError) as e:  # parts: a cache
                print(f"{path}: cannot be read ({str(e).splitlines()[0]}); dropped, its work is done again",
                      file=sys.stderr)
                if dist.is_main():
                    discard(path)  # gone already if another process found it so
                continue
            for key, value in records:
                found[tuple(key) if isinstance(key, list) else key] = value
        return found

    def save(self, values: dict) -> None:
        """One more part file of {key: value}, atomically."""
        if not values:
            return
        os.makedirs(self.folder, exist_ok=True)
        while True:  # a name no earlier run of this process's rank has taken
            self.count += 1
            path = os.path.join(self.folder, f"part-{dist.rank():03d}-{self.count:06d}.jsonl")
            if not os.path.exists(path):
                break
        write(path, [{"key": list(k) if isinstance(k, tuple) else k, "value": v} for k, v in values.items()])


@dataclass
class Stage:
    """What a running stage gives the step it runs: a label for its progress lines, where it keeps its finished parts
    (None: nothing is kept), where its records go (metrics.jsonl), its iteration's (step's) folder (empty: none,
    nothing is saved beside it) and number."""
    label: str
    parts: Parts | None = None
    log: Callable[[dict], None] = lambda record: None
    folder: str = ""
    t: int | None = None  # its iteration (step)

    def path(self, name: str) -> str:
        """The file `name` beside the stage's own, in its iteration's (step's) folder."""
        return os.path.join(self.folder, name)

    def sub(self, name: str | None = None, label: str | None = None) -> "Stage":
        """A part of this stage, with finished parts of its own when `name` is given (a held-out check inside
        training), or only another label."""
        return replace(self, label=label or self.label, parts=self.parts.sub(name) if name and self.parts else
                       self.parts)

    def finished(self) -> dict:
        """What a stopped run of this stage finished ({} without parts), read by every process before any writes
        more."""
        done = self.parts.read() if self.parts else {}
        dist.barrier()
        return done


def batches(items: list, size: int) -> list:
    return [items[i:i + size] for i in range(0, len(items), size)]


def in_chunks(todo: list, rows: int, compute: Callable, stage: Stage, unit: str, lower: str) -> dict:
    """compute(chunk, bar) → {key: result} over `todo` in chunks of `rows`, every P-th chunk on this process, each
    finished chunk kept in the stage's parts as it ends (a restarted stage computes only the rest). An
    out-of-memory error frees what the chunk held and retries it at half its rows, saying so in one line, down to
    one `unit` (a row, a pair); one out of memory ends the run with one line naming the flag to `lower`. Returns
    every process's results."""
    chunks = batches(todo, rows)
    mine, done = [key for b in dist.mine(len(chunks)) for key in chunks[b]], {}
    with progress_bar(total=len(mine), desc=stage.label, unit=unit) as bar:  # closed on a stop too, before its line
        start = 0
        while start < len(mine):
            chunk = mine[start:start + rows]
            try:
                results = compute(chunk, bar)
            except torch.OutOfMemoryError:
                results = None  # out of the except block first, so that the traceback's tensors are freed
            if results is not None:
                if stage.parts:
                    stage.parts.save(results)
                done.update(results)
                start += len(chunk)
                continue
            release()
            if len(chunk) == 1:
                sys.exit(f"{stage.label}: out of memory with one {unit}; lower {lower}")
            rows = len(chunk) // 2
            print(f"{stage.label}: out of memory at {len(chunk)} {unit}s at once; going on with {rows}",
                  file=sys.stderr)
    return dist.merge(done)


def progress_bar(**kwargs) -> tqdm:
    """A progress bar on stderr, redrawn at most every 0.1 s on a terminal and every 30 s into a file or a pipe, so
    that a run's log gets a line every half minute, not one a token."""
    return tqdm(mininterval=0.1 if sys.stderr.isatty() else 30, **kwargs)


def release() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def trainable(optimizer) -> list:
    """The weights an optimizer steps (the LoRA weights), in its order."""
    return [p for group in optimizer.param_groups for p in group["params"]]


@dataclass
class TrainState:
    """Where training stands: its last optimizer step, the records so far, the best checkpoint (step, score, the
    trainable weights then). Saved with the weights, the optimizer's state and every process's random generators
    into `{parts}/state/` (atomically), so that a restarted stage goes on after `step` as if never stopped."""
    step: int = 0
    records: list = field(default_factory=list)
    best: tuple | None = None

    def checked(self) -> bool:
        return any(r.get("step") == self.step and "heldout/accuracy" in r for r in self.records)

    def save(self, parts, optimizer) -> None:
        params = trainable(optimizer)
        generators = dist.merge({dist.rank(): random_state()})
        if dist.is_main():
            with atomic(os.path.join(parts.folder, "state")) as tmp:
                os.makedirs(tmp)
                torch.save({"step": self.step, "records": self.records, "best": self.best and self.best[:2],
                            "best_weights": self.best and self.best[2], "weights": [p.detach() for p in params],
                            "optimizer": optimizer.state_dict(), "generators": generators},
                           os.path.join(tmp, "state.pt"))
        dist.barrier()

    @classmethod
    def load(cls, parts, optimizer) -> "TrainState":
        path = os.path.join(parts.folder, "state", "state.pt") if parts else ""
        if not os.path.exists(path):
            return cls()
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # cut short (a full disk, a copy): training starts over, its held-out checks kept
            print(f"{path}: cannot be read ({str(e).splitlines()[0][:120]}); training starts over", file=sys.stderr)
            dist.barrier()
            if dist.is_main():
                discard(os.path.dirname(path))
            return cls()
        with torch.no_grad():
            for p, w in zip(trainable(optimizer), saved["weights"]):
                p.copy_(w)
        optimizer.load_state_dict(saved["optimizer"])
        random_state(saved["generators"].get(dist.rank(), saved["generators"][0]))
        best = saved["best"] and (*saved["best"], saved["best_weights"])
        return cls(saved["step"], saved["records"], best)


def random_state(state: dict | None = None) -> dict | None:
    """Python's and torch's generators (CUDA's too): their state, or set them to `state`."""
    if state is None:
        return {"python": random.getstate(), "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    return None
