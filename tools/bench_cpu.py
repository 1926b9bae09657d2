"""float32 against bf16 on this CPU, stage by stage: the measurement behind what `--dtype auto` means on a CPU
(`model.compute_dtype`).

    python tools/bench_cpu.py                                  # SmolLM2-135M, and Qwen2.5-Coder-0.5B where installed
    python tools/bench_cpu.py --models smollm2-135m my.gguf --repeats 3

Each (model, dtype) runs in a fresh child process, the dtypes alternating, so that each peak RSS is its own and
neither dtype profits from the other's warm caches: the sampling stage at the rows a CPU run takes (the
--sample-batch-size cap: a CPU has no memory plan), in tokens computed a second; the reference pass in pairs a
second; one training pass in seconds a pair; the process's peak RSS. Prompts: GSM8K test questions in the paper's
prompt through the chat template; pairs: GSM8K training questions, each gold solution chosen and the next
question's solution rejected. Also what bf16 changes: the largest difference between the two dtypes' reference
log-probs of the same pairs, in nats a sequence. Speed is measured here, never asserted in tests.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project, one folder up

import data  # noqa: E402
import model as models  # noqa: E402
import rpo  # noqa: E402
import training  # noqa: E402
from machinery.resume import Stage  # noqa: E402
from machinery.results import markdown_table  # noqa: E402
from tools.bench import DATA, header, timed_generate  # noqa: E402

DTYPES = ("float32", "bfloat16")


def gsm8k_pairs(n: int, tokenizer) -> list:
    """n pairs of GSM8K training questions: the gold solution (the prompt's format) chosen, the next question's
    solution rejected."""
    train = data.load_examples("gsm8k", os.path.join(DATA, "gsm8k", "train.jsonl"))[:n + 1]
    return [{"prompt": models.task_prompt(tokenizer, ex, []), "chosen": data.gold_solution(ex),
             "rejected": data.gold_solution(train[i + 1])} for i, ex in enumerate(train[:n])]


def side(args) -> None:
    """One (model, dtype), in this (child) process: prints its figures as JSON."""
    cfg = rpo.Config(model=args.model, dtype=args.dtype, task="gsm8k", max_new_tokens=args.new_tokens,
                     sample_batch_size=args.questions * args.samples, batch_size=1, grad_accum=8, epochs=1)
    policy = models.load_model(cfg)
    tests = data.load_examples("gsm8k", os.path.join(DATA, "gsm8k", "test.jsonl"))[:args.questions]
    prompts = [models.task_prompt(policy.tokenizer, ex, []) for ex in tests]
    timed_generate(policy, prompts[:2], 2, 8, 4, "warm-up")  # first-call allocations and kernel choice
    sampled = timed_generate(policy, prompts, args.samples, args.new_tokens, args.questions * args.samples, "sample")
    pairs = gsm8k_pairs(args.pairs, policy.tokenizer)
    start = time.time()
    reference = training.reference_logps(policy, pairs, cfg, Stage("reference"))
    scored = time.time() - start
    start = time.time()
    training.train(policy, pairs, reference, cfg, Stage("train", t=1))
    trained = time.time() - start
    print(json.dumps({"sample tok/s": sampled["computed"] / sampled["seconds"], "reference pairs/s":
                      len(pairs) / scored, "training s/pair": trained / len(pairs),
                      "peak RSS GiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                      "reference": reference, "threads": torch.get_num_threads()}))


def qwen_installed() -> bool:
    """Whether the built-in Qwen2.5-Coder-0.5B-Instruct's packages are installed."""
    try:
        models.check_model(models.QWEN)
        return True
    except models.DataError:
        return False


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", nargs="?", default="table", choices=("table", "side"))
    parser.add_argument("--models", nargs="+", default=None, help="default: smollm2-135m and the Qwen GGUF")
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", choices=DTYPES, help=argparse.SUPPRESS)
    parser.add_argument("--questions", type=int, default=8, help="GSM8K test questions sampled")
    parser.add_argument("--samples", type=int, default=8, help="samples a question: questions × samples rows")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    if args.what == "side":
        return side(args)
    names = args.models or [models.EMBEDDED] + ([models.QWEN] if qwen_installed() else [])
    figures = {(m, d): [] for m in names for d in DTYPES}
    for _ in range(args.repeats):
        for name in names:
            for dtype in DTYPES:  # alternating, each in a fresh process
                done = subprocess.run([sys.executable, os.path.abspath(__file__), "side", "--model", name, "--dtype",
                                       dtype, "--questions", str(args.questions), "--samples", str(args.samples),
                                       "--new-tokens", str(args.new_tokens), "--pairs", str(args.pairs)],
                                      capture_output=True, text=True)
                if done.returncode:
                    sys.exit(f"{name} {dtype}: {done.stderr.strip().splitlines()[-1]}")
                figures[(name, dtype)].append(json.loads(done.stdout.strip().splitlines()[-1]))
    rows = []
    for name in names:
        base = {k: statistics.median(f[k] for f in figures[(name, "float32")]) for k in figures[(name, "float32")][0]
                if k not in ("reference", "threads")}
        for dtype in DTYPES:
            runs = figures[(name, dtype)]
            med = {k: statistics.median(f[k] for f in runs) for k in base}
            drift = max(abs(a[s] - b[s]) for a, b in zip(runs[0]["reference"],
                                                         figures[(name, "float32")][0]["reference"])
                        for s in ("chosen", "rejected"))
            rows.append([os.path.basename(name), dtype, f"{med['sample tok/s']:.0f}",
                         f"{med['sample tok/s'] / base['sample tok/s']:.2f}", f"{med['reference pairs/s']:.2f}",
                         f"{med['reference pairs/s'] / base['reference pairs/s']:.2f}", f"{med['training s/pair']:.2f}",
                         f"{base['training s/pair'] / med['training s/pair']:.2f}", f"{med['peak RSS GiB']:.2f}",
                         f"{drift:.3f}"])
    print(header(f"float32 against bf16 on this CPU ({figures[(names[0], 'float32')][0]['threads']} torch threads): "
                 f"{args.questions} GSM8K questions × {args.samples} samples, up to {args.new_tokens} new tokens; "
                 f"{args.pairs} GSM8K pairs; medians of {args.repeats}"))
    print(markdown_table(["model", "dtype", "sampling tok/s", "× float32", "reference pairs/s", "× float32",
                          "training s/pair", "× float32 (speed)", "peak RSS GiB",
                          "largest |Δ log-prob| vs float32, nats"], rows))


if __name__ == "__main__":
    main()
