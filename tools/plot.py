"""Plots of rpo.py and sdpo.py run directories, from their metrics.jsonl and eval.json files (pip install ".[plot]").

    python tools/plot.py runs/demo runs/sdpo-demo --out plots
    python tools/plot.py --together runs/a runs/b --first 1 --out plots/a-vs-b.png

For each run directory: test accuracy per iteration or step (the papers' tables), and the log-probabilities of
chosen and rejected responses over training steps (arXiv 2404.19733v3, Fig. 3); for sDPO runs also the held-out
mean γ per step (arXiv 2403.19270v1, Fig. 2). One PNG per figure, named after the run directory.
With --together, one figure overlays several runs (seeds, or α = 1 / α = 0 / SFT on the same pairs): accuracy,
the change of the chosen and rejected log-probs since the reference (rewards / β), and their margin, over
training steps; --first N keeps iterations 1 … N. It also prints a table of the accuracies with, against the
run's own M_0 on the same test questions, the questions gained and lost and an exact sign test.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project, one folder up

from machinery.files import atomic, read  # noqa: E402
from machinery.results import index_of, markdown_table, run_rows, versus  # noqa: E402


def read_run(folder: str):
    return read(os.path.join(folder, "config.json")), read(os.path.join(folder, "metrics.jsonl"))


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: str) -> None:
    with atomic(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")


def step_axis(steps: list) -> list:
    """x of each training record: the iterations' (steps') optimizer steps laid end to end."""
    xs, offset, last = [], 0, None
    for r in steps:
        if r["iteration"] != last:
            offset, last = (xs[-1] if xs else 0), r["iteration"]
        xs.append(offset + r["step"])
    return xs


def accuracy_lines(ax, evals: list, prefix: str = "", maj_alpha: float = 1.0, **style) -> None:
    """Greedy accuracy (solid) and maj@k (dashed) per iteration or step."""
    x = [index_of(r["folder"]) for r in evals]
    ax.plot(x, [100 * r.get("accuracy", float("nan")) for r in evals], "o-", label=f"{prefix}greedy", **style)
    for key in sorted({k for r in evals for k in r if k.startswith("maj@")}):
        ax.plot(x, [100 * r.get(key, float("nan")) for r in evals], "s--", alpha=maj_alpha, label=f"{prefix}{key}",
                **style)


def plot_run(folder: str, out: str) -> list:
    plt = pyplot()
    config, records = read_run(folder)
    script = config.get("script", "rpo.py")
    name = os.path.basename(os.path.normpath(folder))
    unit = "step" if script == "sdpo.py" else "iteration"
    evals = [r for r in records if r.get("stage") == "eval"]
    steps = [r for r in records if "loss" in r and "step" in r]
    fig, axes = plt.subplots(1, 3 if script == "sdpo.py" else 2, figsize=(15 if script == "sdpo.py" else 10, 4))
    x = [index_of(r["folder"]) for r in evals]
    accuracy_lines(axes[0], evals)
    axes[0].set(xlabel=unit, ylabel="test accuracy %", title=f"{name}: accuracy per {unit}", xticks=x)
    axes[0].legend()
    xs = step_axis(steps)
    groups = sorted({r["iteration"] for r in steps})
    for g in groups:  # one curve segment per iteration/step
        mine = [(x, r) for x, r in zip(xs, steps) if r["iteration"] == g]
        axes[1].plot([x for x, _ in mine], [r["logps/chosen"] for _, r in mine], "g-",
                     label="chosen" if g == groups[0] else None)
        axes[1].plot([x for x, _ in mine], [r["logps/rejected"] for _, r in mine], "r-",
                     label="rejected" if g == groups[0] else None)
    axes[1].set(xlabel="optimizer step (all iterations)", ylabel="log π (summed over response)",
                title="log-probs of chosen and rejected (Fig. 3)")
    axes[1].legend()
    if script == "sdpo.py":
        axes[2].plot(x, [r["heldout/gamma_mean"] for r in evals], "o-")
        axes[2].set(xlabel="model M_t", ylabel="mean γ on held-out pairs", xticks=x,
                    title="mean γ_ref of the next step (sDPO Fig. 2)")
    fig.tight_layout()
    path = os.path.join(out, f"{name}.png")
    save(fig, path)
    plt.close(fig)
    return [path]


def plot_together(folders: list, path: str, first: int = 0) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(21, 4.2))
    for color, folder in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], folders):
        config, records = read_run(folder)
        script, beta = config.get("script", "rpo.py"), config["beta"]
        name = os.path.basename(os.path.normpath(folder))
        keep = (lambda t: t <= first) if first else (lambda t: True)
        evals = [r for r in records if r.get("stage") == "eval" and keep(index_of(r["folder"]))]
        steps = [r for r in records if "loss" in r and "step" in r and keep(r["iteration"])]
        accuracy_lines(axes[0], evals, f"{name} ", maj_alpha=0.6, color=color)
        xs = step_axis(steps)
        # the raw log π of the step's pairs (the paper's Fig. 3 axis): moves with the pairs drawn for the step
        axes[1].plot(xs, [r["logps/chosen"] for r in steps], "-", color=color, lw=1, label=f"{name} chosen")
        axes[1].plot(xs, [r["logps/rejected"] for r in steps], ":", color=color, lw=1, label=f"{name} rejected")
        # rewards / β = log π − log π_ref of the step's pairs: their change since the reference, free of the
        # pair-to-pair spread of the raw log-probs
        axes[2].plot(xs, [r["rewards/chosen"] / beta for r in steps], "-", color=color, label=f"{name} chosen")
        axes[2].plot(xs, [r["rewards/rejected"] / beta for r in steps], ":", color=color, label=f"{name} rejected")
        axes[3].plot(xs, [r["rewards/margins"] / beta for r in steps], "-", color=color, label=name)
    unit = "step" if script == "sdpo.py" else "iteration"
    axes[0].set(xlabel=unit, ylabel="test accuracy %", title=f"accuracy per {unit}")
    axes[0].xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    for ax in axes[2:]:
        ax.axhline(0, color="grey", lw=0.5)
    axes[1].set(xlabel="optimizer step", ylabel="log π (summed over response)",
                title="chosen (solid), rejected (dotted), raw (Fig. 3)")
    axes[2].set(xlabel="optimizer step", ylabel="log π − log π_ref (summed over response)",
                title="the same, relative to the reference")
    axes[3].set(xlabel="optimizer step", ylabel="(log π − log π_ref)(chosen − rejected)", title="margin")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    save(fig, path)
    plt.close(fig)


def gamma_table(folders: list) -> str:
    """Per sDPO run and step: its pairs, their mean γ_ref under M_{t-1} for each file they came from (the bar the
    step must beat: arXiv 2403.19270v1, Sec. 2.2), and M_t on the held-out pairs (mean γ, which is the next step's
    mean γ_ref: Fig. 2; reward accuracy against M_0) and on the test split."""
    rows = []
    for folder in folders:
        config, records = read_run(folder)
        if config.get("script") != "sdpo.py":
            continue
        key = lambda p: json.dumps([p["prompt"], p["chosen"], p["rejected"]])  # noqa: E731
        names = [os.path.basename(f) for f in config["data"]]
        if len(set(names)) < len(names):  # e.g. iter_1/pairs.jsonl and iter_2/pairs.jsonl
            names = [os.path.join(os.path.basename(os.path.dirname(f)), n) for f, n in zip(config["data"], names)]
        # the files as named at run time, relative to where it ran; a pair from a file not found here: "file not found"
        source = {key(p): n for f, n in zip(config["data"], names) if os.path.exists(f) for p in read(f)}
        evals = {index_of(r["folder"]): r for r in records if r.get("stage") == "eval"}
        name = os.path.basename(os.path.normpath(folder))
        for t in sorted(evals):
            e = evals[t]
            cells = [name, t, "-", "-"]
            if t:
                pairs = read(os.path.join(folder, f"step_{t}", "pairs.jsonl"))
                logps = read(os.path.join(folder, f"step_{t}", "reference.jsonl"))
                by_file = {}
                for p, lp in zip(pairs, logps):
                    by_file.setdefault(source.get(key(p), "file not found"), []).append(lp["chosen"] - lp["rejected"])
                cells[2:] = [len(pairs), "; ".join(f"{f}: {sum(g) / len(g):.2f} ({len(g)})"
                                                   for f, g in sorted(by_file.items()))]
            cells += [f"{e['heldout/gamma_mean']:.2f}", "-" if not t else f"{100 * e['heldout/reward_accuracy']:.1f}",
                      f"{100 * e['accuracy']:.1f}" if "accuracy" in e else "-"]
            rows.append(cells)
    return markdown_table(["run", "step", "pairs", "mean γ_ref under M_{t-1}, by file (pairs)", "held-out mean γ of "
                           "M_t", "held-out reward acc % vs M_0", "test acc %"], rows) if rows else ""


def changes_table(folders: list, first: int = 0) -> str:
    """Per run and iteration (step): greedy accuracy and maj@k on the test split, and the questions it got right
    that M_0 got wrong (and the reverse), with the sign test's p: paired, so finer than the binomial error bar;
    the same against the iteration (step) before."""
    rows = []
    for folder in folders:
        name = os.path.basename(os.path.normpath(folder))
        for row in run_rows(folder, first or None):
            e = row["eval"]
            if "results" not in e:  # sDPO on pairs with no task: no test accuracy
                continue
            maj = next((f"{100 * v:.1f}" for k, v in e.items() if k.startswith("maj@")), "-")
            rows.append([name, row["t"], len(e["results"]), f"{100 * e['accuracy']:.1f}", maj,
                         versus(row["versus_m0"]), versus(row["versus_before"])])
    return markdown_table(["run", "iteration/step", "test n", "greedy %", "maj %", "vs M_0: gained / lost (sign "
                           "test)", "vs the one before"], rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories of rpo.py or sdpo.py")
    parser.add_argument("--out", default="plots", help="folder for the PNG files (with --together: the PNG file)")
    parser.add_argument("--together", action="store_true", help="overlay the runs in one figure")
    parser.add_argument("--first", type=int, default=0, help="with --together: iterations 1 … N only")
    args = parser.parse_args(argv)
    if args.together:
        try:
            plot_together(args.runs, args.out, args.first)
            print(changes_table(args.runs, args.first))
            print(gamma_table(args.runs))
        except FileNotFoundError as e:
            sys.exit(f"{e.filename}: missing; not a finished run directory")
        print(args.out)
        return
    for folder in args.runs:
        try:
            for path in plot_run(folder, args.out):
                print(path)
        except FileNotFoundError as e:
            sys.exit(f"{folder}: not a finished run directory ({e.filename} is missing)")


if __name__ == "__main__":
    main()
