"""The run directory nothing can corrupt: one run at a time (a lock), each finished stage checked against what it
was when written (manifest.json) and redone with every stage after it when damaged, random kills at many points of
both scripts, a full disk, and the bad input that used to reach a traceback. Every run ends with the files of an
unbroken run, or one line and a non-zero exit with nothing finished lost."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import FLAGS, ROOT, snapshot, tiny_config, write_pairs

import data
import model as models
import rpo
import sampling
import sdpo
from machinery.files import DirectoryLock, read

SDPO = ["--model", "tiny-random", "--steps", "2", "--heldout", "4", "--lr", "3e-3", "--batch-size", "2",
        "--grad-accum", "2", "--save-minutes", "0"]


def run_rpo(out, *flags, timeout=300):
    return subprocess.run([sys.executable, "rpo.py", *FLAGS, *flags, "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def last_line(done) -> str:
    return done.stderr.strip().splitlines()[-1]


# --- one run at a time ---------------------------------------------------------------------------------------------

def test_a_second_run_into_a_running_directory_is_one_line_naming_the_holder(unbroken, tmp_path):
    """Started while the first holds the directory, the same command and one with another --lr are both refused
    before any work; the first ends with the files of a run that was alone. The first is held just after it took
    the lock (a gate the test opens), so the test never races it, however slow or fast the machine."""
    out, ready, go = tmp_path / "run", tmp_path / "ready", tmp_path / "go"
    driver = tmp_path / "held.py"
    driver.write_text(f"""import os, sys, time
sys.path.insert(0, {ROOT!r})
import rpo
from machinery.files import DirectoryLock

real = DirectoryLock.acquire


def acquire(self):
    real(self)
    open({str(ready)!r}, "w").close()
    while not os.path.exists({str(go)!r}):
        time.sleep(0.02)


DirectoryLock.acquire = acquire
rpo.main(sys.argv[1:])
""")
    first = subprocess.Popen([sys.executable, str(driver), *FLAGS, "--out", str(out)], cwd=ROOT,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not ready.exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert ready.exists(), "the first run never took the lock"
        for flags in ([], ["--lr", "2e-3"]):
            second = run_rpo(out, *flags)
            assert second.returncode == 1 and "Traceback" not in second.stderr, second.stderr[-2000:]
            assert last_line(second).startswith(f"{os.path.realpath(out)}: another run is using this directory "
                                                f"(pid {first.pid} on "), last_line(second)
    finally:
        go.touch()
    assert first.wait(timeout=300) == 0
    assert snapshot(out) == snapshot(unbroken)  # config.json still says the first run's lr; no .lock left


def test_a_killed_holder_never_blocks_its_restart(tmp_path):
    """The OS lets go of a dead process's lock: the file it left is no obstacle, and a finished run removes it."""
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nsys.path.insert(0, '.')\n"
                               "from machinery.files import DirectoryLock\n"
                               f"DirectoryLock({str(out)!r}).acquire()\nprint('held', flush=True)\ntime.sleep(300)"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(SystemExit, match=f"pid {holder.pid} on .*: -c"):
        rpo.run(tiny_config(out, iterations=0, eval_k=0))
    holder.kill()
    holder.wait()
    assert (out / DirectoryLock.NAME).exists()  # what the killed holder left
    rpo.run(tiny_config(out, iterations=0, eval_k=0))
    assert not (out / DirectoryLock.NAME).exists() and (out / "iter_0" / "eval.json").is_file()


# --- random kills at many points of both scripts ------------------------------------------------------------------

def killing_script(tmp_path):
    """A driver that runs rpo.py's or sdpo.py's command line and kills its own process (SIGKILL) right after its k-th
    step that leaves something on disk, counted from the first stage it computes: a stage's file, the manifest or
    metrics written, a part or training state saved, a stage's parts removed (so between a stage's file and its
    record, and between its record and its parts' removal, too)."""
    script = tmp_path / "kill_at.py"
    script.write_text(f'''import os, shutil, signal, sys, types
sys.path.insert(0, {ROOT!r})
import rpo, sdpo
from machinery import resume, rundir

which, k, seen = sys.argv[1], int(sys.argv[2]), [0, False]


def then_kill(real):
    def step(*args, **kwargs):
        value = real(*args, **kwargs)
        seen[0] += seen[1]  # counted from the first stage this start computes: reading back is no progress
        if seen[0] == k:
            os.kill(os.getpid(), signal.SIGKILL)
        return value
    return step


def claim(real):
    def first(self):
        seen[1] = True
        return real(self)
    return first


rundir.RunDir.claim = claim(rundir.RunDir.claim)
rundir.write = then_kill(rundir.write)
rundir.shutil = types.SimpleNamespace(rmtree=then_kill(shutil.rmtree))
resume.Parts.save = then_kill(resume.Parts.save)
resume.TrainState.save = then_kill(resume.TrainState.save)
(rpo if which == "rpo" else sdpo).main(sys.argv[3:])
''')
    return script


def killed_again_and_again(tmp_path, which, flags, out, seed, most):
    """Start the command, kill it after a random 1 to `most` of its steps, start it again, … until a start finishes:
    how many kills it took (the two scripts: 20 or more in all)."""
    script, rng, kills = killing_script(tmp_path), random.Random(seed), 0
    for _ in range(200):
        k = str(rng.randint(1, most))
        done = subprocess.run([sys.executable, str(script), which, k, *flags, "--out", str(out)], cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
        if done.returncode == 0:
            return kills
        assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
        kills += 1
    raise AssertionError("the run never finished")


def test_rpo_killed_at_random_points_ends_with_the_files_of_a_run_never_stopped(unbroken, tmp_path):
    kills = killed_again_and_again(tmp_path, "rpo", FLAGS, tmp_path / "run", seed=0, most=3)
    assert kills >= 12
    assert snapshot(tmp_path / "run") == snapshot(unbroken)


def test_sdpo_killed_at_random_points_ends_with_the_files_of_a_run_never_stopped(tmp_path):
    flags = [*SDPO, "--data", write_pairs(tmp_path / "p.jsonl", 24)]
    subprocess.run([sys.executable, "sdpo.py", *flags, "--out", str(tmp_path / "unbroken")], cwd=ROOT, check=True,
                   capture_output=True, timeout=300)
    kills = killed_again_and_again(tmp_path, "sdpo", flags, tmp_path / "run", seed=1, most=6)
    assert kills >= 8
    assert snapshot(tmp_path / "run") == snapshot(tmp_path / "unbroken")


# --- damage found and redone ----------------------------------------------------------------------------------------

def cut_lines(path, n):
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-n]))


def forget(out, *stages):
    """Take stages out of the manifest, as if the run had stopped before they finished."""
    manifest = read(str(out / "manifest.json"))
    for stage in stages:
        manifest.pop(stage)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")


def truncate(path):
    text = path.read_bytes()
    path.write_bytes(text[:len(text) // 2])


def damaged_part(out):  # a stage not finished, one of its parts cut mid-line
    (out / "iter_1" / "eval.json").unlink()
    forget(out, "iter_1/eval.json")
    parts = out / "iter_1" / "eval.json.parts" / "greedy"
    parts.mkdir(parents=True)
    (parts / "part-000-000001.jsonl").write_text('{"key": ["q1", 0], "val')


def damaged_state(out):  # training not finished, its saved state cut short
    for name in ("train_log.jsonl", "eval.json"):
        (out / "iter_1" / name).unlink()
    shutil.rmtree(out / "iter_1" / "adapter")
    forget(out, "iter_1/train_log.jsonl", "iter_1/eval.json")
    state = out / "iter_1" / "train_log.jsonl.parts" / "state"
    state.mkdir(parents=True)
    (state / "state.pt").write_bytes(b"PK\x03\x04 cut short")


DAMAGE = {
    "lines removed from samples": (lambda out: cut_lines(out / "iter_1" / "samples.jsonl", 5),
                                   r"iter_1/samples\.jsonl: \d+ bytes where \d+ were written; the stage is done again, "
                                   "and every stage after it"),
    "samples deleted": (lambda out: (out / "iter_1" / "samples.jsonl").unlink(),
                        "iter_1/samples.jsonl: missing; the stage is done again"),
    "eval cut mid-line": (lambda out: truncate(out / "iter_0" / "eval.json"), "iter_0/eval.json: .* bytes where"),
    "a byte changed": (lambda out: (out / "iter_1" / "pairs.jsonl").write_text(
        (out / "iter_1" / "pairs.jsonl").read_text().replace("Final", "Finel", 1)),
        "iter_1/pairs.jsonl: changed since it was written"),
    "adapter deleted": (lambda out: shutil.rmtree(out / "iter_1" / "adapter"),
                        r"iter_1/adapter/\S+: missing; the stage is done again"),
    "a damaged part": (damaged_part, r"part-000-000001\.jsonl: cannot be read .*; dropped, its work is done again"),
    "a damaged training state": (damaged_state, r"state\.pt: cannot be read .*; training starts over"),
    "manifest damaged": (lambda out: truncate(out / "manifest.json"),
                         "manifest.json: damaged; each finished stage is checked by reading it instead"),
    "a run of before the manifest": (lambda out: (out / "manifest.json").unlink(), None),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damage_is_found_said_and_redone(unbroken, tmp_path, capsys, damage):
    import re

    out = tmp_path / "run"
    shutil.copytree(unbroken, out)
    harm, says = DAMAGE[damage]
    harm(out)
    rpo.main([*FLAGS, "--out", str(out)])
    err = capsys.readouterr().err
    assert says is None or re.search(says, err), err[-3000:]
    assert snapshot(out) == snapshot(unbroken)


def test_a_full_disk_is_one_line_and_the_same_command_resumes(unbroken, tmp_path, monkeypatch):
    """An OSError(ENOSPC) on the fourth file a stage writes (a real small filesystem: the next test)."""
    import errno

    from machinery import rundir

    real, calls = rundir.write, []

    def write(path, value):
        calls.append(path)
        if len(calls) == 4:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, value)

    out = tmp_path / "run"
    monkeypatch.setattr(rundir, "write", write)
    with pytest.raises(SystemExit) as stop:
        rpo.main([*FLAGS, "--out", str(out)])
    assert isinstance(stop.value.code, str) and stop.value.code.startswith(f"rpo.py: {calls[3]}: no space left on the "
                                                                           "device ("), stop.value.code
    assert stop.value.code.endswith("MiB free); free some space and the same command resumes the run")
    assert not [p for p in snapshot(out) if p.endswith(".tmp")]
    monkeypatch.setattr(rundir, "write", real)
    rpo.main([*FLAGS, "--out", str(out)])
    assert snapshot(out) == snapshot(unbroken)


def test_a_really_full_small_filesystem_is_one_line(unbroken, tmp_path):
    """A tmpfs smaller than the run needs, where this process may mount one (root); elsewhere the injected error of
    the test above stands in for it."""
    small = tmp_path / "small"
    small.mkdir()
    size = sum(len(v) for v in snapshot(unbroken).values()) // 2
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(small)],
                                           capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root; the injected ENOSPC test covers the line")
    try:
        done = run_rpo(small / "run")
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
        assert "no space left on the device" in last_line(done), last_line(done)
        shutil.copytree(small / "run", tmp_path / "run")  # a moved run directory resumes
    finally:
        subprocess.run(["umount", str(small)])
    again = run_rpo(tmp_path / "run")
    assert again.returncode == 0, again.stderr[-2000:]
    assert snapshot(tmp_path / "run") == snapshot(unbroken)


# --- what a resumed run says ----------------------------------------------------------------------------------------

def test_a_finished_run_says_so_and_a_shorter_one_says_where_it_ends(full_run, unbroken, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(unbroken, out)
    rpo.main([*FLAGS, "--out", str(out)])
    said = capsys.readouterr().err
    assert f"{out}: the 6 stages asked for were finished already and are as they were written" in said
    shutil.copytree(full_run[0], tmp_path / "full")
    rpo.run(tiny_config(tmp_path / "full", iterations=1))
    err = capsys.readouterr().err
    assert f"{tmp_path / 'full'}: holds a run of --iterations 2; this command asks for 1 and ends there" in err
    (out / "iter_1" / "eval.json").unlink()
    forget(out, "iter_1/eval.json")
    rpo.main([*FLAGS, "--out", str(out)])
    assert (f"{out}: 5 finished stage(s) read back, each checked against its record in manifest.json; going on with "
            "iter 1: eval") in capsys.readouterr().err


def test_an_iteration_without_pairs_says_so_and_trains_nothing(tmp_path, capsys):
    """No gold, 4 tokens: no sample is right, so no pairs; the run ends at M_0 with one line, not a table of zeros."""
    out = tmp_path / "run"
    with pytest.raises(data.DataError, match=r"iteration 1 made no pairs: 0 of 6 questions had both a right and a "
                                             r"wrong sample, \d+ of 24 samples were cut off at --max-new-tokens 4; "
                                             "M_1 was not trained and the run ends at M_0"):
        rpo.run(tiny_config(out, add_gold=False, max_new_tokens=4, iterations=2))
    assert not (out / "iter_1" / "train_log.jsonl").exists() and not (out / "iter_2").exists()
    assert "| 0 |" in capsys.readouterr().out  # the table so far: M_0


# --- bad input that used to reach a traceback ---------------------------------------------------------------------

def test_sdpo_task_config_that_is_not_json_is_one_line(tmp_path):
    (tmp_path / "c.json").write_text('{"script": "rpo.py", ')
    with pytest.raises(SystemExit, match=r"c\.json: not valid JSON \(.*\); the config\.json of an rpo\.py run was "
                                         "expected"):
        sdpo.main([*SDPO, "--data", write_pairs(tmp_path / "p.jsonl", 24), "--task-config",
                   str(tmp_path / "c.json"), "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_sdpo_heldout_larger_than_the_data_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "load_model", lambda cfg: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit, match="24 pairs are too few for --heldout 1000"):
        sdpo.main([*SDPO, "--data", write_pairs(tmp_path / "p.jsonl", 24), "--heldout", "1000", "--out",
                   str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_pairs_whose_chosen_is_their_rejected_are_dropped_and_counted(tmp_path, capsys):
    path = write_pairs(tmp_path / "p.jsonl", 24)
    with open(path, "a") as f:
        for i in range(3):
            f.write(json.dumps({"prompt": [{"role": "user", "content": f"Say {i}"}], "chosen": f"{i}",
                                "rejected": f"{i}"}) + "\n")
    cfg = sdpo.Config(data=[path], model="tiny-random", out=str(tmp_path / "run"), steps=1, heldout=4, lr=3e-3,
                      batch_size=2, grad_accum=2, max_steps=1)
    sdpo.run(cfg)
    assert "3 pairs dropped: their chosen and rejected responses are the same" in capsys.readouterr().err
    used = read(str(tmp_path / "run" / "heldout.jsonl")) + read(str(tmp_path / "run" / "step_1" / "pairs.jsonl"))
    assert len(used) == 24 and all(p["chosen"] != p["rejected"] for p in used)


def test_a_prompt_longer_than_max_length_is_dropped_and_counted_before_sampling(tmp_path, capsys):
    policy = models.load_model(tiny_config(tmp_path / "run"))
    examples = [{"id": str(i), "task": "gsm8k", "question": "Add 1 and 2. " * (600 if i == 3 else 1), "answer": "3"}
                for i in range(6)]
    kept = sampling.fitting(policy, tiny_config(tmp_path / "run"), examples, [], "training")
    assert [ex["id"] for ex in kept] == ["0", "1", "2", "4", "5"]
    assert ("1 of 6 training questions dropped: their prompt is longer than --max-length 512 tokens"
            in capsys.readouterr().err)
    with pytest.raises(data.DataError, match="--max-length 512: none of the 1 test questions' prompts fits"):
        sampling.fitting(policy, tiny_config(tmp_path / "run"), examples[3:4], [], "test")


def test_a_byte_that_is_not_utf8_is_named_by_its_line(tmp_path):
    path = tmp_path / "train.jsonl"
    good = json.dumps({"question": "1 + 1?", "answer": "2\n#### 2"}).encode()
    path.write_bytes(good + b"\n" + good + b"\n" + b'{"question": "caf\xe9", "answer": "#### 1"}\n')
    with pytest.raises(data.DataError, match=r"train\.jsonl:3: not UTF-8 text \(byte 0xe9 at column 18\)"):
        data.load_examples("gsm8k", str(path))
