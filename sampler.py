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
    from transformers import DynamicCache

    repeats = [n] * len(prompts) if isinstance(n, int) else list(n)
    if keys is None and temperature > 0:
        seed = int(torch.randint(2**62, ()).item())
        keys = row_keys(seed, [p for p, r in enumerate(repeats) for _ in range(r)],
                        [s for r in repeats for s in range(r)])
    device = model.device
    cache = DynamicCache(config=model.config)
    shared = common_prefix(prompts) if len(prompts) > 1 else 0
    if shared:  # its keys and values, computed once, copied to every prompt's row
        model(input_ids=torch.tensor([prompts[0][:shared]], device=device), use_cache=True, logits_to_keep=1,
              **with_cache(model, cache))
        cache.batch_repeat_interleave(len(prompts))
    ids, rest = (t.to(device) for t in left_pad([p[shared:] for p in prompts], pad_id))
    mask = torch.cat([rest.new_ones(len(prompts), shared), rest], -1)  # padding between the two parts is masked
    position = (mask.cumsum(-1) - 1).clamp(min=0)  # positions count real tokens only, as in model.generate
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position[:, shared:], use_cache=True,
                   logits_to_keep=1, **with_cache(model, cache)).logits[:, -1]  # (P, V)
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
