"""rpo.py on a tiny random Llama: the whole Iterative RPO loop, resume after any stage, loss ablations on the same
pairs, the pairing walk, the command line."""
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import replace

import pytest
from conftest import DATA, FLAGS, ROOT, assert_same_files, kill_and_resume_script, snapshot, tiny_config

import data
import model as models
import reward
import rpo
import training
from machinery import cli
from machinery.files import read


def test_whole_loop_two_iterations(full_run):
    out, rows = full_run
    assert [r["t"] for r in rows] == [0, 1, 2]
    for t in (1, 2):
        folder = out / f"iter_{t}"
        for name in ("samples.jsonl", "pairs.jsonl", "reference.jsonl", "train_log.jsonl", "eval.json", "stats.json"):
            assert (folder / name).is_file(), name
        assert (folder / "adapter" / "adapter_config.json").is_file()
        samples = read(str(folder / "samples.jsonl"))
        assert len(samples) == 6 * 4 and {s["reward"] for s in samples} <= {0, 1}
        pairs = read(str(folder / "pairs.jsonl"))
        assert rows[t]["stats"]["pairs"] == len(pairs) > 0
        assert all(p["chosen"] != p["rejected"] for p in pairs)
    metrics = read(str(out / "metrics.jsonl"))
    steps = [m for m in metrics if "step" in m]
    assert steps and all(name in steps[0] for name in training.METRICS)
    assert [m["stage"] for m in metrics if "stage" in m] == ["eval", "stats", "eval", "stats", "eval"]
    assert not [p for p in snapshot(out) if p.endswith(".tmp")]


def test_samples_from_reuses_m0_eval_and_samples_for_a_loss_ablation(full_run, tmp_path):
    source, _ = full_run
    out = tmp_path / "dpo"
    rpo.run(tiny_config(out, iterations=1, alpha=0.0, samples_from=str(source)))
    for name in ("iter_0/eval.json", "iter_1/samples.jsonl", "iter_1/pairs.jsonl", "iter_1/reference.jsonl"):
        assert (out / name).read_bytes() == (source / name).read_bytes(), name
    ours, theirs = ([r for r in read(str(d / "iter_1" / "train_log.jsonl")) if "loss" in r] for d in (out, source))
    assert [r["loss/nll"] for r in ours] != [r["loss/nll"] for r in theirs]  # α changed the training only
    assert ours[0]["loss"] == pytest.approx(math.log(2))  # α = 0: plain DPO, log 2 at step 1
    with pytest.raises(SystemExit, match="differs in seed"):
        rpo.run(tiny_config(tmp_path / "other", seed=1, samples_from=str(source)))


@pytest.mark.parametrize("cut", ["iter_1/samples.jsonl", "iter_1/reference.jsonl", "iter_1/adapter",
                                 "iter_1/eval.json", "iter_2/pairs.jsonl", "iter_2/eval.json"])
def test_resume_after_any_stage_gives_the_same_files(full_run, tmp_path, cut):
    out, _ = full_run
    order = ["iter_0/eval.json"] + [f"iter_{t}/{name}" for t in (1, 2) for name in (
        "samples.jsonl", "stats.json", "pairs.jsonl", "reference.jsonl", "adapter", "train_log.jsonl", "eval.json")]
    stopped = tmp_path / "run"
    shutil.copytree(out, stopped)
    for name in order[order.index(cut) + 1:]:  # a stop right after `cut`: later stages never happened
        path = stopped / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    with open(stopped / "metrics.jsonl", "a") as f:  # what a stopped training stage had logged already
        f.write(json.dumps({"iteration": 9, "step": 1, "loss": 1.0}) + "\n")
    rpo.run(tiny_config(stopped))
    assert snapshot(stopped) == snapshot(out)


def test_mismatched_config_is_refused(full_run):
    out, _ = full_run
    with pytest.raises(SystemExit, match=r"config\.json: this run directory holds a run with another config "
                                         r"\(lr \(0\.001 there, 0\.002 here\)\)"):
        rpo.run(tiny_config(out, lr=2e-3))


def test_non_empty_directory_without_config_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="not empty"):
        rpo.run(tiny_config(tmp_path))


def test_make_pairs_walks_with_wrap_around():
    assert rpo.make_pairs(["w1", "w2"], ["l1", "l2", "l3"], 4) == [("w1", "l1"), ("w2", "l2"), ("w1", "l3"),
                                                                 ("w2", "l1")]
    pairs = rpo.make_pairs(["w1", "w2"], ["l1", "l2"], 10)
    assert sorted(pairs) == [("w1", "l1"), ("w1", "l2"), ("w2", "l1"), ("w2", "l2")]  # all 4, none twice
    assert rpo.make_pairs([], ["l1"], 3) == [] and rpo.make_pairs(["w1"], [], 3) == []
    assert rpo.make_pairs(["w"], ["l1", "l2", "l3"], 2) == [("w", "l1"), ("w", "l2")]


def test_pair_up_drops_too_long_and_caps(tmp_path):
    cfg = tiny_config(tmp_path, pairs_per_question=3, max_length=200, max_pairs=2)
    _, tokenizer = models.tiny_random()
    examples = [{"id": "a", "task": "arith", "question": "q", "answer": "7", "solution": None},
                {"id": "b", "task": "arith", "question": "q", "answer": "7", "solution": None}]
    samples = [{"id": "a", "prompt": "P", "completion": c, "reward": r}
               for c, r in [("Final answer: 7", 1), ("8", 0), ("9", 0), ("x" * 300, 0)]]
    samples += [{"id": "b", "prompt": "P", "completion": "7", "reward": 1}]  # no loser: no pairs
    stats, pairs = rpo.pair_up(tokenizer, cfg, samples, examples, 1)
    assert stats["dropped_too_long"] == 1 and stats["pairs"] == len(pairs) == 2
    assert stats["questions_with_pairs"] == 1 and stats["train_accuracy"] == pytest.approx(2 / 5)


def test_samples_are_rewarded_by_the_one_reward_function(full_run):
    import data

    out, _ = full_run
    cfg = tiny_config(out)
    gold = {ex["id"]: ex["answer"] for ex in data.load_task(cfg, cfg.seed, cfg.heldout_questions)[0]}
    for s in read(str(out / "iter_1" / "samples.jsonl")):
        assert (s["extracted"], s["reward"]) == reward.judge(s["completion"], gold[s["id"]], "arith", None,
                                                           s["truncated"])
    for r in read(str(out / "iter_1" / "eval.json"))["results"]:
        assert (r["extracted"], r["correct"]) == reward.judge(r["completion"], r["gold"], "arith", None, r["truncated"])


def test_cli_help_lists_paper_values_once_per_flag(capsys):
    with pytest.raises(SystemExit):
        rpo.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--iterations", "--samples-per-question", "--pairs-per-question", "--alpha", "--beta", "--model",
                 "--task", "--out", "--max-new-tokens", "--lora-r", "--lora-targets", "--seed", "--config",
                 "--load-in-4bit", "--preset"):
        assert flag in text
    assert "--max_new_tokens" not in text and "(default: )" not in text
    assert "[30 / 30 / 20]" in text and "[0.1]" in text


def test_config_file_presets_flags_and_old_names(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"beta": 0.5, "samples": 3}))  # a field's old name is still read
    cfg = cli.parse_config(rpo.Config, ["--config", str(path), "--samples", "5", "--preset", "gsm8k-7b"],
                              rpo.PRESETS)
    assert (cfg.beta, cfg.samples_per_question, cfg.task, cfg.pairs_per_question) == (0.5, 5, "gsm8k", 10)
    cfg = cli.parse_config(rpo.Config, ["--pairs", "3", "--max_new_tokens", "7", "--load-in-4bit", "--add-gold",
                                           "--temperatures", "0.5", "1"])
    assert (cfg.pairs_per_question, cfg.max_new_tokens, cfg.load_in_4bit, cfg.add_gold) == (3, 7, True, True)
    assert cfg.temperatures == [0.5, 1.0]
    cfg = cli.parse_config(rpo.Config, ["--no-load-in-4bit", "--no-add-gold", "--no-gradient-checkpointing"],
                              rpo.PRESETS)
    assert (cfg.load_in_4bit, cfg.add_gold, cfg.gradient_checkpointing) == (False, False, False)
    assert cli.parse_config(rpo.Config, []).load_in_4bit is None
    path.write_text(json.dumps({"betta": 0.5}))
    with pytest.raises(SystemExit, match="unknown field"):
        cli.parse_config(rpo.Config, ["--config", str(path)])


def test_file_task_without_files_is_one_clear_line(tmp_path):
    with pytest.raises(SystemExit, match="--task gsm8k needs --train-file and --test-file"):
        rpo.main(["--model", "tiny-random", "--task", "gsm8k", "--out", str(tmp_path / "r")])


def test_readme_test_command_is_what_ci_runs():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    readme = open(os.path.join(root, "README.md")).read()
    ci = open(os.path.join(root, ".ci", "run")).read()
    command = "pip install \".[test]\" && python -m pytest"
    assert command in readme and command.replace("pip install", "pip install -q") in ci


def test_neither_algorithm_file_imports_the_other():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name, other in (("rpo.py", "sdpo"), ("sdpo.py", "rpo")):
        lines = open(os.path.join(root, name)).read().splitlines()
        assert not [s for s in lines if s.startswith(("import ", "from ")) and other in s.split()], name


def test_unknown_flag_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as stop:
        rpo.main(["--sampels", "3"])
    assert stop.value.code == 2 and "unrecognized arguments: --sampels" in capsys.readouterr().err


def test_cut_off_samples_are_never_winners_and_get_no_eos(full_run):
    """The tiny random model rarely ends within 12 tokens: its cut-off samples are recorded, rewarded 0, paired
    only as losers, counted in the stats, and scored in training without an EOS the model never wrote."""
    out, _ = full_run
    samples = read(str(out / "iter_1" / "samples.jsonl"))
    cut = [s for s in samples if s["truncated"]]
    assert cut and all(s["reward"] == 0 for s in cut)
    stats, pairs = read(str(out / "iter_1" / "stats.json")), read(str(out / "iter_1" / "pairs.jsonl"))
    assert stats["truncated"] == len(cut) and stats["samples"] == len(samples)
    texts = {s["completion"] for s in cut}
    assert not [p for p in pairs if p["chosen"] in texts]
    losers = [p for p in pairs if p["rejected_truncated"]]
    assert losers and all(p["rejected"] in texts for p in losers)
    _, tokenizer = models.tiny_random()
    _, chosen, rejected = training.encode_pair(tokenizer, losers[0], 512)
    assert chosen[-1] == tokenizer.eos_token_id and tokenizer.eos_token_id not in rejected
    evaluation = read(str(out / "iter_1" / "eval.json"))
    assert evaluation["truncated"] == sum(r["truncated"] for r in evaluation["results"])


def test_star_trains_on_every_correct_sample_once(full_run, tmp_path):
    source, _ = full_run
    out = tmp_path / "sft"
    rpo.run(tiny_config(out, iterations=1, sft=True, samples_from=str(source)))
    samples, pairs = read(str(out / "iter_1" / "samples.jsonl")), read(str(out / "iter_1" / "pairs.jsonl"))
    right = [s["completion"] for s in samples if s["reward"]]
    golds = 6  # --add-gold: each of the 6 questions' gold solution is a correct sample too
    assert len(pairs) == len(right) + golds and all(p["rejected"] == "" for p in pairs)
    assert sorted(p["chosen"] for p in pairs if p["chosen"] in right) == sorted(right)
    log = [r for r in read(str(out / "iter_1" / "train_log.jsonl")) if "loss" in r]
    assert log and all(r["loss"] == pytest.approx(r["loss/nll"]) for r in log)  # the NLL term alone


def test_whole_loop_on_the_published_gsm8k(tmp_path):
    """A few real GSM8K training questions with the gold solution among the winners, the paper's zero-shot
    prompt, pairs, one training step, evaluation on real test questions."""
    import data

    train, test = (os.path.join(DATA, "gsm8k", name) for name in ("train.jsonl", "test.jsonl"))
    if not os.path.exists(train):
        pytest.skip(f"{train} is absent: the published data sets sit in ../shared/data beside the project")
    rows = rpo.run(tiny_config(tmp_path / "run", task="gsm8k", train_file=train, test_file=test, n_train=3,
                               n_test=2, iterations=1, max_steps=1, max_length=2048))
    pairs = read(str(tmp_path / "run" / "iter_1" / "pairs.jsonl"))
    first = data.load_examples("gsm8k", train)[0]
    assert pairs[0]["prompt"][0]["content"] == data.build_prompt(first)  # the paper's prompt, as a chat message
    assert pairs[0]["prompt"][0]["content"].startswith(data.GSM8K_INSTRUCTION)
    gold = [p for p in pairs if p["chosen"] == data.gold_solution(first)]
    assert gold and gold[0]["chosen"].endswith(f"\nFinal answer: {first['answer']}") and "<<" not in gold[0]["chosen"]
    assert len([r for r in read(str(tmp_path / "run" / "iter_1" / "train_log.jsonl")) if "loss" in r]) == 1
    assert [r["t"] for r in rows] == [0, 1] and read(str(tmp_path / "run" / "iter_1" / "eval.json"))["n"] == 2
    evaluation = read(str(tmp_path / "run" / "iter_1" / "eval.json"))  # both GSM8K scores lm-eval readers know
    assert evaluation["strict-match"] == evaluation["accuracy"]
    assert evaluation["flexible-extract"] == sum(reward.lm_eval_exact_match(reward.flexible_extract(r["completion"]),
                                                                          r["gold"]) for r in evaluation["results"]) / 2


def test_heldout_questions_pick_the_checkpoint_and_are_never_sampled(full_run):
    out, rows = full_run
    cfg = tiny_config(out)
    train_set, _, _, heldout = data.load_task(cfg, cfg.seed, cfg.heldout_questions)
    assert len(heldout) == cfg.heldout_questions and len(train_set) == cfg.n_train
    assert not {ex["id"] for ex in heldout} & {s["id"] for s in read(str(out / "iter_1" / "samples.jsonl"))}
    for t in (1, 2):
        log = read(str(out / f"iter_{t}" / "train_log.jsonl"))
        checks = [r for r in log if "heldout/accuracy" in r and "step" in r]
        steps = max(r["step"] for r in log if "loss" in r)
        assert [r["step"] for r in checks] == [round(steps / 2), steps]  # --checkpoints 2
        best = max(checks[::-1], key=lambda r: r["heldout/accuracy"])  # ties go to the later checkpoint
        assert log[-1] == {"iteration": t, "selected_step": best["step"], "heldout/accuracy": best["heldout/accuracy"]}
        assert rows[t]["checkpoint"] == log[-1]


def test_math_verify_grader_asked_but_not_installed_is_one_line(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "math_verify" else real(name, *a))
    with pytest.raises(SystemExit, match="--math-grader math-verify needs the package: pip install math-verify"):
        rpo.main(["--model", "tiny-random", "--math-grader", "math-verify", "--out", str(tmp_path / "r")])


# Bad input: one line naming the value (and the file and line where there is one) and what is valid, a non-zero
# exit, before any work, and nothing written.
def _parquet_that_is_not(tmp_path):
    (tmp_path / "bad.parquet").write_text("not parquet")
    return str(tmp_path / "bad.parquet")


def _config_file(tmp_path):
    (tmp_path / "c.json").write_text('{\n  "model": "tiny-random",\n  "samples": "8"\n}\n')
    return str(tmp_path / "c.json")


MISTAKES = [  # (flags, exit code, the message)
    (["--samples", "0"], 2, r"--samples-per-question 0: takes an integer ≥ 1"),
    (["--pairs", "0"], 2, r"--pairs-per-question 0: takes an integer ≥ 1"),
    (["--pairs", "-1"], 2, r"--pairs-per-question -1: takes an integer ≥ 1"),
    (["--beta", "0"], 2, r"--beta 0\.0: takes a finite number > 0"),
    (["--beta", "-1"], 2, r"--beta -1\.0: takes a finite number > 0"),
    (["--temperatures", "0.8", "-1"], 2,
     r"--temperatures 0\.8 -1\.0: takes a list of at least 1, each a finite number > 0"),
    (["--task", "sums"], 2, r"invalid choice: 'sums'"),
    (["--arith-test-every", "1"], 2, r"--arith-test-every 1: takes an integer ≥ 2"),
    (["--arith-ops", "/"], 1, r"--arith-ops '/': takes one or more of '\+-\*'"),
    (["--n-train", "120"], 1, r"--n-train 120 \(\+ 10 held out\) / --n-test 120: only 87 distinct train problems"),
    (["--train-file", "gsm8k.jsonl"], 1, r"the arith task is built in and reads no files"),
    (["--model", "./no-such-folder"], 1, r"--model \./no-such-folder: no such folder, nor a model id"),
    (["--config", _config_file], 1, r'c\.json:3: "samples": "8" — samples_per_question takes an integer ≥ 1'),
    (["--task", "gsm8k", "--train-file", _parquet_that_is_not, "--test-file", _parquet_that_is_not], 1,
     r"bad\.parquet: not a readable Parquet file"),
    (["--task", "gsm8k", "--train-file", "typo.jsonl", "--test-file", "typo.jsonl"], 1, r"typo\.jsonl: no such file"),
]


@pytest.mark.parametrize("flags, code, message", MISTAKES, ids=[f"{i}{m[0][0]}" for i, m in enumerate(MISTAKES)])
def test_every_mistake_is_one_line_before_any_work(tmp_path, capsys, flags, code, message):
    if "--model" not in flags and "--config" not in flags:
        flags = ["--model", "tiny-random"] + flags
    flags = [f(tmp_path) if callable(f) else f for f in flags]
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        rpo.main(flags + ["--out", str(out)])
    err = capsys.readouterr().err + (stop.value.code if isinstance(stop.value.code, str) else "")
    code_seen = 1 if isinstance(stop.value.code, str) else stop.value.code
    assert code_seen == code and len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err
    assert not out.exists()


def test_a_model_id_neither_cached_nor_reachable_is_named(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(data.DataError, match=r"--model smollm2-136m: not a built-in name, a folder, nor in the "
                                             r"Hugging Face cache \(and HF_HUB_OFFLINE is set\)"):
        models.check_model("smollm2-136m")


def test_a_start_that_failed_leaves_nothing_and_an_old_failed_config_does_not_block(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SystemExit):
        rpo.main(["--model", "tiny-random", "--task", "gsm8k", "--train-file", "typo.jsonl", "--test-file", "t.jsonl",
                  "--out", str(out)])
    assert not out.exists()
    out.mkdir()  # what an older version left: the config of a start that failed before any stage finished
    (out / "config.json").write_text(json.dumps({"script": "rpo.py", "task": "gsm8k", "train_file": "typo.jsonl"}))
    cfg = tiny_config(out, iterations=0, eval_k=0)
    rpo.run(cfg)
    assert read(str(out / "config.json"))["train_file"] == "" and (out / "iter_0" / "eval.json").is_file()


def test_a_finished_run_continues_with_more_iterations(full_run, tmp_path):
    out, _ = full_run
    rpo.run(tiny_config(tmp_path / "run", iterations=1))
    rpo.run(tiny_config(tmp_path / "run", iterations=2))  # the same run directory, one iteration more
    assert snapshot(tmp_path / "run") == snapshot(out)


def test_the_gold_solution_is_paired_even_when_the_model_is_often_right(tmp_path):
    """12 right and 18 wrong samples, K = 10: the gold is the first winner of the walk, so it is paired."""
    cfg = tiny_config(tmp_path, pairs_per_question=10, add_gold=True)
    _, tokenizer = models.tiny_random()
    example = {"id": "q", "task": "arith", "question": "3 + 4?", "answer": "7", "solution": "3 + 4 = 7."}
    samples = [{"id": "q", "prompt": "P", "completion": f"Try {i}: 3 + 4 = 7.\nFinal answer: 7", "reward": 1}
               for i in range(12)] + [{"id": "q", "prompt": "P", "completion": f"It is {i}", "reward": 0}
                                      for i in range(18)]
    _, pairs = rpo.pair_up(tokenizer, cfg, samples, [example], 1)
    chosen = [p["chosen"] for p in pairs]
    assert len(pairs) == 10 and chosen.count(data.gold_solution(example)) == 1
    _, pairs = rpo.pair_up(tokenizer, replace(cfg, add_gold=False), samples, [example], 1)
    assert data.gold_solution(example) not in [p["chosen"] for p in pairs]


def test_each_iteration_samples_at_its_temperature(full_run):
    out, _ = full_run
    cfg = tiny_config(out)
    for t, want in ((1, 0.8), (2, 1.3)):  # tiny_config's schedule: 0.8, then 1.3
        assert {s["temperature"] for s in read(str(out / f"iter_{t}" / "samples.jsonl"))} == {want}
        assert rpo.sampling_temperature(cfg, t) == want
    assert [rpo.sampling_temperature(rpo.Config(), t) for t in range(1, 6)] == [0.8, 0.8, 1.3, 1.3, 1.3]
    for preset, want in (("gsm8k-7b", [0.8, 0.8, 1.3, 1.3]), ("arc-7b", [0.8, 0.8, 1.3]), ("math-7b", [0.8, 0.8, 1.0])):
        cfg = cli.parse_config(rpo.Config, ["--preset", preset], rpo.PRESETS)
        assert [rpo.sampling_temperature(cfg, t) for t in range(1, cfg.iterations + 1)] == want, preset


# --- a run that fits, and survives a crash ------------------------------------------------------------------------

@pytest.mark.parametrize("stage, after, resumed", [
    ("samples", 2, "iter 1: sample (T=0.8): 16 of 24 rows sampled before, 8 to go"),  # 2 of 3 batches of 8 kept
    ("train", 3, "train M_1: going on after step 3 of 6"),  # killed as it saved step 3, before its held-out check
])
def test_a_run_killed_and_started_again_ends_with_the_files_of_one_never_stopped(unbroken, tmp_path, stage, after,
                                                                                 resumed):
    out = tmp_path / "run"
    script = kill_and_resume_script(tmp_path, ROOT)
    killed = subprocess.run([sys.executable, str(script), stage, str(after), *FLAGS, "--out", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (out / "iter_1" / ("samples.jsonl" if stage == "samples" else "train_log.jsonl")).exists()
    again = subprocess.run([sys.executable, "rpo.py", *FLAGS, "--out", str(out)], cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert resumed in again.stderr  # what was finished is not computed again
    assert snapshot(out) == snapshot(unbroken)


def test_out_of_memory_halves_the_rows_and_the_run_ends_with_the_same_files(full_run, tmp_path, monkeypatch, capsys):
    """A forward of more than 3 rows raises the error CUDA raises: every stage goes on with fewer rows."""
    import functools

    import torch
    from transformers import LlamaForCausalLM

    real = LlamaForCausalLM.forward

    @functools.wraps(real)
    def forward(self, *args, **kwargs):
        if kwargs["input_ids"].shape[0] > 3:
            raise torch.OutOfMemoryError("CUDA out of memory (a test)")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(LlamaForCausalLM, "forward", forward)
    rpo.run(tiny_config(tmp_path / "run"))
    err = capsys.readouterr().err
    for line in ("iter 0: eval greedy: out of memory at 4 rows at once; going on with 2",
                 "iter 1: sample (T=0.8): out of memory at 8 rows at once; going on with 4",
                 "iter 1: sample (T=0.8): out of memory at 4 rows at once; going on with 2",
                 "iter 1: reference: out of memory at 2 pairs at once; going on with 1",
                 "train: out of memory; the step again at 1 pairs a forward pass"):
        assert line in err, line
    assert_same_files(tmp_path / "run", full_run[0])


def test_samples_do_not_depend_on_the_rows_sampled_together(tmp_path):
    for rows in (4, 64):
        rpo.run(tiny_config(tmp_path / str(rows), iterations=1, sample_batch_size=rows))
    for name in ("iter_0/eval.json", "iter_1/samples.jsonl"):
        assert (tmp_path / "4" / name).read_bytes() == (tmp_path / "64" / name).read_bytes(), name


def test_a_run_resumes_with_other_speed_settings(full_run, tmp_path):
    """The sample batch and the memory budget change no sample: a stopped run may go on with other values."""
    stopped = tmp_path / "run"
    shutil.copytree(full_run[0], stopped)
    shutil.rmtree(stopped / "iter_2")
    rpo.run(tiny_config(stopped, sample_batch_size=3, memory_budget=4.0))
    assert read(str(stopped / "config.json"))["sample_batch_size"] == 3
    sampled = (stopped / "iter_2" / "samples.jsonl").read_bytes()
    assert sampled == (full_run[0] / "iter_2" / "samples.jsonl").read_bytes()


def test_an_evaluation_only_run_needs_no_training_file(tmp_path):
    test = os.path.join(DATA, "gsm8k", "test.jsonl")
    if not os.path.exists(test):
        pytest.skip(f"{test} is absent: the published data sets sit in ../shared/data beside the project")
    rows = rpo.run(tiny_config(tmp_path / "run", task="gsm8k", test_file=test, n_test=2, iterations=0))
    assert [r["t"] for r in rows] == [0] and read(str(tmp_path / "run" / "iter_0" / "eval.json"))["n"] == 2
    with pytest.raises(SystemExit, match="--task gsm8k needs --train-file and --test-file"):
        rpo.main(["--model", "tiny-random", "--task", "gsm8k", "--test-file", test, "--out", str(tmp_path / "r")])


@pytest.mark.parametrize("sent, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_stopped_run_says_so_in_one_line_and_the_same_command_resumes_it(unbroken, tmp_path, sent, code):
    """SIGTERM (a scheduler's or a container's stop) and Ctrl-C end a run with one line, the signal's exit code and
    what was finished kept; the same command then ends with the files of a run never stopped."""
    import time

    out = tmp_path / "run"
    # Ctrl-C's default back: a test run in the background of a non-interactive shell inherits SIGINT ignored.
    running = subprocess.Popen([sys.executable, "rpo.py", *FLAGS, "--out", str(out)], cwd=ROOT,
                               stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 240
    while not (out / "iter_0" / "eval.json").exists() and running.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    running.send_signal(sent)
    err = running.communicate(timeout=120)[1]
    assert running.returncode == code, err[-2000:]
    assert err.rstrip().splitlines()[-1] == "rpo.py: stopped; the same command resumes the run"
    assert "Traceback" not in err
    again = subprocess.run([sys.executable, "rpo.py", *FLAGS, "--out", str(out)], cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert snapshot(out) == snapshot(unbroken)


def test_leftovers_of_a_finished_stage_are_removed_when_it_is_read_back(unbroken, tmp_path):
    """Stopped between writing a stage's file and removing its parts: the next run removes them."""
    out = tmp_path / "run"
    shutil.copytree(unbroken, out)
    (out / "iter_1" / "train_log.jsonl.parts" / "state").mkdir(parents=True)
    (out / "iter_1" / "train_log.jsonl.parts" / "part-000-000001.jsonl").write_text("{}\n")
    done = subprocess.run([sys.executable, "rpo.py", *FLAGS, "--out", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert snapshot(out) == snapshot(unbroken)


@pytest.mark.parametrize("flags, says", [
    (["--iteration", "3"], "unrecognized arguments: --iteration 3"),  # an abbreviation is no other flag
    (["--lr", "inf"], "--lr inf: takes a finite number > 0"),
])
def test_a_typo_or_a_number_that_is_not_finite_is_one_line(tmp_path, capsys, flags, says):
    with pytest.raises(SystemExit) as stop:
        rpo.main(["--model", "tiny-random", *flags, "--out", str(tmp_path / "run")])
    assert stop.value.code == 2 and says in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_an_out_that_cannot_be_a_directory_is_one_line_before_any_work(tmp_path):
    (tmp_path / "file").write_text("x")
    for out, says in ((tmp_path / "file", "a file, not a directory"),
                      (tmp_path / "file" / "run", "is a file, so no directory can be made there")):
        with pytest.raises(SystemExit, match=f"--out {out}: .*{says}"):
            rpo.run(tiny_config(out))
    assert (tmp_path / "file").read_text() == "x"


def test_a_damaged_config_is_one_line(unbroken, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(unbroken, out)
    text = (out / "config.json").read_text()
    (out / "config.json").write_text(text[:len(text) // 2])  # cut short, as a full disk or a copy leaves it
    done = subprocess.run([sys.executable, "rpo.py", *FLAGS, "--out", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"{out / 'config.json'}: damaged")
