"""--report-to: a tiny-random run's trackers read back equal to its metrics.jsonl, and a resumed or continued run
logs no record twice. Each tracker that runs offline here: TensorBoard, trackio (local), wandb (offline mode)."""
import glob
import importlib.util
import json
import math
import os
import struct
import subprocess
import sys

import pytest

from machinery import trackers
from machinery.files import read

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ["--model", "tiny-random", "--n-train", "4", "--n-test", "3", "--samples", "4", "--pairs", "2",
         "--max-new-tokens", "8", "--eval-k", "2", "--add-gold", "--heldout-questions", "2", "--batch-size", "2",
         "--grad-accum", "1", "--lr", "1e-3"]
INSTALLED = [n for n in ("tensorboard", "trackio", "wandb") if importlib.util.find_spec(n)]


def run(tmp_path, iterations: int, names: list):
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "TRACKIO_DIR": str(tmp_path / "trackio")}
    done = subprocess.run([sys.executable, "rpo.py", *FLAGS, "--iterations", str(iterations), "--out",
                           str(tmp_path / "run"), "--report-to", *names], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def expected(folder) -> list:
    """(step, name, value) of every number metrics.jsonl holds, as the trackers should have it."""
    records = read(os.path.join(folder, "metrics.jsonl"))
    return [(step, k, v) for r, step in zip(records, trackers.global_steps(records))
            for k, v in trackers.scalars(r).items()]


def tensorboard_values(folder) -> set:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(folder, "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return [(e.step, tag, e.value) for tag in events.Tags()["scalars"] for e in events.Scalars(tag)]


def wandb_values(folder) -> list:
    """The history of wandb's offline run files (one per start of the run, all of the same run id): LevelDB log
    blocks of protobuf records (wandb 0.31 keeps no Python reader of its own)."""
    from wandb.proto import wandb_internal_pb2

    payloads = []
    for path in sorted(glob.glob(os.path.join(folder, "wandb", "offline-run-*", "run-*.wandb"))):
        raw, pos, part = open(path, "rb").read(), 7, b""  # 7: the file's header, ":W&B", magic, version
        while pos + 7 <= len(raw):
            left = 32768 - pos % 32768
            _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7]) if left >= 7 else (0, 0, 0)
            if left < 7 or kind == 0:
                pos += left
                continue
            chunk, pos = raw[pos + 7:pos + 7 + length], pos + 7 + length
            part = chunk if kind in (1, 2) else part + chunk  # full, first, middle, last
            if kind in (1, 4):
                payloads.append(part)
    values = []
    for payload in payloads:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            values += [(items["_step"], k, v) for k, v in items.items() if not k.startswith("_")]
    return values


def trackio_values(tmp_path) -> list:
    code = ("import json, sys\nfrom trackio.sqlite_storage import SQLiteStorage\n"
            "print(json.dumps(SQLiteStorage.get_logs('rpo', 'run')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio")})
    return [(row["step"], k, v) for row in json.loads(done.stdout) for k, v in row.items()
            if isinstance(v, (int, float)) and k not in ("step",)]


def holds(found: list, want: list) -> bool:
    have = {}
    for step, name, value in found:
        have.setdefault((step, name), []).append(value)
    missing = [(s, n, v) for s, n, v in want if not any(math.isclose(v, x, rel_tol=1e-6, abs_tol=1e-6)
                                                        for x in have.get((s, n), []))]
    assert not missing, missing[:5]
    return True


@pytest.mark.skipif(not INSTALLED, reason="no tracker installed (pip install tensorboard, trackio or wandb)")
def test_the_trackers_hold_what_metrics_jsonl_holds_and_never_a_record_twice(tmp_path):
    run(tmp_path, 1, INSTALLED)
    readers = {"tensorboard": lambda: tensorboard_values(tmp_path / "run"), "wandb": lambda: wandb_values(
        tmp_path / "run"), "trackio": lambda: trackio_values(tmp_path)}
    want = expected(tmp_path / "run")
    assert any(name == "loss" for _, name, _ in want) and any(name == "eval/accuracy" for _, name, _ in want)
    counts = {}
    for name in INSTALLED:
        found = readers[name]()
        assert holds(found, want), name
        counts[name] = len(found)
    run(tmp_path, 1, INSTALLED)  # finished: read back, nothing logged again
    run(tmp_path, 2, INSTALLED)  # one iteration more: its records alone are new
    want = expected(tmp_path / "run")
    for name in INSTALLED:
        found = readers[name]()
        assert holds(found, want), name
        if name == "tensorboard":  # every event kept apart: exactly one per number
            assert len(found) == len(want)
    state = json.loads((tmp_path / "run" / "trackers.json").read_text())
    assert state["logged"] == len(read(str(tmp_path / "run" / "metrics.jsonl")))
    assert state["tables"] == ["iter_1/completions", "iter_1/pairs", "iter_2/completions", "iter_2/pairs"]


def test_a_tracker_not_installed_is_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    import rpo

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(SystemExit, match="--report-to wandb needs its package: pip install wandb"):
        rpo.main(["--model", "tiny-random", "--report-to", "wandb", "--out", str(tmp_path / "r")])
    assert not (tmp_path / "r").exists()
