"""rpo.py and sdpo.py with two CPU processes (gloo) on the tiny random Llama: the same run directory as one process.
Sampling, the reference pass and evaluation share out whole batches, each drawn from its own seeded generator, so
their files are equal byte for byte. Training sums the two processes' gradients where one process sums its
micro-batches one after the other: the same sum in another order, so the adapters agree up to float32 rounding
(atol 1e-5 on weights of order 1e-2, after a handful of AdamW steps at lr 3e-3: Adam divides a gradient by its own
size, so an entry near zero turns a rounding difference into a visible one; 1.2e-6 was seen)."""
import os
import shutil
import subprocess
import sys

import pytest
from conftest import write_pairs

from machinery.files import read

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RPO = ["--model", "tiny-random", "--n-train", "6", "--n-test", "4", "--samples", "4", "--pairs", "2",
       "--max-new-tokens", "12", "--add-gold", "--eval-k", "2", "--grad-accum", "4", "--lr", "1e-3",
       "--iterations", "1", "--sample-batch-size", "8", "--heldout-questions", "2"]


# Two CPU processes through torch's own launcher (torchrun), which `accelerate launch --multi_gpu` also uses: the
# `--cpu --num_processes 2` of Accelerate 1.15 starts one process (several CPU processes need its mpirun set-up).
def launcher(processes):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)] \
        if processes > 1 else [sys.executable]


def run(script, flags, out, processes):
    launcher_ = launcher(processes)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two processes on two cores
    done = subprocess.run(launcher_ + [script, *flags, "--out", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def adapter_weights(folder):
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "adapter_model.safetensors"))


def assert_same_adapter(one, two):
    a, b = adapter_weights(one), adapter_weights(two)
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] - b[name]).abs().max().item() < 1e-5, name


@pytest.fixture(scope="module")
def rpo_runs(tmp_path_factory):
    pytest.importorskip("accelerate")
    tmp = tmp_path_factory.mktemp("dist")
    run("rpo.py", RPO, tmp / "one", 1)
    two = run("rpo.py", RPO + ["--sample-batch-size", "4"], tmp / "two", 2)  # other batches: the same samples
    return tmp / "one", tmp / "two", two


def test_two_processes_sample_pair_and_score_what_one_does(rpo_runs):
    one, two, _ = rpo_runs
    for name in ("iter_0/eval.json", "iter_1/samples.jsonl", "iter_1/stats.json", "iter_1/pairs.jsonl",
                 "iter_1/reference.jsonl"):
        assert (one / name).read_bytes() == (two / name).read_bytes(), name


def test_two_processes_train_the_adapter_one_does(rpo_runs):
    one, two, _ = rpo_runs
    assert_same_adapter(one / "iter_1" / "adapter", two / "iter_1" / "adapter")
    steps = [[r for r in read(str(d / "iter_1" / "train_log.jsonl")) if "loss" in r] for d in (one, two)]
    assert len(steps[0]) == len(steps[1]) > 1
    for a, b in zip(*steps):
        assert a["pairs"] == b["pairs"] and abs(a["loss"] - b["loss"]) < 1e-5


def test_only_the_main_process_writes_and_prints(rpo_runs):
    one, two, done = rpo_runs
    assert sorted(os.listdir(one)) == sorted(os.listdir(two))
    assert done.stderr.count("rpo.py: Iterative RPO") == 1 and done.stdout.count("| iteration |") == 1


def test_two_processes_resume_a_stopped_run(rpo_runs, tmp_path):
    _, two, _ = rpo_runs
    stopped = tmp_path / "run"
    shutil.copytree(two, stopped)
    for name in ("iter_1/adapter", "iter_1/train_log.jsonl", "iter_1/eval.json"):  # stopped after the reference
        path = stopped / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    run("rpo.py", RPO, stopped, 2)
    for name in ("iter_1/samples.jsonl", "iter_1/reference.jsonl", "iter_1/train_log.jsonl", "iter_1/eval.json",
                 "metrics.jsonl"):
        assert (stopped / name).read_bytes() == (two / name).read_bytes(), name


def test_sdpo_under_two_processes(tmp_path):
    pytest.importorskip("accelerate")
    data = write_pairs(tmp_path / "p.jsonl", 20)
    flags = ["--data", data, "--model", "tiny-random", "--steps", "2", "--heldout", "4", "--lr", "3e-3",
             "--grad-accum", "4"]
    run("sdpo.py", flags, tmp_path / "one", 1)
    run("sdpo.py", flags, tmp_path / "two", 2)
    for name in ("heldout.jsonl", "step_0/heldout_logps.jsonl", "step_1/pairs.jsonl", "step_1/reference.jsonl"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    assert_same_adapter(tmp_path / "one" / "step_2" / "adapter", tmp_path / "two" / "step_2" / "adapter")


def test_a_failure_in_main_first_ends_the_others_with_its_error(tmp_path):
    """The main process fails while the others wait for it (a model conversion, say): they stop at once, naming
    its error, instead of waiting at a barrier for the launcher's timeout."""
    pytest.importorskip("accelerate")
    script = tmp_path / "fail.py"
    script.write_text(f"import sys\nsys.path.insert(0, {ROOT!r})\nfrom machinery import dist\n\n\ndef convert():\n"
                      "    if dist.is_main():\n        raise RuntimeError('conversion failed')\n\n\n"
                      "dist.state()\ndist.run(lambda: dist.main_first(convert))\n")
    done = subprocess.run(launcher(2) + [str(script)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode != 0
    assert "process 1: the main process failed first: RuntimeError: conversion failed" in done.stderr, done.stderr


def test_a_process_that_fails_ends_the_others_with_its_error(tmp_path):
    """One process fails while sampling; the other, waiting for it to gather the samples, ends at once too."""
    import time

    pytest.importorskip("accelerate")
    script = tmp_path / "fail.py"
    script.write_text(f"import sys\nsys.path.insert(0, {ROOT!r})\nimport rpo, sampling\n"
                      "from machinery import dist\n\n\n"
                      "def failing(*args, **kwargs):\n    raise RuntimeError('sampling failed')\n\n\n"
                      "if dist.rank() == 1:\n    sampling.generate_ids = failing\nrpo.main(sys.argv[1:])\n")
    start = time.time()
    done = subprocess.run(launcher(2) + [str(script), *RPO, "--out", str(tmp_path / "run")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode != 0 and time.time() - start < 120
    assert "process 1: RuntimeError: sampling failed" in done.stderr, done.stderr[-3000:]
