"""Training on pairs, what Iterative RPO (arXiv 2404.19733v3) and sDPO (arXiv 2403.19270v1) share: the reference
pass, the optimizer steps of Eq. 1, the state a stopped run resumes from, the best checkpoint.

    reference_logps   log-probs of every pair under the current model, before training: π_ref = M_{t-1}
    train             DPO + NLL (Eq. 1, `losses.rpo_loss`) on pairs against the stored reference log-probs;
                      the best of --checkpoints held-out checks kept; a resumable state every --save-minutes
    optimizer_step    one step: this process's share of the pairs, gradients summed over the processes
    TrainState        the last step, its records, the best checkpoint: saved and loaded with the weights, the
                      optimizer's state and the random generators

Both algorithm files import this module; it imports neither.
"""
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

import dist
import lm
import memory
from losses import rpo_loss
from rundir import atomic


def pair_rows(model, encoded: list, indices, cfg: lm.Config, grad: bool, label: str) -> int:
    """How many pairs one forward pass scores: the memory plan for the longest prompt and response among them (with
    `grad`, less the optimizer's state and the gradients), at most --batch-size; one line says so."""
    shared, costs = not lm.checkpointing(model), memory.costs(model, lm.checkpointing(model))
    space = memory.available(cfg.memory_budget, model)
    if grad and space is not None:  # float32 gradients and two AdamW moments of every trainable weight
        space -= 12 * sum(p.numel() for p in model.parameters() if p.requires_grad)
    prompt = max((len(encoded[i][0]) for i in indices), default=1)
    response = max((max(len(encoded[i][1]), len(encoded[i][2])) for i in indices), default=1)
    rows = memory.scoring_rows(costs, space, prompt, response, cfg.batch_size, grad, shared)
    peak = memory.scoring_peak(costs, rows, prompt, response, grad, shared)
    print(memory.plan_line(label, rows, cfg.batch_size, space, peak, "pair"), file=sys.stderr)
    return rows


def reference_logps(model, tokenizer, pairs: list, cfg: lm.Config, desc: str, parts=None) -> list:
    """log M_{t-1}(y|x) of every chosen and rejected response, before the first update: the policy *is* the
    reference then, so no second model is kept. Eval mode: dropout off. Same `pair_logps` path as `train`. Pairs in
    order, as many a forward pass as the memory plan allows (`pair_rows`); under a launcher every P-th batch on each
    process; each finished batch kept in `parts`, so that a restarted stage scores only the rest."""
    model.eval()
    encoded = [lm.encode_pair(tokenizer, p, cfg.max_length) for p in pairs]
    finished = lm.finished_parts(parts)  # {pair index: {"chosen", "rejected"}}
    todo = [i for i in range(len(pairs)) if i not in finished]
    rows = dist.broadcast(pair_rows(model, encoded, todo, cfg, False, desc) if todo else 1)

    def score(chunk, bar):
        with torch.no_grad():
            chosen, rejected, _ = lm.pair_logps(model, lm.collate([encoded[i] for i in chunk], tokenizer.pad_token_id))
        bar.update(len(chunk))
        return {i: {"chosen": c, "rejected": r} for i, c, r in zip(chunk, chosen.tolist(), rejected.tolist())}

    finished.update(lm.in_parts(todo, rows, score, parts, desc, "pair", "pair", "--max-length"))
    return [finished[i] for i in range(len(pairs))]


def make_optimizer(params: list, lr: float):
    if torch.cuda.is_available():
        try:
            import bitsandbytes as bnb

            return bnb.optim.PagedAdamW8bit(params, lr=lr)
        except (ImportError, RuntimeError):
            pass
    return torch.optim.AdamW(params, lr=lr)


def trainable(optimizer) -> list:
    """The weights an optimizer steps (the LoRA weights), in its order."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def training_order(pairs: int, cfg: lm.Config, t: int) -> list:
    """The pairs of each optimizer step, batch_size × grad_accum a step: every epoch a seeded shuffle of them, the
    whole capped at --max-steps. A function of the seed alone, so a resumed run takes the same steps."""
    steps = [step for epoch in range(cfg.epochs) for step in
             lm.batches(random.Random(f"{cfg.seed}-{t}-{epoch}").sample(range(pairs), pairs),
                     cfg.batch_size * cfg.grad_accum)]
    return steps[:cfg.max_steps or None]


def accumulate(model, encoded: list, reference: list, mine: list, total: int, cfg: lm.Config, sft: bool, micro: int,
               pad_id: int, bar) -> dict:
    """The gradients of this process's pairs of a step, `micro` pairs a forward pass: Eq. 1 (`losses.rpo_loss`;
    with `sft`, its NLL term alone) summed over the pairs and divided by the step's `total`; returns the sums of the
    logged metrics."""
    sums = dict.fromkeys(lm.METRICS, 0.0)
    for chunk in lm.batches(mine, micro):
        chosen, rejected, lengths = lm.pair_logps(model, lm.collate([encoded[i] for i in chunk], pad_id))
        ref_chosen = torch.tensor([reference[i]["chosen"] for i in chunk], device=chosen.device)
        ref_rejected = torch.tensor([reference[i]["rejected"] for i in chunk], device=chosen.device)
        eq1, chosen_rewards, rejected_rewards, dpo, nll = rpo_loss(chosen, rejected, ref_chosen, ref_rejected,
                                                                   lengths, cfg.beta, cfg.alpha)  # Eq. 1
        losses = nll if sft else eq1  # STaR: the NLL term alone
        (losses.sum() / total).backward()
        values = {"loss": losses, "loss/dpo": dpo, "loss/nll": nll, "rewards/chosen": chosen_rewards,
                  "rewards/rejected": rejected_rewards,
                  "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
                  "rewards/margins": chosen_rewards - rejected_rewards, "logps/chosen": chosen,
                  "logps/rejected": rejected}
        for name, value in values.items():
            sums[name] += value.detach().float().sum().item()
        bar.update(len(chunk) * dist.size())
    return sums


def optimizer_step(model, encoded: list, reference: list, indices: list, cfg: lm.Config, sft: bool, optimizer,
                   micro: int, pad_id: int, bar) -> tuple[dict, int]:
    """One optimizer step on the pairs `indices`, the loss averaged over them: each process its share of the step's
    --batch-size groups (as DDP: the gradients then summed over the processes), `micro` pairs a forward pass. Out of
    memory, the step starts again at half the pairs a forward pass. Returns (the step's metrics, `micro` now)."""
    params = trainable(optimizer)
    shares = lm.batches(indices, cfg.batch_size)
    mine = [i for m in dist.mine(len(shares)) for i in shares[m]]
    counted = bar.n
    while True:
        try:
            sums = accumulate(model, encoded, reference, mine, len(indices), cfg, sft, micro, pad_id, bar)
            break
        except torch.OutOfMemoryError:
            pass  # out of the except block first, so that the traceback's tensors are freed
        optimizer.zero_grad(set_to_none=True)
        memory.release()
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


@dataclass
class TrainState:
    """Where training stands: its last optimizer step, the records so far, the best checkpoint (step, score, the
    trainable weights then). Saved with the weights, the optimizer's state and every process's random generators
    into `{parts}/state/` (atomically), so that a restarted stage goes on after `step` as if never stopped."""
    step: int = 0
    records: list = field(default_factory=list)
    best: tuple | None = None

    def checked(self) -> bool:
        return any(r.get("step") == self.step and "heldout/accuracy" in r for r in self.records)

    def save(self, parts, optimizer) -> None:
        params = trainable(optimizer)
        generators = dist.merge({dist.rank(): random_state()})
        if dist.is_main():
            with atomic(os.path.join(parts.folder, "state")) as tmp:
                os.makedirs(tmp)
                torch.save({"step": self.step, "records": self.records, "best": self.best and self.best[:2],
                            "best_weights": self.best and self.best[2], "weights": [p.detach() for p in params],
                            "optimizer": optimizer.state_dict(), "generators": generators},
                           os.path.join(tmp, "state.pt"))
        dist.barrier()

    @classmethod
    def load(cls, parts, optimizer) -> "TrainState":
        path = os.path.join(parts.folder, "state", "state.pt") if parts else ""
        if not os.path.exists(path):
            return cls()
        saved = torch.load(path, map_location="cpu", weights_only=True)
        with torch.no_grad():
            for p, w in zip(trainable(optimizer), saved["weights"]):
                p.copy_(w)
        optimizer.load_state_dict(saved["optimizer"])
        random_state(saved["generators"].get(dist.rank(), saved["generators"][0]))
        best = saved["best"] and (*saved["best"], saved["best_weights"])
        return cls(saved["step"], saved["records"], best)


def random_state(state: dict | None = None) -> dict | None:
    """Python's and torch's generators (CUDA's too): their state, or set them to `state`."""
    if state is None:
        return {"python": random.getstate(), "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    return None


def train(model, tokenizer, pairs: list, reference: list, cfg: lm.Config, t: int, log: Callable[[dict], None],
          sft: bool = False, adapter: str | None = None, checkpoint: Callable[[int], float] | None = None,
          checkpoints: int = 1, parts=None) -> list:
    """Train the policy on the pairs with L_DPO+NLL (Eq. 1; plain DPO at α = 0; with `sft`, the NLL term alone:
    SFT on the chosen responses) against the stored reference log-probs: one optimizer step per
    batch_size × grad_accum pairs, the loss averaged over the pairs of the step. With `checkpoint` (a score of the
    step, such as accuracy on held-out questions), the policy is scored at `checkpoints` evenly spaced steps, the
    last one included, and the best checkpoint is kept (ties go to the later one). With `parts`, a resumable state
    is kept at each of those steps and every --save-minutes, and a restarted stage goes on from the last one.
    Saves the adapter to the folder `adapter` when given, and returns the step records (also passed to `log`)."""
    model.train()
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg.lr)
    steps, encoded = training_order(len(pairs), cfg, t), [lm.encode_pair(tokenizer, p, cfg.max_length) for p in pairs]
    marks = {round(len(steps) * (k + 1) / checkpoints) for k in range(checkpoints)} if checkpoint else set()
    state = TrainState.load(parts, optimizer)
    if state.step:
        print(f"train M_{t}: going on after step {state.step} of {len(steps)}", file=sys.stderr)
    for record in state.records:  # metrics.jsonl goes on where the stopped stage left it
        log(record)
    micro = dist.broadcast(pair_rows(model, encoded, range(len(pairs)), cfg, True, f"train M_{t}"))
    bar = tqdm(total=sum(map(len, steps)), initial=sum(map(len, steps[:state.step])), desc=f"train M_{t}",
               unit="pair")  # moves every micro-batch
    saved = time.time()

    def check():  # the paper: "select the best checkpoint using a held-out 1k samples" (Sec. 3)
        state.records.append({"iteration": t, "step": state.step, "heldout/accuracy": checkpoint(state.step)})
        log(state.records[-1])
        model.train()
        if state.best is None or state.records[-1]["heldout/accuracy"] >= state.best[1]:
            state.best = (state.step, state.records[-1]["heldout/accuracy"],
                          [p.detach().clone() for p in trainable(optimizer)])
        if parts:
            state.save(parts, optimizer)

    if state.step in marks and not state.checked():  # stopped between a checkpoint's state and its check
        check()
    for step in range(state.step + 1, len(steps) + 1):
        record, micro = optimizer_step(model, encoded, reference, steps[step - 1], cfg, sft, optimizer, micro,
                                       tokenizer.pad_token_id, bar)
        state.step = step
        state.records.append({"iteration": t, "step": step, **record})
        log(state.records[-1])
        bar.set_postfix_str(f"step {step}/{len(steps)}, loss {record['loss']:.4f} acc "
                            f"{record['rewards/accuracies']:.2f}")
        if parts and (step in marks or dist.broadcast(time.time() - saved >= 60 * cfg.save_minutes)):
            state.save(parts, optimizer)  # before a check too: a stop during it loses no optimizer step
            saved = time.time()
        if step in marks:
            check()
    bar.close()
    return finish(model, state, optimizer, t, log, adapter)


def finish(model, state: TrainState, optimizer, t: int, log: Callable[[dict], None], adapter: str | None) -> list:
    """The best checkpoint's weights back in the policy (with held-out checks), the record of which one, the
    adapter saved."""
    if state.best is not None:
        with torch.no_grad():
            for p, kept in zip(trainable(optimizer), state.best[2]):
                p.copy_(kept)
        state.records.append({"iteration": t, "selected_step": state.best[0], "heldout/accuracy": state.best[1]})
        log(state.records[-1])
    if adapter:
        lm.save_adapter(model, adapter)
    return state.records
