"""Fixtures shared by the test files: the tiny-random runs of both loops happen once per session."""
import json
import os
import subprocess
import sys

import pytest

import rpo
import sdpo

# The published data sets (GSM8K, MATH-500, an ARC-Challenge subset) sit beside the project, in CI too; never copied
# into it. Tests that read them skip, saying why, where they are absent.
DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data")


def tiny_config(out, **kw):
    base = dict(model="tiny-random", out=str(out), n_train=6, n_test=4, samples_per_question=4, pairs_per_question=2,
                max_new_tokens=12, add_gold=True, eval_k=2, batch_size=2, grad_accum=2, lr=1e-3, iterations=2,
                sample_batch_size=8, temperatures=[0.8, 1.3])
    return rpo.Config(**{**base, **kw})


def some_pairs(n=6):
    return [{"prompt": [{"role": "user", "content": f"What is {i} + 1?"}], "chosen": f"{i} + 1 = {i + 1}.\nFinal "
             f"answer: {i + 1}", "rejected": f"I think it is {i + 7}"} for i in range(n)]


def snapshot(folder):
    """Every file of a run directory, as bytes, by relative path."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, folder)] = f.read()
    return files


def write_pairs(path, n, offset=0):
    with open(path, "w") as f:
        for i in range(offset, offset + n):
            f.write(json.dumps({"prompt": [{"role": "user", "content": f"What is {i} + 2?"}],
                                "chosen": f"{i} + 2 = {i + 2}.\nFinal answer: {i + 2}",
                                "rejected": f"It is {i + 5}."}) + "\n")
    return str(path)


def sdpo_config(tmp_path, files, **kw):
    base = dict(data=files, model="tiny-random", out=str(tmp_path / "run"), steps=2, heldout=4, lr=3e-3,
                batch_size=2, grad_accum=2)
    return sdpo.Config(**{**base, **kw})


@pytest.fixture(scope="session")
def full_run(tmp_path_factory):
    """Iterative RPO, two iterations on the tiny random Llama: (run directory, summary rows)."""
    out = tmp_path_factory.mktemp("full") / "run"
    return out, rpo.run(tiny_config(out))


@pytest.fixture(scope="session")
def two_steps(tmp_path_factory):
    """sDPO, two steps on 24 written pairs: (config, summary rows)."""
    tmp = tmp_path_factory.mktemp("sdpo")
    cfg = sdpo_config(tmp, [write_pairs(tmp / "p.jsonl", 24)])
    return cfg, sdpo.run(cfg)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ["--model", "tiny-random", "--n-train", "6", "--n-test", "4", "--samples", "4", "--pairs", "2",
         "--max-new-tokens", "12", "--add-gold", "--eval-k", "2", "--batch-size", "2", "--grad-accum", "2", "--lr",
         "1e-3", "--iterations", "1", "--sample-batch-size", "8", "--heldout-questions", "4", "--checkpoints", "2",
         "--save-minutes", "0"]


@pytest.fixture(scope="session")
def unbroken(tmp_path_factory):
    """rpo.py's command line, one iteration on the tiny random Llama, never stopped: what a stopped, damaged or
    refused run must end equal to."""
    out = tmp_path_factory.mktemp("unbroken") / "run"
    subprocess.run([sys.executable, "rpo.py", *FLAGS, "--out", str(out)], cwd=ROOT, check=True, capture_output=True,
                   timeout=300)
    return out


def kill_and_resume_script(tmp_path, root):
    """A driver that runs rpo.py's command line and kills its own process (SIGKILL, as `kill -9`) right after the
    k-th save of a stage's finished parts (`samples`: iteration 1's sampling; `train`: iteration 1's training
    state), so a test can stop a run at a chosen point and start the same command again."""
    script = tmp_path / "killed.py"
    script.write_text(f'''import os, signal, sys
sys.path.insert(0, {str(root)!r})
import rpo
from machinery import resume

what, after, saves = sys.argv[1], int(sys.argv[2]), []


def killing(real):
    def save(self, *args):
        real(self, *args)
        folder = self.folder if isinstance(self, resume.Parts) else args[0].folder
        if os.path.join("iter_1", "samples" if what == "samples" else "train_log") in folder:
            saves.append(folder)
            if len(saves) == after:
                os.kill(os.getpid(), signal.SIGKILL)
    return save


if what == "samples":
    resume.Parts.save = killing(resume.Parts.save)
else:
    resume.TrainState.save = killing(resume.TrainState.save)
rpo.main(sys.argv[3:])
''')
    return script


def read_json(text: bytes):
    return json.loads(text.decode())


def assert_same_files(one, two, rel=1e-5, atol=1e-4):
    """Two run directories hold the same files: equal bytes, or, where the order of float sums may differ (another
    batch shape), JSON equal but for floats within float32 rounding (`rel`; log-probs are sums of hundreds of terms)
    and adapters' weights within `atol`. Seen between 2-row and 1-row batches: 3e-5 on log-probs near 100, 8e-7 on
    adapter weights."""
    import math

    from safetensors.torch import load_file

    def close(a, b, where):
        if isinstance(a, float) or isinstance(b, float):
            assert math.isclose(a, b, rel_tol=rel, abs_tol=atol), where
        elif isinstance(a, dict):
            assert a.keys() == b.keys(), where
            for k in a:
                close(a[k], b[k], f"{where}.{k}")
        elif isinstance(a, list):
            assert len(a) == len(b), where
            for i, (x, y) in enumerate(zip(a, b)):
                close(x, y, f"{where}[{i}]")
        else:
            assert a == b, where

    a, b = snapshot(one), snapshot(two)
    assert sorted(a) == sorted(b)
    for name in a:
        if a[name] == b[name]:
            continue
        if name in ("manifest.json", "inputs.json"):  # the files' hashes: the files themselves are compared
            assert read_json(a[name]).keys() == read_json(b[name]).keys()
            assert all(read_json(a[name])[k].keys() == read_json(b[name])[k].keys() for k in read_json(a[name]))
            continue
        if name.endswith(".safetensors"):
            x, y = load_file(os.path.join(one, name)), load_file(os.path.join(two, name))
            assert x.keys() == y.keys() and all((x[k] - y[k]).abs().max() <= atol for k in x), name
        else:
            from machinery.files import read

            assert name.endswith((".json", ".jsonl")), name
            close(read(os.path.join(one, name)), read(os.path.join(two, name)), name)
