"""Training on pairs, what Iterative RPO (arXiv 2404.19733v3) and sDPO (arXiv 2403.19270v1) share: pairs encoded
and scored, the reference pass, the optimizer steps of Eq. 1, the best checkpoint.

    encode_pair, collate   prompt and response tokenised apart, then joined; a batch of pairs padded
    pair_logps        log π(y_w|x) and log π(y_l|x) of a batch of pairs, the prompt computed once
    reference_logps   log-probs of every pair under the current model, before training: π_ref = M_{t-1}
    train             DPO + NLL (Eq. 1, `losses.rpo_loss`) on pairs against the stored reference log-probs;
                      the best of --checkpoints held-out checks kept
    optimizer_step    one step: this process's share of the pairs, gradients summed over the processes

Both algorithm files import this module; it imports neither. Where a stopped training resumes from is
`machinery.resume.TrainState`.
"""
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from losses import rpo_loss, sequence_logps
from machinery import dist, memory
from machinery.config import arg
from machinery.resume import Stage, TrainState, batches, in_chunks, progress_bar, release, trainable
from model import Policy, encode_prompt, left_pad, surely_longer, with_cache

METRICS = ("loss", "loss/dpo", "loss/nll", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
           "rewards/margins", "logps/chosen", "logps/rejected")


@dataclass
class TrainConfig:
    """The optimisation of Eq. 1 (both scripts add α, the learning rate and the passes, each with its paper's value)."""
    beta: float = arg(0.1, "β of the DPO term", above=0)
    batch_size: int = arg(1, "pairs per forward pass (one prompt pass, then chosen and rejected together); memory "
                          "grows with it, and on a CPU 1 is as fast as 4", min=1)
    grad_accum: int = arg(8, "forward passes per optimizer step; batch_size × grad_accum pairs a step", min=1)
    max_steps: int = arg(0, "cap on optimizer steps per iteration (step), 0 = none", min=0)
    max_length: int = arg(512, "pairs whose prompt + response exceed this many tokens are dropped", min=8)
    save_minutes: float = arg(10.0, "minutes between the resumable states training keeps (also at each held-out "
                              "check); 0 = after every optimizer step", min=0)


# =================================================================================================================
# Pairs: tokenised prompt and responses, padded into a batch, scored

def encode_pair(tokenizer, pair: dict, max_length: int):
    """(prompt ids, chosen ids, rejected ids), responses ending in EOS, but for a response that was cut off at the
    token limit (`rejected_truncated`): the model never ended it. None if either side is too long."""
    if any(surely_longer(tokenizer, pair[k], max_length) for k in ("prompt", "chosen", "rejected")):
        return None  # told from its characters: a runaway text is never tokenised whole
    prompt = encode_prompt(tokenizer, pair["prompt"])
    responses = [tokenizer(pair[k], add_special_tokens=False)["input_ids"] +
                 ([] if pair.get(f"{k}_truncated") else [tokenizer.eos_token_id]) for k in ("chosen", "rejected")]
    if len(prompt) + max(len(r) for r in responses) > max_length:
        return None
    return prompt, responses[0], responses[1]


def collate(encoded: list, pad_id: int):
    """A batch of pairs for `pair_logps`: the prompts left-padded (B, P), so that every prompt ends at the same
    column, and the responses right-padded (2B, R), chosen and rejected interleaved (c_0, r_0, c_1, r_1, ...).
    Masks come from lengths, never from the pad id."""
    prompt, prompt_mask = left_pad([p for p, _, _ in encoded], pad_id)
    responses = [r for _, chosen, rejected in encoded for r in (chosen, rejected)]
    response = torch.full((len(responses), max(map(len, responses))), pad_id, dtype=torch.long)
    response_mask = torch.zeros_like(response)
    for i, r in enumerate(responses):
        response[i, :len(r)], response_mask[i, :len(r)] = torch.tensor(r), 1
    return prompt, prompt_mask, response, response_mask


def pair_logps(model, batch, share_prompt: bool | None = None):
    """log π(y|x) of the chosen and rejected responses: (chosen logps, rejected logps, chosen lengths), each (B,).
    The prompt, the same for both responses, is computed once: its keys and values (and, in training, their
    gradients) serve both. Gradient checkpointing recomputes layers in the backward pass, which a KV cache does
    not survive: then prompt + response is one sequence, and only the response positions are scored
    (`logits_to_keep`). `share_prompt` defaults to "not checkpointing", so the reference pass and training, which
    both call this, always take the same path. Either way the logits are those that predict the responses."""
    from transformers import DynamicCache

    if share_prompt is None:
        share_prompt = not checkpointing(model)
    prompt, prompt_mask, response, response_mask = (t.to(model.device) for t in batch)
    width_p, width_r = prompt.shape[1], response.shape[1]
    mask = torch.cat([prompt_mask.repeat_interleave(2, 0), response_mask], -1)  # (2B, P + R)
    position = (mask.cumsum(-1) - 1).clamp(min=0)  # positions count real tokens only
    if share_prompt:
        cache = DynamicCache(config=model.config)
        first = model(input_ids=prompt, attention_mask=prompt_mask, position_ids=position[0::2, :width_p],
                      **with_cache(model, cache), use_cache=True, logits_to_keep=1).logits  # (B, 1, V)
        cache.batch_repeat_interleave(2)  # one copy of the prompt's keys and values per response
        rest = model(input_ids=response, attention_mask=mask, position_ids=position[:, width_p:],
                     **with_cache(model, cache), use_cache=True).logits  # (2B, R, V)
        logits = torch.cat([first.repeat_interleave(2, 0), rest], 1)  # (2B, R + 1, V)
    else:
        ids = torch.cat([prompt.repeat_interleave(2, 0), response], -1)  # (2B, P + R)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position, use_cache=False,
                       logits_to_keep=width_r + 1).logits  # (2B, R + 1, V), from the prompt's last position on
    labels = torch.cat([torch.full_like(response[:, :1], -100), response.masked_fill(response_mask == 0, -100)], -1)
    logps, lengths = sequence_logps(logits, labels)  # (2B,), the shift by one happens inside
    return logps[0::2], logps[1::2], lengths[0::2]


def checkpointing(model) -> bool:
    """Whether gradient (activation) checkpointing is on; transformers 5 renamed the attribute."""
    on = getattr(model, "is_activation_checkpointing", None)
    return bool(getattr(model, "is_gradient_checkpointing", False) if on is None else on)


# =================================================================================================================
# The reference pass, and the optimizer steps of Eq. 1

def pair_rows(model, encoded: list, indices, cfg, grad: bool, label: str) -> int:
    """How many pairs one forward pass scores: the memory plan for the longest prompt and response among them (with
    `grad`, less the optimizer's state and the gradients), at most --batch-size; one line says so."""
    shared, costs = not checkpointing(model), memory.costs(model, checkpointing(model))
    space = memory.available(cfg.memory_budget, model)
    if grad and space is not None:  # float32 gradients and two AdamW moments of every trainable weight
        space -= 12 * sum(p.numel() for p in model.parameters() if p.requires_grad)
    prompt = max((len(encoded[i][0]) for i in indices), default=1)
    response = max((max(len(encoded[i][1]), len(encoded[i][2])) for i in indices), default=1)
    rows = memory.scoring_rows(costs, space, prompt, response, cfg.batch_size, grad, shared)
    peak = memory.scoring_peak(costs, rows, prompt, response, grad, shared)
    print(memory.plan_line(label, rows, cfg.batch_size, space, peak, "pair"), file=sys.stderr)
    return rows


def reference_logps(policy: Policy, pairs: list, cfg, stage: Stage) -> list:
    """log M_{t-1}(y|x) of every chosen and rejected response, before the first update: the policy *is* the
    reference then, so no second model is kept. Eval mode: dropout off. Same `pair_logps` path as `train`. Pairs in
    order, as many a forward pass as the memory plan allows (`pair_rows`); under a launcher every P-th batch on each
    process; each finished batch kept in the stage's parts, so that a restarted stage scores only the rest."""
    model, tokenizer = policy
    model.eval()
    encoded = [encode_pair(tokenizer, p, cfg.max_length) for p in pairs]
    finished = stage.finished()  # {pair index: {"chosen", "rejected"}}
    todo = [i for i in range(len(pairs)) if i not in finished]
    rows = dist.broadcast(pair_rows(model, encoded, todo, cfg, False, stage.label) if todo else 1)

    def score(chunk, bar):
        with torch.no_grad():
            chosen, rejected, _ = pair_logps(model, collate([encoded[i] for i in chunk], tokenizer.pad_token_id))
        bar.update(len(chunk))
        return {i: {"chosen": c, "rejected": r} for i, c, r in zip(chunk, chosen.tolist(), rejected.tolist())}

    finished.update(in_chunks(todo, rows, score, stage, unit="pair", lower="--max-length"))
    return [finished[i] for i in range(len(pairs))]


def make_optimizer(params: list, lr: float):
    if torch.cuda.is_available():
        try:
            import bitsandbytes as bnb

            return bnb.optim.PagedAdamW8bit(params, lr=lr)
        except (ImportError, RuntimeError):
            pass
    return torch.optim.AdamW(params, lr=lr)


def training_order(pairs: int, cfg, t: int) -> list:
    """The pairs of each optimizer step, batch_size × grad_accum a step: every epoch a seeded shuffle of them, the
    whole capped at --max-steps. A function of the seed alone, so a resumed run takes the same steps."""
    steps = [step for epoch in range(cfg.epochs) for step in
             batches(random.Random(f"{cfg.seed}-{t}-{epoch}").sample(range(pairs), pairs),
                     cfg.batch_size * cfg.grad_accum)]
    return steps[:cfg.max_steps or None]


def accumulate(model, encoded: list, reference: list, mine: list, total: int, cfg, micro: int, pad_id: int,
               bar, tied: bool = False) -> dict:
    """The gradients of this process's pairs of a step, `micro` pairs a forward pass: Eq. 1 (`losses.rpo_loss`;
    with cfg.sft, the STaR baseline, its NLL term alone) summed over the pairs and divided by the step's `total`;
    returns the sums of the logged metrics. `tied`: the policy is still its reference (`is_reference`)."""
    sums = dict.fromkeys(METRICS, 0.0)
    for chunk in batches(mine, micro):
        chosen, rejected, lengths = pair_logps(model, collate([encoded[i] for i in chunk], pad_id))
        ref_chosen = torch.tensor([reference[i]["chosen"] for i in chunk], device=chosen.device)
        ref_rejected = torch.tensor([reference[i]["rejected"] for i in chunk], device=chosen.device)
        eq1, chosen_rewards, rejected_rewards, dpo, nll = rpo_loss(chosen, rejected, ref_chosen, ref_rejected,
                                                                   lengths, cfg.beta, cfg.alpha)  # Eq. 1
        losses = nll if getattr(cfg, "sft", False) else eq1  # STaR: the NLL term alone
        (losses.sum() / total).backward()
        margins = chosen_rewards - rejected_rewards
        values = {"loss": losses, "loss/dpo": dpo, "loss/nll": nll, "rewards/chosen": chosen_rewards,
                  "rewards/rejected": rejected_rewards, "rewards/accuracies": accuracies(margins, tied),
                  "rewards/margins": margins, "logps/chosen": chosen, "logps/rejected": rejected}
        for name, value in values.items():
            sums[name] += value.detach().float().sum().item()
        bar.update(len(chunk) * dist.size())
    return sums


def accuracies(margins: torch.Tensor, tied: bool) -> torch.Tensor:
    """rewards/accuracies per pair: 1 where the chosen reward beats the rejected one, 0 where it loses, ½ for a tie.
    While the policy is still its reference (`tied`) every margin is 0 by definition: what is computed is rounding,
    whose sign changes with the rows of a forward pass, the CPU's kernels and the library's version, so each pair
    counts as a tie, not as the sign of that noise. Shape: (batch_size,)."""
    if tied:
        return torch.full_like(margins, 0.5)
    return (margins > 0).float() + 0.5 * (margins == 0).float()


def is_reference(model, step: int) -> bool:
    """Whether the policy's forward pass is still the reference's: no optimizer step yet (training starts from
    M_{t-1}, the reference) and no dropout active (the reference pass runs in eval mode)."""
    return step == 0 and not any(isinstance(m, torch.nn.Dropout) and m.training and m.p > 0 for m in model.modules())


def optimizer_step(model, encoded: list, reference: list, indices: list, cfg, optimizer, micro: int, pad_id: int,
                   bar, tied: bool = False) -> tuple[dict, int]:
    """One optimizer step on the pairs `indices`, the loss averaged over them: each process its share of the step's
    --batch-size groups (as DDP: the gradients then summed over the processes), `micro` pairs a forward pass. Out of
    memory, the step starts again at half the pairs a forward pass. Returns (the step's metrics, `micro` now)."""
    params = trainable(optimizer)
    shares = batches(indices, cfg.batch_size)
    mine = [i for m in dist.mine(len(shares)) for i in shares[m]]
    counted = bar.n
    while True:
        try:
            sums = accumulate(model, encoded, reference, mine, len(indices), cfg, micro, pad_id, bar, tied)
            break
        except torch.OutOfMemoryError:
            pass  # out of the except block first, so that the traceback's tensors are freed
        optimizer.zero_grad(set_to_none=True)
        release()
        bar.update(counted - bar.n)
        if micro == 1:
            sys.exit("train: out of memory with one pair a forward pass; lower --max-length, or give "
                     "--gradient-checkpointing")
        micro //= 2
        print(f"train: out of memory; the step again at {micro} pairs a forward pass", file=sys.stderr)
    if dist.size() > 1:  # data parallel, as DDP: the gradients (and the logged sums) summed over the processes
        for p in params:
            p.grad = torch.zeros_like(p) if p.grad is None else p.grad
        totals = torch.tensor(list(sums.values()), dtype=torch.float64, device=params[0].device)
        dist.sum_([p.grad for p in params] + [totals])
        sums = dict(zip(sums, totals.tolist()))
    grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0).item()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {**{k: v / len(indices) for k, v in sums.items()}, "grad_norm": grad_norm, "lr": cfg.lr,
            "pairs": len(indices)}, micro


def train(policy: Policy, pairs: list, reference: list, cfg, stage: Stage,
          select: Callable[[Stage], float] | None = None) -> list:
    """Train the policy on the pairs with L_DPO+NLL (Eq. 1; plain DPO at α = 0; with cfg.sft, the NLL term alone:
    SFT on the chosen responses) against the stored reference log-probs: one optimizer step per
    batch_size × grad_accum pairs, the loss averaged over the pairs of the step. With `select` (a score of the
    policy, such as its accuracy on held-out questions, given a stage of its own), the policy is scored at
    cfg.checkpoints evenly spaced steps, the last one included, and the best checkpoint is kept (ties go to the
    later one). A resumable state is kept in the stage's parts at each of those steps and every --save-minutes,
    and a restarted stage goes on from the last one. Saves the adapter beside the stage's file, and returns the
    step records (also logged)."""
    model, tokenizer = policy
    t = stage.t
    model.train()
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg.lr)
    steps, encoded = training_order(len(pairs), cfg, t), [encode_pair(tokenizer, p, cfg.max_length) for p in pairs]
    marks = {round(len(steps) * (k + 1) / cfg.checkpoints) for k in range(cfg.checkpoints)} if select else set()
    state = TrainState.load(stage.parts, optimizer)
    if state.step:
        print(f"train M_{t}: going on after step {state.step} of {len(steps)}", file=sys.stderr)
    for record in state.records:  # metrics.jsonl goes on where the stopped stage left it
        stage.log(record)
    micro = dist.broadcast(pair_rows(model, encoded, range(len(pairs)), cfg, True, f"train M_{t}"))
    bar = progress_bar(total=sum(map(len, steps)), initial=sum(map(len, steps[:state.step])), desc=f"train M_{t}",
               unit="pair")  # moves every micro-batch
    saved = time.time()

    def check():  # the paper: "select the best checkpoint using a held-out 1k samples" (Sec. 3)
        score = select(stage.sub(f"heldout-{state.step}", f"held-out {t}: eval"))
        state.records.append({"iteration": t, "step": state.step, "heldout/accuracy": score})
        stage.log(state.records[-1])
        model.train()
        if state.best is None or score >= state.best[1]:
            state.best = (state.step, score, [p.detach().clone() for p in trainable(optimizer)])
        if stage.parts:
            state.save(stage.parts, optimizer)

    try:  # the bar closed on a stop too, before its line
        if state.step in marks and not state.checked():  # stopped between a checkpoint's state and its check
            check()
        for step in range(state.step + 1, len(steps) + 1):
            record, micro = optimizer_step(model, encoded, reference, steps[step - 1], cfg, optimizer, micro,
                                           tokenizer.pad_token_id, bar, is_reference(model, step - 1))
            state.step = step
            state.records.append({"iteration": t, "step": step, **record})
            stage.log(state.records[-1])
            bar.set_postfix_str(f"step {step}/{len(steps)}, loss {record['loss']:.4f} acc "
                                f"{record['rewards/accuracies']:.2f}")
            if stage.parts and (step in marks or dist.broadcast(time.time() - saved >= 60 * cfg.save_minutes)):
                state.save(stage.parts, optimizer)  # before a check too: a stop during it loses no optimizer step
                saved = time.time()
            if step in marks:
                check()
    finally:
        bar.close()
    return finish(policy, state, optimizer, t, stage)


def finish(policy: Policy, state: TrainState, optimizer, t: int, stage: Stage) -> list:
    """The best checkpoint's weights back in the policy (with held-out checks), the record of which one, the
    adapter saved beside the stage's file (with a folder to save to)."""
    if state.best is not None:
        with torch.no_grad():
            for p, kept in zip(trainable(optimizer), state.best[2]):
                p.copy_(kept)
        state.records.append({"iteration": t, "selected_step": state.best[0], "heldout/accuracy": state.best[1]})
        stage.log(state.records[-1])
    if stage.folder:
        policy.save(stage.path("adapter"))
    return state.records
