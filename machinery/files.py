"""Files a run writes, each atomically, and the seeding of its random generators."""
import contextlib
import hashlib
import json
import os
import random
import shutil


@contextlib.contextmanager
def atomic(path: str):
    """A temporary path beside `path` to write a file or a folder to, renamed to `path` once written: a stopped run
    never leaves half of it behind. A folder already at `path` is replaced."""
    tmp = path + ".tmp"
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    yield tmp
    if os.path.isdir(path):
        shutil.rmtree(path)
    os.replace(tmp, path)


def write_atomic(path: str, text: str) -> None:
    with atomic(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def write(path, value) -> None:
    """JSON Lines for a .jsonl path (one record a line), else indented JSON; atomically."""
    path = os.fspath(path)
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in value) if path.endswith(".jsonl")
                 else json.dumps(value, indent=1) + "\n")


def read(path):
    """What `write` wrote: a list of records from a .jsonl file, else the JSON value."""
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()] if path.endswith(".jsonl") else json.load(f)


def seed_everything(*keys) -> None:
    """Seed Python's and torch's generators from a key such as (config seed, iteration, stage name)."""
    import torch

    seed = int(hashlib.sha256(json.dumps(keys).encode()).hexdigest()[:8], 16)
    random.seed(seed)
    torch.manual_seed(seed)
