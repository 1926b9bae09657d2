"""sdpo.py on a tiny random Llama: two steps end to end, the moving reference, --steps 1 = DPO, splits, resume."""
import json
import shutil

import pytest
import torch
from conftest import sdpo_config as config, snapshot, write_pairs

import data
import model as models
import sdpo
import training
from machinery.files import read, seed_everything
from machinery.resume import Stage


def logps_under(cfg, adapter, pairs):
    policy = models.load_model(cfg)
    if adapter:
        policy.load(adapter)
    return training.reference_logps(policy, pairs, cfg, Stage("check"))


def test_two_steps_end_to_end(two_steps):
    cfg, rows = two_steps
    assert [r["t"] for r in rows] == [0, 1, 2] and [r["stats"].get("pairs") for r in rows] == [None, 10, 10]
    metrics = read(f"{cfg.out}/metrics.jsonl")
    assert [m["stage"] for m in metrics if "stage" in m] == ["eval", "stats", "eval", "stats", "eval"]
    # training moved the held-out margin
    assert rows[2]["eval"]["heldout/gamma_mean"] > rows[0]["eval"]["heldout/gamma_mean"]


def test_step_2_reference_is_the_step_1_model_not_the_base(two_steps):
    cfg, _ = two_steps
    chunk = read(f"{cfg.out}/step_2/pairs.jsonl")
    stored = read(f"{cfg.out}/step_2/reference.jsonl")
    under_m1 = logps_under(cfg, f"{cfg.out}/step_1/adapter", chunk)
    under_m0 = logps_under(cfg, None, chunk)
    for s, m1, m0 in zip(stored, under_m1, under_m0):
        assert s["chosen"] == pytest.approx(m1["chosen"], abs=1e-4)
        assert s["rejected"] == pytest.approx(m1["rejected"], abs=1e-4)
        assert abs(s["chosen"] - m0["chosen"]) > 1e-2  # the classic LoRA mistake would give these
    # The mean γ_ref of step 2 is the mean γ of M_1, so it is the step-1 model that sets the bar.
    stats = read(f"{cfg.out}/step_2/stats.json")
    assert stats["gamma_ref_mean"] == pytest.approx(sum(m["chosen"] - m["rejected"] for m in under_m1) / 10, abs=1e-3)


def test_one_step_is_plain_dpo_on_all_data(tmp_path):
    cfg = config(tmp_path, [write_pairs(tmp_path / "p.jsonl", 14)], steps=1)
    sdpo.run(cfg)
    chunk = read(f"{cfg.out}/step_1/pairs.jsonl")
    assert len(chunk) == 10
    policy = models.load_model(cfg)  # one DPO run over all the training pairs, by hand
    model = policy.model
    reference = training.reference_logps(policy, chunk, cfg, Stage("ref"))
    seed_everything(cfg.seed, 1, "train")
    training.train(policy, chunk, reference, cfg, Stage("train", t=1))
    from peft import load_peft_weights

    saved = load_peft_weights(f"{cfg.out}/step_1/adapter")
    mine = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(saved) == len(mine) > 0
    for name, value in saved.items():
        key = next(k for k in mine if k.replace(".default", "") == name)
        assert torch.allclose(mine[key], value, atol=1e-6), name


@pytest.mark.parametrize("mode, steps", [("random", 3), ("easy-to-hard", 3), ("given", 2), ("random", 1)])
def test_each_split_partitions_the_data(mode, steps):
    pairs = list(range(23))
    files = ["a"] * 9 + ["b"] * 14
    gammas = [((i * 7) % 23) - 11.0 for i in range(23)]
    chunks = sdpo.split_steps(pairs, files, mode, steps, gammas, seed=0)
    assert len(chunks) == steps and sorted(i for c in chunks for i in c) == list(range(23))
    assert max(map(len, chunks)) - min(map(len, chunks)) <= (14 - 9 if mode == "given" else 1)
    if mode == "easy-to-hard":
        assert max(gammas[i] for i in chunks[0]) <= min(gammas[i] for i in chunks[1])
    if mode == "given":
        assert chunks == [list(range(9)), list(range(9, 23))]


def test_given_split_steps_one_file_each(tmp_path):
    files = [write_pairs(tmp_path / "a.jsonl", 8), write_pairs(tmp_path / "b.jsonl", 8, offset=100)]
    cfg = config(tmp_path, files, split="given", heldout=2)
    rows = sdpo.run(cfg)
    assert sum(r["stats"].get("pairs", 0) for r in rows) == 14
    with pytest.raises(SystemExit, match="one file per step"):
        sdpo.run(config(tmp_path, files, split="given", steps=3, out=str(tmp_path / "other")))


@pytest.mark.parametrize("cut", ["step_0/eval.json", "step_1/reference.jsonl", "step_1/eval.json"])
def test_resume(two_steps, tmp_path, cut):
    cfg, _ = two_steps
    order = ["heldout.jsonl", "step_0/heldout_logps.jsonl", "step_0/eval.json"] + [
        f"step_{t}/{name}" for t in (1, 2) for name in (
            "pairs.jsonl", "reference.jsonl", "stats.json", "adapter", "train_log.jsonl", "heldout_logps.jsonl",
            "eval.json")]
    stopped = tmp_path / "run"
    shutil.copytree(cfg.out, stopped)
    for name in order[order.index(cut) + 1:]:
        path = stopped / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    sdpo.run(sdpo.Config(**{**cfg.__dict__, "out": str(stopped)}))
    assert snapshot(stopped) == snapshot(cfg.out)


def test_over_rpo_pairs_measures_task_accuracy(full_run, tmp_path):
    out, _ = full_run
    cfg = config(tmp_path, [str(out / "iter_1" / "pairs.jsonl"), str(out / "iter_2" / "pairs.jsonl")], heldout=4)
    rows = sdpo.run(cfg)
    assert all("accuracy" in r["eval"] and r["eval"]["test_n"] == 4 for r in rows)
    m0 = read(str(out / "iter_0" / "eval.json"))  # step 0 is M_0: the rpo.py run's own measurement
    assert rows[0]["eval"]["accuracy"] == m0["accuracy"] and rows[0]["eval"]["results"] == m0["results"]


def test_bad_data_is_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "c"}\n')
    with pytest.raises(SystemExit, match=r"bad\.jsonl:1: missing field 'rejected'"):
        sdpo.main(["--data", str(bad), "--model", "tiny-random", "--out", str(tmp_path / "r")])


def test_a_role_no_chat_template_knows_is_one_line_and_writes_nothing(tmp_path):
    bad = tmp_path / "roles.jsonl"
    bad.write_text('{"prompt": [{"role": "wizard", "content": "hi"}], "chosen": "a", "rejected": "b"}\n')
    with pytest.raises(SystemExit, match=r"roles\.jsonl:1: role 'wizard' in 'prompt' is none of system, user, "
                                         r"assistant"):
        sdpo.main(["--data", str(bad), "--model", "tiny-random", "--steps", "1", "--out", str(tmp_path / "r")])
    assert not (tmp_path / "r").exists()


def test_an_rpo_run_directory_is_named_as_such(full_run, tmp_path):
    out, _ = full_run
    with pytest.raises(SystemExit, match=r"holds a run of rpo\.py, not of sdpo\.py; give sdpo\.py its own --out$"):
        sdpo.run(config(tmp_path, [write_pairs(tmp_path / "p.jsonl", 12)], out=str(out), steps=1))


def test_several_files_are_steps_in_their_order_by_default(tmp_path):
    files = [write_pairs(tmp_path / "a.jsonl", 10), write_pairs(tmp_path / "b.jsonl", 10, offset=10)]
    cfg = config(tmp_path, files, heldout=2, epochs=1)
    assert cfg.split == "auto"
    sdpo.run(cfg)
    assert read(str(tmp_path / "run" / "config.json"))["split"] == "given"
    first = {p["prompt"][0]["content"] for p in read(str(tmp_path / "run" / "step_1" / "pairs.jsonl"))}
    assert first <= {f"What is {i} + 2?" for i in range(10)}  # step 1 is the first file
    one = sdpo.run(config(tmp_path, files, heldout=2, epochs=1, steps=1, out=str(tmp_path / "dpo")))  # all at once
    assert read(str(tmp_path / "dpo" / "config.json"))["split"] == "random" and one[1]["stats"]["pairs"] == 18


def test_a_loser_cut_off_in_rpo_is_scored_without_eos_in_sdpo_too(full_run, tmp_path):
    """The same pairs, the same tokens: rpo.py scored a cut-off loser without the EOS it never wrote, and so does
    sDPO on rpo.py's pairs.jsonl; the reference log-probs of step 1 (M_0) equal rpo.py's of iteration 1 (M_0)."""
    out, _ = full_run
    pairs = data.load_preferences(str(out / "iter_1" / "pairs.jsonl"))
    cut = [p for p in pairs if p.get("rejected_truncated")]
    _, tokenizer = models.tiny_random()
    assert cut and all(training.encode_pair(tokenizer, p, 512)[2][-1] != tokenizer.eos_token_id for p in cut)
    cfg = config(tmp_path, [str(out / "iter_1" / "pairs.jsonl")], steps=1, heldout=2, epochs=1)
    sdpo.run(cfg)
    theirs = {(json.dumps(p["prompt"]), p["chosen"], p["rejected"]): r for p, r in zip(
        read(str(out / "iter_1" / "pairs.jsonl")), read(str(out / "iter_1" / "reference.jsonl")))}
    chunk, reference = read(f"{cfg.out}/step_1/pairs.jsonl"), read(f"{cfg.out}/step_1/reference.jsonl")
    assert any(p.get("rejected_truncated") for p in chunk)
    for p, r in zip(chunk, reference):
        want = theirs[(json.dumps(p["prompt"]), p["chosen"], p["rejected"])]
        assert r["rejected"] == pytest.approx(want["rejected"], abs=1e-4)


def test_a_given_file_left_without_pairs_is_named_before_any_work(tmp_path):
    short = write_pairs(tmp_path / "short.jsonl", 8)
    long = tmp_path / "long.jsonl"
    long.write_text("".join(json.dumps({"prompt": "Q", "chosen": "x" * 400, "rejected": "y"}) + "\n"
                            for _ in range(3)))
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=r"long\.jsonl: none of its 3 pairs is left for step 2 \(3 longer than "
                                         r"--max-length 256, 0 drawn into --heldout 2\)"):
        sdpo.main(["--data", short, str(long), "--model", "tiny-random", "--max-length", "256", "--heldout", "2",
                   "--out", str(out)])
    assert not out.exists()
