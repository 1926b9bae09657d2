"""Candidates for the sampler's token loop, measured against the one rpo.py uses (`sampling.generate_ids`) by
`bench.py sampler` on a CPU and `bench_gpu.py --what sampler` on a GPU; none is in the loop until a measurement on
a GPU chooses one (docs/BENCHMARKS.md).

    generate_slots      fixed slots, refilled as rows end, every decode step of one shape (the same rows as the
                        loop: tested), so that a step can be replayed from a CUDA graph
    Graphed             that replay, for `generate_slots(forward=...)`; GPU only
    merged_copy         the policy as one dense model (base + B·A·scale), for sampling alone
    run_sampler         each candidate on the same rows, forced to their full length: tok/s, ms a step, peak memory
"""
import os
import sys
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project, one folder up

from machinery import memory  # noqa: E402
from machinery.resume import release  # noqa: E402
from model import float32_head, with_cache  # noqa: E402
from sampling import generate_ids, prefill, row_keys, sample_tokens, uniforms  # noqa: E402



class SlotCache:
    """The KV cache of `generate_slots`: per layer, keys and values of (slots, heads, capacity, head size). Every
    row is written at the same column each step (`column`, a one-element tensor, so that a step's shapes and
    addresses never change: what a CUDA graph needs), a row's own tokens right-aligned before it; attention masks
    out the rest. Duck-typed for the attention layers, which call `update` and nothing else here."""

    def __init__(self, layers: list, slots: int, capacity: int, column: int):
        self.keys = [k.new_zeros(slots, k.shape[1], capacity, k.shape[3]) for k, _ in layers]
        self.values = [v.new_zeros(slots, v.shape[1], capacity, v.shape[3]) for _, v in layers]
        self.column = torch.tensor([column], device=layers[0][0].device)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.keys[layer_idx].index_copy_(2, self.column, key_states)
        self.values[layer_idx].index_copy_(2, self.column, value_states)
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.column.item())

    def keep(self, slots: torch.Tensor) -> None:
        """Only these slots from now on (the tail of a stage, when no row waits for one)."""
        self.keys = [k[slots] for k in self.keys]
        self.values = [v[slots] for v in self.values]

    def shift(self, by: int) -> None:
        """Every row `by` columns to the left, the column too: room again at the right end. In place, so that a
        captured graph still reads the same tensors."""
        for t in self.keys + self.values:
            t[:, :, :-by] = t[:, :, by:].clone()
            t[:, :, -by:] = 0
        self.column -= by


class SlotLoop:
    """The state of `generate_slots`: `slots` rows in flight in one static cache (`SlotCache`), the row each slot
    holds, what each slot's next token sees, and the rows still waiting."""

    def __init__(self, model, prompts: list, repeats: list, temperature: float, max_new_tokens: int, eos_id: int,
                 pad_id: int, done: Callable[[list], bool], keys: torch.Tensor | None, slots: int):
        self.model, self.prompts, self.temperature, self.new = model, prompts, temperature, max_new_tokens
        self.eos_id, self.pad_id, self.done, self.keys, self.device = eos_id, pad_id, done, keys, model.device
        self.row_prompt = [p for p, r in enumerate(repeats) for _ in range(r)]
        self.waiting = list(range(len(self.row_prompt)))[::-1]  # popped from the end: row 0 first
        self.out = [[] for _ in self.row_prompt]
        self.longest = max(map(len, prompts))
        self.capacity, self.column = 2 * self.longest + max_new_tokens, self.longest  # a prompt fits before it
        slots = min(slots, len(self.row_prompt))
        self.held = [-1] * slots  # the row each slot holds
        self.begins = [self.column] * slots  # the column of a slot's first token
        self.visible = torch.zeros(slots, self.capacity, dtype=torch.bool, device=self.device)  # what it sees
        self.token = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.position = torch.zeros(slots, 1, dtype=torch.long, device=self.device)
        self.slot_keys = torch.zeros(slots, 2, dtype=torch.long, device=self.device)
        self.cache, self.step = None, 0
        self.dtype = model.get_input_embeddings().weight.dtype  # of the additive mask: the activations' dtype

    def finish(self, slot: int, t: int) -> bool:
        """The row in `slot` took token t: True if it ended."""
        row = self.held[slot]
        if t != self.eos_id:
            self.out[row].append(t)
        if t == self.eos_id or self.done(self.out[row]) or len(self.out[row]) == self.new:
            self.held[slot] = -1
            return True
        return False

    def admit(self, free: list) -> int:
        """Waiting rows into free slots: their prompts prefilled once, their first token drawn. Returns the rows
        that ended at that token."""
        rows = [self.waiting.pop() for _ in range(min(len(free), len(self.waiting)))]
        free = free[:len(rows)]
        distinct = list(dict.fromkeys(self.row_prompt[r] for r in rows))
        cache, logits, mask, _ = prefill(self.model, [self.prompts[p] for p in distinct], self.pad_id)
        index = torch.tensor([distinct.index(self.row_prompt[r]) for r in rows], device=self.device)
        layers = [(layer.keys[index], layer.values[index]) for layer in cache.layers]  # (rows, heads, width, dim)
        if self.cache is None:
            self.cache = SlotCache(layers, len(self.held), self.capacity, self.column)
        width, at, column = mask.shape[1], torch.tensor(free, device=self.device), self.column
        for (k, v), keys_, values_ in zip(layers, self.cache.keys, self.cache.values):
            keys_[at, :, column - width:column], values_[at, :, column - width:column] = k, v
        self.visible[at] = False
        self.visible[at, column - width:column] = mask[index].bool()
        self.position[at, 0] = mask[index].sum(-1)
        for slot, row in zip(free, rows):
            self.held[slot], self.begins[slot] = row, column - width
        if self.keys is not None:
            self.slot_keys[at] = self.keys[rows].to(self.device)
        u = uniforms(self.slot_keys[at], 0) if self.keys is not None else None
        first = sample_tokens(logits[index], self.temperature, u)
        self.token[at] = first
        return sum(self.finish(slot, t) for slot, t in zip(free, first.tolist()))

    def drop_finished(self) -> None:
        """The tail: no row waits, so the finished slots leave the cache."""
        live = torch.tensor([s for s in range(len(self.held)) if self.held[s] >= 0], device=self.device)
        self.cache.keep(live)
        self.held, self.begins = [self.held[s] for s in live.tolist()], [self.begins[s] for s in live.tolist()]
        self.visible, self.token = self.visible[live], self.token[live]
        self.position, self.slot_keys = self.position[live], self.slot_keys[live]

    def shift_left(self) -> None:
        """No room at the right end: everything to the left, as far as the oldest row allows."""
        by = min(min(b for b, h in zip(self.begins, self.held) if h >= 0), self.column - self.longest)
        self.cache.shift(by)
        self.visible = torch.cat([self.visible[:, by:], self.visible.new_zeros(len(self.held), by)], 1)
        self.column, self.begins = self.column - by, [b - by for b in self.begins]

    def decode(self, forward: Callable) -> int:
        """One token for every slot; returns the rows that ended."""
        self.visible[:, self.column] = True  # each slot's new token sees itself
        mask = torch.zeros(self.visible.shape, dtype=self.dtype, device=self.device)
        mask.masked_fill_(~self.visible, float("-inf"))
        logits = forward(self.token[:, None], self.position, mask[:, None, None, :], self.cache)[:, -1]  # (S, V)
        self.cache.column += 1
        self.column, self.step = self.column + 1, self.step + 1
        self.position += 1
        steps = torch.tensor([len(self.out[h]) if h >= 0 else 0 for h in self.held], device=self.device)
        u = uniforms(self.slot_keys, steps) if self.keys is not None else None
        self.token = sample_tokens(logits, self.temperature, u)
        return sum(self.finish(s, t) for s, t in enumerate(self.token.tolist()) if self.held[s] >= 0)


@torch.no_grad()
def generate_slots(model, prompts: list, n: int | list, temperature: float, max_new_tokens: int, eos_id: int,
                   pad_id: int, done: Callable[[list], bool] = lambda tokens: False,
                   progress: Callable[[int, int], None] = lambda step, ended: None,
                   keys: torch.Tensor | None = None, slots: int = 64, forward: Callable | None = None) -> list:
    """What `generate_ids` returns (the same rows, each drawn from its own stream, so the same tokens up to the
    last bits of the logits), computed with a fixed number of rows in flight: `slots` rows share one static cache
    (`SlotCache`); a row that ends gives its slot to the next waiting row (a group at a time, once a quarter of the
    slots are free, each group's prompts prefilled once); once no row waits, the finished slots are dropped.
    Every decode step between those events has the same shapes, so `forward(token, position, mask, cache)` may be a
    captured CUDA graph (`Graphed`); by default the model itself."""
    repeats = [n] * len(prompts) if isinstance(n, int) else list(n)
    loop = SlotLoop(model, prompts, repeats, temperature, max_new_tokens, eos_id, pad_id, done, keys, slots)
    forward = forward or (lambda ids, pos, mask, cache: model(
        input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **with_cache(model, cache)).logits)
    ended = loop.admit(list(range(len(loop.held))))
    while True:
        free = [s for s in range(len(loop.held)) if loop.held[s] < 0]
        if loop.waiting and (len(free) >= max(1, len(loop.held) // 4) or len(free) == len(loop.held)):
            ended += loop.admit(free)
            continue
        if len(free) == len(loop.held):
            break
        if not loop.waiting and free:
            loop.drop_finished()
        if loop.column == loop.capacity:
            loop.shift_left()
        ended += loop.decode(forward)
        progress(loop.step, ended)
        ended = 0
    return loop.out


def timed(compute) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.time()
    compute()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.time() - start



def merged_copy(model, dtype=None):
    """A plain copy of the policy for sampling alone: each base weight (dequantised, if 4-bit) plus its LoRA update
    B·A·scale, in `dtype` (default the compute dtype), the head in float32 as `float32_head` makes it: no adapter
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
    return float32_head(dense.eval())


class Graphed:
    """`forward` for `generate_slots`: each decode step replayed from a CUDA graph, captured once per number
    of slots and cache (after two warm-up steps on a side stream); GPU only."""

    def __init__(self, model):
        self.model, self.graphs = model, {}

    def run(self, ids, position, mask, cache):
        return self.model(input_ids=ids, attention_mask=mask, position_ids=position, use_cache=True,
                          **with_cache(self.model, cache)).logits

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


def bounded_cache(rows: int, tokens: int):
    """Continuous batching's paged cache sized for `rows` rows of `tokens` tokens: on a CPU it would otherwise take
    90 % of the free host memory (14 GB here for the tiny Llama)."""
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    page = 256
    return ContinuousBatchingConfig(page_size=page, num_blocks=rows * (-(-tokens // page) + 1),
                                    max_batch_tokens=rows * tokens)


def sample_with(candidate: str, model, prompts: list, n: int, steps: int) -> tuple:
    """(seconds, ms a decode step) of sampling n rows of each prompt, `steps` tokens each, no row stopping."""
    from transformers import GenerationConfig

    keys = row_keys(0, [p for p in range(len(prompts)) for _ in range(n)],
                            [s for _ in prompts for s in range(n)])
    marks = []
    progress = lambda step, ended: marks.append(time.time())  # noqa: E731
    if candidate == "transformers continuous batching":
        config = GenerationConfig(max_new_tokens=steps, min_new_tokens=steps, do_sample=True, temperature=0.8, top_k=0,
                                  top_p=1.0, eos_token_id=None, pad_token_id=0)
        cache = None if torch.cuda.is_available() else bounded_cache(len(prompts) * n, len(prompts[0]) + steps)
        seconds = timed(lambda: model.generate_batch([p for p in prompts for _ in range(n)], generation_config=config,
                                                     progress_bar=False, continuous_batching_config=cache))
        return seconds, 1000 * seconds / steps
    loop = generate_ids if candidate in ("loop", "merged copy + loop") else generate_slots
    extra = {} if loop is generate_ids else {"slots": len(prompts) * n}
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
                release()
                continue
            peak = torch.cuda.max_memory_allocated() / memory.GiB if torch.cuda.is_available() else float("nan")
            tok_s = rows * 1000 / ms
            cache = rows * (prompt + steps) * memory.costs(subject).cache_token
            floor = (weights + cache) / floor_bandwidth * 1000 if floor_bandwidth else float("nan")  # ms a step
            table.append([candidate, rows, f"{tok_s:.0f}", f"{ms:.1f}", f"{peak:.2f}", f"{floor / ms:.2f}",
                          f"{GSM8K_TOKENS / tok_s / 3600:.1f}"])
            release()
    return table


GSM8K_TOKENS = 7473 * 30 * 175  # an iteration's sampling at the preset: questions × N × ~175 tokens
BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12}  # bytes/s of HBM, the makers' figures
