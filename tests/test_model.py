"""model.py, training.py and sampling.py on a tiny random Llama: log-probs of pairs (shared prompt or not,
gradients), the reference pass, training, adapters in stock PEFT, the sampler, tokenisation, 4-bit LoRA gradients;
a GPU-only QLoRA run."""
import json
import math
import shutil
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from conftest import some_pairs, tiny_config

import model as models
import reward
import rpo
import sampling
import training
from losses import rpo_loss, sequence_logps
from machinery import clock
from machinery.files import read
from machinery.resume import Stage
from model import Policy


def sample(policy, prompts: list, n: int, new_tokens: int, rows: int, label: str, budget: float = 0.0) -> list:
    """`sampling.generate` at T = 0.8 outside a run: keys 0, 1, ..., no parts kept."""
    cfg = SimpleNamespace(max_new_tokens=new_tokens, sample_batch_size=rows, memory_budget=budget)
    return sampling.generate(policy, prompts, list(range(len(prompts))), n, 0.8, cfg, Stage(label))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_reference_logps_equal_policy_at_step_0(tmp_path, checkpointing):
    """The reference pass and training score pairs by the same path, so at step 0 the policy equals the reference
    (with gradient checkpointing too, where both take the concatenated path)."""
    cfg = tiny_config(tmp_path, gradient_checkpointing=checkpointing)
    policy = models.load_model(cfg)
    model, tokenizer = policy
    assert training.checkpointing(model) == checkpointing
    pairs = some_pairs()
    reference = training.reference_logps(policy, pairs, cfg, Stage("ref"))
    model.train()
    encoded = [training.encode_pair(tokenizer, p, cfg.max_length) for p in pairs]
    chosen, rejected, _ = training.pair_logps(model, training.collate(encoded, tokenizer.pad_token_id))
    assert torch.allclose(chosen.detach(), torch.tensor([r["chosen"] for r in reference]), atol=1e-5)
    assert torch.allclose(rejected.detach(), torch.tensor([r["rejected"] for r in reference]), atol=1e-5)
    records = training.train(policy, pairs, reference, cfg, Stage("train", t=1))
    assert records[0]["loss/dpo"] == pytest.approx(math.log(2), abs=1e-6)  # all of step 1 is before the update
    assert records[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    # the logged loss is Eq. 1: losses.rpo_loss of the step's pairs
    assert records[0]["loss"] == pytest.approx(math.log(2) + records[0]["loss/nll"], abs=1e-6)


def test_pair_logps_equal_each_sequence_alone_shared_prompt_or_not():
    """A batch of pairs with prompts and responses of different lengths: each log-prob equals that of its prompt +
    response scored alone, unpadded, whether the prompt is computed once (shared) or once per response."""
    model, tokenizer = models.tiny_random()
    pairs = some_pairs(3)
    pairs[1]["prompt"][0]["content"] += " Think carefully, please."  # prompts of different lengths
    pairs[2]["rejected"] = "A much longer wrong answer, with more words.\nFinal answer: 9"
    encoded = [training.encode_pair(tokenizer, p, 512) for p in pairs]
    alone = []
    with torch.no_grad():
        for p, c, r in encoded:
            for response in (c, r):
                labels = torch.tensor([[-100] * len(p) + response])
                alone.append(sequence_logps(model(input_ids=torch.tensor([p + response])).logits, labels)[0][0])
        for share in (True, False):
            batch = training.collate(encoded, tokenizer.pad_token_id)
            chosen, rejected, lengths = training.pair_logps(model, batch, share)
            assert torch.allclose(chosen, torch.stack(alone[0::2]), atol=1e-4), share
            assert torch.allclose(rejected, torch.stack(alone[1::2]), atol=1e-4), share
            assert lengths.tolist() == [len(c) for _, c, _ in encoded]


def test_shared_prompt_gives_the_gradients_of_separate_sequences(tmp_path):
    cfg = tiny_config(tmp_path)
    model, tokenizer = models.load_model(cfg)
    pairs = some_pairs(3)
    pairs[0]["prompt"][0]["content"] += " (a longer prompt)"
    batch = training.collate([training.encode_pair(tokenizer, p, 512) for p in pairs], tokenizer.pad_token_id)
    for p in model.parameters():  # B = 0 at init would give zero gradients to A: move off it
        if p.requires_grad:
            p.data.normal_(0, 0.05)
    model.train()
    grads = []
    for share in (True, False):
        chosen, rejected, _ = training.pair_logps(model, batch, share)
        (chosen.sum() - 0.5 * rejected.sum()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
        model.zero_grad()
    assert grads[0].abs().max() > 0
    assert (grads[0] - grads[1]).norm() / grads[1].norm() < 1e-4


def mean_loss(model, tokenizer, pairs, reference, cfg):
    model.eval()
    encoded = [training.encode_pair(tokenizer, p, cfg.max_length) for p in pairs]
    with torch.no_grad():
        chosen, rejected, lengths = training.pair_logps(model, training.collate(encoded, tokenizer.pad_token_id))
    ref_c = torch.tensor([r["chosen"] for r in reference])
    ref_r = torch.tensor([r["rejected"] for r in reference])
    return rpo_loss(chosen, rejected, ref_c, ref_r, lengths, cfg.beta, cfg.alpha)[0].mean().item()


@pytest.mark.parametrize("alpha, sft", [(1.0, False), (0.0, False), (1.0, True)])
def test_training_lowers_the_loss_and_saved_adapter_loads_in_stock_peft(tmp_path, alpha, sft):
    from peft import PeftModel

    cfg = tiny_config(tmp_path, epochs=4, lr=3e-3, alpha=alpha, sft=sft)
    policy = models.load_model(cfg)
    model, tokenizer = policy
    pairs = some_pairs()
    reference = training.reference_logps(policy, pairs, cfg, Stage("ref"))
    before = mean_loss(model, tokenizer, pairs, reference, cfg)
    records = training.train(policy, pairs, reference, cfg, Stage("train", folder=str(tmp_path), t=1))
    after = mean_loss(model, tokenizer, pairs, reference, cfg)
    assert len(records) == 4 * 2 and after < before - 0.05

    base, _ = models.tiny_random()
    stock = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    ids = torch.tensor([tokenizer("Final answer: 42")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(stock(ids).logits, model(ids).logits, atol=1e-5)


def test_generation_stops_after_the_final_answer_line():
    _, tokenizer = models.tiny_random()
    text = tokenizer("so 3 + 4 = 7.\nFinal answer: 7\nQuestion")["input_ids"]
    done_at = next(i for i in range(1, len(text) + 1) if sampling.answer_done(tokenizer, text[:i]))
    assert tokenizer.decode(text[:done_at]).endswith("Final answer: 7\n")


def test_sample_tokens_follows_softmax_over_temperature_and_leaves_its_input_alone():
    """With the sampler's own draws: 40,000 rows at one step, and one row over 40,000 steps."""
    logits = torch.tensor([[0.0, 1.0, 2.0, -30.0, 3.0]]).repeat(40000, 1)  # (B, V)
    kept = logits.clone()
    across_rows = sampling.uniforms(sampling.row_keys(7, range(40000), [0] * 40000), step=3)
    one_row = sampling.row_keys(7, [0], [0])
    across_steps = torch.cat([sampling.uniforms(one_row, step) for step in range(40000)])
    for u in (across_rows, across_steps):
        for temperature in (0.5, 1.0, 2.0):
            counts = torch.bincount(sampling.sample_tokens(logits, temperature, u), minlength=5) / len(logits)
            expected = torch.softmax(logits[0] / temperature, -1)
            assert (counts - expected).abs().max() < 0.01, (temperature, counts, expected)
            assert torch.equal(logits, kept)  # the caller's logits are not changed in place
    assert sampling.sample_tokens(logits[:2], 0.0).tolist() == [4, 4]


def test_the_draws_are_uniform_and_unrelated_between_rows_and_steps():
    keys = sampling.row_keys(0, range(20000), [0] * 20000)
    u0, u1 = sampling.uniforms(keys, 0), sampling.uniforms(keys, 1)
    assert 0 <= u0.min() and u0.max() < 1
    deciles = torch.histc(u0, bins=10, min=0, max=1) / len(u0)
    assert (deciles - 0.1).abs().max() < 0.01
    assert abs(torch.corrcoef(torch.stack([u0, u1]))[0, 1]) < 0.03  # a row's next step, another number
    assert abs(torch.corrcoef(torch.stack([u0[:-1], u0[1:]]))[0, 1]) < 0.03  # the next row, another number
    assert torch.equal(sampling.uniforms(keys[5:9], 1), u1[5:9])  # a row's draw is its own, whatever the batch


def test_generate_ids_equals_model_generate_greedy_with_early_stops():
    """Left padding, one shared prefill for n rows, and rows leaving the batch early change no token: greedy
    decoding equals model.generate's, row by row (float64, so batch composition cannot flip an argmax)."""
    from transformers import GenerationConfig

    model, tokenizer = models.tiny_random()
    model = model.double().eval()
    prompts = [tokenizer(t)["input_ids"] for t in ("1 + 1 = ?", "What is 12 - 5? Think.", "7")]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    free = sampling.generate_ids(model, prompts, 1, 0.0, 12, eos, pad)
    stop_token = free[0][4]  # rows that sample this token are done (a stand-in for the answer line)
    ours = sampling.generate_ids(model, prompts, 2, 0.0, 12, eos, pad, done=lambda row: row[-1] == stop_token)
    for k, p in enumerate(prompts):
        plain = model.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                               generation_config=GenerationConfig(max_new_tokens=12, do_sample=False,
                                                                  pad_token_id=pad, eos_token_id=eos))
        row = plain[0, len(p):].tolist()
        row = row[:row.index(eos)] if eos in row else row
        row = row[:row.index(stop_token) + 1] if stop_token in row else row
        assert ours[2 * k] == ours[2 * k + 1] == row, k
    assert len(ours[0]) <= 5 and any(len(row) > len(ours[0]) for row in ours)  # rows left at different steps


def llama2_style_tokenizer():
    """The tiny tokenizer made to behave as Llama-2-chat's does: the chat template writes the BOS itself, and
    tokenising with special tokens (the default) adds one more in front."""
    from tokenizers.processors import TemplateProcessing

    _, tokenizer = models.tiny_random()
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer.chat_template = ("{% for m in messages %}{{ bos_token }}[INST] {{ m['content'] }} [/INST]"
                               "{% endfor %}")
    return tokenizer


def test_encode_pair_appends_eos_and_writes_the_templates_bos_once():
    tokenizer = llama2_style_tokenizer()
    pair = some_pairs(1)[0]
    text = models.prompt_text(tokenizer, pair["prompt"])
    assert text.startswith("<s>[INST]") and tokenizer(text)["input_ids"][:2] == [1, 1]  # the pitfall is live
    prompt, chosen, rejected = training.encode_pair(tokenizer, pair, 512)
    assert prompt.count(tokenizer.bos_token_id) == 1 and prompt[0] == tokenizer.bos_token_id
    assert chosen[-1] == rejected[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(prompt + chosen[:-1]).endswith("[/INST]0 + 1 = 1.\nFinal answer: 1")
    plain = models.encode_prompt(tokenizer, "Question: 1 + 1?")  # a plain-text prompt gets the tokenizer's one BOS
    assert plain.count(tokenizer.bos_token_id) == 1


# --- 4-bit ------------------------------------------------------------------------------------------------------

def four_bit_and_full_precision(tmp_path, monkeypatch):
    """The tiny model in 4-bit with LoRA, and a float32 copy whose weights are the dequantised 4-bit ones, with the
    same (non-zero) LoRA weights."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    monkeypatch.setattr(models, "CACHE", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the pitfall and this check are CPU ones
    cfg = tiny_config(tmp_path, load_in_4bit=True)
    quantised, tokenizer = models.load_model(cfg)
    torch.manual_seed(1)
    for name, p in quantised.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    full, _ = models.tiny_random()
    state = full.state_dict()
    for name, module in quantised.base_model.model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state[name.replace(".base_layer", "") + ".weight"] = bnb.functional.dequantize_4bit(
                module.weight.data, module.weight.quant_state)
    full.load_state_dict(state)
    full = get_peft_model(full, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules="all-linear"))
    full.load_state_dict({k: v for k, v in quantised.state_dict().items() if "lora_" in k}, strict=False)
    return quantised, full, tokenizer, cfg


def lora_grads(model, tokenizer, cfg):
    model.train()
    model.zero_grad()
    encoded = [training.encode_pair(tokenizer, p, cfg.max_length) for p in some_pairs(2)]
    chosen, rejected, _ = training.pair_logps(model, training.collate(encoded, tokenizer.pad_token_id))
    (chosen.sum() - rejected.sum()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}


def test_4bit_lora_gradients_match_full_precision_after_generate(tmp_path, monkeypatch):
    quantised, full, tokenizer, cfg = four_bit_and_full_precision(tmp_path, monkeypatch)
    # generate() is the eval-mode no-grad forward after which bitsandbytes' CPU repack corrupts the gradients.
    sample(Policy(quantised, tokenizer), ["Question: 1 + 1?"], 2, 4, 2, "warm-up")
    got, want = lora_grads(quantised, tokenizer, cfg), lora_grads(full, tokenizer, cfg)
    assert got.keys() == want.keys() and len(got) > 0
    for name in got:
        error = (got[name] - want[name]).norm() / want[name].norm().clamp(min=1e-12)
        assert error < 1e-3, (name, error.item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_qlora_loop_on_gpu(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "CACHE", str(tmp_path))
    rows = rpo.run(tiny_config(tmp_path / "run", iterations=1, gradient_checkpointing=True))
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["load_in_4bit"] is None and len(rows) == 2  # None = 4-bit on CUDA
    log = read(str(tmp_path / "run" / "iter_1" / "train_log.jsonl"))
    assert log and all(math.isfinite(r["loss"]) for r in log)
    assert log[0]["loss/dpo"] == pytest.approx(math.log(2), abs=1e-3)


def test_pair_logps_agree_with_trl_on_its_own_tokens(tmp_path):
    """TRL's DPOTrainer (precomputed reference, fp32) and `training.pair_logps` give the same log-probs for the same
    token ids. The tokens differ in one place, accounted for here: TRL's chosen/rejected ids of a conversational pair
    end with what the chat template writes after the message (here "\\n"; SmolLM2: "<|im_end|>\\n"), ours with EOS."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    model, tokenizer = models.tiny_random()
    pairs = some_pairs(4)
    conversational = [{"prompt": p["prompt"], "chosen": [{"role": "assistant", "content": p["chosen"]}],
                       "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in pairs]
    config = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, precompute_ref_log_probs=True,
                       bf16=False, gradient_checkpointing=False, report_to=[], use_cpu=True, max_length=512)
    trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(conversational),
                         processing_class=tokenizer)
    rows = trainer.get_train_dataloader().dataset  # tokenised by TRL, reference log-probs added
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    encoded = []
    for row, pair in zip(rows, pairs):
        prompt, chosen, rejected = training.encode_pair(tokenizer, pair, 512)
        assert row["prompt_ids"] == prompt
        assert row["chosen_ids"] == chosen[:-1] + newline and row["rejected_ids"] == rejected[:-1] + newline
        encoded.append((row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]))
    model.eval()
    with torch.no_grad():
        chosen, rejected, _ = training.pair_logps(model, training.collate(encoded, tokenizer.pad_token_id))
    assert torch.allclose(chosen, torch.tensor([r["ref_chosen_logps"] for r in rows]), atol=5e-5)
    assert torch.allclose(rejected, torch.tensor([r["ref_rejected_logps"] for r in rows]), atol=5e-5)


def test_train_keeps_the_best_checkpoint_ties_to_the_later(tmp_path):
    cfg = tiny_config(tmp_path, epochs=4, lr=3e-3)  # 4 epochs × 2 steps
    cfg = replace(cfg, checkpoints=4)
    policy = models.load_model(cfg)
    model, tokenizer = policy
    pairs = some_pairs()
    reference = training.reference_logps(policy, pairs, cfg, Stage("ref"))
    scores, seen = iter([0.2, 0.5, 0.5, 0.1]), []

    def checkpoint(stage):
        seen.append([p.detach().clone() for p in model.parameters() if p.requires_grad])
        return next(scores)

    records = training.train(policy, pairs, reference, cfg, Stage("train", folder=str(tmp_path), t=1),
                             select=checkpoint)
    assert [r["step"] for r in records if "heldout/accuracy" in r and "step" in r] == [2, 4, 6, 8]
    assert records[-1] == {"iteration": 1, "selected_step": 6, "heldout/accuracy": 0.5}
    now = [p for p in model.parameters() if p.requires_grad]
    assert all(torch.equal(a, b) for a, b in zip(now, seen[2]))  # the weights of step 6, not of step 8
    assert not all(torch.equal(a, b) for a, b in zip(now, seen[3]))
    from peft import load_peft_weights

    saved = load_peft_weights(str(tmp_path / "adapter"))  # the saved adapter is the selected checkpoint
    assert any(torch.equal(v, seen[2][0]) for v in saved.values())


@pytest.mark.parametrize("seconds, text", [(0.4, "0 s"), (59.4, "59 s"), (59.6, "1 min 00 s"), (119.6, "2 min 00 s"),
                                           (3601, "60 min 01 s")])
def test_durations_round_before_they_split(seconds, text):
    assert clock.duration(seconds) == text


def test_the_estimate_of_the_time_left():
    """A stage seen before is expected to take what it took the iteration before; the first of its kind, its
    work at the seconds per token measured so far (scoring a quarter of generating until a scoring stage ran)."""
    plan = {(0, "eval"): (100, 0), (1, "sample"): (300, 0), (1, "reference"): (0, 400), (1, "train"): (50, 1200),
            (1, "eval"): (100, 0), (2, "sample"): (300, 0)}
    estimate_clock = clock.Clock(plan, "iter ")
    estimate_clock.finished((0, "eval"), 10.0)  # 0.1 s a generated token
    assert estimate_clock.estimate() == pytest.approx(30 + 400 * 0.1 / 4 + (5 + 1200 * 0.1 / 4) + 10 + 30)
    estimate_clock.finished((1, "sample"), 60.0)  # (10 + 60) / 400 s a generated token
    estimate_clock.finished((1, "reference"), 20.0)  # 0.05 s a scored token
    assert estimate_clock.estimate() == pytest.approx(50 * 70 / 400 + 1200 * 0.05 + 10 + 60)
    estimate_clock.skip((1, "train"))  # read back by a resumed run: no time left to spend on it
    assert estimate_clock.estimate() == pytest.approx(10 + 60)


def test_the_sampler_reports_every_row_that_ends_once():
    model, tokenizer = models.tiny_random()
    prompts = [models.encode_prompt(tokenizer, p) for p in ("a", "bb", "ccc")]
    ended, steps = [], []
    rows = sampling.generate_ids(model, prompts, 2, 1.0, 9, tokenizer.eos_token_id, tokenizer.pad_token_id,
                           done=lambda tokens: len(tokens) >= 3,
                           progress=lambda step, n: (steps.append(step), ended.append(n)))
    assert sum(ended) == len(rows) == 6 and steps == list(range(1, len(steps) + 1))


def test_training_trains_the_loss_users_copy(tmp_path, monkeypatch):
    """training.train computes Eq. 1 by calling losses.rpo_loss, the function the README tells users to copy."""
    returned = []

    def spy(*args):
        out = rpo_loss(*args)
        returned.append(out[0].detach())
        return out

    monkeypatch.setattr(training, "rpo_loss", spy)
    cfg = tiny_config(tmp_path)
    policy = models.load_model(cfg)
    pairs = some_pairs(4)
    reference = training.reference_logps(policy, pairs, cfg, Stage("ref"))
    records = training.train(policy, pairs, reference, cfg, Stage("train", t=1))
    assert len(returned) == 4  # one call per micro-batch of 2 pairs, two steps
    assert records[0]["loss"] == pytest.approx(torch.cat(returned[:2]).mean().item(), abs=1e-6)


def test_the_forward_calls_warn_about_no_deprecated_argument():
    """transformers 5.24 renamed past_key_values to cache and warns at every forward that passes the old name."""
    import warnings

    model, tokenizer = models.tiny_random()
    batch = training.collate([training.encode_pair(tokenizer, p, 512) for p in some_pairs(2)], tokenizer.pad_token_id)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        sampling.generate_ids(model, [[5, 6, 7], [5, 6, 8, 9]], 2, 0.8, 3, 2, 2)
        training.pair_logps(model, batch, share_prompt=True)


# --- maj@k --------------------------------------------------------------------------------------------------------

def test_majority_counts_equal_answers_whatever_their_order_and_form():
    import itertools

    for votes in set(itertools.permutations(["3 + 4 = 7", "8", "8", "7", "x = 7"])):  # 7 has three votes, 8 two
        assert reward.answers_match(reward.majority(list(votes), "gsm8k"), "7", "gsm8k"), votes
    assert reward.majority(["8", "3 + 4 = 7", "8", None, "7"], "gsm8k") == "8"  # a tie goes to the answer seen first
    assert reward.majority([None, None], "gsm8k") is None


def test_majority_groups_math_votes_with_the_runs_grader():
    pytest.importorskip("math_verify")
    votes = ["2(k+1)", "2k+3", "2k+2", "2k+3", "2(1+k)"]  # 2k+3 twice; 2k+2 three ways, equal only by algebra
    assert reward.majority(votes, "math") == "2k+3"
    assert reward.majority(votes, "math", grader="math-verify") == "2(k+1)"


def test_evaluate_votes_with_the_runs_grader(monkeypatch):
    pytest.importorskip("math_verify")
    votes = ["2(k+1)", "2k+3", "2k+2", "2k+3", "2(1+k)"]

    def sampled(policy, prompts, keys, n, *args, **kwargs):  # greedy: one answer; maj@5: the votes
        return [[(f"So.\nFinal answer: {v}", False) for v in (votes if n > 1 else ["2k+3"])] for _ in prompts]

    monkeypatch.setattr(sampling, "generate", sampled)
    _, tokenizer = models.tiny_random()
    example = {"id": "m", "task": "math", "question": "2k + 2 = ?", "answer": "2k+2", "solution": None}
    for grader, right in (("builtin", 0), ("math-verify", 1)):
        task = rpo.Config(task="math", eval_k=5, math_grader=grader)
        result = sampling.evaluate(Policy(None, tokenizer), task, [example], [], Stage("test", t=0))
        assert result["results"][0]["majority_correct"] == right and result["maj@5"] == right, grader


# --- memory: the cache in the compute dtype, rows planned from a budget ------------------------------------------

def cache_spy(monkeypatch):
    """Every key tensor the KV cache receives, and the bytes of all its layers' keys and values after each."""
    from transformers.cache_utils import DynamicLayer

    import weakref

    seen = {"dtypes": set(), "peak": 0, "layers": weakref.WeakKeyDictionary()}  # the live caches' layers only
    real = DynamicLayer.update

    def update(self, key_states, value_states, *args, **kwargs):
        out = real(self, key_states, value_states, *args, **kwargs)
        seen["dtypes"].add(key_states.dtype)
        seen["layers"][self] = self.keys.numel() * self.keys.element_size() * 2
        seen["peak"] = max(seen["peak"], sum(seen["layers"].values()))
        return out

    monkeypatch.setattr(DynamicLayer, "update", update)
    return seen


def test_qlora_samples_with_its_cache_in_the_compute_dtype(tmp_path, monkeypatch):
    """4-bit NF4 with bf16 compute (bitsandbytes runs on a CPU too): keys and values are bf16, not the float32 that
    PEFT's prepare_model_for_kbit_training upcast gave; the logits, and so the log-probs, are float32."""
    pytest.importorskip("bitsandbytes")
    monkeypatch.setattr(models, "CACHE", str(tmp_path))
    policy = models.load_model(tiny_config(tmp_path, load_in_4bit=True, dtype="bfloat16"))
    model, tokenizer = policy
    seen = cache_spy(monkeypatch)
    sample(policy, ["Question: 1 + 1?", "Question: 2 + 2?"], 2, 4, 4, "sample")
    assert seen["dtypes"] == {torch.bfloat16}
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    ids = torch.tensor([tokenizer("Final answer: 4")["input_ids"]])
    assert model(input_ids=ids).logits.dtype == torch.float32


def test_the_memory_plan_keeps_the_cache_within_the_budget_and_fills_it(monkeypatch):
    """A budget in bytes: the rows the plan picks hold at most that, the planned peak takes most of it (one row more
    would not fit), and the cache the run really holds is the planned cache."""
    from machinery import memory

    model, tokenizer = models.tiny_random()
    real = sampling.generate_ids  # no EOS, no answer line: every row runs to its end
    monkeypatch.setattr(sampling, "generate_ids", lambda model, prompts, n, temperature, new, eos, *args, **kwargs:
                        real(model, prompts, n, temperature, new, -1, *args, **kwargs))
    monkeypatch.setattr(sampling, "answer_done", lambda tokenizer, tokens: False)
    prompts = [f"Question: what is {i} + {i}?" for i in range(16)]
    longest = max(len(models.encode_prompt(tokenizer, p)) for p in prompts)
    costs, space = memory.costs(model), 1_000_000
    rows = memory.sampling_rows(costs, space, longest, 20, 4, 64)
    assert 4 < rows < 64
    assert memory.sampling_peak(costs, rows, longest, 20, 4) <= space < memory.sampling_peak(costs, rows + 1, longest,
                                                                                            20, 4)
    assert memory.sampling_peak(costs, rows, longest, 20, 4) > 0.8 * space
    seen = cache_spy(monkeypatch)
    budget = (space + memory.resident(model)) / memory.GiB
    sample(Policy(model, tokenizer), prompts, 4, 20, 64, "sample", budget)
    planned = rows * (longest + 20) * costs.cache_token
    assert 0.9 * planned <= seen["peak"] <= planned


def test_bf16_keeps_step_0_at_log_2_the_head_and_lora_in_float32_and_log_probs_near_float32(tmp_path):
    """What bf16 changes on a CPU, bounded: the frozen weights, activations and cache in bf16, the output head and
    the LoRA weights float32; the reference log-probs within a fraction of a nat of float32's; at step 0 the policy
    is the reference, so the DPO term is log 2 and the loss log 2 + α·NLL."""
    pairs = some_pairs()
    cfg32, cfg16 = tiny_config(tmp_path, dtype="float32"), tiny_config(tmp_path, dtype="bfloat16")
    want = training.reference_logps(models.load_model(cfg32), pairs, cfg32, Stage("ref"))
    policy = models.load_model(cfg16)
    model = policy.model
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert model.get_output_embeddings().weight.dtype == torch.float32
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)
    got = training.reference_logps(policy, pairs, cfg16, Stage("ref"))
    assert max(abs(g[k] - w[k]) for g, w in zip(got, want) for k in ("chosen", "rejected")) < 0.5
    records = training.train(policy, pairs, got, cfg16, Stage("train", t=1))
    assert records[0]["loss/dpo"] == pytest.approx(math.log(2), abs=1e-3)
    assert records[0]["loss"] == pytest.approx(records[0]["loss/dpo"] + cfg16.alpha * records[0]["loss/nll"],
                                               abs=1e-5)


def test_threads_sets_the_threads_torch_computes_with(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    models.load_model(tiny_config(tmp_path))
    models.load_model(tiny_config(tmp_path, threads=1))
    assert calls == [1]  # 0, the default, leaves torch's own


# --- --dtype auto, by kind of CPU -----------------------------------------------------------------------------------

KINDS = {  # what torch's run-time checks and the kernel say, by kind of CPU
    "Intel with AMX (Sapphire Rapids on)": (True, True, "GenuineIntel", {"amx_bf16", "amx_tile", "avx512_bf16"}),
    "AMD with AVX-512 BF16 (Zen 4 on)": (False, True, "AuthenticAMD", {"avx512_bf16", "avx512f"}),
    "Intel with AVX-512 BF16, no AMX (Cooper Lake)": (False, True, "GenuineIntel", {"avx512_bf16", "avx512f"}),
    "neither (AVX2 only)": (False, False, "AuthenticAMD", {"avx2"}),
    "torch sees AMX, the kernel does not let it be used": (True, False, "GenuineIntel", {"avx512f"}),
}


def cpu_of_kind(monkeypatch, kind):
    amx, avx512_bf16, vendor, flags = KINDS[kind]
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(models, "cpu_info", lambda: (vendor, flags))


@pytest.mark.parametrize("kind, native, want", [
    ("Intel with AMX (Sapphire Rapids on)", "AMX", "bfloat16"),
    ("AMD with AVX-512 BF16 (Zen 4 on)", "AVX-512 BF16", "bfloat16"),
    ("Intel with AVX-512 BF16, no AMX (Cooper Lake)", "AVX-512 BF16", "float32"),
    ("neither (AVX2 only)", None, "float32"),
    ("torch sees AMX, the kernel does not let it be used", None, "float32")])
def test_auto_is_bf16_where_it_was_measured_faster_and_float32_elsewhere(monkeypatch, kind, native, want):
    cpu_of_kind(monkeypatch, kind)
    cpu = torch.device("cpu")
    assert models.cpu_bf16() == native
    assert models.compute_dtype(rpo.Config(model="smollm2-135m"), cpu) == getattr(torch, want)
    assert models.compute_dtype(rpo.Config(model="tiny-random"), cpu) == torch.float32  # on every kind
    assert models.compute_dtype(rpo.Config(model="smollm2-135m", dtype="float32"), cpu) == torch.float32
    assert models.compute_dtype(rpo.Config(model="smollm2-135m", dtype="bfloat16"), cpu) == torch.bfloat16
    assert models.compute_dtype(rpo.Config(model="smollm2-135m"), torch.device("cuda")) == torch.bfloat16


def test_a_run_says_what_auto_resolved_to_and_records_that_in_its_config(monkeypatch, tmp_path, capsys):
    cpu_of_kind(monkeypatch, "AMD with AVX-512 BF16 (Zen 4 on)")
    assert models.resolved(rpo.Config(model="smollm2-135m")).dtype == "bfloat16"
    assert models.auto_dtype("smollm2-135m", torch.device("cpu")) == (
        "bfloat16", "this CPU computes bf16 natively: AVX-512 BF16 on AMD")
    cpu_of_kind(monkeypatch, "neither (AVX2 only)")
    assert models.resolved(rpo.Config(model="smollm2-135m")).dtype == "float32"
    assert models.resolved(rpo.Config(model="smollm2-135m", dtype="bfloat16")).dtype == "bfloat16"
    rpo.run(tiny_config(tmp_path / "run", iterations=0, eval_k=0))
    assert read(str(tmp_path / "run" / "config.json"))["dtype"] == "float32"
    assert ("loading tiny-random, computing in float32 (tiny-random, the tests' model, computes in float32 on every "
            "CPU)") in capsys.readouterr().err


def test_a_run_directory_of_before_records_auto_and_goes_on(full_run, tmp_path, capsys):
    """config.json of a run from before `auto` was resolved says "auto": the run goes on, and records the dtype."""
    out = tmp_path / "run"
    shutil.copytree(full_run[0], out)
    config = read(str(out / "config.json"))
    (out / "config.json").write_text(json.dumps({**config, "dtype": "auto"}, indent=2) + "\n")
    rpo.run(tiny_config(out, iterations=3, eval_k=2))
    assert read(str(out / "config.json"))["dtype"] == "float32" and (out / "iter_3" / "eval.json").exists()


def test_the_cpu_vendor_and_flags_are_read_from_the_kernel():
    info = models.cpu_info()
    assert info is None or (info[0] in ("GenuineIntel", "AuthenticAMD") and "sse2" in info[1])
