"""CPU smoke runs of the whole Iterative RPO loop on a tiny random Llama, resume, the reference pass, training,
adapters, 4-bit gradients; a GPU-only QLoRA run that skips itself without CUDA."""
import json
import math
import os
import shutil

import pytest
import torch

import rpo
from losses import rpo_loss


def tiny_config(out, **kw):
    base = dict(model="tiny-random", out=str(out), n_train=6, n_test=4, samples=4, pairs=2, max_new_tokens=12,
                add_gold=True, eval_k=2, batch_size=2, grad_accum=2, lr=1e-3, iterations=2, sample_batch_size=8)
    return rpo.Config(**{**base, **kw})


def snapshot(folder):
    """Every file of a run directory, as bytes, by relative path."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, folder)] = f.read()
    return files


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    rows = rpo.run(tiny_config(out))
    return out, rows


def test_whole_loop_two_iterations(full_run):
    out, rows = full_run
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    for t in (1, 2):
        folder = out / f"iter_{t}"
        for name in ("samples.jsonl", "pairs.jsonl", "reference.jsonl", "train_log.jsonl", "eval.json", "stats.json"):
            assert (folder / name).is_file(), name
        assert (folder / "adapter" / "adapter_config.json").is_file()
        samples = rpo.read_jsonl(folder / "samples.jsonl")
        assert len(samples) == 6 * 4 and {s["reward"] for s in samples} <= {0, 1}
        pairs = rpo.read_jsonl(folder / "pairs.jsonl")
        assert rows[t]["pairs"] == len(pairs) > 0
        assert all(p["chosen"] != p["rejected"] for p in pairs)
    metrics = rpo.read_jsonl(out / "metrics.jsonl")
    steps = [m for m in metrics if "step" in m]
    assert steps and all(name in steps[0] for name in rpo.METRICS)
    assert [m["stage"] for m in metrics if "stage" in m] == ["eval", "stats", "eval", "stats", "eval"]
    assert not [p for p in snapshot(out) if p.endswith(".tmp")]


def test_samples_from_reuses_m0_eval_and_samples_for_a_loss_ablation(full_run, tmp_path):
    source, _ = full_run
    out = tmp_path / "dpo"
    rpo.run(tiny_config(out, iterations=1, alpha=0.0, samples_from=str(source)))
    for name in ("iter_0/eval.json", "iter_1/samples.jsonl", "iter_1/pairs.jsonl", "iter_1/reference.jsonl"):
        assert (out / name).read_bytes() == (source / name).read_bytes(), name
    ours, theirs = (rpo.read_jsonl(d / "iter_1" / "train_log.jsonl") for d in (out, source))
    assert [r["loss/nll"] for r in ours] != [r["loss/nll"] for r in theirs]  # α changed the training only
    assert ours[0]["loss"] == pytest.approx(math.log(2))  # α = 0: plain DPO, log 2 at step 1
    with pytest.raises(SystemExit, match="differs in seed"):
        rpo.run(tiny_config(tmp_path / "other", seed=1, samples_from=str(source)))


@pytest.mark.parametrize("cut", ["iter_1/samples.jsonl", "iter_1/reference.jsonl", "iter_1/adapter",
                                 "iter_1/eval.json", "iter_2/pairs.jsonl", "iter_2/eval.json"])
def test_resume_after_any_stage_gives_the_same_files(full_run, tmp_path, cut):
    out, _ = full_run
    order = ["iter_0/eval.json"] + [f"iter_{t}/{name}" for t in (1, 2) for name in (
        "samples.jsonl", "stats.json", "pairs.jsonl", "reference.jsonl", "train_log.jsonl", "adapter", "eval.json")]
    stopped = tmp_path / "run"
    shutil.copytree(out, stopped)
    for name in order[order.index(cut) + 1:]:  # a stop right after `cut`: later stages never happened
        path = stopped / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    with open(stopped / "metrics.jsonl", "a") as f:  # what a stopped training stage had logged already
        f.write(json.dumps({"iteration": 9, "step": 1, "loss": 1.0}) + "\n")
    rpo.run(tiny_config(stopped))
    assert snapshot(stopped) == snapshot(out)


def test_mismatched_config_is_refused(full_run, capsys):
    out, _ = full_run
    with pytest.raises(SystemExit, match=r"config\.json: this run directory holds a run with another config "
                                         r"\(lr: 0\.001 there, 0\.002 here\)"):
        rpo.run(tiny_config(out, lr=2e-3))


def test_non_empty_directory_without_config_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="not empty"):
        rpo.run(tiny_config(tmp_path))


def some_pairs(n=6):
    return [{"prompt": [{"role": "user", "content": f"What is {i} + 1?"}], "chosen": f"{i} + 1 = {i + 1}.\nFinal "
             f"answer: {i + 1}", "rejected": f"I think it is {i + 7}"} for i in range(n)]


def test_reference_logps_equal_policy_at_step_0(tmp_path):
    cfg = tiny_config(tmp_path)
    model, tokenizer = rpo.load_model(cfg)
    pairs = some_pairs()
    reference = rpo.reference_logps(model, tokenizer, pairs, cfg, "ref")
    model.train()
    encoded = [rpo.encode_pair(tokenizer, p, cfg.max_length) for p in pairs]
    chosen, rejected, _ = rpo.pair_logps(model, rpo.collate(encoded, tokenizer.pad_token_id))
    assert torch.allclose(chosen.detach(), torch.tensor([r["chosen"] for r in reference]), atol=1e-5)
    assert torch.allclose(rejected.detach(), torch.tensor([r["rejected"] for r in reference]), atol=1e-5)
    records = rpo.train(model, tokenizer, pairs, reference, cfg, 1, lambda r: None)
    assert records[0]["loss/dpo"] == pytest.approx(math.log(2), abs=1e-5)  # all of step 1 is before the update
    assert records[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)


def test_pair_logps_equal_each_sequence_alone_shared_prompt_or_not():
    """A batch of pairs with prompts and responses of different lengths: each log-prob equals that of its prompt +
    response scored alone, unpadded, whether the prompt is computed once (shared) or once per response."""
    from losses import sequence_logps

    model, tokenizer = rpo.tiny_random()
    pairs = some_pairs(3)
    pairs[1]["prompt"][0]["content"] += " Think carefully, please."  # prompts of different lengths
    pairs[2]["rejected"] = "A much longer wrong answer, with more words.\nFinal answer: 9"
    encoded = [rpo.encode_pair(tokenizer, p, 512) for p in pairs]
    alone = []
    with torch.no_grad():
        for p, c, r in encoded:
            for response in (c, r):
                labels = torch.tensor([[-100] * len(p) + response])
                alone.append(sequence_logps(model(input_ids=torch.tensor([p + response])).logits, labels)[0][0])
        for share in (True, False):
            chosen, rejected, lengths = rpo.pair_logps(model, rpo.collate(encoded, tokenizer.pad_token_id), share)
            assert torch.allclose(chosen, torch.stack(alone[0::2]), atol=1e-4), share
            assert torch.allclose(rejected, torch.stack(alone[1::2]), atol=1e-4), share
            assert lengths.tolist() == [len(c) for _, c, _ in encoded]


def test_shared_prompt_gives_the_gradients_of_separate_sequences(tmp_path):
    cfg = tiny_config(tmp_path)
    model, tokenizer = rpo.load_model(cfg)
    pairs = some_pairs(3)
    pairs[0]["prompt"][0]["content"] += " (a longer prompt)"
    batch = rpo.collate([rpo.encode_pair(tokenizer, p, 512) for p in pairs], tokenizer.pad_token_id)
    for p in model.parameters():  # B = 0 at init would give zero gradients to A: move off it
        if p.requires_grad:
            p.data.normal_(0, 0.05)
    model.train()
    grads = []
    for share in (True, False):
        chosen, rejected, _ = rpo.pair_logps(model, batch, share)
        (chosen.sum() - 0.5 * rejected.sum()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
        model.zero_grad()
    assert grads[0].abs().max() > 0
    assert (grads[0] - grads[1]).norm() / grads[1].norm() < 1e-4


def mean_loss(model, tokenizer, pairs, reference, cfg):
    model.eval()
    encoded = [rpo.encode_pair(tokenizer, p, cfg.max_length) for p in pairs]
    with torch.no_grad():
        chosen, rejected, lengths = rpo.pair_logps(model, rpo.collate(encoded, tokenizer.pad_token_id))
    ref_c = torch.tensor([r["chosen"] for r in reference])
    ref_r = torch.tensor([r["rejected"] for r in reference])
    return rpo_loss(chosen, rejected, ref_c, ref_r, lengths, cfg.beta, cfg.alpha)[0].mean().item()


@pytest.mark.parametrize("alpha, sft", [(1.0, False), (0.0, False), (1.0, True)])
def test_training_lowers_the_loss_and_saved_adapter_loads_in_stock_peft(tmp_path, alpha, sft):
    from peft import PeftModel

    cfg = tiny_config(tmp_path, epochs=4, lr=3e-3, alpha=alpha, sft=sft)
    model, tokenizer = rpo.load_model(cfg)
    pairs = some_pairs()
    reference = rpo.reference_logps(model, tokenizer, pairs, cfg, "ref")
    before = mean_loss(model, tokenizer, pairs, reference, cfg)
    records = rpo.train(model, tokenizer, pairs, reference, cfg, 1, lambda r: None, sft)
    after = mean_loss(model, tokenizer, pairs, reference, cfg)
    assert len(records) == 4 * 2 and after < before - 0.05

    rpo.save_adapter(model, str(tmp_path / "adapter"))
    base, _ = rpo.tiny_random()
    stock = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    ids = torch.tensor([tokenizer("Final answer: 42")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(stock(ids).logits, model(ids).logits, atol=1e-5)


def test_make_pairs_walks_with_wrap_around():
    assert rpo.make_pairs(["w1", "w2"], ["l1", "l2", "l3"], 4) == [("w1", "l1"), ("w2", "l2"), ("w1", "l3"),
                                                                 ("w2", "l1")]
    pairs = rpo.make_pairs(["w1", "w2"], ["l1", "l2"], 10)
    assert sorted(pairs) == [("w1", "l1"), ("w1", "l2"), ("w2", "l1"), ("w2", "l2")]  # all 4, none twice
    assert rpo.make_pairs([], ["l1"], 3) == [] and rpo.make_pairs(["w1"], [], 3) == []
    assert rpo.make_pairs(["w"], ["l1", "l2", "l3"], 2) == [("w", "l1"), ("w", "l2")]


def test_pair_stage_drops_too_long_and_caps(tmp_path):
    cfg = tiny_config(tmp_path, pairs=3, max_length=200, max_pairs=2)
    _, tokenizer = rpo.tiny_random()
    examples = [{"id": "a", "task": "arith", "question": "q", "answer": "7", "solution": None},
                {"id": "b", "task": "arith", "question": "q", "answer": "7", "solution": None}]
    samples = [{"id": "a", "prompt": "P", "completion": c, "reward": r}
               for c, r in [("Final answer: 7", 1), ("8", 0), ("9", 0), ("x" * 300, 0)]]
    samples += [{"id": "b", "prompt": "P", "completion": "7", "reward": 1}]  # no loser: no pairs
    pairs, stats = rpo.pair_stage(tokenizer, cfg, samples, examples, 1)
    assert stats["dropped_too_long"] == 1 and stats["pairs"] == len(pairs) == 2
    assert stats["questions_with_pairs"] == 1 and stats["train_accuracy"] == pytest.approx(2 / 5)


def test_generation_stops_after_the_final_answer_line():
    _, tokenizer = rpo.tiny_random()
    text = tokenizer("so 3 + 4 = 7.\nFinal answer: 7\nQuestion")["input_ids"]
    done_at = next(i for i in range(1, len(text) + 1) if rpo.answer_done(tokenizer, text[:i]))
    assert tokenizer.decode(text[:done_at]).endswith("Final answer: 7\n")


def test_sample_tokens_follows_softmax_over_temperature():
    logits = torch.tensor([[0.0, 1.0, 2.0, -30.0, 3.0]]).repeat(40000, 1)  # (B, V)
    for temperature in (0.5, 1.0, 2.0):
        torch.manual_seed(0)
        counts = torch.bincount(rpo.sample_tokens(logits.clone(), temperature), minlength=5) / len(logits)
        expected = torch.softmax(logits[0] / temperature, -1)
        assert (counts - expected).abs().max() < 0.01, (temperature, counts, expected)
    assert rpo.sample_tokens(logits[:2].clone(), 0.0).tolist() == [4, 4]


def test_decode_equals_model_generate_greedy_with_early_stops():
    """Left padding, one shared prefill for n rows, and rows leaving the batch early change no token: greedy
    decoding equals model.generate's, row by row (float64, so batch composition cannot flip an argmax)."""
    from transformers import GenerationConfig

    model, tokenizer = rpo.tiny_random()
    model = model.double().eval()
    prompts = [tokenizer(t)["input_ids"] for t in ("1 + 1 = ?", "What is 12 - 5? Think.", "7")]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    free = rpo.decode(model, prompts, 1, 0.0, 12, eos, pad)
    stop_token = free[0][4]  # rows that sample this token are done (a stand-in for the answer line)
    ours = rpo.decode(model, prompts, 2, 0.0, 12, eos, pad, done=lambda row: row[-1] == stop_token)
    for k, p in enumerate(prompts):
        plain = model.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                               generation_config=GenerationConfig(max_new_tokens=12, do_sample=False,
                                                                  pad_token_id=pad, eos_token_id=eos))
        row = plain[0, len(p):].tolist()
        row = row[:row.index(eos)] if eos in row else row
        row = row[:row.index(stop_token) + 1] if stop_token in row else row
        assert ours[2 * k] == ours[2 * k + 1] == row, k
    assert len(ours[0]) <= 5 and any(len(row) > len(ours[0]) for row in ours)  # rows left at different steps


def test_encode_pair_appends_eos_and_no_double_bos():
    _, tokenizer = rpo.tiny_random()
    prompt, chosen, rejected = rpo.encode_pair(tokenizer, some_pairs(1)[0], 512)
    assert chosen[-1] == rejected[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(prompt + chosen[:-1]).endswith("<|assistant|>\n0 + 1 = 1.\nFinal answer: 1")
    assert prompt.count(tokenizer.bos_token_id) <= 1


def test_cli_help_lists_paper_values(capsys):
    with pytest.raises(SystemExit):
        rpo.parse_config(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--iterations", "--samples", "--pairs", "--alpha", "--beta", "--model", "--task", "--out",
                 "--max-new-tokens", "--lora-r", "--lora-targets", "--seed", "--config", "--load-in-4bit"):
        assert flag in text
    assert "[30 / 30 / 20]" in text and "[0.1]" in text


def test_config_file_and_flags(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"beta": 0.5, "samples": 3}))
    cfg = rpo.parse_config(["--config", str(path), "--samples", "5", "--preset", "gsm8k-7b"])
    assert (cfg.beta, cfg.samples, cfg.task, cfg.pairs) == (0.5, 5, "gsm8k", 10)
    path.write_text(json.dumps({"betta": 0.5}))
    with pytest.raises(SystemExit, match="unknown field"):
        rpo.parse_config(["--config", str(path)])


def test_file_task_without_files_is_one_clear_line(tmp_path, capsys):
    with pytest.raises(SystemExit, match="--task gsm8k needs --train-file and --test-file"):
        rpo.main(["--model", "tiny-random", "--task", "gsm8k", "--out", str(tmp_path / "r")])


def test_readme_test_command_is_what_ci_runs():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    readme = open(os.path.join(root, "README.md")).read()
    ci = open(os.path.join(root, ".ci", "run")).read()
    command = "pip install \".[test]\" && python -m pytest"
    assert command in readme and command.replace("pip install", "pip install -q") in ci


# --- 4-bit ------------------------------------------------------------------------------------------------------

def four_bit_and_full_precision(tmp_path, monkeypatch):
    """The tiny model in 4-bit with LoRA, and a float32 copy whose weights are the dequantised 4-bit ones, with the
    same (non-zero) LoRA weights."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    monkeypatch.setattr(rpo, "CACHE", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the pitfall and this check are CPU ones
    cfg = tiny_config(tmp_path, load_in_4bit=True)
    quantised, tokenizer = rpo.load_model(cfg)
    torch.manual_seed(1)
    for name, p in quantised.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    full, _ = rpo.tiny_random()
    state = full.state_dict()
    for name, module in quantised.base_model.model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state[name.replace(".base_layer", "") + ".weight"] = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
    full.load_state_dict(state)
    full = get_peft_model(full, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules="all-linear"))
    full.load_state_dict({k: v for k, v in quantised.state_dict().items() if "lora_" in k}, strict=False)
    return quantised, full, tokenizer, cfg


def lora_grads(model, tokenizer, cfg):
    model.train()
    model.zero_grad()
    encoded = [rpo.encode_pair(tokenizer, p, cfg.max_length) for p in some_pairs(2)]
    chosen, rejected, _ = rpo.pair_logps(model, rpo.collate(encoded, tokenizer.pad_token_id))
    (chosen.sum() - rejected.sum()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}


def test_4bit_lora_gradients_match_full_precision_after_generate(tmp_path, monkeypatch):
    quantised, full, tokenizer, cfg = four_bit_and_full_precision(tmp_path, monkeypatch)
    # generate() is the eval-mode no-grad forward after which bitsandbytes' CPU repack corrupts the gradients.
    rpo.generate(quantised, tokenizer, ["Question: 1 + 1?"], 2, 0.8, 4, 2, "warm-up")
    got, want = lora_grads(quantised, tokenizer, cfg), lora_grads(full, tokenizer, cfg)
    assert got.keys() == want.keys() and len(got) > 0
    for name in got:
        error = (got[name] - want[name]).norm() / want[name].norm().clamp(min=1e-12)
        assert error < 1e-3, (name, error.item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_qlora_loop_on_gpu(tmp_path, monkeypatch):
    monkeypatch.setattr(rpo, "CACHE", str(tmp_path))
    rows = rpo.run(tiny_config(tmp_path / "run", iterations=1, gradient_checkpointing=True))
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["load_in_4bit"] is None and len(rows) == 2  # None = 4-bit on CUDA
    log = rpo.read_jsonl(tmp_path / "run" / "iter_1" / "train_log.jsonl")
    assert log and all(math.isfinite(r["loss"]) for r in log)
    assert log[0]["loss/dpo"] == pytest.approx(math.log(2), abs=1e-3)
