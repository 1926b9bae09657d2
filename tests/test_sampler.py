"""sampler.py's fixed-slot loop (issue 21's candidate) against the plain loop: the same rows, the same tokens, the
stop rules, refills and the cache's shift to the left; greedy output equal to model.generate's."""
import pytest
import torch
from conftest import tiny_config

import lm
import rpo
import sampler


def model_and_prompts():
    """The tiny random Llama in float64 (so that batch shapes cannot flip a draw), prompts of different lengths."""
    model, tokenizer = lm.tiny_random()
    texts = ("1 + 1 = ?", "What is 12 - 5? Think.", "7", "a prompt longer than the others, with more words")
    return model.double().eval(), tokenizer, [tokenizer(t)["input_ids"] for t in texts]


@pytest.mark.parametrize("slots", [12, 5, 2, 1])  # all rows at once; refills; one row at a time (the cache shifts)
def test_fixed_slots_give_the_rows_of_the_plain_loop(slots):
    model, tokenizer, prompts = model_and_prompts()
    keys = sampler.row_keys(3, [p for p in range(4) for _ in range(3)], [s for _ in range(4) for s in range(3)])
    free = sampler.generate_ids(model, prompts, 3, 1.0, 16, -1, tokenizer.pad_token_id, keys=keys)
    stop = free[0][3]  # rows that sample this token are done (a stand-in for the answer line)
    for eos, done in ((-1, lambda row: False), (tokenizer.eos_token_id, lambda row: row[-1] == stop)):
        plain = sampler.generate_ids(model, prompts, [3, 1, 3, 2], 1.0, 16, eos, tokenizer.pad_token_id, done,
                                     keys=keys[:9])
        slotted = sampler.generate_slots(model, prompts, [3, 1, 3, 2], 1.0, 16, eos, tokenizer.pad_token_id, done,
                                         keys=keys[:9], slots=slots)
        assert slotted == plain
    assert len({len(row) for row in plain}) > 1  # rows ended at different steps


def test_fixed_slots_greedy_equal_model_generate():
    from transformers import GenerationConfig

    model, tokenizer, prompts = model_and_prompts()
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    ours = sampler.generate_slots(model, prompts, 2, 0.0, 12, eos, pad, slots=3)
    for k, p in enumerate(prompts):
        plain = model.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                               generation_config=GenerationConfig(max_new_tokens=12, do_sample=False,
                                                                  pad_token_id=pad, eos_token_id=eos))
        row = plain[0, len(p):].tolist()
        assert ours[2 * k] == ours[2 * k + 1] == (row[:row.index(eos)] if eos in row else row), k


def test_a_run_samples_the_same_with_either_loop(tmp_path):
    for loop in ("loop", "slots"):
        rpo.run(tiny_config(tmp_path / loop, iterations=1, sampler=loop, sample_batch_size=3))
    for name in ("iter_0/eval.json", "iter_1/samples.jsonl"):
        assert (tmp_path / "loop" / name).read_bytes() == (tmp_path / "slots" / name).read_bytes(), name


@pytest.mark.parametrize("four_bit", [False, True])
def test_the_merged_copy_computes_what_the_policy_computes(tmp_path, monkeypatch, four_bit):
    """Issue 21's third candidate: base weights (dequantised from NF4) plus B·A·scale, as one plain model."""
    import bench_gpu

    if four_bit:
        pytest.importorskip("bitsandbytes")
        monkeypatch.setattr(lm, "CACHE", str(tmp_path))
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model, tokenizer = lm.load_model(tiny_config(tmp_path, load_in_4bit=four_bit))
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.3)
    dense = bench_gpu.merged_copy(model)
    assert not any("lora" in name for name, _ in dense.named_parameters())
    ids = torch.tensor([tokenizer("What is 3 + 4? Final answer: 7")["input_ids"]])
    model.eval()
    with torch.no_grad():
        assert torch.allclose(dense(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-4)


def test_transformers_continuous_batching_applies_the_adapter_greedy():
    """Issue 21's first candidate, checked where it can be on a CPU: on the PEFT model, `generate_batch` computes
    with the LoRA adapter (its greedy tokens are ours, not the base model's). It draws samples with
    torch.multinomial on the global generator, so it cannot keep each row's own stream, and it stops only at EOS or
    max_new_tokens: docs/BENCHMARKS.md."""
    from transformers import GenerationConfig

    model, tokenizer = lm.load_model(tiny_config("unused"))
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.3)
    model.eval()
    prompts = [tokenizer(t)["input_ids"] for t in ("1 + 1 = ?", "What is 12 - 5? Think.", "7")]
    ours = sampler.generate_ids(model, prompts, 1, 0.0, 8, -1, tokenizer.pad_token_id)
    config = GenerationConfig(max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
    out = model.generate_batch(prompts, generation_config=config, progress_bar=False)
    assert [out[f"req_{i}"].generated_tokens for i in range(3)] == ours
    with model.disable_adapter():
        assert sampler.generate_ids(model, prompts, 1, 0.0, 8, -1, tokenizer.pad_token_id) != ours
