"""Measurements on a GPU, as one prepared script for a short device lease: the Llama-2-7B shape with random weights
(speed and memory do not depend on the values) in NF4 with LoRA r = 16 on every linear layer, as the presets load it.

    python bench_gpu.py                       each stage of the gsm8k-7b and math-7b presets under a 24 and a 12 GiB
                                              cap (torch.cuda.set_per_process_memory_fraction, --memory-budget the cap
                                              less 1 GiB): rows planned, rows run, peak memory, tokens/s
    python bench_gpu.py --what sampler        the sampler candidates (tools/samplers.py) at 16, 32, 64 and 53 rows
                                              (53: the 24 GiB plan): tokens/s, ms a step, peak, share of the bandwidth
                                              floor, hours a GSM8K iteration
    python bench_gpu.py --what engine         `--engine vllm` (machinery/engine.py) at --rows rows: the merged bf16
                                              copy written, vLLM started (its own process), --sampler-steps tokens a
                                              row sampled at T = 0.8: tokens/s and the stage's seconds (needs vLLM
                                              installed where the lease runs; --shape smollm2 checks it on a CPU)
    python bench_gpu.py --shape tiny --caps 0.05 --margin 0    the same on the tiny Llama, on a CPU: a check of it

Random weights never end a row, so every row runs its full length; a stage is measured as its first batch, after a
prompt of (prompt + new − --steps) tokens decoded --steps steps: the cache of every row at its last token, which is
the batch's peak, and its step time at the longest context. Prints one table, with the plan `tools/bench.py plan`
computes.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project, one folder up

import model as models  # noqa: E402
import rpo  # noqa: E402
import training  # noqa: E402
from losses import rpo_loss  # noqa: E402
from machinery import memory  # noqa: E402
from machinery.resume import Stage, in_chunks, release  # noqa: E402
from machinery.results import markdown_table  # noqa: E402
from sampling import generate_ids, row_keys  # noqa: E402
from tools import bench  # noqa: E402
from tools.samplers import BANDWIDTH, run_sampler, timed  # noqa: E402


def model_of(shape: str):
    """The policy as `model.load_model` makes it: NF4 + LoRA, bf16 compute, gradient checkpointing (the presets)."""
    if shape in ("tiny", "smollm2"):
        name = "tiny-random" if shape == "tiny" else "smollm2-135m"
        return models.load_model(rpo.Config(model=name, gradient_checkpointing=True))
    from transformers import LlamaForCausalLM

    path = os.path.join(models.CACHE, "llama-2-7b-shape")
    if not os.path.exists(os.path.join(path, "config.json")):  # random bf16 weights, saved once: quantised on load
        with torch.device("cuda"):
            LlamaForCausalLM(bench.llama2_7b_config()).to(torch.bfloat16).save_pretrained(path)
        models.tiny_random()[1].save_pretrained(path)  # any tokenizer: the benchmark feeds token ids
        torch.cuda.empty_cache()
    return models.load_model(rpo.Config(model=path, load_in_4bit=True, gradient_checkpointing=True))


def run_engine(policy, rows_list: list, prompt: int, new_tokens: int, vllm_python: str) -> list:
    """`--engine vllm` as a stage runs it, at each number of rows: [rows, tokens, tokens/s of the sampling, seconds
    of the stage (the merged copy, the engine's start, the sampling)]."""
    import tempfile
    from types import SimpleNamespace

    from machinery import engine

    table = []
    for rows in rows_list:
        cfg = SimpleNamespace(vllm_python=vllm_python)
        ids = torch.randint(3, policy.model.config.vocab_size, (rows, prompt)).tolist()
        with tempfile.TemporaryDirectory() as folder:
            start = time.time()
            with engine.Engine(policy, cfg, Stage(f"engine, {rows} rows", folder=folder), prompt + new_tokens) as vllm:
                sampling = time.time()
                tokens = sum(map(len, vllm.generate(ids, list(range(rows)), 0.8, new_tokens)))
                sampling = time.time() - sampling
            table.append([rows, tokens, f"{tokens / sampling:.0f}", f"{time.time() - start:.1f}"])
    return table


def run_stage(model, stage: tuple, budget: float, steps: int, vocab: int) -> list:
    """[rows planned, rows run, peak GiB, tokens/s, ms a step] of one stage's first batch under `budget` GiB."""
    name, kind, n, prompt, new, cap = stage
    costs = memory.costs(model, checkpointing=kind != "sample")
    space = memory.available(budget, model)
    if kind == "train":
        space -= 12 * sum(p.numel() for p in model.parameters() if p.requires_grad)
    planned = memory.sampling_rows(costs, space, prompt, new, n, cap) if kind == "sample" else \
        memory.scoring_rows(costs, space, prompt, new, cap, kind == "train", shared=False)
    ids = torch.randint(3, vocab, (planned, prompt + new)).tolist()
    times, ran = [], []
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()

    def sample(rows, bar):  # n rows a prompt; the decode steps timed apart from the prefill
        distinct = -(-len(rows) // n)
        marks = []
        seconds = timed(lambda: generate_ids(
            model, [ids[i][:prompt + new - steps] for i in range(distinct)],
            [min(n, len(rows) - i * n) for i in range(distinct)], 0.8, steps, -1, 0,
            progress=lambda step, ended: marks.append(time.time()),
            keys=row_keys(0, [r // n for r in rows], [r % n for r in rows])))
        times.append((marks[-1] - marks[0]) / max(1, len(marks) - 1) if len(marks) > 1 else seconds)
        ran.append(len(rows))
        return {}

    def score(rows, bar):  # pairs: the prompt and two responses, as the reference pass (no_grad) or a training step
        batch = training.collate([(ids[i][:prompt], ids[i][prompt:prompt + new],
                                   ids[(i + 1) % planned][prompt:prompt + new]) for i in rows], 0)
        optimizer = training.make_optimizer([p for p in model.parameters() if p.requires_grad], 1e-6)

        def step():
            if kind == "score":
                with torch.no_grad():
                    training.pair_logps(model, batch)
                return
            chosen, rejected, lengths = training.pair_logps(model, batch)
            rpo_loss(chosen, rejected, chosen.detach(), rejected.detach(), lengths, 0.1, 1.0)[0].sum().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        model.train(kind == "train")
        times.append(timed(step))
        ran.append(len(rows))
        return {}

    in_chunks(list(range(planned)), planned, sample if kind == "sample" else score, Stage(name),
              unit="row" if kind == "sample" else "pair", lower="--memory-budget")
    peak = torch.cuda.max_memory_allocated() / memory.GiB if torch.cuda.is_available() else float("nan")
    tokens = ran[0] if kind == "sample" else ran[0] * 2 * (prompt + new)
    return [planned, ran[0], f"{peak:.2f}", f"{tokens / times[0]:.0f}", f"{1000 * times[0]:.0f}"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=("llama-2-7b", "tiny", "smollm2"), default="llama-2-7b")
    parser.add_argument("--presets", nargs="+", default=["gsm8k-7b", "math-7b"])
    parser.add_argument("--caps", type=float, nargs="+", default=[24, 12], help="GiB the process may allocate")
    parser.add_argument("--steps", type=int, default=16, help="decode steps timed a sampling stage")
    parser.add_argument("--margin", type=float, default=memory.MARGIN / memory.GiB,
                        help="GiB of the cap left out of --memory-budget (the default's margin)")
    parser.add_argument("--what", nargs="+", choices=("stages", "sampler", "engine"), default=["stages", "sampler"])
    parser.add_argument("--vllm-python", default="", help="--what engine: the interpreter that has vLLM")
    parser.add_argument("--rows", type=int, nargs="+", default=[16, 32, 64, 53],
                        help="rows of the sampler candidates (53: what the 24 GiB plan picks for gsm8k-7b)")
    parser.add_argument("--sampler-steps", type=int, default=64, help="tokens each row samples")
    args = parser.parse_args(argv)
    if args.shape == "llama-2-7b" and not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs a CUDA GPU (or --shape tiny for a check of the script on a CPU)")
    policy = model_of(args.shape)
    model = policy.model
    if "engine" in args.what:
        table = run_engine(policy, args.rows, bench.LONGEST_PROMPT["gsm8k"], args.sampler_steps, args.vllm_python)
        print(bench.header(f"--engine vllm, {args.shape} merged into bf16, prompts of "
                           f"{bench.LONGEST_PROMPT['gsm8k']} tokens, {args.sampler_steps} tokens a row, T = 0.8"))
        print(markdown_table(["rows", "tokens", "tokens/s (sampling)", "stage s (copy + start + sampling)"], table))
    vocab = model.config.vocab_size
    resident = torch.cuda.memory_allocated() if torch.cuda.is_available() else memory.resident(model)
    if "sampler" in args.what:
        name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
        bandwidth = next((b for k, b in BANDWIDTH.items() if k in name), 0.0)
        table = run_sampler(model, args.rows, bench.LONGEST_PROMPT["gsm8k"], args.sampler_steps, vocab, bandwidth)
        print(bench.header(f"Sampler candidates, {args.shape}, prompts of {bench.LONGEST_PROMPT['gsm8k']} tokens, "
                           f"{args.sampler_steps} tokens a row, T = 0.8, no row stopping"))
        print(markdown_table(["candidate", "rows", "tokens/s", "ms a step", "peak GiB", "share of the bandwidth floor",
                              "hours a GSM8K iteration (39M tokens)"], table))
    if "stages" not in args.what:
        return
    rows = []
    for cap in args.caps:
        if torch.cuda.is_available():
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(cap * memory.GiB / total)
        for preset in args.presets:
            for stage in bench.preset_stages(preset):
                rows.append([f"{cap:g}", preset, stage[0], f"{stage[3]} + {stage[4]}"] +
                            run_stage(model, stage, cap - args.margin, args.steps, vocab))
                release()
    print(bench.header(f"The 7B presets' stages measured, {args.shape} (NF4 + LoRA r = 16, bf16, checkpointing), "
                       f"weights {resident / memory.GiB:.2f} GiB"))
    print(markdown_table(["cap GiB", "preset", "stage", "tokens a row", "rows planned", "rows run (after any halving)",
                          "peak GiB", "tokens/s (sampling: decode)", "ms a step"], rows))


if __name__ == "__main__":
    main()
