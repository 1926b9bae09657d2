"""Benchmarks of the two costs of the Iterative RPO loop: sampling and DPO training steps. Each prints a table with
the machine, the versions and the commit. Speed and memory are measured here, never asserted in tests.

    python tools/bench.py sample           # the loop's sampling stage vs plain model.generate (SmolLM2-135M)
    python tools/bench.py train            # our DPO+NLL step vs TRL's DPOTrainer (pip install ".[bench]")
    python tools/bench.py reward           # the reward on the published GSM8K, MATH-500 and ARC files
    python tools/bench.py plan             # the memory plan of the 7B presets' stages, computed from the config
    python tools/bench.py memory           # the plan against the KV cache a CPU run holds (SmolLM2)
    python tools/bench.py sampler          # the sampler candidates (tools/samplers.py) on this machine (SmolLM2)
    python tools/bench.py lm-eval          # lm-evaluation-harness' GSM8K scores beside ours, same model and questions
    python tools/bench_gpu.py              # on a GPU: the 7B presets' stages under 24 and 12 GiB caps, measured

Each comparison runs both sides in the same process, alternating, and reports the median and the ratio.
"""
import argparse
import importlib.util
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from fractions import Fraction

from types import SimpleNamespace

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the project, one folder up
sys.path.insert(0, ROOT)

import data  # noqa: E402
import model as models  # noqa: E402
import reward  # noqa: E402
import rpo  # noqa: E402
import sampling  # noqa: E402
import training  # noqa: E402
from machinery import memory  # noqa: E402
from machinery.cli import parse_config  # noqa: E402
from machinery.resume import Stage  # noqa: E402
from machinery.results import markdown_table  # noqa: E402
from tools import samplers  # noqa: E402


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what the platform says."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "cpu"


def header(title: str) -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip() or \
        os.environ.get("BENCH_COMMIT", "unknown")  # a copy of the tree without .git (a remote GPU) names it
    import transformers

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{cpu_name()}, {os.cpu_count()} " \
        f"cores, {torch.get_num_threads()} torch threads, native bf16: {models.cpu_bf16() or 'none'}" + (
        f" (oneDNN capped at ONEDNN_MAX_CPU_ISA={os.environ['ONEDNN_MAX_CPU_ISA']})"
        if os.environ.get("ONEDNN_MAX_CPU_ISA") else "")
    return (f"### {title}\n\n{time.strftime('%Y-%m-%d')}, commit {commit}, {device}, torch {torch.__version__}, "
            f"transformers {transformers.__version__}\n")


# =================================================================================================================

def bench_sample(args) -> None:
    """Tokens per second of the loop's sampling stage (`sampling.generate`: one prefill per prompt shared by its
    samples, rows leave the batch at their answer line, inverse-CDF sampling) against plain `model.generate` with
    the same prompts, alternating; and the share of computed tokens that come after the final answer."""
    policy = models.load_model(rpo.Config(model=args.model))
    model, tokenizer = policy
    examples = data.arith_problems(args.questions, "train", seed=1)
    prompts = [models.task_prompt(tokenizer, ex, []) for ex in examples]
    rows = []
    for batch in args.batch:
        ours, plain, waste_ours, waste_plain = [], [], [], []
        for _ in range(args.repeats):
            stats = timed_generate(policy, prompts, batch // len(prompts) or 1, args.new_tokens, batch, "ours")
            ours.append(stats["kept"] / stats["seconds"])
            waste_ours.append(max(0.0, 1 - stats["kept"] / stats["computed"]))  # re-tokenising may merge
            tok_s, waste = plain_generate(model, tokenizer, prompts, batch, args.new_tokens)
            plain.append(tok_s)
            waste_plain.append(waste)
        rows.append([batch, f"{statistics.median(plain):.0f}", f"{statistics.median(ours):.0f}",
                     f"{statistics.median(ours) / statistics.median(plain):.2f}",
                     f"{100 * statistics.median(waste_plain):.0f}", f"{100 * statistics.median(waste_ours):.0f}"])
    print(header(f"Sampling, {args.model}, fp32, {args.new_tokens} new tokens, temperature 0.8"))
    print(markdown_table(["batch", "plain generate tok/s", "sampling.generate tok/s", "ratio",
                 "plain: % tokens after answer", "ours: % computed after answer"], rows))
    print("\ntok/s counts the tokens kept in completions (up to EOS or the end of the answer line).")


def timed_generate(policy, prompts: list, n: int, new_tokens: int, rows: int, label: str, budget: float = 0.0) -> dict:
    """`sampling.generate` at T = 0.8, timed: its seconds, the tokens the token loop computed (counted through a
    wrapper around it) and the tokens kept in the completions (re-tokenised)."""
    computed, real = [0], sampling.generate_ids

    def counting(*args, **kwargs):
        out = real(*args, **kwargs)
        computed[0] += sum(map(len, out))
        return out

    cfg = SimpleNamespace(max_new_tokens=new_tokens, sample_batch_size=rows, memory_budget=budget)
    sampling.generate_ids, start = counting, time.time()
    try:
        texts = sampling.generate(policy, prompts, list(range(len(prompts))), n, 0.8, cfg, Stage(label))
    finally:
        sampling.generate_ids = real
    seconds = time.time() - start
    kept = sum(len(policy.tokenizer(text, add_special_tokens=False)["input_ids"]) for outs in texts for text, _ in outs)
    return {"seconds": seconds, "computed": computed[0], "kept": kept}


def plain_generate(model, tokenizer, prompts: list, batch: int, new_tokens: int):
    """Plain model.generate on `batch` rows (prompts repeated), left-padded by the tokenizer; tokens kept are
    those up to the end of the answer line or EOS, the rest counts as after the answer."""
    from transformers import GenerationConfig

    texts = [models.prompt_text(tokenizer, prompts[i % len(prompts)]) for i in range(batch)]
    tokenizer.padding_side = "left"
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=True, temperature=0.8, top_k=0, top_p=1.0,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    model.eval()
    start = time.time()
    with torch.no_grad():
        out = model.generate(**enc, generation_config=config)[:, enc["input_ids"].shape[1]:]
    seconds = time.time() - start
    kept = 0
    for row in out.tolist():
        if tokenizer.eos_token_id in row:
            row = row[:row.index(tokenizer.eos_token_id) + 1]
        text = tokenizer.decode(row, skip_special_tokens=True)
        end = reward.completion_end(text)
        kept += len(tokenizer(text[:end], add_special_tokens=False)["input_ids"]) if end else len(row)
    return kept / seconds, 1 - kept / out.numel()


# =================================================================================================================

def demo_pairs(n: int) -> list:
    """Pairs of the arithmetic task in the loop's format: a right and a wrong worked answer per question."""
    pairs = []
    for ex in data.arith_problems(n, "train", seed=2):
        prompt = [{"role": "user", "content": data.build_prompt(ex)}]
        wrong = int(ex["answer"]) + 3
        pairs.append({"prompt": prompt, "chosen": data.gold_solution(ex),
                      "rejected": f"{ex['solution'].split('=')[0]}= {wrong}.\nFinal answer: {wrong}"})
    return pairs


# Every side runs in fp32 and with gradient checkpointing off, then on: TRL 1.16's DPOConfig defaults to bf16=True
# (bf16 autocast on the CPU) and to gradient checkpointing, so both are passed explicitly to compare like with like.
IMPLEMENTATIONS = ("ours", "TRL default ref", "TRL precomputed ref")
CHECKPOINTING = ", gradient checkpointing"
TRAIN_SIDES = tuple(name + suffix for suffix in ("", CHECKPOINTING) for name in IMPLEMENTATIONS)


def bench_train(args) -> None:
    """Seconds per pair and peak memory of one pass over the same pairs: ours (reference pass + training) against
    TRL's DPOTrainer with loss_type=["sigmoid", "sft"], LoRA, its default reference handling, and with
    precompute_ref_log_probs=True. Same model, pairs, batch, lengths and precision (fp32); each with gradient
    checkpointing off and on. Each pass runs in a fresh child process (so that its peak resident memory is its
    own), the sides alternating."""
    sides = list(TRAIN_SIDES)
    try:
        import trl  # noqa: F401
    except ImportError:
        print("TRL is not installed (pip install '.[bench]'): only our side is measured", file=sys.stderr)
        sides = [s for s in sides if s.startswith("ours")]
    times, memory = {k: [] for k in sides}, {k: [] for k in sides}
    for _ in range(args.repeats):
        for name in sides:
            result = subprocess.run([sys.executable, os.path.abspath(__file__), "train-side", name, "--model",
                                     args.model, "--pairs", str(args.pairs), "--batch", str(args.batch)],
                                    capture_output=True, text=True, check=True)
            seconds, peak = json.loads(result.stdout.strip().splitlines()[-1])
            times[name].append(seconds / args.pairs)
            memory[name].append(peak)
    rows = []
    for name in sides:
        checkpointing = name.endswith(CHECKPOINTING)
        base = times.get("TRL default ref" + (CHECKPOINTING if checkpointing else ""))
        rows.append([name.removesuffix(CHECKPOINTING), "on" if checkpointing else "off", "fp32",
                     f"{statistics.median(times[name]):.3f}",
                     f"{statistics.median(times[name]) / statistics.median(base):.2f}" if base else "-",
                     f"{statistics.median(memory[name]):.0f}"])
    print(header(f"DPO+NLL training, {args.model}, LoRA r=16 all-linear, {args.pairs} pairs, batch {args.batch}, "
                 f"one pass with its reference log-probs, medians of {args.repeats}"))
    print(markdown_table(["side", "gradient checkpointing", "precision", "s / pair", "× TRL default ref, same "
                          "checkpointing", "peak RSS of the process, MiB"], rows))


def train_side(args) -> None:
    """One side of `bench_train`, in this (child) process: prints [seconds, peak RSS in MiB]."""
    pairs = demo_pairs(args.pairs)
    name = args.side.removesuffix(CHECKPOINTING)
    cfg = rpo.Config(model=args.model, batch_size=args.batch, grad_accum=1, lr=1e-5, epochs=1,
                     gradient_checkpointing=args.side.endswith(CHECKPOINTING))
    seconds = ours_pass(cfg, pairs) if name == "ours" else \
        trl_pass(cfg, pairs, precompute=name == "TRL precomputed ref")
    import resource

    print(json.dumps([seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024]))


def ours_pass(cfg, pairs) -> float:
    policy = models.load_model(cfg)
    start = time.time()
    reference = training.reference_logps(policy, pairs, cfg, Stage("ours ref"))
    training.train(policy, pairs, reference, cfg, Stage("ours train", t=1))
    return time.time() - start


def trl_pass(cfg, pairs, precompute: bool) -> float:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    if cfg.model == "tiny-random":
        model, tokenizer = models.tiny_random()
    else:
        path = models.embedded_smollm2() if cfg.model == models.EMBEDDED else cfg.model
        model, tokenizer = (AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                            AutoTokenizer.from_pretrained(path))
    with tempfile.TemporaryDirectory() as out:
        config = DPOConfig(output_dir=out, per_device_train_batch_size=cfg.batch_size, num_train_epochs=1,
                           learning_rate=cfg.lr, beta=cfg.beta, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 1.0],
                           precompute_ref_log_probs=precompute, max_length=cfg.max_length, report_to=[],
                           save_strategy="no", logging_steps=1000, use_cpu=True, dataloader_num_workers=0,
                           bf16=False, gradient_checkpointing=cfg.gradient_checkpointing)
        conversational = [{"prompt": p["prompt"], "chosen": [{"role": "assistant", "content": p["chosen"]}],
                           "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in pairs]
        trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(conversational),
                             processing_class=tokenizer,
                             peft_config=LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                                                    target_modules="all-linear", task_type="CAUSAL_LM"))
        start = time.time()
        trainer.train()
        return time.time() - start


# =================================================================================================================

DATA = os.path.join(ROOT, "..", "shared", "data")
PUBLISHED = {"gsm8k": "gsm8k/test.jsonl", "math": "math/test.jsonl", "arc": "arc/ARC-Challenge-Test.jsonl"}


def published_answer(task: str, record: dict) -> str:
    """The final answer as the data set's publisher wrote it, read without our loader."""
    if task == "gsm8k":
        return record["answer"].rsplit("####", 1)[1].strip().replace(",", "")
    return record["answer"] if task == "math" else record["answerKey"]


def rewrites(gold: str, task: str, example: dict) -> list:
    """Answers a grader must accept as equal to `gold`: other notations of the same value or choice."""
    out = [gold, f"${gold}$", f"\\boxed{{{gold}}}", f" {gold}.", f"x = {gold}" if "=" not in gold else gold]
    out += remarks(gold, task)
    if task == "arc":
        text = dict(example["choices"])[gold]
        return [gold, f"({gold})", f"{gold})", f"{gold}.", f"The answer is {gold}.", f"({gold}) {text}", text,
                f"{text} (because it fits best)"] + remarks(gold, task)
    m = re.fullmatch(r"(-?)\\[dt]?frac\{(-?\d+)\}\{(\d+)\}", gold)
    if m:  # -\frac{a}{b}: a/b, the sign on the numerator, \dfrac, and the decimal where it is exact
        value = Fraction(int(m.group(2)), int(m.group(3))) * (-1 if m.group(1) else 1)
        out += [f"{value.numerator}/{value.denominator}", f"\\frac{{{value.numerator}}}{{{value.denominator}}}",
                f"\\dfrac{{{value.numerator}}}{{{value.denominator}}}"]
        if 10**6 % value.denominator == 0:
            out.append(str(float(value)))
    if re.fullmatch(r"-?\d+", gold):
        out += [f"{gold}.0", f"{int(gold):,}", f"{gold} \\text{{ units}}", f"{gold}^\\circ"]
    words = re.fullmatch(r"\\text\{([A-Za-z ]+)\}", gold)
    if words:
        out += [words.group(1), f"\\mbox{{{words.group(1)}}}"]
    items = gold.split(",")
    if 1 < len(items) <= 5 and not set("([{") & set(gold) and not re.search(r"\d,(\\!)?\s*\d{3}\b", gold):
        out.append(", ".join(reversed([i.strip() for i in items])))  # an unordered list of solutions
    return out


def remarks(answer: str, task: str, said: str = "") -> list:
    """`answer` followed by the remarks models write after an answer: in brackets, "= …", a sentence, a reason.
    `said` goes into the remarks (the gold, for the wrong answers: a remark that names it must not earn a reward)."""
    said = said or answer
    out = [f"{answer} (because the steps above give {said})", f"{answer} (= {said})", f"{answer}. That is {said}.",
           f"{answer}, because the steps above give {said}"]
    if task in reward.NUMERIC_TASKS:
        out += [f"{answer} = 1 + {said} - 1", f"{answer} apples (since 3 x 4 = 12)"]
    if task == "math" and "=" not in answer:
        out.append(f"{answer} = {said}" if said == answer else f"{said} + 0 = {answer}")
    return out


def wrong_answers(gold: str, task: str, example: dict) -> list:
    """Answers a grader must refuse: empty, words, and other values (the gold's neighbours, other choices)."""
    out = ["", " ", "\\text{}", "\\text{wrong}", "none", "x"]
    if task == "arc":
        labels = {label for label, _ in example["choices"]}
        others = [label for label in labels if label != gold]
        return out + others + [text for label, text in example["choices"] if label != gold and
                               text.strip(" .") not in labels] + remarks(min(others), task, gold)
    value = reward._math_value(reward.normalize_math(gold)) if task == "math" else Fraction(gold)
    if value is not None:
        out += [str(value + 1), str(-value) if value else "1", str(value + Fraction(1, 3))]
        out += remarks(str(value + 1), task, gold)  # a wrong value whose remark names the gold
    if task == "math" and "," in gold and gold[0] not in "([{":
        out.append(gold.rsplit(",", 1)[0])  # a list with a solution missing
    if task == "math" and gold[0] in "([" and "," in gold:
        out.append(gold[0] + ",".join(reversed(gold[1:-1].split(","))) + gold[-1])  # a tuple out of order
    return out


def reward_counts(task: str, path: str) -> dict:
    """The reward on one published file: rows, golds as published, rewrites rewarded, wrong answers rewarded."""
    examples = data.load_examples(task, path)
    with open(path, encoding="utf-8") as f:
        published = [published_answer(task, json.loads(line)) for line in f if line.strip()]
    right = [(f"So we are done.\nFinal answer: {r}", ex) for ex in examples
             for r in rewrites(ex["answer"], task, ex)]
    wrong = [(f"So we are done.\nFinal answer: {w}", ex) for ex in examples
             for w in wrong_answers(ex["answer"], task, ex)]
    start = time.perf_counter()
    rewarded = [reward.judge(c, ex["answer"], task, ex.get("choices"))[1] for c, ex in right + wrong]
    seconds = (time.perf_counter() - start) / len(rewarded)
    theirs = math_verify_counts(right, wrong) if task == "math" else None
    return {"rows": len(examples), "published": len(published), "math_verify": theirs,
            "golds_as_published": sum(e["answer"] == p for e, p in zip(examples, published)),
            "right": len(right), "missed": [c for (c, _), r in zip(right, rewarded) if not r],
            "wrong": len(wrong), "fooled": [c for (c, _), r in zip(wrong, rewarded[len(right):]) if r],
            "seconds_per_call": seconds}


def math_verify_counts(right: list, wrong: list) -> dict | None:
    """Hugging Face's math-verify (the grader TRL and open-r1 use) alone, as `--math-grader math-verify` calls it
    (`reward.math_verify_equal`), on the same rewrites and wrong answers; None where it is not installed."""
    if importlib.util.find_spec("math_verify") is None:
        return None
    start = time.perf_counter()
    verdicts = [reward.math_verify_equal(c.split("Final answer:", 1)[1], ex["answer"]) for c, ex in right + wrong]
    return {"missed": [c for (c, _), v in zip(right, verdicts) if not v],
            "fooled": [c for (c, _), v in zip(wrong, verdicts[len(right):]) if v],
            "seconds_per_call": (time.perf_counter() - start) / len(verdicts)}


def bench_reward(args) -> None:
    """Per published data set: rows loaded, golds equal to the published answer, equivalent rewrites rewarded, wrong
    answers rewarded (must be 0), and the time per reward call, plus hostile completions."""
    rows = []
    for task in args.tasks:
        path = os.path.join(args.data, PUBLISHED[task])
        n = reward_counts(task, path)
        rows.append([task, PUBLISHED[task], n["rows"], f"{n['golds_as_published']} / {n['published']}",
                     f"{n['right'] - len(n['missed'])} / {n['right']}", f"{len(n['fooled'])} / {n['wrong']}",
                     f"{1e6 * n['seconds_per_call']:.0f}"])
        for c in (n["fooled"] + n["missed"])[:args.show]:
            print(f"{task}: {'FOOLED' if c in n['fooled'] else 'missed'}: {c.splitlines()[-1]!r}", file=sys.stderr)
        if n["math_verify"]:
            mv = n["math_verify"]
            rows.append([f"{task}, math-verify", PUBLISHED[task], n["rows"], "-",
                         f"{n['right'] - len(mv['missed'])} / {n['right']}", f"{len(mv['fooled'])} / {n['wrong']}",
                         f"{1e6 * mv['seconds_per_call']:.0f}"])
            for c in (mv["fooled"] + mv["missed"])[:args.show]:
                print(f"math-verify: {'FOOLED' if c in mv['fooled'] else 'missed'}: {c.splitlines()[-1]!r}",
                      file=sys.stderr)
    hostile = {"1 MB of text": "x " * 500_000, "a 20,000-digit number": "Final answer: " + "9" * 20_000,
               "50,000 nested \\boxed{": "\\boxed{" * 50_000 + "1" + "}" * 50_000,
               "a 10-deep \\frac": "Final answer: " + "\\frac{1}{" * 10 + "2" + "}" * 10}
    for name, completion in hostile.items():
        start = time.perf_counter()
        for task in ("gsm8k", "math", "arc"):
            reward.judge(completion, "1", task, [("A", "x"), ("B", "y")] if task == "arc" else None)
        rows.append(["hostile", name, "-", "-", "-", "-", f"{1e6 * (time.perf_counter() - start) / 3:.0f}"])
        if importlib.util.find_spec("math_verify"):
            start = time.perf_counter()
            reward.judge(completion, "1", "math", grader="math-verify")
            rows.append(["hostile, math with math-verify", name, "-", "-", "-", "-",
                         f"{1e6 * (time.perf_counter() - start):.0f}"])
    print(header("The reward (reward.judge) on the published data sets"))
    print(markdown_table(["task", "file", "rows loaded", "golds equal to the published answer",
                         "equivalent rewrites rewarded", "wrong answers rewarded", "µs per call"], rows))


# =================================================================================================================
# Memory: the plan of the 7B presets (computed from the config alone), and the plan against what a run holds (CPU)

def llama2_7b_config():
    """Llama-2-7B's shape (its published config.json), built here: nothing is downloaded."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)


def qlora_resident(config, lora_r: int) -> int:
    """Bytes a QLoRA model of this config holds, computed: NF4 linear weights with double-quantised absmax
    (0.5 + 1/64 + 4/(64·256) bytes a weight), bf16 embeddings and norms, the float32 head (`model.float32_head`), and
    float32 LoRA A and B matrices on every linear layer."""
    hidden, inner, layers, vocab = config.hidden_size, config.intermediate_size, config.num_hidden_layers, \
        config.vocab_size
    kv = (config.num_key_value_heads or config.num_attention_heads) * (hidden // config.num_attention_heads)
    shapes = [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden), (hidden, inner), (hidden, inner),
              (inner, hidden)]  # q, k, v, o, gate, up, down: (in, out)
    weights = layers * sum(i * o for i, o in shapes)
    lora = layers * sum((i + o) * lora_r for i, o in shapes)
    return int(weights * (0.5 + 1 / 64 + 4 / (64 * 256))) + vocab * hidden * (2 + 4) + lora * 4 + \
        (2 * layers + 1) * hidden * 2


# The longest prompt of each task in Llama-2 tokens, with the chat template, as counted elsewhere with Llama-2's
# tokenizer (GSM8K and ARC 115-165 tokens, MATH's 4-shot prompt 1,000-1,600); it cannot be downloaded here.
LONGEST_PROMPT = {"gsm8k": 165, "arc": 165, "math": 1600}


def preset_stages(name: str) -> list:
    """(stage, kind, rows per prompt or None, prompt tokens, new or response tokens, cap) of a preset's stages."""
    cfg = parse_config(rpo.Config, ["--preset", name], rpo.PRESETS)
    prompt, new = LONGEST_PROMPT[cfg.task], cfg.max_new_tokens
    response = min(new + 1, cfg.max_length - prompt)  # a pair over --max-length tokens is dropped
    return [(f"sampling, N = {cfg.samples_per_question}", "sample", cfg.samples_per_question, prompt, new,
             cfg.sample_batch_size),
            ("greedy evaluation", "sample", 1, prompt, new, cfg.sample_batch_size),
            (f"maj@{cfg.eval_k}", "sample", cfg.eval_k, prompt, new, cfg.sample_batch_size),
            ("held-out scoring (greedy)", "sample", 1, prompt, new, cfg.sample_batch_size),
            ("reference pass", "score", None, prompt, response, cfg.batch_size),
            ("training step", "train", None, prompt, response, cfg.batch_size)]


def stage_plan(costs, train_costs, space: int, lora: int, stage: tuple) -> tuple:
    """(rows, planned peak bytes) of a stage under `space` bytes (the presets score pairs under checkpointing)."""
    _, kind, n, prompt, new, cap = stage
    if kind == "sample":
        rows = memory.sampling_rows(costs, space, prompt, new, n, cap)
        return rows, memory.sampling_peak(costs, rows, prompt, new, n)
    c, grad = (train_costs, True) if kind == "train" else (costs, False)
    space -= 12 * lora if grad else 0  # float32 gradients and AdamW moments
    rows = memory.scoring_rows(c, space, prompt, new, cap, grad, shared=False)
    return rows, memory.scoring_peak(c, rows, prompt, new, grad, False) + (12 * lora if grad else 0)


def bench_plan(args) -> None:
    """The rows each stage of the 7B presets plans, and its planned peak, computed from Llama-2-7B's config: NF4
    base, bf16 activations and cache, float32 head, LoRA r = 16; the budget is the card's memory less the CUDA
    context and the 1 GiB margin (`--memory-budget`). Beside it, the code before: a fixed batch (the cap) and a
    float32 KV cache."""
    config = llama2_7b_config()
    resident = qlora_resident(config, args.lora_r)
    now = memory.costs_from_config(config, 2, 4, checkpointing=True)
    before = memory.costs_from_config(config, 4, 4, checkpointing=True)  # prepare_model_for_kbit_training: float32
    lora = (qlora_resident(config, args.lora_r) - qlora_resident(config, 0)) // 4
    rows = []
    for preset in args.presets:
        for stage in preset_stages(preset):
            row = [preset, stage[0], f"{stage[3]} + {stage[4]}"]
            for card in args.cards:
                space = int((card - args.context - memory.MARGIN / memory.GiB) * memory.GiB) - resident
                planned, peak = stage_plan(now, now, space, lora, stage)
                row += [planned, f"{(resident + peak) / memory.GiB:.1f}"]
            old = stage[5]
            _, old_peak = stage_plan(before, before, 10**15, lora, stage[:5] + (old,))
            row += [old, f"{(resident + old_peak) / memory.GiB:.1f}", "not measured"]
            rows.append(row)
    print(header(f"The memory plan of the 7B presets, computed from Llama-2-7B's config (weights "
                 f"{resident / memory.GiB:.2f} GiB computed, LoRA r = {args.lora_r})"))
    head = ["preset", "stage", "tokens a row (longest)"]
    for card in args.cards:
        head += [f"{card:g} GiB card: rows", "planned peak GiB"]
    print(markdown_table(head + ["before: rows (fixed)", "before: peak GiB, float32 cache", "GPU: measured"],
                         rows))
    print(f"\nComputed, not measured: the budget is each card's memory less {args.context:g} GiB of CUDA context and "
          "the 1 GiB margin; prompts as long as the longest in LONGEST_PROMPT; the peaks add the weights.")


def bench_memory(args) -> None:
    """The plan against what a run holds, on this machine: the embedded SmolLM2 samples N = 8 rows per question at
    --memory-budget B; the planned rows and peak beside the KV cache it really held (every layer's keys and values,
    summed at each step) and the growth of the process's peak resident memory over the stage."""
    import weakref

    from transformers.cache_utils import DynamicLayer

    policy = models.load_model(rpo.Config(model=args.model))
    model, tokenizer = policy
    prompts = [models.task_prompt(tokenizer, ex, []) for ex in data.arith_problems(args.questions, "train", seed=1)]
    longest = max(len(models.encode_prompt(tokenizer, p)) for p in prompts)
    costs, layers, peak_cache = memory.costs(model), weakref.WeakKeyDictionary(), [0]
    real = DynamicLayer.update

    def update(self, key_states, value_states, *rest, **kwargs):  # the cache a run holds, exactly
        out = real(self, key_states, value_states, *rest, **kwargs)
        layers[self] = 2 * self.keys.numel() * self.keys.element_size()
        peak_cache[0] = max(peak_cache[0], sum(layers.values()))
        return out

    DynamicLayer.update = update
    timed_generate(policy, prompts[:2], 8, 8, args.cap, "warm-up")  # first-call allocations, not counted
    resident, rows = memory.resident(model), []
    for budget in args.budgets:
        space = int(budget * memory.GiB) - resident
        planned = memory.sampling_rows(costs, space, longest, args.new_tokens, 8, args.cap)
        peak_cache[0], before = 0, rss_reset()
        stats = timed_generate(policy, prompts, 8, args.new_tokens, args.cap, f"budget {budget}", budget)
        grown = rss_peak() - before
        rows.append([f"{budget:g}", f"{space / 2**20:.0f}", planned,
                     f"{memory.sampling_peak(costs, planned, longest, args.new_tokens, 8) / 2**20:.0f}",
                     f"{planned * (longest + args.new_tokens) * costs.cache_token / 2**20:.0f}",
                     f"{peak_cache[0] / 2**20:.0f}", f"{grown / 2**20:.0f}", f"{stats['kept'] / stats['seconds']:.0f}"])
    DynamicLayer.update = real
    print(header(f"The memory plan against a run, {args.model}, {args.questions} prompts × N = 8, up to "
                 f"{args.new_tokens} new tokens (prompts up to {longest} tokens), cap {args.cap} rows"))
    print(markdown_table(["--memory-budget GiB", "space for the stage MiB", "rows planned", "planned peak MiB",
                          "planned cache MiB", "cache held MiB (measured)", "peak RSS growth MiB (measured)",
                          "tok/s"], rows))


def bench_sampler(args) -> None:
    """The sampler candidates on this machine (`samplers.run_sampler`): the same rows through each, forced to their
    full length, alternating candidates within one process."""
    model = models.load_model(rpo.Config(model=args.model)).model
    rows = []
    for _ in range(args.repeats):
        rows += samplers.run_sampler(model, args.rows, args.prompt, args.steps, model.config.vocab_size, 0.0)
    print(header(f"Sampler candidates, {args.model}, random prompts of {args.prompt} tokens, {args.steps} tokens a "
                 f"row, T = 0.8, no row stopping; {args.repeats} rounds"))
    print(markdown_table(["candidate", "rows", "tokens/s", "ms a step", "peak GiB", "share of the bandwidth floor",
                          "hours a GSM8K iteration (39M tokens)"], rows))


def bench_lm_eval(args) -> None:
    """lm-evaluation-harness' GSM8K scores beside ours on the same model and the same test questions: its stock
    `gsm8k` task (5-shot "Question: … Answer:", answers ending "#### n", strict-match and flexible-extract) read
    from the published files here instead of the hub, and `sampling.evaluate` (the paper's zero-shot prompt in the chat
    template, the "Final answer:" line as strict-match, lm-evaluation-harness' rule as flexible-extract)."""
    import lm_eval
    import yaml
    from lm_eval.tasks import TaskManager

    train, test = (os.path.join(args.data, "gsm8k", f"{split}.jsonl") for split in ("train", "test"))
    with open(os.path.join(os.path.dirname(lm_eval.__file__), "tasks", "gsm8k", "gsm8k.yaml")) as f:
        task = yaml.safe_load(f)
    task.update(task="gsm8k_local", dataset_path="json", dataset_kwargs={"data_files": {"train": train, "test": test}})
    task.pop("dataset_name", None)
    task.pop("tag", None)
    model_path = models.embedded_smollm2() if args.model == models.EMBEDDED else args.model
    with tempfile.TemporaryDirectory() as folder:
        with open(os.path.join(folder, "gsm8k_local.yaml"), "w") as f:
            yaml.safe_dump(task, f)
        model_args = f"pretrained={model_path},dtype=float32" + (f",peft={args.adapter}" if args.adapter else "")
        start = time.time()
        results = lm_eval.simple_evaluate(model="hf", model_args=model_args, tasks=["gsm8k_local"], limit=args.limit,
                                          batch_size=args.batch, device="cpu", task_manager=TaskManager(
                                              include_path=folder))["results"]["gsm8k_local"]
        theirs_seconds = time.time() - start
    cfg = rpo.Config(model=args.model, task="gsm8k", max_new_tokens=args.new_tokens, sample_batch_size=args.batch)
    policy = models.load_model(cfg)
    if args.adapter:
        policy.load(args.adapter)
    start = time.time()
    ours = sampling.evaluate(policy, cfg, data.load_examples("gsm8k", test)[:args.limit], [], Stage("ours", t=0))
    rows = [["lm-evaluation-harness " + lm_eval.__version__ + ", task gsm8k (v3) on the local files",
             "5-shot, Question: … Answer:, until \"Question:\"", f"{100 * results['exact_match,strict-match']:.1f}",
             f"{100 * results['exact_match,flexible-extract']:.1f}", f"{theirs_seconds:.0f}"],
            ["ours, sampling.evaluate",
             f"0-shot, the paper's prompt in the chat template, up to {args.new_tokens} tokens",
             f"{100 * ours['strict-match']:.1f}", f"{100 * ours['flexible-extract']:.1f}",
             f"{time.time() - start:.0f}"]]
    print(header(f"GSM8K test, the first {args.limit} questions, {args.model}" +
                 (f" + adapter {args.adapter}" if args.adapter else "") + ", greedy"))
    print(markdown_table(["harness", "prompt", "strict-match %", "flexible-extract %", "seconds"], rows))


def rss_reset() -> int:
    """Reset the process's peak resident memory (Linux: /proc/self/clear_refs) and return the current one."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return rss_peak()


def rss_peak() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("sample", help="sampling stage vs plain generate")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--batch", type=int, nargs="+", default=[8, 32, 64, 128])
    p.add_argument("--questions", type=int, default=8, help="distinct prompts, repeated to fill a batch")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p = sub.add_parser("train", help="DPO+NLL training vs TRL DPOTrainer")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--pairs", type=int, default=16)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p = sub.add_parser("train-side", help=argparse.SUPPRESS)
    p.add_argument("side", choices=TRAIN_SIDES)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--pairs", type=int, default=16)
    p.add_argument("--batch", type=int, default=4)
    p = sub.add_parser("reward", help="the reward on the published data sets: equivalents, wrong answers, time")
    p.add_argument("--data", default=DATA, help="the folder of the published files (default: ../shared/data)")
    p.add_argument("--tasks", nargs="+", default=["gsm8k", "math", "arc"], choices=sorted(PUBLISHED))
    p.add_argument("--show", type=int, default=10, help="print up to this many misses and false rewards")
    p = sub.add_parser("plan", help="the memory plan of the 7B presets' stages, computed from Llama-2-7B's config")
    p.add_argument("--presets", nargs="+", default=["gsm8k-7b", "math-7b"])
    p.add_argument("--cards", type=float, nargs="+", default=[24, 12], help="GiB of the card")
    p.add_argument("--context", type=float, default=0.5, help="GiB the CUDA context takes outside PyTorch")
    p.add_argument("--lora-r", type=int, default=16)
    p = sub.add_parser("memory", help="the memory plan against the cache a CPU run holds")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.6, 0.8, 1.2])
    p.add_argument("--questions", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--cap", type=int, default=128)
    p = sub.add_parser("sampler", help="the sampler candidates (tools/samplers.py), forced to their full length")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rows", type=int, nargs="+", default=[32, 128])
    p.add_argument("--prompt", type=int, default=165, help="tokens of each (random) prompt")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p = sub.add_parser("lm-eval", help="lm-evaluation-harness' GSM8K scores beside ours (pip install lm-eval)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--adapter", default="", help="a saved adapter folder, e.g. runs/demo/iter_1/adapter")
    p.add_argument("--data", default=DATA, help="the folder of the published files (default: ../shared/data)")
    p.add_argument("--limit", type=int, default=100, help="the first test questions")
    p.add_argument("--new-tokens", type=int, default=256, help="ours: most tokens a completion (theirs: 256)")
    p.add_argument("--batch", type=int, default=16)
    args = parser.parse_args(argv)
    {"sample": bench_sample, "train": bench_train, "train-side": train_side, "reward": bench_reward,
     "plan": bench_plan, "memory": bench_memory, "sampler": bench_sampler, "lm-eval": bench_lm_eval}[args.what](args)


if __name__ == "__main__":
    main()
