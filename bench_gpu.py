"""Measurements on a GPU, as one prepared script for a short device lease: the Llama-2-7B shape with random weights
(speed and memory do not depend on the values) in NF4 with LoRA r = 16 on every linear layer, as the presets load it.

    python bench_gpu.py                       each stage of the gsm8k-7b and math-7b presets under a 24 and a 12 GiB
                                              cap (torch.cuda.set_per_process_memory_fraction, --memory-budget the cap
                                              less 1 GiB): rows planned, rows run, peak memory, tokens/s
    python bench_gpu.py --what sampler        issue 21's sampler candidates at 16, 32, 64 and 53 rows (53: the 24 GiB
                                              plan): tokens/s, ms a step, peak, share of the bandwidth floor, hours a
                                              GSM8K iteration
    python bench_gpu.py --shape tiny --caps 0.05 --margin 0    the same on the tiny Llama, on a CPU: a check of it

Random weights never end a row, so every row runs its full length; a stage is measured as its first batch, after a
prompt of (prompt + new − --steps) tokens decoded --steps steps: the cache of every row at its last token, which is
the batch's peak, and its step time at the longest context. Prints one table, with the plan `bench.py plan` computes.
"""
import argparse
import os
import sys
import time

import torch

import bench
import lm
import memory
import sampler
import training
from losses import rpo_loss
from rundir import markdown_table


def model_of(shape: str):
    """The policy as `lm.load_model` makes it: NF4 + LoRA, bf16 compute, gradient checkpointing (the presets)."""
    if shape == "tiny":
        return lm.load_model(lm.Config(model="tiny-random", gradient_checkpointing=True))[0]
    from transformers import LlamaForCausalLM

    path = os.path.join(lm.CACHE, "llama-2-7b-shape")
    if not os.path.exists(os.path.join(path, "config.json")):  # random bf16 weights, saved once: quantised on load
        with torch.device("cuda"):
            LlamaForCausalLM(bench.llama2_7b_config()).to(torch.bfloat16).save_pretrained(path)
        lm.tiny_random()[1].save_pretrained(path)  # any tokenizer: the benchmark feeds token ids
        torch.cuda.empty_cache()
    return lm.load_model(lm.Config(model=path, load_in_4bit=True, gradient_checkpointing=True))[0]


def timed(compute) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.time()
    compute()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.time() - start


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

    def sample(rows):  # n rows a prompt; the decode steps timed apart from the prefill
        distinct = -(-len(rows) // n)
        marks = []
        seconds = timed(lambda: sampler.generate_ids(
            model, [ids[i][:prompt + new - steps] for i in range(distinct)],
            [min(n, len(rows) - i * n) for i in range(distinct)], 0.8, steps, -1, 0,
            progress=lambda step, ended: marks.append(time.time()),
            keys=sampler.row_keys(0, [r // n for r in rows], [r % n for r in rows])))
        times.append((marks[-1] - marks[0]) / max(1, len(marks) - 1) if len(marks) > 1 else seconds)
        ran.append(len(rows))

    def score(rows):  # pairs: the prompt and two responses, as the reference pass (no_grad) or a training step
        batch = lm.collate([(ids[i][:prompt], ids[i][prompt:prompt + new], ids[(i + 1) % planned][prompt:prompt + new])
                            for i in rows], 0)
        optimizer = training.make_optimizer([p for p in model.parameters() if p.requires_grad], 1e-6)

        def step():
            if kind == "score":
                with torch.no_grad():
                    lm.pair_logps(model, batch)
                return
            chosen, rejected, lengths = lm.pair_logps(model, batch)
            rpo_loss(chosen, rejected, chosen.detach(), rejected.detach(), lengths, 0.1, 1.0)[0].sum().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        model.train(kind == "train")
        times.append(timed(step))
        ran.append(len(rows))

    memory.in_chunks(list(range(planned)), planned, sample if kind == "sample" else score, name,
                     "row" if kind == "sample" else "pair", "--memory-budget")
    peak = torch.cuda.max_memory_allocated() / memory.GiB if torch.cuda.is_available() else float("nan")
    tokens = ran[0] if kind == "sample" else ran[0] * 2 * (prompt + new)
    return [planned, ran[0], f"{peak:.2f}", f"{tokens / times[0]:.0f}", f"{1000 * times[0]:.0f}"]


# =================================================================================================================
# Issue 21's candidates for the sampler's token loop, each given the same rows and forced to their full length

def merged_copy(model, dtype=None):
    """A plain copy of the policy for sampling alone: each base weight (dequantised, if 4-bit) plus its LoRA update
    B·A·scale, in `dtype` (default the compute dtype), the head in float32 as `lm.float32_head` makes it: no adapter
    modules, no 4-bit kernels at each step, for the memory of a dense copy (13.5 GB for a 7B model in bf16)."""
    import copy

    from transformers import AutoModelForCausalLM

    base = model.get_base_model()
    dtype = dtype or model.get_input_embeddings().weight.dtype
    config = copy.deepcopy(base.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device(model.device):
        dense = AutoModelForCausalLM.from_config(config, dtype=dtype)
    merged = {name + ".weight": module for name, module in base.named_modules()
              if hasattr(module, "base_layer") and hasattr(module, "get_delta_weight")}  # the LoRA layers
    own = dict(base.named_parameters())
    with torch.no_grad():
        for name, p in dense.named_parameters():
            if name in merged:
                module = merged[name]
                weight = module.base_layer.weight
                if type(weight).__name__ == "Params4bit":
                    import bitsandbytes as bnb

                    weight = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
                value = weight.float() + sum(module.get_delta_weight(a).float() for a in module.active_adapters)
            else:
                value = own[name]
            p.copy_(value.to(p.dtype))
    return lm.float32_head(dense.eval())


class Graphed:
    """`forward` for `sampler.generate_slots`: each decode step replayed from a CUDA graph, captured once per number
    of slots and cache (after two warm-up steps on a side stream); GPU only."""

    def __init__(self, model):
        self.model, self.graphs = model, {}

    def run(self, ids, position, mask, cache):
        return self.model(input_ids=ids, attention_mask=mask, position_ids=position, use_cache=True,
                          **sampler.with_cache(self.model, cache)).logits

    def __call__(self, ids, position, mask, cache):
        key = (ids.shape[0], cache.keys[0].data_ptr())
        if key not in self.graphs:
            static = [ids.clone(), position.clone(), mask.clone()]
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # the same step twice: the same keys and values, written again
                for _ in range(2):
                    self.run(*static, cache)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self.run(*static, cache)
            self.graphs[key] = (graph, static, out)
        graph, static, out = self.graphs[key]
        for buffer, value in zip(static, (ids, position, mask)):
            buffer.copy_(value)
        graph.replay()
        return out


def sample_with(candidate: str, model, prompts: list, n: int, steps: int) -> tuple:
    """(seconds, ms a decode step) of sampling n rows of each prompt, `steps` tokens each, no row stopping."""
    from transformers import GenerationConfig

    keys = sampler.row_keys(0, [p for p in range(len(prompts)) for _ in range(n)],
                            [s for _ in prompts for s in range(n)])
    marks = []
    progress = lambda step, ended: marks.append(time.time())  # noqa: E731
    if candidate == "transformers continuous batching":
        config = GenerationConfig(max_new_tokens=steps, min_new_tokens=steps, do_sample=True, temperature=0.8, top_k=0,
                                  top_p=1.0, eos_token_id=None, pad_token_id=0)
        seconds = timed(lambda: model.generate_batch([p for p in prompts for _ in range(n)],
                                                     generation_config=config, progress_bar=False))
        return seconds, 1000 * seconds / steps
    loop = sampler.generate_ids if candidate in ("loop", "merged copy + loop") else sampler.generate_slots
    extra = {} if loop is sampler.generate_ids else {"slots": len(prompts) * n}
    if candidate == "slots + CUDA graph":
        extra["forward"] = Graphed(model)
    seconds = timed(lambda: loop(model, prompts, n, 0.8, steps, -1, 0, progress=progress, keys=keys, **extra))
    per_step = (marks[-1] - marks[0]) / (len(marks) - 1) if len(marks) > 1 else seconds / steps
    return seconds, 1000 * per_step


CANDIDATES = ("loop", "slots", "slots + CUDA graph", "merged copy + loop", "transformers continuous batching")


def run_sampler(model, rows_list: list, prompt: int, steps: int, vocab: int, floor_bandwidth: float) -> list:
    """[candidate, rows, tokens/s, ms a step, peak GiB, share of the bandwidth floor, hours a GSM8K iteration]."""
    table, dense = [], None
    for candidate in CANDIDATES:
        if candidate == "slots + CUDA graph" and not torch.cuda.is_available():
            continue
        subject = model
        if candidate == "merged copy + loop":
            dense = dense or merged_copy(model)
            subject = dense
        weights = memory.resident(subject)
        for rows in rows_list:
            n = 8 if rows % 8 == 0 else 1
            prompts = torch.randint(3, vocab, (rows // n, prompt)).tolist()
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            try:
                seconds, ms = sample_with(candidate, subject, prompts, n, steps)
            except Exception as e:  # a candidate that does not run here is a row that says why
                table.append([candidate, rows, f"failed: {type(e).__name__}: {str(e)[:80]}", "-", "-", "-", "-"])
                memory.release()
                continue
            peak = torch.cuda.max_memory_allocated() / memory.GiB if torch.cuda.is_available() else float("nan")
            tok_s = rows * 1000 / ms
            cache = rows * (prompt + steps) * memory.costs(subject).cache_token
            floor = (weights + cache) / floor_bandwidth * 1000 if floor_bandwidth else float("nan")  # ms a step
            table.append([candidate, rows, f"{tok_s:.0f}", f"{ms:.1f}", f"{peak:.2f}", f"{floor / ms:.2f}",
                          f"{GSM8K_TOKENS / tok_s / 3600:.1f}"])
            memory.release()
    return table


GSM8K_TOKENS = 7473 * 30 * 175  # an iteration's sampling at the preset: questions × N × ~175 tokens (issue 21)
BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12}  # bytes/s of HBM, the makers' figures


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=("llama-2-7b", "tiny"), default="llama-2-7b")
    parser.add_argument("--presets", nargs="+", default=["gsm8k-7b", "math-7b"])
    parser.add_argument("--caps", type=float, nargs="+", default=[24, 12], help="GiB the process may allocate")
    parser.add_argument("--steps", type=int, default=16, help="decode steps timed a sampling stage")
    parser.add_argument("--margin", type=float, default=memory.MARGIN / memory.GiB,
                        help="GiB of the cap left out of --memory-budget (the default's margin)")
    parser.add_argument("--what", nargs="+", choices=("stages", "sampler"), default=["stages", "sampler"])
    parser.add_argument("--rows", type=int, nargs="+", default=[16, 32, 64, 53],
                        help="rows of the sampler candidates (53: what the 24 GiB plan picks for gsm8k-7b)")
    parser.add_argument("--sampler-steps", type=int, default=64, help="tokens each row samples")
    args = parser.parse_args(argv)
    if args.shape != "tiny" and not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs a CUDA GPU (or --shape tiny for a check of the script on a CPU)")
    model = model_of(args.shape)
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
                memory.release()
    print(bench.header(f"The 7B presets' stages measured, {args.shape} (NF4 + LoRA r = 16, bf16, checkpointing), "
                       f"weights {resident / memory.GiB:.2f} GiB"))
    print(markdown_table(["cap GiB", "preset", "stage", "tokens a row", "rows planned", "rows run (after any halving)",
                          "peak GiB", "tokens/s (sampling: decode)", "ms a step"], rows))


if __name__ == "__main__":
    main()
