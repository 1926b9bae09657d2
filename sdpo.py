"""sDPO: stepwise Direct Preference Optimization (Kim et al., "sDPO: Don't Use Your Data All at Once",
arXiv 2403.19270v1), with LoRA or QLoRA.

The algorithm, in the paper's words (Sec. 2.2):
  1. Split the preference data D into T chunks D_1 … D_T (`split_steps`).
  2. For t = 1 … T: the reference model is M_{t-1}, the model aligned at step t-1 (M_0 = the SFT model), frozen;
     the target model is initialised from M_{t-1} as well; train it with the DPO loss on D_t.
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
  - Optimisation as in rpo.py (constant learning rate, clipping at 1.0); the paper follows Zephyr's settings.

Run directory: config.json, metrics.jsonl, heldout.jsonl, step_0/ (M_0 on the held-out pairs) and step_t/ with
pairs.jsonl (chunk D_t), reference.jsonl (log-probs under M_{t-1}), adapter/, train_log.jsonl, stats.json,
heldout_logps.jsonl, eval.json. Written atomically; the same command again resumes.
"""
import json
import os
import random
import sys
from dataclasses import dataclass

import data
import rpo
from rpo import opt

SPLITS = ("given", "random", "easy-to-hard")


@dataclass
class Config:
    data: list = opt([], "preference files (JSONL/Parquet: prompt, chosen, rejected; strings or chat messages), e.g. "
                     "the pairs.jsonl of an rpo.py run; with --split given, one file per step", nargs="+")
    steps: int = opt(2, "T, the number of steps [2: OpenOrca, then UltraFeedback]; 1 = plain DPO on all data")
    split: str = opt("random", "how D is cut into steps: given (one file a step), random (equal chunks, the "
                     "paper's stratified control) or easy-to-hard (by M_0's γ_ref)", choices=SPLITS)
    heldout: int = opt(32, "pairs held out (fixed, drawn before splitting) for γ_ref and preference accuracy")
    model: str = opt("smollm2-135m", "'smollm2-135m', 'tiny-random', or a Hugging Face model id or local path. "
                     "Paper: SOLAR-10.7B + SFT")
    task_config: str = opt("", "config.json of the rpo.py run whose test split measures task accuracy after each "
                           "step; default: found beside pairs.jsonl files written by rpo.py")
    alpha: float = opt(0.0, "α of an optional length-normalised NLL term on the chosen response [0: plain DPO]")
    beta: float = opt(0.1, "β of the DPO loss [Zephyr's settings]")
    lr: float = opt(2e-5, "learning rate, constant [Zephyr: 5e-7 for full fine-tuning; LoRA needs more]")
    batch_size: int = opt(4, "pairs per forward pass")
    grad_accum: int = opt(2, "forward passes per optimizer step")
    epochs: int = opt(1, "passes over each step's chunk")
    max_steps: int = opt(0, "cap on optimizer steps per sDPO step, 0 = none")
    max_length: int = opt(512, "pairs longer than this many tokens (prompt + response) are dropped")
    gradient_checkpointing: bool = opt(False, "recompute activations in the backward pass (saves GPU memory)")
    load_in_4bit: bool = opt(None, "QLoRA: NF4 base weights; default: on with CUDA", nullable=True)
    lora_r: int = opt(16, "LoRA rank")
    lora_alpha: int = opt(32, "LoRA scaling numerator")
    lora_dropout: float = opt(0.0, "LoRA dropout")
    lora_targets: str = opt("all-linear", "LoRA target modules: 'all-linear' or a comma-separated list")
    seed: int = opt(0, "seed of the held-out draw, the splits, LoRA init and shuffling")
    out: str = opt("runs/sdpo", "run directory")


# =================================================================================================================
# Splitting the data into steps

def split_steps(pairs: list, files: list, mode: str, steps: int, gammas: list | None, seed: int) -> list:
    """Index lists, one per step, that partition range(len(pairs)): nothing lost, nothing repeated.
    `files[i]` is the file pair i came from; `gammas[i]` its γ_ref under M_0 (easy-to-hard only)."""
    indices = list(range(len(pairs)))
    if mode == "given":
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


def load_all(cfg: Config):
    """(pairs, the file of each pair); DataError on bad input, SystemExit on a bad combination of flags."""
    if not cfg.data:
        sys.exit("sdpo.py: give the preference data with --data FILE [FILE ...]")
    if cfg.split == "given" and len(cfg.data) != cfg.steps:
        sys.exit(f"sdpo.py: --split given takes one file per step: {len(cfg.data)} files for --steps {cfg.steps}")
    pairs, files = [], []
    for path in cfg.data:
        loaded = data.load_preferences(path)
        pairs += loaded
        files += [path] * len(loaded)
    return pairs, files


def find_task_config(cfg: Config) -> str:
    if cfg.task_config:
        return cfg.task_config
    for path in cfg.data:  # runs/x/iter_1/pairs.jsonl -> runs/x/config.json
        candidate = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(path))), "config.json")
        if os.path.exists(candidate) and rpo.read_json(candidate).get("script") == "rpo.py":
            return candidate
    return ""


# =================================================================================================================
# Held-out evaluation: γ = log π(y_w|x) − log π(y_l|x) under the current model

def heldout_eval(logps: list, initial: list, t: int) -> dict:
    """Mean γ under M_t (= the mean γ_ref of step t+1, the paper's Fig. 2), the share of held-out pairs M_t
    prefers (γ > 0), and its DPO reward accuracy against M_0 (γ_t > γ_0)."""
    gamma = [p["chosen"] - p["rejected"] for p in logps]
    gamma0 = [p["chosen"] - p["rejected"] for p in initial]
    n = max(1, len(gamma))
    return {"step": t, "heldout/gamma_mean": sum(gamma) / n,
            "heldout/preference_accuracy": sum(g > 0 for g in gamma) / n,
            "heldout/reward_accuracy": sum(g > g0 for g, g0 in zip(gamma, gamma0)) / n}


# =================================================================================================================
# The loop

def run(cfg: Config) -> list:
    """sDPO: for t = 1 … T, reference = M_{t-1}, target initialised from M_{t-1}, DPO on chunk D_t."""
    rpo.open_run(cfg, "sdpo.py")
    pairs, files = load_all(cfg)
    task_config = find_task_config(cfg)
    task_cfg = rpo.Config(**{k: v for k, v in rpo.read_json(task_config).items() if k != "script"}) \
        if task_config else None
    folders = ["step_0"] + [f"step_{t}" for t in range(1, cfg.steps + 1)]
    rpo.rebuild_metrics(cfg.out, folders)
    model, tokenizer = rpo.load_model(cfg)
    log = rpo.metrics_logger(cfg.out)

    def path(*names):
        return os.path.join(cfg.out, *names)

    keep = [i for i, p in enumerate(pairs) if rpo.encode_pair(tokenizer, p, cfg.max_length) is not None]
    if len(keep) < len(pairs):
        print(f"{len(pairs) - len(keep)} pairs dropped as longer than {cfg.max_length} tokens", file=sys.stderr)
    if len(keep) <= cfg.heldout:
        sys.exit(f"sdpo.py: {len(keep)} pairs are too few for --heldout {cfg.heldout} and training")
    held = set(random.Random(f"{cfg.seed}-heldout").sample(keep, cfg.heldout))
    heldout = rpo.cached(path("heldout.jsonl"), lambda: [pairs[i] for i in keep if i in held])
    pool = [i for i in keep if i not in held]
    initial = rpo.cached(path("step_0", "heldout_logps.jsonl"),                   # M_0 on the held-out pairs
                         lambda: rpo.reference_logps(model, tokenizer, heldout, cfg, "M_0 held-out"))
    gammas = None
    if cfg.split == "easy-to-hard":
        scored = rpo.cached(path("step_0", "pool_logps.jsonl"),
                            lambda: rpo.reference_logps(model, tokenizer, [pairs[i] for i in pool], cfg, "M_0 γ_ref"))
        gammas = [s["chosen"] - s["rejected"] for s in scored]
    chunks = split_steps([pairs[i] for i in pool], [files[i] for i in pool], cfg.split, cfg.steps, gammas, cfg.seed)
    # (config, test examples, shots, the rpo run's directory)
    task = (task_cfg, *rpo.load_data(task_cfg)[1:], os.path.dirname(task_config)) if task_cfg else None
    evaluate(model, tokenizer, cfg, task, initial, initial, 0)
    for t in range(1, cfg.steps + 1):
        if not os.path.isdir(path(f"step_{t}", "adapter")):
            if t > 1:
                rpo.load_adapter(model, path(f"step_{t - 1}", "adapter"))  # reference AND target := M_{t-1}
            chunk = rpo.cached(path(f"step_{t}", "pairs.jsonl"), lambda: [pairs[pool[i]] for i in chunks[t - 1]])
            reference = rpo.cached(path(f"step_{t}", "reference.jsonl"),  # log π_{t-1}, frozen for this step
                                   lambda: rpo.reference_logps(model, tokenizer, chunk, cfg, f"step {t} reference"))
            gamma_ref = [r["chosen"] - r["rejected"] for r in reference]
            stats = {"step": t, "pairs": len(chunk), "gamma_ref_mean": sum(gamma_ref) / max(1, len(gamma_ref))}
            rpo.write_atomic(path(f"step_{t}", "stats.json"), json.dumps(stats, indent=1) + "\n")
            rpo.seed_everything(cfg.seed, t, "train")
            records = rpo.train(model, tokenizer, chunk, reference, cfg, t, log)
            rpo.write_jsonl(path(f"step_{t}", "train_log.jsonl"), records)
            rpo.save_adapter(model, path(f"step_{t}", "adapter"))
        elif not os.path.exists(path(f"step_{t}", "eval.json")):
            rpo.load_adapter(model, path(f"step_{t}", "adapter"))  # resuming: M_t is on disk
        logps = rpo.cached(path(f"step_{t}", "heldout_logps.jsonl"),
                           lambda: rpo.reference_logps(model, tokenizer, heldout, cfg, f"M_{t} held-out"))
        evaluate(model, tokenizer, cfg, task, logps, initial, t)
        rpo.rebuild_metrics(cfg.out, folders)
    rows = [rpo.read_json(path(f, "eval.json")) | (rpo.read_json(path(f, "stats.json")) if f != "step_0" else {})
            for f in folders]
    print(format_table(rows))
    return rows


def evaluate(model, tokenizer, cfg: Config, task, logps: list, initial: list, t: int) -> dict:
    """Held-out preference metrics and, when the pairs come from an rpo.py run (`task` = its config, test examples
    and shots), its task accuracy."""
    def compute():
        result = heldout_eval(logps, initial, t)
        if task is not None:
            task_cfg, test, shots, task_dir = task
            m0 = os.path.join(task_dir, "iter_0", "eval.json")
            if t == 0 and os.path.exists(m0) and (cfg.model, cfg.load_in_4bit) == (task_cfg.model,
                                                                                   task_cfg.load_in_4bit):
                measured = rpo.read_json(m0)  # M_0 on the same test split: the rpo.py run measured it already
            else:
                rpo.seed_everything(cfg.seed, t, "eval")
                measured = rpo.evaluate(model, tokenizer, task_cfg, test, shots, t, label="step")
            result.update({k: v for k, v in measured.items() if k not in ("iteration", "n")}, test_n=measured["n"])
        return result
    return rpo.cached(os.path.join(cfg.out, f"step_{t}", "eval.json"), compute, jsonl=False)


def format_table(rows: list) -> str:
    head = ["step", "pairs", "mean γ_ref (train chunk)", "held-out mean γ", "held-out pref. acc %",
            "held-out reward acc %", "test acc %"]
    return rpo.markdown_table(head, [[
        r["step"], r.get("pairs", "-"), f"{r['gamma_ref_mean']:.2f}" if "gamma_ref_mean" in r else "-",
        f"{r['heldout/gamma_mean']:.2f}", f"{100 * r['heldout/preference_accuracy']:.1f}",
        f"{100 * r['heldout/reward_accuracy']:.1f}" if r["step"] else "-",
        f"{100 * r['accuracy']:.1f}" if "accuracy" in r else "-"] for r in rows])


def main(argv=None) -> None:
    rpo.cli(argv, run, Config, {}, __doc__)


if __name__ == "__main__":
    main()
