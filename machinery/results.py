"""A run's results, read from its directory once: the rows of its table, with the paired sign test, for the scripts'
closing table, the HTML report and the plots alike.

    folders(run)        the iteration (step) folders of a run directory, in order: [(t, path)] (`index_of` a name)
    run_rows(run)       per iteration (step): its stats, its checkpoint, its evaluation, the questions gained and lost
                        against M_0 and against the one before (`flips`)
    rpo_table, sdpo_table   the table each script prints (markdown)
    no_pairs(cfg, t, stats) the line that ends an rpo.py run whose iteration t made no pairs
"""
import glob
import math
import os

from machinery.files import read


def markdown_table(head: list, rows: list) -> str:
    lines = ["| " + " | ".join(map(str, head)) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


def sign_test(lost: int, gained: int) -> float:
    """Two-sided exact sign test (McNemar) of questions lost against questions gained: P(as lopsided | no change)."""
    n = lost + gained
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(lost, gained) + 1)) / 2**n) if n else 1.0


def flips(before: dict, after: dict) -> tuple:
    """(gained, lost, sign test p) of an evaluation (an eval.json) against an earlier one on the same questions:
    questions answered right that were wrong, and the reverse. Paired, so finer than two accuracies' error bars."""
    was = {r["id"]: r["correct"] for r in before["results"]}
    now = {r["id"]: r["correct"] for r in after["results"]}
    gained = sum(now[i] and not was[i] for i in now)
    lost = sum(was[i] and not now[i] for i in now)
    return gained, lost, sign_test(lost, gained)


def index_of(folder_name: str) -> int:
    """t of an iteration (step) folder's name: iter_3 → 3, step_2 → 2."""
    return int(folder_name.rsplit("_", 1)[1])


def folders(run: str) -> list:
    """[(t, path)] of the iteration (step) folders of a run directory (`iter_t`, `step_t`), in order of t."""
    found = [(index_of(os.path.basename(p)), p) for p in glob.glob(os.path.join(run, "*_[0-9]*"))
             if os.path.isdir(p) and os.path.basename(p).rsplit("_", 1)[1].isdigit()]
    return sorted(found)


def optional(path: str, default=None):
    return read(path) if os.path.exists(path) else default


def run_rows(run: str, last: int | None = None) -> list:
    """Per iteration (step) t = 0 … last (default: every one evaluated): {"t", "stats", "eval", "checkpoint" (the
    selected step's record, or None), "versus_m0", "versus_before" ((gained, lost, p), or None without a task or
    at t = 0)}."""
    rows = []
    for t, path in folders(run):
        if (last is not None and t > last) or not os.path.exists(os.path.join(path, "eval.json")):
            continue
        result = read(os.path.join(path, "eval.json"))
        log = optional(os.path.join(path, "train_log.jsonl"), [])
        selected = [r for r in log if "selected_step" in r]
        rows.append({"t": t, "stats": optional(os.path.join(path, "stats.json"), {}) if t else {}, "eval": result,
                     "checkpoint": selected[0] if selected else None})
    for i, row in enumerate(rows):
        tasked = i and "results" in row["eval"] and "results" in rows[0]["eval"]
        row["versus_m0"] = flips(rows[0]["eval"], row["eval"]) if tasked else None
        row["versus_before"] = flips(rows[i - 1]["eval"], row["eval"]) if tasked else None
    return rows


def cell(v, pct: bool = False) -> str:
    return "-" if v is None else (f"{100 * v:.1f}" if pct else str(v))


def versus(flipped: tuple | None) -> str:
    return "-" if flipped is None else "{} / {} (p = {:.2g})".format(*flipped)


def rpo_table(rows: list, eval_k: int) -> str:
    """Iterative RPO's table: per iteration its pairs, its checkpoint, its test accuracy (lm-evaluation-harness
    readers' strict-match: the "Final answer:" line), and the test questions it answers right that M_0 got wrong
    (gained) and the reverse (lost), with the sign test's p on them; on GSM8K and arith also lm-evaluation-harness'
    flexible-extract (the completion's last number) and maj@k."""
    def checkpoint(c):
        return "-" if c is None else f"step {c['selected_step']} ({100 * c['heldout/accuracy']:.1f})"

    flexible = rows[0]["eval"].get("flexible-extract") is not None  # a numeric task: lm-evaluation-harness' second
    head = ["iteration", "questions w/ pairs", "pairs", "train-sample acc %", "checkpoint (held-out acc %)",
            f"test acc % (n = {rows[0]['eval']['n']})", "vs M_0: gained / lost (sign test)"] + \
        (["flexible-extract %"] if flexible else []) + ([f"maj@{eval_k} %"] if eval_k else [])
    return markdown_table(head, [[r["t"], cell(r["stats"].get("questions_with_pairs")), cell(r["stats"].get("pairs")),
                                  cell(r["stats"].get("train_accuracy"), True), checkpoint(r["checkpoint"]),
                                  cell(r["eval"]["accuracy"], True), versus(r["versus_m0"])] +
                                 ([cell(r["eval"].get("flexible-extract"), True)] if flexible else []) +
                                 ([cell(r["eval"].get(f"maj@{eval_k}"), True)] if eval_k else []) for r in rows])


def sdpo_table(rows: list) -> str:
    """sDPO's table: per step its chunk, γ on the held-out pairs, and with a task, test accuracy and the test
    questions gained and lost against M_0 with the sign test's p."""
    head = ["step", "pairs", "mean γ_ref (train chunk)", "held-out mean γ", "held-out pref. acc %",
            "held-out reward acc %", "test acc %", "vs M_0: gained / lost (sign test)"]
    return markdown_table(head, [[
        r["t"], r["stats"].get("pairs", "-"), f"{r['stats']['gamma_ref_mean']:.2f}" if r["stats"] else "-",
        f"{r['eval']['heldout/gamma_mean']:.2f}", f"{100 * r['eval']['heldout/preference_accuracy']:.1f}",
        f"{100 * r['eval']['heldout/reward_accuracy']:.1f}" if r["t"] else "-",
        f"{100 * r['eval']['accuracy']:.1f}" if "accuracy" in r["eval"] else "-", versus(r["versus_m0"])]
        for r in rows])


def no_pairs(cfg, t: int, stats: dict) -> str:
    """Why iteration t made no pairs (its stats.json), and what gives pairs: the line that ends the run at M_{t-1}."""
    return (f"iteration {t} made no {'SFT examples' if cfg.sft else 'pairs'}: "
            f"{stats['questions_with_right_and_wrong']} of {stats['questions']} questions had both a right and a wrong "
            f"sample, {stats['truncated']} of "
            f"{stats['samples']} samples were cut off at --max-new-tokens {cfg.max_new_tokens}; M_{t} was not trained "
            f"and the run ends at M_{t - 1}. More --max-new-tokens, --samples-per-question or --add-gold give pairs")
