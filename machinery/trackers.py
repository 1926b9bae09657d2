"""--report-to: a run's metrics in the experiment trackers practitioners use, with TRL's flag and names.

    check(names)            before any work: each tracker asked for is installed (one line naming the pip install)
    Trackers(names, out, config)   each tracker, opened on the run directory: a resumed run continues its tracker run
    .sync(records)          metrics.jsonl's records not logged yet: a training step at its optimizer step counted
                            over all iterations, a stage's figures (stats, eval) at the step where it finished (an
                            iteration without an optimizer step logs its figures at the step of the one before)
    .table(key, name, rows) a bounded sample of completions or pairs, once per key
    .stage_table(...)       after a stage of samples.jsonl or pairs.jsonl: a seeded sample of it as such a table

Every tracker is an optional extra, imported only when asked for: tensorboard (`torch.utils.tensorboard`, pip install
tensorboard), trackio (Hugging Face's, local by default), wandb (offline with WANDB_MODE=offline). What was logged is
kept in `trackers.json` beside metrics.jsonl (how many records, which tables, wandb's run id), so that a resumed run
never logs a record twice. Only the main process logs.
"""
import importlib.util
import json
import os
import random
import sys
import uuid

from machinery import dist
from machinery.cli import DataError
from machinery.files import write_atomic

REPORT_TO = ("none", "tensorboard", "trackio", "wandb")
PACKAGE = {"tensorboard": "tensorboard", "trackio": "trackio", "wandb": "wandb"}


def last_message(prompt) -> str:
    """A prompt as a table shows it: the text, or a chat's last message (the question, without the template)."""
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


# The stages shown as tables: a sample of an iteration's completions, and of its pairs, as the trackers show them.
TABLES = {
    "samples.jsonl": ("completions", lambda s: {"prompt": last_message(s["prompt"]), "completion": s["completion"],
                                                "extracted": s["extracted"], "reward": s["reward"],
                                                "cut off": s["truncated"]}),
    "pairs.jsonl": ("pairs", lambda p: {"prompt": last_message(p["prompt"]), "chosen": p["chosen"],
                                        "rejected": p["rejected"], "gold": p.get("answer"),
                                        "rejected cut off": p.get("rejected_truncated", False)}),
}


def check(names: list) -> None:
    """DataError, before any work, for a tracker that is not installed."""
    for name in names:
        if name != "none" and importlib.util.find_spec(PACKAGE[name]) is None:
            raise DataError(f"--report-to {name} needs its package: pip install {PACKAGE[name]}")


def scalars(record: dict) -> dict:
    """The numbers of a metrics.jsonl record, under its names; a stage's figures under `stage/` (eval/accuracy) and,
    for the sampling stage, TRL's GRPO names too."""
    numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
               and k not in ("iteration", "step")}
    if "selected_step" in record:  # the checkpoint kept: beside, not over, the held-out check of the same step
        return {"heldout/selected_step": record["selected_step"],
                "heldout/selected_accuracy": record["heldout/accuracy"]}
    if "stage" not in record:
        return numbers
    named = {f"{record['stage']}/{k}": v for k, v in numbers.items()}
    if record["stage"] == "stats" and record.get("samples"):  # the sampling stage, as TRL's GRPO names it
        named["reward"] = record["train_accuracy"]
        named["completions/clipped_ratio"] = record["truncated"] / record["samples"]
        if "mean_length" in record:
            named["completions/mean_length"] = record["mean_length"]
        if "questions_with_right_and_wrong" in record:
            named["frac_reward_zero_std"] = 1 - record["questions_with_right_and_wrong"] / max(1, record["questions"])
    return named


def global_steps(records: list) -> list:
    """The step each record is logged at: a training step's optimizer step counted over all iterations (steps);
    any other record at the last optimizer step before it."""
    steps, offset, last, where = [], 0, None, 0
    for r in records:
        if "step" in r and "iteration" in r and "stage" not in r:
            if r["iteration"] != last:
                offset, last = where, r["iteration"]
            where = max(where, offset + r["step"])
            steps.append(offset + r["step"])
        else:
            steps.append(where)
    return steps


def read_state(path: str) -> dict | None:
    """trackers.json as a run wrote it, or None (said in one line) where it is damaged or of another shape: the
    trackers then log the run anew from its first record. wandb's run id names a folder: letters and digits only."""
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except (ValueError, UnicodeDecodeError):
        state = None
    if (isinstance(state, dict) and isinstance(state.get("logged"), int) and isinstance(state.get("tables"), list)
            and str(state.get("wandb_id", "id")).isalnum()):
        return state
    print(f"{path}: damaged; the trackers log the run anew from its first record", file=sys.stderr)
    return None


class Trackers:
    def __init__(self, names: list, out: str, config: dict):
        self.names = [n for n in names if n != "none"] if dist.is_main() else []
        self.path = os.path.join(out, "trackers.json")
        self.state = {"logged": 0, "tables": []}
        if os.path.exists(self.path):
            self.state = read_state(self.path) or self.state
        self.run_name, self.out, self.config, self.writers = os.path.basename(os.path.normpath(out)), out, config, {}
        self.step = 0

    def open(self):
        """Each tracker, the first time something is logged (a run that fails on its input opens none)."""
        if self.writers or not self.names:
            return self.writers
        for name in self.names:
            if name == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter

                self.writers[name] = SummaryWriter(os.path.join(self.out, "tensorboard"))
            elif name == "trackio":
                import trackio

                self.writers[name] = trackio.init(project=self.config["script"].removesuffix(".py"),
                                                  name=self.run_name, config=self.config, resume="allow",
                                                  embed=False, auto_log_gpu=False, auto_log_cpu=False)
            else:
                import wandb

                self.state.setdefault("wandb_id", uuid.uuid4().hex[:8])  # kept: a resumed run continues this one
                self.writers[name] = wandb.init(project=self.config["script"].removesuffix(".py"),
                                                name=self.run_name, id=self.state["wandb_id"], resume="allow",
                                                dir=self.out, config=self.config)
        return self.writers

    def sync(self, records: list) -> None:
        """Log the records after the ones already logged (metrics.jsonl's order is a resumed run's order too)."""
        if not self.names or len(records) <= self.state["logged"]:
            return
        steps = global_steps(records)
        self.step = steps[-1]  # where a table goes (wandb takes no step behind its last)
        for record, step in list(zip(records, steps))[self.state["logged"]:]:
            numbers = scalars(record)
            for name, writer in self.open().items():
                if name == "tensorboard":
                    for key, value in numbers.items():
                        writer.add_scalar(key, value, step)
                    writer.flush()
                else:
                    writer.log(numbers, step=step)
        self.state["logged"] = len(records)
        self.save()

    def table(self, key: str, name: str, rows: list) -> None:
        """A table of rows (dicts of one layout) in each tracker, once for `key` (an iteration's completions)."""
        if not self.names or key in self.state["tables"] or not rows:
            return
        columns = list(rows[0])
        for tracker, writer in self.open().items():
            if tracker == "tensorboard":  # a markdown table, TensorBoard's text tab
                cells = [["" if v is None else str(v).replace("|", "\\|").replace("\n", "<br>") for v in r.values()]
                         for r in rows]
                writer.add_text(name, "\n".join(["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)] +
                                                ["| " + " | ".join(c) + " |" for c in cells]), self.step)
                writer.flush()
            else:
                module = __import__(tracker)
                writer.log({name: module.Table(columns=columns, data=[list(r.values()) for r in rows])},
                           step=self.step)
        self.state["tables"].append(key)
        self.save()

    def stage_table(self, folder: str, name: str, value, seed: int, rows: int = 16) -> None:
        """A seeded sample of a finished stage's records as a table, when the stage is one of `TABLES`."""
        if not self.names or name not in TABLES or not isinstance(value, list):
            return
        kind, row = TABLES[name]
        pick = random.Random(f"{seed}-show-{folder}-{kind}")
        self.table(f"{folder}/{kind}", f"{kind}/{folder}", [row(r) for r in pick.sample(value, min(rows, len(value)))])

    def save(self) -> None:
        write_atomic(self.path, json.dumps(self.state, indent=1) + "\n")

    def close(self) -> None:
        for name, writer in self.writers.items():
            writer.close() if name == "tensorboard" else writer.finish()
        self.writers = {}
