"""sDPO: stepwise Direct Preference Optimization (Kim et al., "sDPO: Don't Use Your Data All at Once",
arXiv 2403.19270v1), with LoRA or QLoRA.

The algorithm, in the paper's words (Sec. 2.2):
  1. Split the preference data D into T chunks D_1 … D_T (`split_steps`).
  2. For t = 1 … T: the reference model is M_{t-1}, the model aligned at step t-1 (M_0 = the SFT model), frozen;
     the target model is initialised from M_{t-1} as well; train it with the DPO loss on D_t (`training.train`).
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

Run directory: config.json, metrics.jsonl, heldout.jsonl, step_0/ (M_0 on the held-out pairs) and step_t/ with
pairs.jsonl (chunk D_t), reference.jsonl (log-probs under M_{t-1}), stats.json, adapter/, train_log.jsonl,
heldout_logps.jsonl, eval.json. Written atomically; the same command again resumes.
"""
import os
import random
import sys
from dataclasses import dataclass, fields, replace

import data
import lm
import trackers
import training
from lm import arg
from rundir import RunDir, flips, main as run_main, markdown_table, read

SPLITS = ("given", "random", "easy-to-hard")


@dataclass
class Config(lm.Config):
    model: str = arg("smollm2-135m", "'smollm2-135m', 'tiny-random', or a Hugging Face model id or local path. "
                     "Paper: SOLAR-10.7B + SFT")
    alpha: float = arg(0.0, "α of an optional length-normalised NLL term on the chosen response [0: plain DPO]",
                       min=0)
    beta: float = arg(0.1, "β of the DPO loss [Zephyr's settings]", above=0)
    lr: float = arg(2e-5, "learning rate, constant [Zephyr: 5e-7 for full fine-tuning; LoRA needs more]", above=0)
    out: str = arg("runs/sdpo", "run directory")
    # --- sDPO
    data: list[str] = arg([], "preference files (JSONL/Parquet: prompt, chosen, rejected; strings or chat "
                          "messages), e.g. the pairs.jsonl of an rpo.py run; with --split given, one file per step")
    steps: int = arg(2, "T, the number of steps [2: OpenOrca, then UltraFeedback]; 1 = plain DPO on all data", min=1)
    split: str = arg("auto", "how D is cut into steps: given (one file a step, in their order: the paper's method), "
                     "random (equal chunks: the paper's stratified control), easy-to-hard (by M_0's γ_ref); auto: "
                     "given when there are as many files as steps, else random", choices=("auto",) + SPLITS)
    heldout: int = arg(32, "pairs held out (fixed, drawn before splitting) for γ_ref and preference accuracy", min=1)
    task_config: str = arg("", "config.json of the rpo.py run whose test split measures task accuracy after each "
                           "step; default: found beside pairs.jsonl files written by rpo.py")


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

def load_pairs(cfg: Config):
    """(pairs, the file of each pair); DataError on bad input, SystemExit on a bad combination of flags."""
    if not cfg.data:
        sys.exit("sdpo.py: give the preference data with --data FILE [FILE ...]")
    if cfg.split == "given" and len(cfg.data) != cfg.steps:
        sys.exit(f"sdpo.py: --split given takes one file per step: {len(cfg.data)} files for --steps {cfg.steps}")
    if cfg.split == "given" and len(set(cfg.data)) < len(cfg.data):
        sys.exit(f"sdpo.py: --split given takes one file per step, each once: {' '.join(cfg.data)}")
    pairs, files = [], []
    for path in cfg.data:
        loaded = data.load_preferences(path)
        pairs += loaded
        files += [path] * len(loaded)
    return pairs, files


def check_steps(cfg: Config, files: list, keep: set, held: set, pool: list) -> None:
    """DataError unless every step gets pairs to train on: with --split given, a file whose pairs were all dropped
    (longer than --max-length) or drawn into --heldout is named."""
    if cfg.split != "given":
        if len(pool) < cfg.steps:
            raise data.DataError(f"--steps {cfg.steps}: only {len(pool)} pairs are left to train on after --heldout "
                                 f"{cfg.heldout}; give more pairs, fewer steps or a smaller --heldout")
        return
    left = {files[i] for i in pool}
    for t, path in enumerate(cfg.data, start=1):
        if path not in left:
            mine = [i for i, f in enumerate(files) if f == path]
            raise data.DataError(
                f"{path}: none of its {len(mine)} pairs is left for step {t} ({sum(i not in keep for i in mine)} "
                f"longer than --max-length {cfg.max_length}, {sum(i in held for i in mine)} drawn into --heldout "
                f"{cfg.heldout}); give a larger --max-length, a smaller --heldout, or another --split")


def rpo_task(cfg: Config):
    """(the rpo.py run's config, its task, test examples, shots, directory) when the pairs come from an rpo.py run
    (its config.json beside them, or --task-config), else None."""
    if cfg.task_config and (not os.path.isfile(cfg.task_config) or read(cfg.task_config).get("script") != "rpo.py"):
        raise data.DataError(f"--task-config {cfg.task_config}: not the config.json of an rpo.py run")
    paths = [cfg.task_config] if cfg.task_config else [  # runs/x/iter_1/pairs.jsonl -> runs/x/config.json
        os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(p))), "config.json") for p in cfg.data]
    for path in paths:
        if os.path.exists(path) and read(path).get("script") == "rpo.py":
            config = read(path)
            task = lm.TaskConfig(**{f.name: config[f.name] for f in fields(lm.TaskConfig) if f.name in config})
            test, shots = lm.load_task(task, config["seed"], config.get("heldout_questions", 0))[1:3]
            return config, task, test, shots, os.path.dirname(path)
    return None


def evaluate(model, tokenizer, cfg: Config, task, logps: list, initial: list, t: int, parts=None) -> dict:
    """Held-out preference metrics and, when the pairs come from an rpo.py run, its task accuracy."""
    result = heldout_eval(logps, initial, t)
    if task is not None:
        config, task_cfg, test, shots, folder = task
        m0 = os.path.join(folder, "iter_0", "eval.json")
        if t == 0 and os.path.exists(m0) and (cfg.model, cfg.load_in_4bit) == (config["model"],
                                                                               config["load_in_4bit"]):
            measured = read(m0)  # M_0 on the same test split: the rpo.py run measured it already
        else:
            measured = lm.evaluate(model, tokenizer, task_cfg, test, shots, t, "step", parts, cfg.memory_budget)
        result.update({k: v for k, v in measured.items() if k not in ("iteration", "n")}, test_n=measured["n"])
    return result


# =================================================================================================================
# The loop

def run(cfg: Config) -> list:
    """sDPO: for t = 1 … T, reference = M_{t-1}, target initialised from M_{t-1}, DPO on chunk D_t."""
    lm.check_model(cfg.model)  # bad input ends the run here, before anything is written
    trackers.check(cfg.report_to)
    if cfg.split == "auto":
        cfg = replace(cfg, split="given" if len(cfg.data) == cfg.steps > 1 else "random")
    pairs, files = load_pairs(cfg)
    task = rpo_task(cfg)
    out = RunDir(cfg, "sdpo.py", "step")
    print(f"sdpo.py: sDPO, T = {cfg.steps} step(s) ({cfg.split} split) of M_0 = {cfg.model} on {len(pairs)} pairs from "
          f"{len(cfg.data)} file(s) → {cfg.out}", file=sys.stderr)
    model, tokenizer = lm.load_model(cfg)                                                     # M_0
    keep = [i for i, p in enumerate(pairs) if lm.encode_pair(tokenizer, p, cfg.max_length) is not None]
    if len(keep) < len(pairs):
        print(f"{len(pairs) - len(keep)} pairs dropped as longer than {cfg.max_length} tokens", file=sys.stderr)
    if len(keep) <= cfg.heldout:
        sys.exit(f"sdpo.py: {len(keep)} pairs are too few for --heldout {cfg.heldout} and training")
    held = set(random.Random(f"{cfg.seed}-heldout").sample(keep, cfg.heldout))
    pool = [i for i in keep if i not in held]
    check_steps(cfg, files, set(keep), held, pool)  # every step has pairs, or one line before any work
    heldout = out.stage(None, "heldout.jsonl", lambda: [pairs[i] for i in keep if i in held])
    out.expect(plan(cfg, task, [pairs[i] for i in pool], len(held)))
    initial = out.stage(0, "heldout_logps.jsonl", lambda: training.reference_logps(           # M_0 on the held-out
        model, tokenizer, heldout, cfg, "M_0 held-out", out.parts(0, "heldout_logps.jsonl")))
    scored = out.stage(0, "pool_logps.jsonl", lambda: training.reference_logps(
        model, tokenizer, [pairs[i] for i in pool], cfg, "M_0 γ_ref", out.parts(0, "pool_logps.jsonl"))) \
        if cfg.split == "easy-to-hard" else None
    chunks = split_steps(pool, [files[i] for i in pool], cfg.split, cfg.steps, scored and gammas(scored), cfg.seed)
    out.stage(0, "eval.json", lambda: evaluate(model, tokenizer, cfg, task, initial, initial, 0,
                                               out.parts(0, "eval.json")), seed="eval")
    for t in range(1, cfg.steps + 1):
        if t > 1:
            lm.load_adapter(model, out.path(t - 1, "adapter"))  # reference AND target := M_{t-1}
        chunk = out.stage(t, "pairs.jsonl", lambda: [pairs[pool[i]] for i in chunks[t - 1]])   # D_t
        reference = out.stage(t, "reference.jsonl", lambda: training.reference_logps(         # log π_{t-1}, frozen
            model, tokenizer, chunk, cfg, f"step {t}: reference", out.parts(t, "reference.jsonl")))
        out.stage(t, "stats.json", lambda: {"step": t, "pairs": len(chunk),                   # mean γ_ref of D_t
                                            "gamma_ref_mean": sum(gammas(reference)) / max(1, len(reference))})
        out.stage(t, "train_log.jsonl", seed="train", compute=lambda: training.train(         # L_DPO(π_t, π_{t-1})
            model, tokenizer, chunk, reference, cfg, t, out.log, adapter=out.path(t, "adapter"),
            parts=out.parts(t, "train_log.jsonl")))
        lm.load_adapter(model, out.path(t, "adapter"))                                        # M_t
        logps = out.stage(t, "heldout_logps.jsonl", lambda: training.reference_logps(         # γ of M_t, held out
            model, tokenizer, heldout, cfg, f"M_{t} held-out", out.parts(t, "heldout_logps.jsonl")))
        out.stage(t, "eval.json", lambda: evaluate(model, tokenizer, cfg, task, logps, initial, t,
                                                   out.parts(t, "eval.json")), seed="eval")
    out.close()
    rows = [read(out.path(t, "eval.json")) | (read(out.path(t, "stats.json")) if t else {})
            for t in range(cfg.steps + 1)]
    print(format_table(rows))
    return rows


def plan(cfg: Config, task, pool: list, heldout: int) -> dict:
    """The run's stages and their rough work in tokens (generated, scored), for the estimate of the time left."""
    per_pair = sum(len(p["chosen"]) + len(p["rejected"]) for p in pool) / max(1, len(pool)) / 4  # ~4 characters a token
    tests = len(task[2]) * (1 + task[1].eval_k) * task[1].max_new_tokens if task else 0
    stages = {(0, "heldout_logps.jsonl"): (0, heldout * per_pair), (0, "eval.json"): (tests, 0)}
    for t in range(1, cfg.steps + 1):
        chunk = len(pool) / cfg.steps * per_pair
        stages |= {(t, "reference.jsonl"): (0, chunk), (t, "train_log.jsonl"): (0, 3 * chunk * cfg.epochs),
                   (t, "heldout_logps.jsonl"): (0, heldout * per_pair), (t, "eval.json"): (tests, 0)}
    return stages


def format_table(rows: list) -> str:
    """Per step: its chunk, γ on the held-out pairs, and with a task, test accuracy and the test questions gained and
    lost against M_0 with the sign test's p."""
    def versus(r):
        return "{} / {} (p = {:.2g})".format(*flips(rows[0], r)) if r["step"] and "results" in r else "-"

    head = ["step", "pairs", "mean γ_ref (train chunk)", "held-out mean γ", "held-out pref. acc %",
            "held-out reward acc %", "test acc %", "vs M_0: gained / lost (sign test)"]
    return markdown_table(head, [[
        r["step"], r.get("pairs", "-"), f"{r['gamma_ref_mean']:.2f}" if "gamma_ref_mean" in r else "-",
        f"{r['heldout/gamma_mean']:.2f}", f"{100 * r['heldout/preference_accuracy']:.1f}",
        f"{100 * r['heldout/reward_accuracy']:.1f}" if r["step"] else "-",
        f"{100 * r['accuracy']:.1f}" if "accuracy" in r else "-", versus(r)] for r in rows])


def main(argv=None) -> None:
    run_main(run, Config, argv, None, __doc__.split("\n\n")[0])


if __name__ == "__main__":
    main()
