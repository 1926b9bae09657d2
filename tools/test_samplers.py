"""The sampler candidates of samplers.py against the loop rpo.py uses (`sampling.generate_ids`): the fixed-slot loop
gives the same rows, tokens, stop rules, refills and the cache's shift to the left, and greedy output equal to
model.generate's; the merged copy computes what the policy computes; transformers' continuous batching applies the
adapter (and skips where the memory it takes is not free)."""
import pytest
import torch
from conftest import tiny_config

import model as models
import rpo
import sampling
from tools import samplers


def model_and_prompts():
    """The tiny random Llama in float64 (so that batch shapes cannot flip a draw), prompts of different lengths."""
    model, tokenizer = models.tiny_random()
    texts = ("1 + 1 = ?", "What is 12 - 5? Think.", "7", "a prompt longer than the others, with more words")
    return model.double().eval(), tokenizer, [tokenizer(t)["input_ids"] for t in texts]


@pytest.mark.parametrize("slots", [12, 5, 2, 1])  # all rows at once; refills; one row at a time (the cache shifts)
def test_fixed_slots_give_the_rows_of_the_plain_loop(slots):
    model, tokenizer, prompts = model_and_prompts()
    keys = sampling.row_keys(3, [p for p in range(4) for _ in range(3)], [s for _ in range(4) for s in range(3)])
    free = sampling.generate_ids(model, prompts, 3, 1.0, 16, -1, tokenizer.pad_token_id, keys=keys)
    stop = free[0][3]  # rows that sample this token are done (a stand-in for the answer line)
    for eos, done in ((-1, lambda row: False), (tokenizer.eos_token_id, lambda row: row[-1] == stop)):
        plain = sampling.generate_ids(model, prompts, [3, 1, 3, 2], 1.0, 16, eos, tokenizer.pad_token_id, done,
                                     keys=keys[:9])
        slotted = samplers.generate_slots(model, prompts, [3, 1, 3, 2], 1.0, 16, eos, tokenizer.pad_token_id, done,
                                         keys=keys[:9], slots=slots)
        assert slotted == plain
    assert len({len(row) for row in plain}) > 1  # rows ended at different steps


def test_fixed_slots_greedy_equal_model_generate():
    from transformers import GenerationConfig

    model, tokenizer, prompts = model_and_prompts()
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    ours = samplers.generate_slots(model, prompts, 2, 0.0, 12, eos, pad, slots=3)
    for k, p in enumerate(prompts):
        plain = model.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                               generation_config=GenerationConfig(max_new_tokens=12, do_sample=False,
                                                                  pad_token_id=pad, eos_token_id=eos))
        row = plain[0, len(p):].tolist()
        assert ours[2 * k] == ours[2 * k + 1] == (row[:row.index(eos)] if eos in row else row), k


def test_a_run_samples_the_same_with_either_loop(tmp_path, monkeypatch):
    rpo.run(tiny_config(tmp_path / "loop", iterations=1, sample_batch_size=3))
    monkeypatch.setattr(sampling, "generate_ids", lambda *args, **kwargs: samplers.generate_slots(*args, **kwargs,
                                                                                                  slots=3))
    rpo.run(tiny_config(tmp_path / "slots", iterations=1, sample_batch_size=12))  # 12 rows through 3 slots
    for name in ("iter_0/eval.json", "iter_1/samples.jsonl"):
        assert (tmp_path / "loop" / name).read_bytes() == (tmp_path / "slots" / name).read_bytes(), name


@pytest.mark.parametrize("four_bit", [False, True])
def test_the_merged_copy_computes_what_the_policy_computes(tmp_path, monkeypatch, four_bit):
    """The third candidate: base weights (dequantised from NF4) plus B·A·scale, as one plain model."""
    if four_bit:
        pytest.importorskip("bitsandbytes")
        monkeypatch.setattr(models, "CACHE", str(tmp_path))
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model, tokenizer = models.load_model(tiny_config(tmp_path, load_in_4bit=four_bit))
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.3)
    dense = samplers.merged_copy(model)
    assert not any("lora" in name for name, _ in dense.named_parameters())
    ids = torch.tensor([tokenizer("What is 3 + 4? Final answer: 7")["input_ids"]])
    model.eval()
    with torch.no_grad():
        assert torch.allclose(dense(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-4)


def test_transformers_continuous_batching_applies_the_adapter_greedy():
    """The first candidate, checked where it can be on a CPU: on the PEFT model, `generate_batch` computes
    with the LoRA adapter (its greedy tokens are ours, not the base model's). It draws samples with
    torch.multinomial on the global generator, so it cannot keep each row's own stream, and it stops only at EOS or
    max_new_tokens: docs/BENCHMARKS.md."""
    from transformers import GenerationConfig

    model, tokenizer = models.load_model(tiny_config("unused"))
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.3)
    model.eval()
    prompts = [tokenizer(t)["input_ids"] for t in ("1 + 1 = ?", "What is 12 - 5? Think.", "7")]
    ours = sampling.generate_ids(model, prompts, 1, 0.0, 8, -1, tokenizer.pad_token_id)
    config = GenerationConfig(max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
    out = model.generate_batch(prompts, generation_config=config, progress_bar=False,
                               continuous_batching_config=samplers.bounded_cache(3, 8 + 8))
    assert [out[f"req_{i}"].generated_tokens for i in range(3)] == ours
    with model.disable_adapter():
        assert sampling.generate_ids(model, prompts, 1, 0.0, 8, -1, tokenizer.pad_token_id) != ours
