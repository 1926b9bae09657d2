"""sDPO: stepwise Direct Preference Optimization (Kim et al., "sDPO: Don't Use Your Data All at Once",
arXiv 2403.19270v1), with LoRA or QLoRA.

The algorithm, in the paper's words (Sec. 2.2):
  1. Split the preference data D into T chunks D_1 … D_T (`split_steps`).
  2. For t = 1 … T: the reference model is M_{t-1}, the model aligned at step t-1 (M_0 = the SFT model), frozen
     (`training.reference_logps`); the target model is initialised from M_{t-1} as well; train it with the DPO loss
     on D_t (`training.train`).
     L_sDPO = Σ_t L_DPO(π_θt, π_θt−1)   (see `losses.py` for γ_ref, the reference margin)
  3. `--steps 1` is plain DPO on all data at once, the paper's baseline, through the same code.

Where this code departs from the paper, and why:
  - LoRA/QLoRA instead of full fine-tuning (SOLAR-10.7B in the paper); the adapter carries over from step to
    step, so M_t = base + adapter_t initialised from adapter_{t-1}. Disabling the adapter would give M_0, the wrong
    reference from step 2 on; here the reference log-probs are M_{t-1}'s own, computed once before step t.
  - Splits: as given (one file per step, as the paper did with OpenOrca then UltraFeedback), random equal chunks
    (the paper's "stratified" control), or easy-to-hard by M_0's γ_ref. The last orders pairs by γ_ref ascending:
    γ_ref is the lower bound the policy must beat (Sec. 2.2), so a low γ_ref is an easy pair.
  - A fixed held-out set of pairs, drawn before splitting, measures mean γ_ref per step (the paper's Fig. 2) and
    preference accuracy. An optional α NLL term (Eq. 1 of arXiv 2404.19733v3) is off by default.
  - Pairs longer than --max-length tokens are dropped before the held-out draw (the paper does not say).
  - Optimisation as in rpo.py (constant learning rate, clipping at 1.0); the paper follows Zephyr's settings.
  - Task accuracy (pairs from an rpo.py run) is measured as rpo.py measures it, with --engine vllm on vLLM.

Run directory: config.json, metrics.jsonl, heldout.jsonl, step_0/ (M_0 on the held-out pairs) and step_t/ with
pairs.jsonl (chunk D_t), reference.jsonl (log-probs under M_{t-1}), stats.json, adapter/, train_log.jsonl,
heldout_logps.jsonl, eval.json. Written atomically; the same command again resumes.
"""
import os
import random
import sys
from dataclasses import dataclass, fields, replace

import data
import model
import sampling
import training
from data import TaskConfig
from machinery import inputs
from machinery.cli import main as command_line
from machinery.clock import sdpo_stages
from machinery.config import RunConfig, arg
from machinery.files import read
from machinery.resume import Stage
from machinery.results import run_rows, sdpo_table
from machinery.rundir import MANIFEST, RunDir, as_written
from model import ModelConfig, Policy
from sampling import SamplingConfig
from training import TrainConfig

SPLITS = ("given", "random", "easy-to-hard")


@dataclass
class Config(TrainConfig, ModelConfig, RunConfig):
    """sDPO's settings: the fields below, and those of training and the model. [In brackets: the paper's value.]"""
    alpha: float = arg(0.0, "α of an optional length-normalised NLL term on the chosen response [0: plain DPO]",
                       min=0)
    lr: float = arg(2e-5, "learning rate, constant [Zephyr: 5e-7 for full fine-tuning; LoRA needs more]", above=0)
    epochs: int = arg(1, "passes over the pairs of a step [Zephyr: 1]", min=1)
    data: list[str] = arg([], "preference files (JSONL/Parquet: prompt, chosen, rejected; strings or chat "
                          "messages), e.g. the pairs.jsonl of an rpo.py run; with --split given, one file per step")
    steps: int = arg(2, "T, the number of steps [2: OpenOrca, then UltraFeedback]; 1 = plain DPO on all data", min=1)
    split: str = arg("auto", "how D is cut into steps: given (one file a step, in their order: the paper's method), "
                     "random (equal chunks: the paper's stratified control), easy-to-hard (by M_0's γ_ref); auto: "
                     "given when there are as many files as steps, else random", choices=("auto",) + SPLITS)
    heldout: int = arg(32, "pairs held out (fixed, drawn before splitting) for γ_ref and preference accuracy", min=1)
    task_config: str = arg("", "config.json of the rpo.py run whose test split measures task accuracy after each "
                           "step; default: found beside pairs.jsonl files written by rpo.py")
    out: str = arg("runs/sdpo", "run directory")


# The paper's values of the fields each module declares, shown in --help beside their own text.
PAPER = {"model": "SOLAR-10.7B + SFT", "beta": "0.1, Zephyr's settings", "max_length": "not given"}


@dataclass
class RpoTask(SamplingConfig, TaskConfig):
    """The task of the rpo.py run the pairs came from, as it sampled and evaluated it (the memory: this run's)."""
    memory_budget: float = 0.0  # this run's, as are the two below: sdpo.py follows no path from a found config
    engine: str = "own"
    vllm_python: str = ""


# =================================================================================================================
# Splitting the data into steps, and γ

def split_steps(pairs: list, files: list, mode: str, steps: int, gammas: list | None, seed: int) -> list:
    """Index lists, one per step, that partition range(len(pairs)): nothing lost, nothing repeated.
    `files[i]` is the file pair i came from; `gammas[i]` its γ_ref under M_0 (easy-to-hard only)."""
    indices = list(range(len(pairs)))
    if mode == "given":  # the files in the order given (`check_steps`: each has pairs)
        order = list(dict.fromkeys(files))
        return [[i for i in indices if files[i] == f] for f in order]
    if mode == "random":
        random.Random(f"{seed}-split").shuffle(indices)
    elif mode == "easy-to-hard":
        indices.sort(key=lambda i: gammas[i])  # low γ_ref first: the lower bound to beat is low
    size, extra = divmod(len(indices), steps)
    chunks, start = [], 0
    for t in range(steps):
        end = start + size + (t < extra)
        chunks.append(indices[start:end])
        start = end
    return chunks


def gammas(logps: list) -> list:
    """γ = log π(y_w|x) − log π(y_l|x) of each pair; under the reference, γ_ref (arXiv 2403.19270v1, Sec. 2.2)."""
    return [p["chosen"] - p["rejected"] for p in logps]


def heldout_eval(logps: list, initial: list, t: int) -> dict:
    """Mean γ under M_t (= the mean γ_ref of step t+1, the paper's Fig. 2), the share of held-out pairs M_t
    prefers (γ > 0), and its DPO reward accuracy against M_0 (γ_t > γ_0)."""
    gamma, gamma0 = gammas(logps), gammas(initial)
    n = max(1, len(gamma))
    return {"step": t, "heldout/gamma_mean": sum(gamma) / n,
            "heldout/preference_accuracy": sum(g > 0 for g in gamma) / n,
            "heldout/reward_accuracy": sum(g > g0 for g, g0 in zip(gamma, gamma0)) / n}


# =================================================================================================================
# Inputs: the pairs, and the task of the rpo.py run they came from

def rpo_task(cfg: Config):
    """(the rpo.py run's config, its task, test examples, shots, directory) when the pairs come from an rpo.py run
    (`inputs.rpo_config`: named by --task-config, or found beside the pairs); else None."""
    config, path = inputs.rpo_config(cfg.task_config, cfg.data)
    if config is None:
        return None
    saved = {f.name: config[f.name] for f in fields(RpoTask) if f.name in config}
    task = RpoTask(**saved | {k: getattr(cfg, k) for k in ("memory_budget", "engine", "vllm_python")})
    test, shots = data.load_task(task, config["seed"], config.get("heldout_questions", 0))[1:3]
    print(f"sdpo.py: task accuracy on the test split of the rpo.py run in {os.path.dirname(path)} ({task.task}, "
          f"{len(test)} questions{', from ' + task.test_file if task.test_file else ''})", file=sys.stderr)
    return config, task, test, shots, os.path.dirname(path)


def evaluate(policy: Policy, cfg: Config, task, logps: list, initial: list, stage: Stage) -> dict:
    """Held-out preference metrics and, when the pairs come from an rpo.py run, its task accuracy."""
    result = heldout_eval(logps, initial, stage.t)
    if task is not None:
        config, task_cfg, test, shots, folder = task
        measured = None
        if stage.t == 0 and (cfg.model, cfg.load_in_4bit) == (config["model"], config["load_in_4bit"]):
            # M_0 on the same test split: the rpo.py run measured it already, if its file is as that run wrote it
            why = as_written(folder, "iter_0/eval.json")
            measured = None if why else read(os.path.join(folder, "iter_0", "eval.json"))
            print(f"{why}: M_0 is evaluated here instead" if why else f"sdpo.py: M_0's task accuracy read from "
                  f"{os.path.join(folder, 'iter_0', 'eval.json')}, as that run wrote it ({MANIFEST})", file=sys.stderr)
        if measured is None:
            measured = sampling.evaluate(policy, task_cfg, test, shots, stage)
        result.update({k: v for k, v in measured.items() if k not in ("iteration", "n")}, test_n=measured["n"])
    return result


# =================================================================================================================
# The loop

def run(cfg: Config) -> list:
    """sDPO: for t = 1 … T, reference = M_{t-1}, target initialised from M_{t-1}, DPO on chunk D_t."""
    model.check_model(cfg.model)  # bad input ends the run here, before anything is written
    cfg = model.resolved(cfg)  # --dtype auto: what this machine computes in (config.json records it)
    if cfg.split == "auto":
        cfg = replace(cfg, split="given" if len(cfg.data) == cfg.steps > 1 else "random")
    inputs.check_files(cfg.data, cfg.split, cfg.steps)  # one line before any work, as are the checks below
    pairs, files = data.load_preference_files(cfg.data)
    task = rpo_task(cfg)
    same = {i for i, p in enumerate(pairs) if p["chosen"] == p["rejected"]}  # no DPO gradient: dropped, counted
    if same:
        print(f"{len(same)} pairs dropped: their chosen and rejected responses are the same", file=sys.stderr)
    if len(pairs) - len(same) <= cfg.heldout:  # before the model loads; again once over-long pairs are dropped
        sys.exit(f"sdpo.py: {len(pairs) - len(same)} pairs are too few for --heldout {cfg.heldout} and training")
    with RunDir(cfg, "sdpo.py", "step") as run_dir:  # locked: one run at a time
        print(f"sdpo.py: sDPO, T = {cfg.steps} step(s) ({cfg.split} split) of M_0 = {cfg.model} on {len(pairs)} "
              f"pairs from {len(cfg.data)} file(s) → {cfg.out}", file=sys.stderr)
        policy = model.load_model(cfg)                                                        # M_0
        keep = [i for i, p in enumerate(pairs) if i not in same and
                training.encode_pair(policy.tokenizer, p, cfg.max_length) is not None]
        if len(keep) < len(pairs) - len(same):
            print(f"{len(pairs) - len(same) - len(keep)} pairs dropped as longer than {cfg.max_length} tokens",
                  file=sys.stderr)
        if len(keep) <= cfg.heldout:
            sys.exit(f"sdpo.py: {len(keep)} pairs are too few for --heldout {cfg.heldout} and training")
        held = set(random.Random(f"{cfg.seed}-heldout").sample(keep, cfg.heldout))
        pool = [i for i in keep if i not in held]
        inputs.check_steps(cfg, files, set(keep), held, pool)  # every step has pairs
        heldout = run_dir.stage(None, "heldout.jsonl", lambda stage: [pairs[i] for i in keep if i in held])
        run_dir.expect(sdpo_stages(cfg, task, [pairs[i] for i in pool], len(held)))
        initial = run_dir.stage(0, "heldout_logps.jsonl", lambda stage:                       # M_0 on the held-out
                                training.reference_logps(policy, heldout, cfg, stage))
        scored = run_dir.stage(0, "pool_logps.jsonl", lambda stage: training.reference_logps(
            policy, [pairs[i] for i in pool], cfg, stage)) if cfg.split == "easy-to-hard" else None
        chunks = split_steps(pool, [files[i] for i in pool], cfg.split, cfg.steps, scored and gammas(scored),
                             cfg.seed)
        run_dir.stage(0, "eval.json", lambda stage: evaluate(policy, cfg, task, initial, initial, stage),
                      seed="eval")
        for t in range(1, cfg.steps + 1):
            if t > 1:
                policy.load(run_dir.path(t - 1, "adapter"))  # reference AND target := M_{t-1}
            chunk = run_dir.stage(t, "pairs.jsonl", lambda stage: [pairs[pool[i]] for i in chunks[t - 1]])  # D_t
            reference = run_dir.stage(t, "reference.jsonl", lambda stage:                     # log π_{t-1}, frozen
                                      training.reference_logps(policy, chunk, cfg, stage))
            run_dir.stage(t, "stats.json", lambda stage: {"step": t, "pairs": len(chunk),     # mean γ_ref of D_t
                                                          "gamma_ref_mean": sum(gammas(reference)) / len(reference)})
            run_dir.stage(t, "train_log.jsonl", seed="train", compute=lambda stage:           # L_DPO(π_t, π_{t-1})
                          training.train(policy, chunk, reference, cfg, stage))
            policy.load(run_dir.path(t, "adapter"))                                           # M_t
            logps = run_dir.stage(t, "heldout_logps.jsonl", lambda stage:                     # γ of M_t, held out
                                  training.reference_logps(policy, heldout, cfg, stage))
            run_dir.stage(t, "eval.json", lambda stage: evaluate(policy, cfg, task, logps, initial, stage),
                          seed="eval")
    rows = run_rows(cfg.out, cfg.steps)
    print(sdpo_table(rows))
    return rows


def main(argv=None) -> None:
    command_line(run, Config, argv, None, __doc__.split("\n\n")[0], PAPER)


if __name__ == "__main__":
    main()
