"""A run directory as one HTML page a person opens in a browser: no server, no network, nothing beside it.

    python tools/report.py runs/demo               # writes runs/demo/report.html
    python tools/report.py runs/demo runs/sdpo-demo --pairs 30

The page holds the run's table (per iteration or step: pairs, checkpoint, test accuracy and the test questions
gained and lost against M_0 and the iteration before, with the exact sign test), its plots (`plot.py`, embedded;
`pip install ".[plot]"`, else left out with a line saying so), and per iteration (step) a browsable sample of
its preference pairs: the prompt, the chosen response beside the rejected one, their extracted answers and the
gold one highlighted, a loser cut off at the token limit marked. Standard library only, but for the plots.
"""
import argparse
import base64
import html
import os
import random
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project, one folder up

import reward  # noqa: E402
from machinery.files import atomic, read  # noqa: E402
from machinery.results import folders, run_rows, versus  # noqa: E402

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 1em 0; } td, th { border: 1px solid #ccc; padding: 4px 8px; }
th { background: #f3f3f3; } td { text-align: right; } td:first-child { text-align: center; }
details { border: 1px solid #ddd; border-radius: 6px; margin: .6em 0; padding: .4em .8em; }
summary { cursor: pointer; } .prompt { white-space: pre-wrap; color: #555; background: #fafafa; padding: .5em; }
.sides { display: grid; grid-template-columns: 1fr 1fr; gap: 1em; }
.side { white-space: pre-wrap; padding: .5em; border-radius: 4px; }
.chosen { background: #eef8ee; } .rejected { background: #fbeeee; }
mark { background: #ffe58a; } .gold { background: #c6f0c6; padding: 0 .3em; border-radius: 3px; }
.cut { background: #d33; color: white; padding: 0 .4em; border-radius: 3px; font-size: .85em; }
img { max-width: 100%; } .note { color: #777; }
"""


def cell(value, percent: bool = False) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}" if percent else html.escape(str(value))


def summary(folder: str, config: dict) -> tuple:
    """(header cells, rows) of the run's table, from its rows (`results.run_rows`)."""
    rows = []
    for row in run_rows(folder):
        t, stats, e = row["t"], row["stats"], row["eval"]
        gains = [html.escape(versus(row["versus_m0"])), html.escape(versus(row["versus_before"]))]
        if config.get("script") == "sdpo.py":  # sDPO: the bar each step must beat, and M_t on the held-out pairs
            rows.append([t, cell(stats.get("pairs")), cell(round(stats["gamma_ref_mean"], 2)) if stats else "-",
                         cell(round(e["heldout/gamma_mean"], 2)), cell(e["heldout/preference_accuracy"], True),
                         cell(e.get("accuracy"), True)] + gains)
            continue
        chosen = row["checkpoint"]
        rows.append([t, cell(stats.get("questions_with_pairs")), cell(stats.get("pairs")),
                     cell(stats.get("train_accuracy"), True),
                     f"step {chosen['selected_step']} ({100 * chosen['heldout/accuracy']:.1f})" if chosen else "-",
                     cell(e["accuracy"], True), cell(e.get("flexible-extract"), True),
                     cell(next((v for k, v in e.items() if k.startswith("maj@")), None), True)] + gains)
    if config.get("script") == "sdpo.py":
        head = ["step", "pairs", "mean γ_ref (its chunk)", "held-out mean γ", "held-out pref. acc %", "test acc %"]
    else:
        head = ["iteration", "questions w/ pairs", "pairs", "train-sample acc %", "checkpoint (held-out acc %)",
                "test acc % (strict-match)", "flexible-extract %", "maj@k %"]
    return head + ["vs M_0: gained / lost (sign test)", "vs the one before"], rows


def table(head: list, rows: list) -> str:
    return ("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>" +
            "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows) + "</table>")


def plots(folder: str) -> str:
    """plot.py's figure of the run, embedded as a PNG; a line saying why where matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return '<p class="note">No plots: pip install ".[plot]" (matplotlib).</p>'
    from tools import plot

    with tempfile.TemporaryDirectory() as tmp:
        images = []
        for path in plot.plot_run(folder, tmp):
            with open(path, "rb") as f:
                images.append(f'<img alt="plots" src="data:image/png;base64,{base64.b64encode(f.read()).decode()}">')
    return "".join(images)


def marked(text: str, task: str | None) -> str:
    """The response, escaped, its extracted final answer highlighted (the "Final answer:" line where there is one)."""
    answer = reward.extract_answer(text, task) if task in reward.TASKS else None
    final = reward.FINAL_RE.search(text)
    at = -1 if not answer else text.find(answer, final.end()) if final else text.rfind(answer)
    if at < 0:
        return html.escape(text)
    return html.escape(text[:at]) + f"<mark>{html.escape(answer)}</mark>" + html.escape(text[at + len(answer):])


def prompt_of(pair: dict) -> str:
    prompt = pair["prompt"]
    return prompt if isinstance(prompt, str) else "\n\n".join(f"[{m['role']}] {m['content']}" for m in prompt)


def pair_view(pair: dict, number: int) -> str:
    """One pair: the prompt, then the chosen and the rejected response side by side."""
    task, gold = pair.get("task"), pair.get("answer")
    cut = ' <span class="cut">cut off at the token limit</span>' if pair.get("rejected_truncated") else ""
    title = f"pair {number}" + (f" · {html.escape(str(pair.get('id')))}" if pair.get("id") else "") + \
        (f' · gold <span class="gold">{html.escape(str(gold))}</span>' if gold is not None else "") + cut
    return (f"<details{' open' if number == 1 else ''}><summary>{title}</summary>"
            f'<div class="prompt">{html.escape(prompt_of(pair))}</div><div class="sides">'
            f'<div class="side chosen"><b>chosen</b>\n{marked(pair["chosen"], task)}</div>'
            f'<div class="side rejected"><b>rejected</b>{cut}\n{marked(pair["rejected"], task)}</div></div></details>')


def pairs_section(folder: str, sample: int, seed: int) -> str:
    """Per iteration (step), a seeded random sample of its pairs, in their order."""
    parts = []
    for _, here in folders(folder):
        path = os.path.join(here, "pairs.jsonl")
        if not os.path.exists(path):
            continue
        pairs = read(path)
        chosen = sorted(random.Random(f"{seed}-report-{path}").sample(range(len(pairs)), min(sample, len(pairs))))
        t = os.path.basename(os.path.dirname(path))
        parts.append(f"<h2>{t}: {len(chosen)} of its {len(pairs)} pairs</h2>" +
                     "".join(pair_view(pairs[i], k + 1) for k, i in enumerate(chosen)))
    return "".join(parts)


def report(folder: str, sample: int = 20) -> str:
    """The page of a run directory, written to `folder/report.html`; returns its path."""
    config = read(os.path.join(folder, "config.json"))
    name = os.path.basename(os.path.normpath(folder))
    head, rows = summary(folder, config)
    settings = ", ".join(f"{k} {config[k]}" for k in ("model", "task", "iterations", "steps", "samples_per_question",
                                                      "pairs_per_question", "alpha", "beta", "lr", "seed")
                         if k in config)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(name)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(name)}: {html.escape(config.get('script', ''))}"
            f"</h1><p class='note'>{html.escape(settings)}</p>{table(head, rows)}"
            "<p class='note'>gained / lost: the test questions answered right that the model compared with got wrong, "
            "and the reverse; p: the exact sign test on them.</p>"
            f"{plots(folder)}{pairs_section(folder, sample, config.get('seed', 0))}</body></html>")
    path = os.path.join(folder, "report.html")
    with atomic(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(page)
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories of rpo.py or sdpo.py")
    parser.add_argument("--pairs", type=int, default=20, help="pairs shown per iteration (step), a seeded sample")
    args = parser.parse_args(argv)
    for folder in args.runs:
        try:
            print(report(folder, args.pairs))
        except FileNotFoundError as e:
            sys.exit(f"{folder}: not a finished run directory ({e.filename} is missing)")


if __name__ == "__main__":
    main()
