"""A run directory from someone else (a shared folder, a tarball) and input as bad luck writes it: nothing outside
--out is ever removed or written, a manifest of the wrong shape or a lost one is said and checked around, a swapped
input is found where a stage can find it, a read-only directory is read, sdpo.py follows no path from a file it
finds, a runaway line is dropped before it is tokenised, a byte-order mark is read; and the metric that used to
report rounding noise (rewards/accuracies at the first step) reports a tie."""
import json
import os
import re
import shutil
import subprocess

import pytest
from conftest import FLAGS, snapshot, tiny_config, write_pairs

import data
import model as models
import rpo
import sampling
import sdpo
import training
from machinery.files import fingerprint, read


@pytest.fixture
def out(unbroken, tmp_path):
    """A copy of the unbroken one-iteration run, to do things to."""
    shutil.copytree(unbroken, tmp_path / "run")
    return tmp_path / "run"


def victims(tmp_path) -> dict:
    """Files and a folder outside the run directory that a crafted manifest names: each must survive."""
    (tmp_path / "victimdir").mkdir()
    (tmp_path / "victimdir" / "precious.txt").write_text("keep me")
    (tmp_path / "victim.txt").write_text("keep me too")
    return {"file": "../victim.txt", "folder": "../victimdir", "absolute": str(tmp_path / "victim.txt"),
            "through the folder": "iter_1/../../victimdir/precious.txt"}


def victims_intact(tmp_path) -> bool:
    return ((tmp_path / "victim.txt").read_text() == "keep me too"
            and (tmp_path / "victimdir" / "precious.txt").read_text() == "keep me")


def edit(path, change) -> None:
    value = read(str(path))
    change(value)
    path.write_text(json.dumps(value, indent=1) + "\n")


# --- paths outside the run directory ------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["a later stage's file", "a stage's name", "an input of a stage"])
@pytest.mark.parametrize("entry", ["file", "folder", "absolute", "through the folder"])
def test_a_file_of_the_run_naming_a_path_outside_it_is_refused_and_nothing_is_removed(out, tmp_path, where, entry):
    """The damage (samples cut) would make the run remove every later stage's files, the crafted one included."""
    name = victims(tmp_path)[entry]
    if where == "a later stage's file":
        edit(out / "manifest.json", lambda m: m["iter_1/eval.json"].update({name: {"size": 3, "sha256": "0" * 64}}))
    elif where == "a stage's name":
        edit(out / "manifest.json", lambda m: m.update({name: {"iter_1/eval.json": m["iter_1/eval.json"]
                                                               ["iter_1/eval.json"]}}))
    else:
        edit(out / "inputs.json", lambda m: m["iter_1/eval.json"].update({name: "0" * 64}))
    lines = (out / "iter_1" / "samples.jsonl").read_text().splitlines(keepends=True)
    (out / "iter_1" / "samples.jsonl").write_text("".join(lines[:-5]))
    before = snapshot(out)
    record = "manifest.json" if where != "an input of a stage" else "inputs.json"
    with pytest.raises(SystemExit, match=rf"{record}: names '{name}', a path outside the run directory; refused, "
                                         "nothing was removed"):
        rpo.main([*FLAGS, "--out", str(out)])
    assert victims_intact(tmp_path)
    assert snapshot(out) == before  # nothing removed or written inside either, the lock file gone again


@pytest.mark.parametrize("link, target", [("iter_2", "victimdir"),  # where iteration 2 would write its samples
                                          (".lock", "victim.txt")])  # what the lock would truncate
def test_a_symbolic_link_out_of_the_run_directory_is_refused_before_anything_is_written(out, tmp_path, link, target):
    victims(tmp_path)
    os.symlink(tmp_path / target, out / link)
    with pytest.raises(SystemExit, match=rf"{re.escape(link)} -> .*{target}: a symbolic link out of the run "
                                         "directory; a run writes and removes files inside its --out only"):
        rpo.main([*FLAGS, "--iterations", "2", "--out", str(out)])
    assert victims_intact(tmp_path) and os.listdir(tmp_path / "victimdir") == ["precious.txt"]


# --- a manifest of the wrong shape, or none ----------------------------------------------------------------------

@pytest.mark.parametrize("text, says", [
    ("[]", "not a JSON object of stages but a JSON list"),
    ('{"iter_0/eval.json": 5}', "stage 'iter_0/eval.json': 5 where an object of its files belongs"),
    ('{"iter_0/eval.json": {"iter_0/eval.json": "big"}}',
     "stage 'iter_0/eval.json': file 'iter_0/eval.json' has \"big\" where a {\"size\", \"sha256\"} record belongs"),
])
def test_a_manifest_of_the_wrong_shape_is_one_line_and_treated_as_missing(out, unbroken, capsys, text, says):
    (out / "manifest.json").write_text(text)
    rpo.main([*FLAGS, "--out", str(out)])
    err = capsys.readouterr().err
    assert f"manifest.json: {says}; each finished stage is checked by reading it instead, and recorded anew" in err
    assert "Traceback" not in err
    assert snapshot(out) == snapshot(unbroken)  # recorded anew: the same manifest as the unbroken run's


def another_seed(tmp_path):
    other = tmp_path / "other"
    rpo.main([*FLAGS, "--seed", "1", "--out", str(other)])
    return other


@pytest.mark.parametrize("manifest", ["deleted", "recorded with the swap"])
def test_a_swapped_stage_file_makes_every_stage_computed_from_it_done_again(out, tmp_path, capsys, manifest):
    """samples.jsonl swapped for another run's (another seed): the pairs were computed from the old samples
    (inputs.json), so they are made again from the new ones, and every stage after them."""
    other = another_seed(tmp_path)
    capsys.readouterr()
    shutil.copy(other / "iter_1" / "samples.jsonl", out / "iter_1" / "samples.jsonl")
    if manifest == "deleted":
        (out / "manifest.json").unlink()
    else:  # the swap covered its tracks in the manifest: its inputs still tell
        edit(out / "manifest.json", lambda m: m["iter_1/samples.jsonl"].update(
            {"iter_1/samples.jsonl": fingerprint(str(out / "iter_1" / "samples.jsonl"))}))
    rpo.main([*FLAGS, "--out", str(out)])
    err = capsys.readouterr().err
    if manifest == "deleted":
        assert ("manifest.json: missing; each finished stage is checked only for being readable and for the files it "
                "was computed from (inputs.json), not for being the bytes its run wrote") in err
    assert ("iter_1/pairs.jsonl: computed from iter_1/samples.jsonl as it was then, and iter_1/samples.jsonl has "
            "changed since; the stage is done again, and every stage after it") in err
    assert "are as they were written" not in err
    for name in ("pairs.jsonl", "reference.jsonl", "train_log.jsonl", "eval.json"):  # as the other seed's run made
        assert (out / "iter_1" / name).read_bytes() != b""
    swapped = {s["completion"] for s in read(str(out / "iter_1" / "samples.jsonl"))}
    assert all(p["rejected"] in swapped for p in read(str(out / "iter_1" / "pairs.jsonl")))
    rpo.main([*FLAGS, "--out", str(out)])  # and now all is as written
    assert "finished already and are as they were written" in capsys.readouterr().err


def test_without_a_manifest_a_finished_run_says_what_was_and_was_not_checked(out, capsys):
    (out / "manifest.json").unlink()
    rpo.main([*FLAGS, "--out", str(out)])
    err = capsys.readouterr().err
    assert ("the 6 stages asked for were finished already, 0 checked against their record in manifest.json, 6 without "
            "one only for being readable and for the files they were computed from (inputs.json): not for being the "
            "bytes their run wrote; nothing computed") in err


# --- a directory that cannot be written ---------------------------------------------------------------------------

@pytest.fixture
def read_only(out, tmp_path):
    """The run directory, read-only: a read-only bind mount where this process may mount (root, as CI), else
    its write bits taken away (which binds everyone but root)."""
    view = tmp_path / "view"
    view.mkdir()
    mounted = os.geteuid() == 0 and not subprocess.run(["mount", "--bind", str(out), str(view)],
                                                      capture_output=True).returncode
    if mounted and subprocess.run(["mount", "-o", "remount,bind,ro", str(view)], capture_output=True).returncode:
        subprocess.run(["umount", str(view)])
        mounted = False
    if not mounted:
        if os.geteuid() == 0:
            pytest.skip("root, but no read-only bind mount here: write bits do not bind root")
        view.rmdir()
        view = out
        for root, dirs, files in os.walk(out):
            for name in dirs + files + [""]:
                os.chmod(os.path.join(root, name), 0o555 if os.path.isdir(os.path.join(root, name)) else 0o444)
    try:
        yield view
    finally:
        if mounted:
            subprocess.run(["umount", str(view)])
        else:
            for root, dirs, files in os.walk(out):
                os.chmod(root, 0o755)


def test_a_finished_run_in_a_read_only_directory_prints_its_table(read_only, capsys):
    before = snapshot(read_only)
    rpo.main([*FLAGS, "--out", str(read_only)])
    captured = capsys.readouterr()
    assert "| 1 |" in captured.out and "Traceback" not in captured.err
    assert snapshot(read_only) == before


def test_an_unfinished_run_in_a_read_only_directory_is_one_line(read_only):
    with pytest.raises(SystemExit, match=rf"{read_only}: cannot be written \(.+\) and the run is not finished \(iter "
                                         r"2: sample is still to do\); copy the directory to a place that can be "
                                         "written and give that as --out"):
        rpo.main([*FLAGS, "--iterations", "2", "--out", str(read_only)])


# --- sdpo.py and the rpo.py run its pairs came from ------------------------------------------------------------------

def test_sdpo_follows_no_path_from_a_config_it_finds(tmp_path, capsys):
    found = tmp_path / "someone" / "config.json"
    (tmp_path / "someone" / "iter_1").mkdir(parents=True)
    found.write_text(json.dumps({"script": "rpo.py", "task": "gsm8k", "train_file": "/etc/passwd",
                                 "test_file": "/etc/passwd", "seed": 0}))
    pairs = write_pairs(tmp_path / "someone" / "iter_1" / "pairs.jsonl", 24)
    rows = sdpo.main(["--model", "tiny-random", "--steps", "1", "--heldout", "4", "--max-steps", "1", "--data", pairs,
                      "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert (f"sdpo.py: {found}, found beside --data, names the files of its task (/etc/passwd, /etc/passwd); a path "
            f"is followed only from a file you name: give --task-config {found} to measure task accuracy on its test "
            "split. Going on without it") in err
    assert "passwd:1" not in err and rows is None or all("accuracy" not in r["eval"] for r in rows)


def test_sdpo_reads_the_m0_evaluation_of_an_rpo_run_only_as_that_run_wrote_it(full_run, tmp_path, capsys):
    rpo_run = tmp_path / "rpo"
    shutil.copytree(full_run[0], rpo_run)
    m0 = read(str(rpo_run / "iter_0" / "eval.json"))
    (rpo_run / "iter_0" / "eval.json").write_text(json.dumps({**m0, "accuracy": 0.99}, indent=1) + "\n")
    cfg = sdpo.Config(data=[str(rpo_run / "iter_1" / "pairs.jsonl")], model="tiny-random", steps=1, heldout=4,
                      max_steps=1, out=str(tmp_path / "run"))
    rows = sdpo.run(cfg)
    err = capsys.readouterr().err
    assert f"sdpo.py: task accuracy on the test split of the rpo.py run in {rpo_run} (arith, 4 questions)" in err
    assert re.search(rf"{rpo_run / 'iter_0' / 'eval.json'}: \d+ bytes where \d+ were written: M_0 is evaluated here "
                     "instead", err), err[-2000:]
    assert rows[0]["eval"]["accuracy"] == m0["accuracy"]  # measured again, greedy: what the rpo.py run measured


# --- input as bad luck writes it -----------------------------------------------------------------------------------

def test_a_runaway_line_is_dropped_without_being_tokenised_whole(tmp_path, capsys, monkeypatch):
    path = tmp_path / "train.jsonl"
    lines = [json.dumps({"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"})
             for i in range(5)]
    lines.insert(2, json.dumps({"question": "Add these. " + "1 + " * 5_000_000 + "1?", "answer": "#### 5000001"}))
    path.write_text("\n".join(lines) + "\n")  # a 20 MB line
    examples = data.load_examples("gsm8k", str(path))
    policy = models.load_model(tiny_config(tmp_path / "run"))
    seen, real = [], type(policy.tokenizer).__call__

    def tokenise(self, text, *args, **kwargs):
        seen.append(len(text) if isinstance(text, str) else max(map(len, text)))
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(type(policy.tokenizer), "__call__", tokenise)
    kept = sampling.fitting(policy, tiny_config(tmp_path / "run"), examples, [], "training")
    assert len(kept) == 5 and max(seen) < 10_000
    assert "1 of 6 training questions dropped: their prompt is longer than --max-length 512 tokens" in (
        capsys.readouterr().err)
    runaway = {"prompt": "Say it.", "chosen": "x " * 10_000_000, "rejected": "y"}
    assert training.encode_pair(policy.tokenizer, runaway, 512) is None and max(seen) < 10_000


def test_a_byte_order_mark_is_read(tmp_path):
    bom = b"\xef\xbb\xbf"
    train = tmp_path / "train.jsonl"
    train.write_bytes(bom + json.dumps({"question": "1 + 1?", "answer": "1 + 1 = 2\n#### 2"}).encode() + b"\r\n")
    assert data.load_examples("gsm8k", str(train))[0]["answer"] == "2"
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_bytes(bom + b'{"prompt": "p", "chosen": "c", "rejected": "r"}\n')
    assert data.load_preferences(str(pairs))[0]["chosen"] == "c"
    config = tmp_path / "config.json"
    config.write_bytes(bom + b'{"lr": 0.002}')
    from machinery.cli import parse_config
    assert parse_config(rpo.Config, ["--config", str(config)]).lr == 0.002


def test_a_bad_byte_is_still_named_by_its_line_and_column_after_a_byte_order_mark(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"question": "ok", "answer": "#### 1"}\n'
                     b'{"question": "caf\xe9", "answer": "#### 1"}\n')
    with pytest.raises(data.DataError, match=r"train\.jsonl:2: not UTF-8 text \(byte 0xe9 at column 18\)"):
        data.load_examples("gsm8k", str(path))


# --- a metric that reported rounding noise ---------------------------------------------------------------------------

def test_accuracies_count_a_tie_as_a_tie():
    import torch

    margins = torch.tensor([0.3, -0.2, 0.0, 1e-9])
    assert training.accuracies(margins, False).tolist() == [1.0, 0.0, 0.5, 1.0]
    assert training.accuracies(margins, True).tolist() == [0.5] * 4  # the policy is its reference: all ties


def test_the_first_step_is_a_tie_whatever_the_sign_of_the_rounding(tmp_path, monkeypatch):
    """Reference log-probs off by 1e-3 one way or the other (what another CPU's kernels or another batch shape give):
    the first step's accuracy is 0.5 both ways, where the sign of the noise used to decide between 0 and 1."""
    real, first = training.reference_logps, {}
    for sign in (1, -1):
        def shifted(*args, sign=sign, **kwargs):
            return [{**r, "chosen": r["chosen"] + sign * 1e-3} for r in real(*args, **kwargs)]

        monkeypatch.setattr(training, "reference_logps", shifted)
        rpo.run(tiny_config(tmp_path / str(sign), iterations=1, eval_k=0))
        steps = [r for r in read(str(tmp_path / str(sign) / "metrics.jsonl")) if r.get("step") == 1]
        first[sign] = steps[0]["rewards/accuracies"]
    assert first == {1: 0.5, -1: 0.5}


def test_a_policy_with_dropout_is_not_its_reference():
    import torch

    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.1)).train()
    assert not training.is_reference(net, 0)
    assert training.is_reference(net.eval(), 0) and not training.is_reference(net.eval(), 1)


@pytest.mark.parametrize("text", ["[]", '{"logged": "many", "tables": []}', '{"logged": 0, "tables": [], '
                                  '"wandb_id": "../../x"}', "{cut"])
def test_a_damaged_trackers_file_is_one_line_and_the_trackers_start_over(tmp_path, capsys, text):
    from machinery import trackers

    (tmp_path / "trackers.json").write_text(text)
    state = trackers.Trackers(["none"], str(tmp_path), {"script": "rpo.py"}).state
    assert state == {"logged": 0, "tables": []}
    assert f"{tmp_path / 'trackers.json'}: damaged; the trackers log the run anew" in capsys.readouterr().err
