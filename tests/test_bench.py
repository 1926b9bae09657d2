"""bench.py runs at a tiny size (speed and memory are measured there, never asserted here)."""
import os

import pytest
from conftest import DATA

import bench


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
