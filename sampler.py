"""The sampler's token loop: a KV-cache loop that stops each row after its final-answer line, every row drawing from
its own counter-based random stream.

    row_keys(seed, prompts, samples)   a 64-bit key per row from (the stage's seed, its prompt's key, its sample)
    uniforms(keys, step)               one uniform number per row for a token step: a hash of (key, step)
    sample_tokens(logits, T, u)        a token per row from softmax(logits / T) by inverse CDF (T = 0: argmax)
    generate_ids(model, prompts, ...)  completions (token lists) of tokenised prompts, several rows per prompt

Why counter-based: a row's draw at step k is a function of (seed, prompt, sample, k) alone, so neither the rows that
share its batch, nor the batch size, the memory plan, an out-of-memory retry with fewer rows, a resumed stage or the
number of processes changes what it samples (up to the last bits of its logits, which a batch of another shape can
round differently). One hash of the whole batch's keys per step, a few element-wise tensor operations: no
generator call per row, which on a GPU would be a kernel launch per row per step.

`lm.generate` plans the rows, shares them out among processes, keeps finished rows as it goes and decodes the text;
this module is the part that a faster sampler would replace (docs/BENCHMARKS.md).
"""
import functools
import hashlib
import inspect
from collections.abc import Callable

import torch

import data

M32 = 0xFFFFFFFF


def _mix(x):
    """A 32-bit integer hash (two multiply-xorshift rounds, the constant 0x45d9f3b), on ints or int64 tensors of
    values below 2**32: every product stays below 2**59, so nothing overflows."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & M32
    x = ((x >> 16) ^ x) * 0x45D9F3B & M32
    return (x >> 16) ^ x


def row_keys(seed: int, prompts: list, samples: list, device=None) -> torch.Tensor:
    """Each row's key, (R, 2) int64 (two 32-bit halves), from sha256 of (stage seed, prompt key, sample index)."""
    keys = [int.from_bytes(hashlib.sha256(f"{seed}|{p}|{s}".encode()).digest()[:8], "little")
            for p, s in zip(prompts, samples)]
    return torch.tensor([[k >> 32, k & M32] for k in keys], dtype=torch.long, device=device).reshape(-1, 2)


def uniforms(keys: torch.Tensor, step: int) -> torch.Tensor:
    """One uniform number in [0, 1) per row for token step `step`, on the 2**-24 grid of a float32 mantissa (what
    torch.rand gives). Shape: (R, 2) → (R,)."""
    h = _mix(keys[:, 1] ^ _mix(keys[:, 0] ^ _mix(step & M32)))
    return (h >> 8).float() * 2.0**-24


def sample_tokens(logits: torch.Tensor, temperature: float, u: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row from softmax(logits / T) (T = 0: argmax); `logits` is left as it is. Shape: (B, V) → (B,).
    `u`: one uniform number per row (B,); inverse-CDF sampling: a cumulative sum and a search, where
    torch.multinomial draws an exponential variate per vocabulary entry (a third of the step time of a 135M model on
    a CPU)."""
    if temperature == 0:
        return logits.argmax(-1)
    shifted = logits.float() - logits.max(-1, keepdim=True).values  # a new tensor: the in-place ops below are on it
    cdf = shifted.div_(temperature).exp_().cumsum_(-1)  # unnormalised
    u = torch.rand(len(cdf), device=cdf.device) if u is None else u.to(cdf.device)
    return torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True).clamp_(max=cdf.shape[-1] - 1).squeeze(-1)


def answer_done(tokenizer, tokens: list) -> bool:
    """A row is done once its "Final answer: ..." line ends or a new "Question:" starts (`data.completion_end`).
    The row is decoded only when a token holds a newline or a colon (decoding tokens one by one would lose
    SentencePiece's spaces)."""
    return any(c in tokenizer.decode(tokens[-1:]) for c in "\n:") and \
        data.completion_end(tokenizer.decode(tokens, skip_special_tokens=True)) is not None


def common_prefix(sequences: list) -> int:
    """How many leading tokens all the sequences share, leaving each at least one token of its own."""
    n = min(map(len, sequences)) - 1
    return next((i for i in range(n) if len({s[i] for s in sequences}) > 1), n)


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


def default_keys(repeats: list) -> torch.Tensor:
    """Row keys from a seed drawn from torch's generator, for callers that give none (tests, benchmarks)."""
    seed = int(torch.randint(2**62, ()).item())
    return row_keys(seed, [p for p, r in enumerate(repeats) for _ in range(r)], [s for r in repeats for s in range(r)])


def prefill(model, prompts: list, pad_id: int):
    """(cache, logits, mask, position) after the tokenised prompts, left-padded to one width: the tokens that all
    of them begin with computed once and copied to every prompt's row, then each prompt's own. `logits` (P, V)
    predict each prompt's next token; `mask` (P, width) marks its real tokens; `position` (P, width) their
    positions, which count real tokens only, as in model.generate."""
    from transformers import DynamicCache

    device = model.device
    cache = DynamicCache(config=model.config)
    shared = common_prefix(prompts) if len(prompts) > 1 else 0
    if shared:  # its keys and values, computed once, copied to every prompt's row
        model(input_ids=torch.tensor([prompts[0][:shared]], device=device), use_cache=True, logits_to_keep=1,
              **with_cache(model, cache))
        cache.batch_repeat_interleave(len(prompts))
    ids, rest = (t.to(device) for t in left_pad([p[shared:] for p in prompts], pad_id))
    mask = torch.cat([rest.new_ones(len(prompts), shared), rest], -1)  # padding between the two parts is masked
    position = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position[:, shared:], use_cache=True,
                   logits_to_keep=1, **with_cache(model, cache)).logits[:, -1]  # (P, V)
    return cache, logits, mask, position


@torch.no_grad()
def generate_ids(model, prompts: list, n: int | list, temperature: float, max_new_tokens: int, eos_id: int,
                 pad_id: int, done: Callable[[list], bool] = lambda tokens: False,
                 progress: Callable[[int, int], None] = lambda step, ended: None,
                 keys: torch.Tensor | None = None) -> list:
    """Completions (token lists, without EOS) of tokenised prompts: n rows of each prompt (or n[i] rows of prompt
    i), in order, row r drawing from the stream of keys[r] (`row_keys`; by default a seed drawn from torch's
    generator). A plain KV-cache loop rather than model.generate, for four savings: the tokens that all prompts
    begin with (the chat template's system prompt and the task's instruction, or MATH's four shots) are computed
    once; each prompt's prefill is computed once and its cache copied to its rows; a row leaves the batch as soon
    as it ends (EOS, or `done(tokens)`); sampling by `sample_tokens`. `progress(step, rows ended at this step)` is
    called after every step."""
    repeats = [n] * len(prompts) if isinstance(n, int) else list(n)
    keys = default_keys(repeats) if keys is None and temperature > 0 else keys
    device = model.device
    cache, logits, mask, position = prefill(model, prompts, pad_id)
    index = torch.repeat_interleave(torch.arange(len(prompts), device=device), torch.tensor(repeats, device=device))
    cache.batch_select_indices(index)  # P prompts → R rows, each with its own copy of its prompt's cache
    logits, mask, position = logits[index], mask[index], position[index, -1:]
    keys = keys.to(device) if keys is not None else None
    rows = torch.arange(len(index), device=device)  # the output row of each batch row
    out = [[] for _ in rows]
    for step in range(max_new_tokens):
        token = sample_tokens(logits, temperature, uniforms(keys, step) if keys is not None else None)  # (B,)
        keep = []
        for b, (r, t) in enumerate(zip(rows.tolist(), token.tolist())):
            if t == eos_id:
                continue
            out[r].append(t)
            if not done(out[r]):
                keep.append(b)
        last = not keep or step == max_new_tokens - 1  # then every row still in the batch ends here
        progress(step + 1, len(rows) if last else len(rows) - len(keep))
        if last:
            break
        if len(keep) < len(rows):  # finished rows leave the batch and the cache
            keep = torch.tensor(keep, device=device)
            cache.batch_select_indices(keep)
            rows, token, mask, position = rows[keep], token[keep], mask[keep], position[keep]
            keys = keys[keep] if keys is not None else None
        mask, position = torch.cat([mask, mask.new_ones(len(rows), 1)], -1), position + 1
        logits = model(input_ids=token[:, None], attention_mask=mask, position_ids=position, use_cache=True,
                       **with_cache(model, cache)).logits[:, -1]  # (B, V)
    return out


# =================================================================================================================
# A candidate (issue 21): fixed slots, refilled as rows end, every decode step of one shape

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
    captured CUDA graph (bench_gpu.py); by default the model itself."""
    repeats = [n] * len(prompts) if isinstance(n, int) else list(n)
    keys = default_keys(repeats) if keys is None and temperature > 0 else keys
    device = model.device
    row_prompt = [p for p, r in enumerate(repeats) for _ in range(r)]
    waiting, out = list(range(len(row_prompt)))[::-1], [[] for _ in row_prompt]  # popped from the end: row 0 first
    longest = max(map(len, prompts))
    capacity, column = 2 * longest + max_new_tokens, longest  # a prompt always fits before the column
    slots = min(slots, len(row_prompt))
    held = [-1] * slots  # the row each slot holds
    begins = [column] * slots  # the column of a slot's first token
    visible = torch.zeros(slots, capacity, dtype=torch.bool, device=device)  # what each slot's next token sees
    token = torch.zeros(slots, dtype=torch.long, device=device)
    position = torch.zeros(slots, 1, dtype=torch.long, device=device)
    slot_keys = torch.zeros(slots, 2, dtype=torch.long, device=device)
    state = {"cache": None, "step": 0}
    dtype = model.get_input_embeddings().weight.dtype  # an additive mask in the activations' dtype
    forward = forward or (lambda ids, pos, mask, cache: model(
        input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **with_cache(model, cache)).logits)

    def finish(slot, t):  # the row in `slot` took token t: True if it ended
        row = held[slot]
        if t != eos_id:
            out[row].append(t)
        if t == eos_id or done(out[row]) or len(out[row]) == max_new_tokens:
            held[slot] = -1
            return True
        return False

    def admit(free):  # waiting rows into free slots: their prompts prefilled once, their first token drawn
        rows = [waiting.pop() for _ in range(min(len(free), len(waiting)))]
        free = free[:len(rows)]
        distinct = list(dict.fromkeys(row_prompt[r] for r in rows))
        cache, logits, mask, _ = prefill(model, [prompts[p] for p in distinct], pad_id)
        index = torch.tensor([distinct.index(row_prompt[r]) for r in rows], device=device)
        layers = [(layer.keys[index], layer.values[index]) for layer in cache.layers]  # (rows, heads, width, dim)
        if state["cache"] is None:
            state["cache"] = SlotCache(layers, slots, capacity, column)
        width, at = mask.shape[1], torch.tensor(free, device=device)
        for (k, v), keys_, values_ in zip(layers, state["cache"].keys, state["cache"].values):
            keys_[at, :, column - width:column], values_[at, :, column - width:column] = k, v
        visible[at] = False
        visible[at, column - width:column] = mask[index].bool()
        position[at, 0] = mask[index].sum(-1)
        for slot, row in zip(free, rows):
            held[slot], begins[slot] = row, column - width
        if keys is not None:
            slot_keys[at] = keys[rows].to(device)
        first = sample_tokens(logits[index], temperature, uniforms(slot_keys[at], 0) if keys is not None else None)
        token[at] = first
        return sum(finish(slot, t) for slot, t in zip(free, first.tolist()))

    ended = admit(list(range(slots)))
    while True:
        free = [s for s in range(len(held)) if held[s] < 0]
        if waiting and (len(free) >= max(1, len(held) // 4) or len(free) == len(held)):
            ended += admit(free)
            continue
        if len(free) == len(held):
            break
        if not waiting and free:  # the tail: no row waits, drop the finished slots
            live = torch.tensor([s for s in range(len(held)) if held[s] >= 0], device=device)
            state["cache"].keep(live)
            held, begins = [held[s] for s in live.tolist()], [begins[s] for s in live.tolist()]
            visible, token, position, slot_keys = visible[live], token[live], position[live], slot_keys[live]
        if column == capacity:  # room at the right end: everything to the left, as far as the oldest row allows
            by = min(min(b for b, h in zip(begins, held) if h >= 0), column - longest)
            state["cache"].shift(by)
            visible = torch.cat([visible[:, by:], visible.new_zeros(len(held), by)], 1)
            column, begins = column - by, [b - by for b in begins]
        visible[:, column] = True  # each slot's new token sees itself
        mask = torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill_(~visible, float("-inf"))
        logits = forward(token[:, None], position, mask[:, None, None, :], state["cache"])[:, -1]  # (S, V)
        state["cache"].column += 1
        column, state["step"] = column + 1, state["step"] + 1
        position += 1
        steps = torch.tensor([len(out[h]) if h >= 0 else 0 for h in held], device=device)
        token = sample_tokens(logits, temperature, uniforms(slot_keys, steps) if keys is not None else None)
        ended += sum(finish(s, t) for s, t in enumerate(token.tolist()) if held[s] >= 0)
        progress(state["step"], ended)
        ended = 0
    return out
