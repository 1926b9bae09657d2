"""Iterative Reasoning Preference Optimization, "Iterative RPO" (Pang et al., arXiv 2404.19733v3), with QLoRA.

The algorithm, in the paper's words (Sec. 2), for iterations t = 1 … T, starting from M_0 = the given model:
  1. Chain-of-thought & answer generation: sample N responses (c_i^n, y_i^n) ~ M_{t-1}(x_i) per training question
     (`sample_and_reward`, with `sampling.generate`).
  2. Reward: r_i^n = 1 if the final answer y_i^n equals the gold answer y_i, else 0 (`reward.judge`; the chain of
     thought is never judged).
  3. Preference pairs: walk the winners (r = 1) and losers (r = 0) of a question together, wrapping around, until
     K pairs are made; none if either set is empty (`make_pairs`, `pair_up`). Only this iteration's pairs are used.
  4. Training: M_t is initialised from M_{t-1} and trained with L_DPO+NLL (Eq. 1, `losses.rpo_loss`) against the
     fixed reference M_{t-1} (`training.reference_logps`, then `training.train`).
  5. Repeat. Evaluation after each iteration: greedy accuracy and maj@k on the test split (`sampling.evaluate`).

Where this code departs from the paper, and why:
  - QLoRA/LoRA instead of full fine-tuning of Llama-2-70B-Chat, so a 7B model fits one consumer GPU. The adapter
    carries over from iteration to iteration: M_t = base + adapter_t, initialised from adapter_{t-1}. LoRA needs
    a larger learning rate than the paper's 7e-7 for full fine-tuning; the presets say which they use. The frozen
    model computes in bf16 on CUDA (its KV cache too), its output head in float32 so log-probs keep their
    precision; each stage runs as many rows at once as its memory plan allows (`machinery/memory.py`).
  - The reference M_{t-1} is never held in memory: since the policy starts as M_{t-1}, the reference log-probs are
    the policy's own log-probs before its first update, computed once per iteration. Disabling the adapter would
    give the *base* model, the wrong reference from iteration 2 on.
  - Checkpoint selection (Sec. 3: up to 5000 steps, "then select the best checkpoint using a held-out 1k samples
    from the training set"): --heldout-questions training questions are never sampled for pairs, and the policy is
    scored on them (greedy accuracy) at --checkpoints evenly spaced steps; the best is kept, ties going to the
    later one, and the next iteration starts from it. The paper does not give the spacing; the presets hold out
    1000 questions and score 10 checkpoints, the demo 10 questions and 2.
  - Pairing when K exceeds the |G_w|·|G_l| distinct (winner, loser) combinations: every combination once, so fewer
    than K pairs; the paper's walk would repeat pairs. Past one lap, the walk shifts the loser index by one every
    lcm(|G_w|, |G_l|) steps so that it reaches new combinations instead of repeating the first lap.
  - The cap on an iteration's pairs (`--max-pairs`, ~55-60k on GSM8K in the paper) keeps a seeded random sample.
  - The first "Final answer:" of a completion is its answer (a small model may go on to invent and answer new
    questions), and sampling stops once that line is complete, or where the model starts a new "Question:" of its
    own, so the tokens after it are neither judged nor paid for.
  - A sample cut off at --max-new-tokens before it ended gave no final answer: its reward is 0, whatever its last
    number (so it is never a winner), and as a loser it is scored in training without the EOS it never wrote. A
    test answer cut off so is scored wrong the same way. The counts go to stats.json and eval.json. The paper does
    not say how it treated such samples.
  - When a model does not use the "Final answer:" format, the answer falls back to "####", the last \\boxed{}
    and (GSM8K, arith) the last number (`reward.extract_answer`).
  - An EOS token is appended to every response scored in training (so the model learns to stop after its answer)
    and is counted in |c_w| + |y_w|, the NLL term's length: one token more than the chain of thought and answer.
  - The gold solution added to the winners (`--add-gold`, GSM8K) is written in the prompt's format: GSM8K's
    reasoning without its <<calculator>> annotations, then "Final answer: <gold>" in place of "#### <gold>". It is
    the first winner of the walk, so every question with a loser pairs it at least once (the paper does not say
    where it goes; last, it would go unpaired whenever K ≤ the model's own right samples).
  - Prompts are sent as one user message through the model's chat template when it has one (the paper used
    Llama-2-70B-Chat and does not say how it wrapped the prompt); a model without a template gets the plain text.
  - MATH's 4 fixed shots are the first 4 examples of the training file, which are then not trained on (the paper
    says "fixed train examples", not which); each shot's solution ends with the "Final answer: ..." line that
    the prompt asks for.
  - `--sft`, the paper's STaR baseline, trains with the NLL term alone on every correct sample of the iteration
    once (and the gold solution with --add-gold), each normalised by its own length as in Eq. 1.
  - Optimiser: AdamW at a constant learning rate with gradient clipping at 1.0 (the paper gives neither schedule
    nor clipping); paged 8-bit AdamW from bitsandbytes on CUDA. LoRA dropout defaults to 0 so that the policy's
    log-probs equal the reference's at step 0 (loss = log 2 + α·NLL).
  - The default is the embedded SmolLM2-135M-Instruct on built-in arithmetic word problems: no download.
  - `--engine vllm` samples and evaluates on vLLM (`machinery/engine.py`) from M_{t-1} merged into one copy (under
    QLoRA its NF4 weights dequantised), each sample with its own seed; its samples are not the own loop's (other
    kernels round otherwise). Held-out checkpoints are scored by the own loop, the default and the reference.

Run directory: config.json, iter_0/eval.json (M_0), and per iteration iter_t/ with samples.jsonl, stats.json,
pairs.jsonl, reference.jsonl, adapter/ (PEFT format), train_log.jsonl, eval.json; the same command again resumes
(docs/USAGE.md). Sample n of question x draws from a random stream of its own, seeded by the stage, x's id and n.
"""
import math
import random
import sys
from dataclasses import dataclass, replace

import data
import model
import reward
import sampling
import training
from data import TaskConfig
from machinery.cli import DataError, main as command_line
from machinery.clock import rpo_stages
from machinery.config import RunConfig, arg
from machinery.resume import Stage
from machinery.results import no_pairs, rpo_table, run_rows
from machinery.rundir import RunDir
from model import ModelConfig, Policy
from sampling import SamplingConfig
from training import TrainConfig


@dataclass
class Config(SamplingConfig, TaskConfig, TrainConfig, ModelConfig, RunConfig):
    """Iterative RPO's settings: the fields below, and those each module reads (the task, sampling, training, the
    model). [In brackets: the paper's value; a / b / c = GSM8K / ARC-Challenge / MATH.]"""
    alpha: float = arg(1.0, "α, weight of the length-normalised NLL term of Eq. 1; 0 = plain DPO [1]", min=0)
    lr: float = arg(1e-4, "learning rate, constant [7e-7 for full fine-tuning; LoRA needs more]", above=0)
    epochs: int = arg(2, "passes over the pairs of an iteration [not given: up to 5000 steps, then the best "
                      "checkpoint]", min=1)
    iterations: int = arg(1, "T, the number of iterations [4 / 3 / 3]; a finished run continues with a larger T",
                          min=0)
    samples_per_question: int = arg(8, "N, responses sampled per training question [30 / 30 / 20]",
                                    aliases=["--samples"], min=1)
    pairs_per_question: int = arg(4, "K, (winner, loser) pairs per question [10 / 20 / 15]", aliases=["--pairs"],
                                  min=1)
    temperatures: list[float] = arg([0.8, 0.8, 1.3, 1.3], "sampling temperature of iteration 1, 2, ...; the last "
                                    "one repeats [0.8 for iterations 1-2, then 1.3 / 1.3 / 1.0]", above=0, min_items=1)
    add_gold: bool = arg(False, "add the gold solution to the winners [GSM8K: yes]")
    max_pairs: int = arg(0, "cap on the pairs of one iteration, 0 = none [GSM8K: ~55-60k]", min=0)
    heldout_questions: int = arg(10, "training questions held out, never sampled for pairs, to pick each iteration's "
                                 "best checkpoint; 0 = keep the last [1000]", min=0)
    checkpoints: int = arg(2, "evenly spaced checkpoints per iteration scored on the held-out questions, the last "
                           "one included [5000 steps, spacing not given]", min=1)
    sft: bool = arg(False, "the STaR baseline: SFT (the NLL term alone) on every correct sample of the iteration "
                    "once, instead of pairs")
    samples_from: str = arg("", "run directory whose M_0 evaluation and iteration-1 samples this run reuses (same "
                            "model, data, sampling and seed): ablations of the loss on identical pairs")
    out: str = arg("runs/demo", "run directory")


# The paper's values of the fields each module declares, shown in --help beside their own text.
PAPER = {"model": "Llama-2-70B-Chat", "beta": "0.1", "grad_accum": "16 pairs a step, batch_size × grad_accum",
         "max_steps": "5000 / 4000 / 5000", "max_length": "the context length", "eval_k": "32",
         "eval_temperature": "0.8"}


PRESETS = {  # the paper's settings, on a 7B chat model with QLoRA on one GPU; files from the public data sets
    # A real GSM8K run on 2 CPU cores, sized by measurement: its table and stage times in README, "A real benchmark".
    "gsm8k-cpu": dict(model="qwen2.5-coder-0.5b", task="gsm8k", n_train=96, n_test=0, iterations=1, engine="vllm",
                      samples_per_question=8, pairs_per_question=2, temperatures=[0.8], max_new_tokens=320,
                      max_length=512, lr=1e-4, batch_size=1, grad_accum=8, epochs=1, heldout_questions=32,
                      checkpoints=2, eval_k=0, sample_batch_size=64, out="runs/gsm8k-cpu"),
    "gsm8k-7b": dict(model="meta-llama/Llama-2-7b-chat-hf", task="gsm8k", n_train=0, n_test=0, iterations=4,
                     samples_per_question=30, pairs_per_question=10, temperatures=[0.8, 0.8, 1.3, 1.3],
                     add_gold=True, max_pairs=60000, max_new_tokens=512, max_length=1024, lr=5e-6, batch_size=4,
                     grad_accum=4, max_steps=5000, gradient_checkpointing=True, eval_k=32, sample_batch_size=64,
                     heldout_questions=1000, checkpoints=10, epochs=1, out="runs/gsm8k-7b"),
    "arc-7b": dict(model="meta-llama/Llama-2-7b-chat-hf", task="arc", n_train=0, n_test=0, iterations=3,
                   samples_per_question=30, pairs_per_question=20, temperatures=[0.8, 0.8, 1.3], max_new_tokens=512,
                   max_length=1024, lr=5e-6, batch_size=4, grad_accum=4, max_steps=4000, gradient_checkpointing=True,
                   eval_k=32, sample_batch_size=64, heldout_questions=1000, checkpoints=10, epochs=1,
                   out="runs/arc-7b"),
    "math-7b": dict(model="meta-llama/Llama-2-7b-chat-hf", task="math", n_train=0, n_test=0, iterations=3,
                    samples_per_question=20, pairs_per_question=15, temperatures=[0.8, 0.8, 1.0], max_new_tokens=768,
                    max_length=2048, lr=5e-6, batch_size=2, grad_accum=8, max_steps=5000,
                    gradient_checkpointing=True, eval_k=32, sample_batch_size=32, heldout_questions=1000,
                    checkpoints=10, epochs=1, out="runs/math-7b"),
}


# =================================================================================================================
# Steps 1-2: sample N responses per question from M_{t-1}, reward each

def sample_and_reward(policy: Policy, cfg: Config, examples: list, shots: list, stage: Stage) -> list:
    """N responses per training question at the iteration's temperature, each with its extracted answer, its reward,
    and whether it was cut off at --max-new-tokens before it ended (then its reward is 0: it gave no answer). Each
    response is drawn from its own stream, seeded by the question's id and its index."""
    temperature = sampling_temperature(cfg, stage.t)
    prompts = [model.task_prompt(policy.tokenizer, ex, shots) for ex in examples]
    completions = sampling.generate(policy, prompts, sampling.example_keys(examples), cfg.samples_per_question,
                                    temperature, cfg, stage.sub(label=f"{stage.label} (T={temperature})"))
    records = []
    for ex, prompt, outs in zip(examples, prompts, completions):
        for n, (text, truncated) in enumerate(outs):
            extracted, r = reward.judge(text, ex["answer"], ex["task"], ex.get("choices"), truncated,
                                        cfg.math_grader)
            records.append({"id": ex["id"], "n": n, "prompt": prompt, "completion": text, "extracted": extracted,
                            "reward": r, "truncated": truncated, "temperature": temperature})
    return records


def sampling_temperature(cfg: Config, t: int) -> float:
    """Iteration t's temperature: --temperatures[t-1], the last one repeating (GSM8K: 0.8, 0.8, 1.3, 1.3)."""
    return cfg.temperatures[min(t, len(cfg.temperatures)) - 1]


# =================================================================================================================
# Step 3: preference pairs

def make_pairs(winners: list, losers: list, k: int) -> list:
    """Walk G_w and G_l together, wrapping around at the end of either, until K (winner, loser) pairs are made;
    no pairs if either is empty (Sec. 2, "Preference optimization"). Distinct pairs only: fewer than K when
    |G_w|·|G_l| < K."""
    if not winners or not losers:
        return []
    count = min(k, len(winners) * len(losers))
    pairs, seen, i = [], set(), 0
    while len(pairs) < count:
        # Offsetting the loser index by one every lcm-th lap visits new combinations once the walk wraps.
        w, l = i % len(winners), (i + i // math.lcm(len(winners), len(losers))) % len(losers)
        if (w, l) not in seen:
            seen.add((w, l))
            pairs.append((winners[w], losers[l]))
        i += 1
    return pairs


def pair_up(tokenizer, cfg: Config, samples: list, examples: list, t: int):
    """(stats, pairs) of iteration t: K pairs per question from its samples (plus the gold solution as the first
    winner with --add-gold), pairs longer than --max-length or whose two texts are the same (no DPO gradient)
    dropped and counted, the total capped at --max-pairs.
    A cut-off sample is never a winner, and as a loser it gets no EOS in training. With --sft (the STaR baseline),
    every winner once, as a pair with an empty rejected response that the NLL term never looks at."""
    by_id = {}
    for s in samples:
        by_id.setdefault(s["id"], []).append(s)
    pairs, too_long, identical = [], 0, 0
    for ex in examples:
        group = by_id.get(ex["id"], [])
        gold = data.gold_solution(ex) if cfg.add_gold else None
        # The gold first: the walk starts with it, so it is paired whenever the question has a loser.
        winners = ([gold] if gold else []) + [s["completion"] for s in group if s["reward"]]
        losers = [(s["completion"], s.get("truncated", False)) for s in group if not s["reward"]]
        made = [(w, ("", False)) for w in winners] if cfg.sft else make_pairs(winners, losers, cfg.pairs_per_question)
        for chosen, (rejected, truncated) in made:
            if chosen == rejected and not cfg.sft:  # the same text as winner and loser carries no DPO gradient
                identical += 1
                continue
            pair = {"id": ex["id"], "task": ex["task"], "answer": ex["answer"], "prompt": group[0]["prompt"],
                    "chosen": chosen, "rejected": rejected, "rejected_truncated": truncated}
            if training.encode_pair(tokenizer, pair, cfg.max_length) is None:
                too_long += 1
            else:
                pairs.append(pair)
    if cfg.max_pairs and len(pairs) > cfg.max_pairs:
        pairs = random.Random(f"{cfg.seed}-cap-{t}").sample(pairs, cfg.max_pairs)
    rewards = {}
    for s in samples:
        rewards.setdefault(s["id"], set()).add(s["reward"])
    lengths = [len(ids) for ids in tokenizer([s["completion"] for s in samples], add_special_tokens=False)["input_ids"]]
    stats = {"questions": len(examples), "questions_with_pairs": len({p["id"] for p in pairs}),
             "pairs": len(pairs), "dropped_too_long": too_long, "dropped_identical": identical,
             "train_accuracy": sum(s["reward"] for s in samples) / max(1, len(samples)),
             "samples": len(samples), "truncated": sum(s.get("truncated", False) for s in samples),
             "questions_with_right_and_wrong": sum(len(r) == 2 for r in rewards.values()),
             "mean_length": sum(lengths) / max(1, len(lengths))}  # tokens of a completion, as sampled
    print(f"iter {t}: {stats['pairs']} {'SFT examples' if cfg.sft else 'pairs'} from "
          f"{stats['questions_with_pairs']}/{len(examples)} questions; {too_long} dropped as longer than "
          f"{cfg.max_length} tokens" + (f", {identical} as chosen = rejected" if identical else "") + "; "
          f"{stats['truncated']} of {len(samples)} samples cut off at "
          f"{cfg.max_new_tokens} tokens", file=sys.stderr)
    return stats, pairs


# =================================================================================================================
# The loop

# What a run's M_0 evaluation and iteration-1 samples do not depend on: only training, pairing and paths.
TRAINING_ONLY = {"iterations", "pairs_per_question", "add_gold", "max_length", "max_pairs", "alpha", "beta", "sft",
                 "lr", "batch_size", "grad_accum", "epochs", "max_steps", "gradient_checkpointing", "samples_from",
                 "checkpoints"}


def run(cfg: Config) -> list:
    """Iterative RPO: T iterations of generate → reward → pair → reference log-probs → train → evaluate."""
    model.check_model(cfg.model)  # bad input ends the run here, before anything is written
    cfg = model.resolved(cfg)  # --dtype auto: what this machine computes in (config.json records it)
    train_set, test_set, shots, heldout = data.load_task(cfg, cfg.seed, cfg.heldout_questions, cfg.iterations > 0)
    with RunDir(cfg, "rpo.py", "iter", grows=("iterations",)) as run_dir:  # locked: one run at a time
        print(f"rpo.py: Iterative RPO, T = {cfg.iterations} from M_0 = {cfg.model}; " + (
              f"{len(train_set)} {cfg.task} training questions × N = {cfg.samples_per_question} samples, K = "
              f"{cfg.pairs_per_question} pairs each; " if cfg.iterations else "M_0 evaluated only; ") +
              f"{len(test_set)} test questions → {cfg.out}", file=sys.stderr)
        if cfg.samples_from:  # a loss ablation on the very pairs of another run
            run_dir.copy_from(cfg.samples_from, ["iter_0/eval.json", "iter_1/samples.jsonl"], TRAINING_ONLY)
        policy = model.load_model(cfg)                                                         # M_0
        train_set, heldout, test_set = (sampling.fitting(policy, cfg, examples, shots, what) for examples, what in
                                        ((train_set, "training"), (heldout, "held-out"), (test_set, "test")))
        run_dir.expect(rpo_stages(cfg, len(train_set), len(test_set), len(heldout)))

        def evaluate(stage):  # greedy accuracy and maj@k of M_t on the test split
            return sampling.evaluate(policy, cfg, test_set, shots, stage)

        def heldout_accuracy(stage):  # greedy accuracy on held-out training questions, to pick a checkpoint (Sec. 3)
            return sampling.evaluate(policy, replace(cfg, eval_k=0, engine="own"), heldout, shots, stage)["accuracy"]

        run_dir.stage(0, "eval.json", evaluate, seed="eval")
        for t in range(1, cfg.iterations + 1):
            if t > 1:
                policy.load(run_dir.path(t - 1, "adapter"))  # M_{t-1}: M_t starts from it, and it is the reference
            samples = run_dir.stage(t, "samples.jsonl", seed="sample", compute=lambda stage:   # 1-2. generate,
                                    sample_and_reward(policy, cfg, train_set, shots, stage))   # reward
            stats, pairs = run_dir.stage(t, ("stats.json", "pairs.jsonl"), lambda stage:      # 3. pair
                                         pair_up(policy.tokenizer, cfg, samples, train_set, t))
            if not pairs:  # nothing to train M_t on: say so and end at M_{t-1}, rather than "train" on nothing
                print(rpo_table(run_rows(cfg.out, t - 1), cfg.eval_k))
                raise DataError(no_pairs(cfg, t, stats))
            reference = run_dir.stage(t, "reference.jsonl", lambda stage:                     # π_ref = M_{t-1},
                                      training.reference_logps(policy, pairs, cfg, stage))    # once
            run_dir.stage(t, "train_log.jsonl", seed="train", compute=lambda stage: training.train(  # 4. train M_t,
                policy, pairs, reference, cfg, stage, select=heldout_accuracy if heldout else None))  # Eq. 1
            policy.load(run_dir.path(t, "adapter"))                                            # M_t, best ckpt
            run_dir.stage(t, "eval.json", evaluate, seed="eval")                               # 5. evaluate
    rows = run_rows(cfg.out, cfg.iterations)
    print(rpo_table(rows, cfg.eval_k))
    return rows


def main(argv=None) -> None:
    command_line(run, Config, argv, PRESETS, __doc__.split("\n\n")[0], PAPER)


if __name__ == "__main__":
    main()
