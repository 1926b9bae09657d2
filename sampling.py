"""Sampling (step 1 of Iterative RPO, arXiv 2404.19733v3, Sec. 2) and evaluation: the token loop, and the stages that
run it over a data set.

    generate(policy, prompts, keys, n, T, cfg, stage)   a sampling stage: n completions per prompt, each stopping
                        after its "Final answer:" line; rows planned by memory, kept as they finish
    evaluate(policy, cfg, examples, shots, stage)       greedy accuracy and maj@k on a split, judged by the reward
    generate_ids(model, prompts, ...)   the token loop: completions (token lists) of tokenised prompts
    row_keys, uniforms, sample_tokens   each row's own counter-based random stream, and a token drawn from it

Why counter-based: a row's draw at step k is a function of (seed, prompt, sample, k) alone, so neither the rows that
share its batch, nor the batch size, the memory plan, an out-of-memory retry with fewer rows, a resumed stage or the
number of processes changes what it samples (up to the last bits of its logits, which a batch of another shape can
round differently). One hash of the whole batch's keys per step, a few element-wise tensor operations: no
generator call per row, which on a GPU would be a kernel launch per row per step.

The token loop is the part a faster sampler would replace; the candidates measured so far are in tools/
(docs/BENCHMARKS.md).
"""
import hashlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

import reward
from machinery import dist, engine, memory
from machinery.cli import DataError
from machinery.config import arg
from machinery.resume import Stage, in_chunks
from model import Policy, encode_prompt, left_pad, surely_longer, task_prompt, with_cache

M32 = 0xFFFFFFFF


@dataclass
class SamplingConfig:
    """How responses are sampled and the test split evaluated."""
    max_new_tokens: int = arg(96, "most tokens sampled per response", min=1)
    sample_batch_size: int = arg(64, "sequences sampled together (prompts × samples per prompt); memory grows with "
                                 "it", min=1)
    eval_k: int = arg(0, "k of maj@k on the test split, 0 = greedy only", min=0)
    eval_temperature: float = arg(0.8, "temperature of the maj@k samples", above=0)


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
    """A row is done once its "Final answer: ..." line ends or a new "Question:" starts (`reward.completion_end`).
    The row is decoded only when a token holds a newline or a colon (decoding tokens one by one would lose
    SentencePiece's spaces)."""
    return any(c in tokenizer.decode(tokens[-1:]) for c in "\n:") and \
        reward.completion_end(tokenizer.decode(tokens, skip_special_tokens=True)) is not None


def common_prefix(sequences: list) -> int:
    """How many leading tokens all the sequences share, leaving each at least one token of its own."""
    n = min(map(len, sequences)) - 1
    return next((i for i in range(n) if len({s[i] for s in sequences}) > 1), n)


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
# The stages: a data set's prompts sampled (rows planned by memory, shared among processes, kept as they finish),
# and a split evaluated

def fitting(policy: Policy, cfg, examples: list, shots: list, what: str) -> list:
    """The examples whose prompt fits in --max-length tokens, before any sampling: a longer prompt could make no pair
    (and one runaway line would stall a whole batch). The others are dropped and counted in one line."""
    if not examples:
        return examples
    prompts = [task_prompt(policy.tokenizer, ex, shots) for ex in examples]
    fits = [ex for ex, prompt in zip(examples, prompts) if not surely_longer(policy.tokenizer, prompt, cfg.max_length)
            and len(encode_prompt(policy.tokenizer, prompt)) <= cfg.max_length]
    if len(fits) < len(examples):
        print(f"{len(examples) - len(fits)} of {len(examples)} {what} questions dropped: their prompt is longer than "
              f"--max-length {cfg.max_length} tokens", file=sys.stderr)
    if not fits:
        raise DataError(f"--max-length {cfg.max_length}: none of the {len(examples)} {what} questions' prompts fits; "
                        "give a larger --max-length")
    return fits


def example_keys(examples: list) -> list:
    """The key of each example's random streams (`generate`): its id, and how many times the id came before (a
    data set may repeat an id), so the same question draws the same samples wherever it stands in a run."""
    seen = {}
    keys = []
    for ex in examples:
        seen[ex["id"]] = seen.get(ex["id"], -1) + 1
        keys.append(f"{ex['id']}#{seen[ex['id']]}")
    return keys


def generate(policy: Policy, prompts: list, keys: list, n: int, temperature: float, cfg: SamplingConfig,
             stage: Stage) -> list:
    """n completions of each prompt (temperature 0 = greedy), as (text, truncated) pairs: the text cut where it ends
    (`reward.completion_end`), and whether it was cut off at cfg.max_new_tokens before it ended.

    Row (i, s), sample s of prompt i, draws from its own stream (`row_keys`: a seed drawn once from the stage's
    generator, keys[i] — the example's id — and s), so the rows it shares a batch with never change it. Rows run in
    order of prompt length, as many at once as the memory plan allows (`memory.sampling_rows`, at most
    --sample-batch-size; an out-of-memory error halves them), and under a launcher every P-th batch on each
    process. Each finished batch is kept in the stage's parts: a restarted stage reads them back and samples only
    the rest."""
    model, tokenizer = policy
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    seed = int(torch.randint(2**62, ()).item())  # one draw from the stage's seed, the same on every process
    finished = stage.finished()  # {(i, s): [text, truncated]}
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    todo = [(i, s) for i in order for s in range(n) if (i, s) not in finished]
    if finished and todo:
        print(f"{stage.label}: {len(finished)} of {len(prompts) * n} rows sampled before, {len(todo)} to go",
              file=sys.stderr)
    start, computed = time.time(), [0]
    if getattr(cfg, "engine", "own") == "vllm" and todo:  # vLLM instead of the token loop below (`machinery/engine.py`)
        with engine.Engine(policy, cfg, stage, max(map(len, encoded)) + cfg.max_new_tokens) as vllm:  # every row's
            def sample_on_engine(chunk, bar):
                tokens = vllm.generate([encoded[i] for i, _ in chunk], engine_seeds(seed, keys, chunk), temperature,
                                       cfg.max_new_tokens)
                computed[0] += sum(map(len, tokens))
                bar.set_postfix_str(f"{computed[0] / (time.time() - start):.0f} tok/s", refresh=False)
                bar.update(len(chunk))
                return {row: completion(tokenizer, out, cfg.max_new_tokens) for row, out in zip(chunk, tokens)}

            finished.update(in_chunks(todo, cfg.sample_batch_size, sample_on_engine, stage, "row",
                                      "--sample-batch-size"))
        return [[tuple(finished[(i, s)]) for s in range(n)] for i in range(len(prompts))]
    costs, space = memory.costs(model), memory.available(cfg.memory_budget, model)
    longest = max((len(encoded[i]) for i, _ in todo), default=1)
    rows = dist.broadcast(memory.sampling_rows(costs, space, longest, cfg.max_new_tokens, n, cfg.sample_batch_size))
    if todo:
        print(memory.plan_line(stage.label, rows, cfg.sample_batch_size, space,
                               memory.sampling_peak(costs, rows, longest, cfg.max_new_tokens, n), "row"),
              file=sys.stderr)
    model.eval()

    def sample(chunk, bar):  # one batch: its prompts prefilled once each, then their rows
        def progress(step, ended):  # the bar moves as rows end, and shows the batch's token step meanwhile
            bar.set_postfix_str(f"token {step}/{cfg.max_new_tokens}", refresh=False)
            bar.update(ended)  # redraws at most every mininterval (`progress_bar`)
            if step % 8 == 0 and time.time() - bar.last_print_t >= bar.mininterval:
                bar.refresh()

        distinct = list(dict.fromkeys(i for i, _ in chunk))
        tokens = generate_ids(model, [encoded[i] for i in distinct], [sum(i == j for j, _ in chunk) for i in distinct],
                              temperature, cfg.max_new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id,
                              lambda row: answer_done(tokenizer, row), progress,
                              row_keys(seed, [keys[i] for i, _ in chunk], [s for _, s in chunk]))
        results = {row: completion(tokenizer, out, cfg.max_new_tokens) for row, out in zip(chunk, tokens)}
        computed[0] += sum(map(len, tokens))
        bar.set_postfix_str(f"{computed[0] / (time.time() - start):.0f} tok/s")
        return results

    finished.update(in_chunks(todo, rows, sample, stage, unit="row", lower="--max-new-tokens"))
    return [[tuple(finished[(i, s)]) for s in range(n)] for i in range(len(prompts))]


def engine_seeds(seed: int, keys: list, chunk: list) -> list:
    """The engine's seed of each row (i, s) of a chunk: its 64-bit key (`row_keys`), to vLLM's 63 bits."""
    halves = row_keys(seed, [keys[i] for i, _ in chunk], [s for _, s in chunk]).tolist()
    return [(hi << 32 | lo) & (2**63 - 1) for hi, lo in halves]


def completion(tokenizer, tokens: list, max_new_tokens: int) -> list:
    """[text, truncated] of a sampled row: the text cut where it ends (`reward.completion_end`), and whether it was
    cut off: a row of max_new_tokens tokens that has not ended (a row that stopped at EOS holds fewer tokens: EOS is
    not kept)."""
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    end = reward.completion_end(text)
    return [text[:end] if end is not None else text, end is None and len(tokens) == max_new_tokens]


def evaluate(policy: Policy, cfg, examples: list, shots: list, stage: Stage) -> dict:
    """Greedy accuracy and maj@k (k samples at the paper's temperature 0.8, none when cfg.eval_k is 0) on the
    examples (the test split, or held-out training questions), judged by the training samples' reward
    (`reward.judge`). The stage's parts keep each of the two's finished rows (`generate`). `cfg`: a
    `SamplingConfig` with the task's `math_grader`."""
    prompts, keys = [task_prompt(policy.tokenizer, ex, shots) for ex in examples], example_keys(examples)
    greedy = generate(policy, prompts, keys, 1, 0.0, cfg, stage.sub("greedy", f"{stage.label} greedy"))
    results = []
    for ex, [(text, truncated)] in zip(examples, greedy):
        extracted, correct = reward.judge(text, ex["answer"], ex["task"], ex.get("choices"), truncated,
                                          cfg.math_grader)
        results.append({"id": ex["id"], "completion": text, "extracted": extracted, "gold": ex["answer"],
                        "correct": correct, "truncated": truncated})
        if ex["task"] in reward.NUMERIC_TASKS:  # lm-evaluation-harness' second GSM8K score, to compare with others
            results[-1]["flexible"] = reward.flexible_extract(text)
            results[-1]["flexible_correct"] = reward.lm_eval_exact_match(results[-1]["flexible"], ex["answer"])
    summary = {"iteration": stage.t, "n": len(examples), "accuracy": sum(r["correct"] for r in results) / len(results),
               "truncated": sum(r["truncated"] for r in results)}
    if "flexible" in results[0]:
        summary["strict-match"] = summary["accuracy"]  # ours: the "Final answer:" line, by the reward
        summary["flexible-extract"] = sum(r["flexible_correct"] for r in results) / len(results)
    if cfg.eval_k:
        votes = generate(policy, prompts, keys, cfg.eval_k, cfg.eval_temperature, cfg,
                         stage.sub(f"maj@{cfg.eval_k}", f"{stage.label} maj@{cfg.eval_k}"))
        summary[f"maj@{cfg.eval_k}"] = majority_votes(results, examples, votes, cfg.math_grader)
    print(f"{stage.label} accuracy {summary['accuracy']:.3f}" +
          (f", maj@{cfg.eval_k} {summary[f'maj@{cfg.eval_k}']:.3f}" if cfg.eval_k else ""), file=sys.stderr)
    return {**summary, "results": results}


def majority_votes(results: list, examples: list, votes: list, grader: str) -> float:
    """maj@k: each example's most common answer among its k samples (`reward.majority`; a cut-off sample casts no
    vote), recorded in its result; returns the share right."""
    for r, ex, outs in zip(results, examples, votes):
        vote = reward.majority([reward.judge(o, ex["answer"], ex["task"], ex.get("choices"), cut)[0]
                                for o, cut in outs if not cut], ex["task"], ex.get("choices"), grader)
        r["majority"] = vote
        r["majority_correct"] = int(reward.answers_match(vote, ex["answer"], ex["task"], ex.get("choices"), grader))
    return sum(r["majority_correct"] for r in results) / len(results)
