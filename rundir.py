"""A run of rpo.py or sdpo.py: its command line and config, and its directory.

    parse_config   flags → the script's config dataclass: defaults < --preset < --config JSON file < flags
    RunDir         the run directory: config.json (a resumed run must have the same), `stage` (a finished stage's
                   output is read back, a missing one computed, seeded and written atomically), metrics.jsonl
    markdown_table the tables the scripts print

Imports only the standard library and data.py (torch where a seed is set), so plot.py can use it too.
"""
import argparse
import contextlib
import copy
import dataclasses
import difflib
import glob
import hashlib
import json
import math
import os
import random
import re
import shutil
import sys
import time
import types
import typing
from collections.abc import Callable

import data
import dist
import trackers


@contextlib.contextmanager
def atomic(path: str):
    """A temporary path beside `path` to write a file or a folder to, renamed to `path` once written: a stopped run
    never leaves half of it behind. A folder already at `path` is replaced."""
    tmp = path + ".tmp"
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    yield tmp
    if os.path.isdir(path):
        shutil.rmtree(path)
    os.replace(tmp, path)


def write_atomic(path: str, text: str) -> None:
    with atomic(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def write(path, value) -> None:
    """JSON Lines for a .jsonl path (one record a line), else indented JSON; atomically."""
    path = os.fspath(path)
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in value) if path.endswith(".jsonl")
                 else json.dumps(value, indent=1) + "\n")


def read(path):
    """What `write` wrote: a list of records from a .jsonl file, else the JSON value."""
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()] if path.endswith(".jsonl") else json.load(f)


def seed_everything(*keys) -> None:
    """Seed Python's and torch's generators from a key such as (config seed, iteration, stage name)."""
    import torch

    seed = int(hashlib.sha256(json.dumps(keys).encode()).hexdigest()[:8], 16)
    random.seed(seed)
    torch.manual_seed(seed)


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


def config_diff(have: dict, want: dict, ignore=()) -> list:
    """'key (value there, value here)' for every key on which two configs differ."""
    return [f"{k} ({have.get(k)!r} there, {want.get(k)!r} here)" for k in sorted(set(have) | set(want))
            if k not in ignore and have.get(k) != want.get(k)]


def duration(seconds: float) -> str:
    seconds = round(seconds)  # before splitting, so that 119.6 s is "2 min 00 s", not "1 min 60 s"
    return f"{seconds} s" if seconds < 60 else f"{seconds // 60} min {seconds % 60:02d} s"


class Clock:
    """The whole-run estimate of the time left. Each planned stage has a rough amount of work: tokens generated
    (sampling, evaluation) and tokens scored (reference pass, training). A stage not yet run is expected to take as
    long as the same stage of the iteration before, or, for the first of its kind, its work at the seconds per
    token measured so far (scoring taken as a quarter of a generated token's cost until a scoring stage ran)."""

    def __init__(self, plan: dict, prefix: str):
        self.plan, self.prefix, self.start = dict(plan), prefix, time.time()
        self.seconds, self.left = {}, list(plan)

    def skip(self, key) -> None:
        if key in self.left:
            self.left.remove(key)

    def finished(self, key, seconds: float) -> None:
        self.seconds[key] = seconds
        self.skip(key)
        if key not in self.plan:
            return
        estimate = self.estimate()
        print(f"{self.prefix}{key[0]}: {key[1]} took {duration(seconds)}; {duration(time.time() - self.start)} so "
              f"far" + (f", about {duration(estimate)} left" if self.left else ""), file=sys.stderr)

    def estimate(self) -> float:
        done = [(self.plan[k], s) for k, s in self.seconds.items() if k in self.plan]
        generated = [(g, s) for (g, scored), s in done if g and not scored]
        scored = [(c, s) for (g, c), s in done if c and not g]
        per_generated = sum(s for _, s in generated) / max(1, sum(g for g, _ in generated))
        per_scored = sum(s for _, s in scored) / sum(c for c, _ in scored) if scored else per_generated / 4
        total = 0.0
        for t, name in self.left:
            before = [s for (u, n), s in self.seconds.items() if n == name and u < t]
            generated, scored = self.plan[(t, name)]
            total += before[-1] if before else generated * per_generated + scored * per_scored
        return total


PARTS = ".parts"
# Settings of speed (and of where metrics also go) alone: no sample, score or step depends on them, so a run may
# resume with other values.
SPEED = {"sample_batch_size", "memory_budget", "save_minutes", "sampler", "report_to"}


class Parts:
    """The finished parts of a stage that is still running: a folder of JSON Lines files, each written atomically
    by one process (its rank in the name) as a unit of work ends, each record a key (a row, a pair) and its value.
    Nothing in it is a stage's output: the stage's own file exists only once every part is done, and a restarted
    stage reads the parts back (`read`) and computes only what is missing. `sub(name)`: a folder of its own inside,
    for a part of the stage that has parts of its own (a held-out check inside training)."""

    def __init__(self, folder: str):
        self.folder, self.count = folder, 0

    def sub(self, name: str) -> "Parts":
        return Parts(os.path.join(self.folder, name))

    def read(self) -> dict:
        """{key: value} of every part file (a key that was a list comes back a tuple)."""
        found = {}
        for path in sorted(glob.glob(os.path.join(self.folder, "part-*.jsonl"))):
            for record in read(path):
                key = record["key"]
                found[tuple(key) if isinstance(key, list) else key] = record["value"]
        return found

    def save(self, values: dict) -> None:
        """One more part file of {key: value}, atomically."""
        if not values:
            return
        os.makedirs(self.folder, exist_ok=True)
        while True:  # a name no earlier run of this process's rank has taken
            self.count += 1
            path = os.path.join(self.folder, f"part-{dist.rank():03d}-{self.count:06d}.jsonl")
            if not os.path.exists(path):
                break
        write(path, [{"key": list(k) if isinstance(k, tuple) else k, "value": v} for k, v in values.items()])


class RunDir:
    """The run directory `cfg.out`: config.json, metrics.jsonl, and one folder per iteration or step, `{prefix}_t`."""

    def __init__(self, cfg, script: str, prefix: str, grows: tuple = ()):
        """Checks the directory; writes nothing until the first stage starts its work (`claim`), so that a run that
        fails on its input leaves nothing behind. A directory whose config.json is from a start that failed before
        any stage began holds nothing to protect: the new config replaces it. The fields in `grows` (the number of
        iterations) and the speed settings (`SPEED`) may differ from the run's: it continues with them, and its
        config.json is written anew."""
        self.out, self.seed, self.prefix, self.claimed = cfg.out, cfg.seed, prefix, False
        self.clock, self.records = Clock({}, f"{prefix} "), []
        # The directory's own path is not part of its config: a moved run directory still resumes.
        self.config = {"script": script, **{k: v for k, v in dataclasses.asdict(cfg).items() if k != "out"}}
        path = os.path.join(self.out, "config.json")
        if os.path.exists(path):
            have = read(path)
            finished = set(os.listdir(self.out)) - {"config.json", "metrics.jsonl"}  # finished parts count
            if have.get("script") != script and finished:
                sys.exit(f"{self.out}: holds a run of {have.get('script')}, not of {script}; give {script} its own "
                         "--out")
            differs = config_diff(have, self.config, set(grows) | SPEED)
            if differs and finished:
                sys.exit(f"{path}: this run directory holds a run with another config ({', '.join(differs)}); use "
                         "another --out, or delete the directory to start over")
            self.claimed = have == self.config
        elif os.path.isdir(self.out) and os.listdir(self.out):
            sys.exit(f"{self.out}: the directory is not empty and holds no config.json; use another --out")
        self.trackers = trackers.Trackers(getattr(cfg, "report_to", []), self.out, self.config)
        if os.path.exists(path) and finished and dist.is_main():
            self.rebuild_metrics()

    def expect(self, plan: dict) -> None:
        """The run's stages, {(t, last file name): (generated tokens, scored tokens)} roughly, in order: after each
        stage, a line with the time so far and an estimate of the time left (`Clock`)."""
        self.clock = Clock(plan, f"{self.prefix} ")

    def claim(self) -> None:
        """Write config.json: from now on the directory holds this run."""
        if not self.claimed and dist.is_main():
            write_atomic(os.path.join(self.out, "config.json"), json.dumps(self.config, indent=2) + "\n")
        self.claimed = True

    def path(self, t: int | None, name: str = "") -> str:
        """The file `name` of iteration (step) t; of the run directory itself when t is None."""
        return os.path.join(self.out, name) if t is None else os.path.join(self.out, f"{self.prefix}_{t}", name)

    def stage(self, t: int | None, name: str | tuple, compute: Callable, seed: str | None = None):
        """The output of a stage of iteration (step) t: read back if a finished run wrote it (resume), else computed
        and written atomically. With `seed`, the random generators are first seeded from (config seed, t, seed),
        so a resumed run draws what an unbroken one drew. A tuple of names: `compute` returns one value per name,
        written in order, and the last file marks the stage as finished."""
        names = name if isinstance(name, tuple) else (name,)
        paths = [self.path(t, n) for n in names]
        # Under a launcher the main process decides for all: the others must not see the file it is about to write.
        if dist.broadcast(os.path.exists(paths[-1])):
            values = [read(p) for p in paths]
            self.clock.skip((t, names[-1]))  # read back: no time left to spend on it
        else:
            if seed is not None:
                seed_everything(self.seed, t, seed)
            start = time.time()
            self.claim()  # from here on the directory holds this run: a stage's finished parts may be kept
            values = compute() if isinstance(name, tuple) else [compute()]
            if dist.is_main():  # under a launcher every process computed the same values: one writes
                for p, v in zip(paths, values):
                    write(p, v)
                self.rebuild_metrics()
                shutil.rmtree(paths[-1] + PARTS, ignore_errors=True)  # the stage is finished: its parts are spent
            dist.barrier()
            self.clock.finished((t, names[-1]), time.time() - start)
        return values if isinstance(name, tuple) else values[0]

    def parts(self, t: int | None, name: str) -> "Parts":
        """Where the stage that writes `name` of iteration (step) t keeps its finished parts while it runs
        (`{name}.parts/`), so that a restarted run computes only the rest; removed once the stage's file is written."""
        return Parts(self.path(t, name) + PARTS)

    def copy_from(self, source: str, names: list, ignore: set) -> None:
        """Copy the files `names` (relative paths) from another run directory whose config agrees with this one on
        every field but those in `ignore`; files this run already has are kept."""
        path = os.path.join(source, "config.json")
        if not os.path.exists(path):
            sys.exit(f"{path}: no such file; give a run directory")
        diff = config_diff(read(path), self.config, set(ignore) | SPEED)
        if diff:
            sys.exit(f"{path}: its files do not fit this run; it differs in " + ", ".join(diff))
        missing = [os.path.join(source, n) for n in names if not os.path.exists(os.path.join(self.out, n))
                   and not os.path.exists(os.path.join(source, n))]
        if missing:
            sys.exit(f"{missing[0]}: no such file; that run has not got that far")
        self.claim()
        for name in names if dist.is_main() else ():
            if not os.path.exists(os.path.join(self.out, name)):
                with open(os.path.join(source, name), encoding="utf-8") as f:
                    write_atomic(os.path.join(self.out, name), f.read())
        dist.barrier()

    def log(self, record: dict) -> None:
        """Append a record (a training step) to metrics.jsonl as it comes; `rebuild_metrics` tidies up after."""
        self.claim()
        if dist.is_main():
            with open(os.path.join(self.out, "metrics.jsonl"), "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            self.records.append(record)
            self.trackers.sync(self.records)

    def table(self, t: int, name: str, rows: list) -> None:
        """A table (a sample of iteration t's completions, or its pairs) in the trackers of --report-to, once."""
        if dist.is_main():
            self.trackers.table(f"{self.prefix}_{t}/{name}", f"{name}/{self.prefix}_{t}", rows)

    def close(self) -> None:
        if dist.is_main():
            self.trackers.close()

    def rebuild_metrics(self) -> None:
        """metrics.jsonl from the finished stages only: what a stopped stage logged is dropped, never duplicated.
        Per folder in order: its stats.json and eval.json as one record each, its training log's records."""
        records = []
        folders = glob.glob(os.path.join(self.out, f"{self.prefix}_[0-9]*"))
        for folder in sorted(folders, key=lambda f: int(f.rsplit("_", 1)[1])):
            for stage in ("stats.json", "train_log.jsonl", "eval.json"):
                path = os.path.join(folder, stage)
                if os.path.exists(path):
                    records += read(path) if stage.endswith(".jsonl") else [
                        {"folder": os.path.basename(folder), "stage": stage[:-5],
                         **{k: v for k, v in read(path).items() if k != "results"}}]
        write(os.path.join(self.out, "metrics.jsonl"), records)
        self.records = records
        self.trackers.sync(records)  # a resumed run's trackers go on after what they logged


# =================================================================================================================
# Command line: every config field is a flag (transformers.HfArgumentParser, as TRL's scripts use);
# --config reads a JSON file of the same fields; --preset the paper's settings

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """One spelling per flag in --help (--max-new-tokens; --max_new_tokens is accepted too), no empty defaults."""

    def __init__(self, prog):
        super().__init__(prog, width=110, max_help_position=30)

    def _format_action_invocation(self, action):
        spellings = action.option_strings
        action.option_strings = [s for s in spellings if "_" not in s] or spellings
        try:
            return super()._format_action_invocation(action)
        finally:
            action.option_strings = spellings

    def _get_help_string(self, action):
        empty = action.default in ("", None, argparse.SUPPRESS) or action.default == []
        return action.help if empty else super()._get_help_string(action)


RANGE = ("min", "above", "max", "below", "min_items")  # a field's valid range, in its metadata (see `lm.arg`)


def config_parser(config_class, description: str):
    """`transformers.HfArgumentParser` over the config dataclass, which passes a field's metadata to argparse:
    the range keys are ours, checked by `problem`, and are kept from it."""
    from transformers import HfArgumentParser

    class Parser(HfArgumentParser):
        @staticmethod
        def _parse_dataclass_field(parser, f):
            f = copy.copy(f)
            f.metadata = types.MappingProxyType({k: v for k, v in f.metadata.items() if k not in RANGE})
            HfArgumentParser._parse_dataclass_field(parser, f)

    return Parser(config_class, description=description, formatter_class=HelpFormatter,
                  usage="%(prog)s [options]   (every option below; --help for this list)")


def valid_values(f: dataclasses.Field) -> str:
    """What a config field takes, in words: its type, its range (metadata min, above, max, below), its choices."""
    kind, each = f.type, ""
    if typing.get_origin(kind) is list:
        kind, each = typing.get_args(kind)[0], "a list, each "
    if f.metadata.get("choices"):
        return each + "one of " + ", ".join(map(str, f.metadata["choices"]))
    words = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
             bool | None: "true, false or null (the default)"}[kind]
    bounds = [f"{sign} {f.metadata[key]}" for key, sign in (("min", "≥"), ("above", ">"), ("max", "≤"),
                                                             ("below", "<")) if key in f.metadata]
    return (f"a list of at least {f.metadata['min_items']}, each " if f.metadata.get("min_items") else each) + \
        words + (" " + " and ".join(bounds) if bounds else "")


def problem(f: dataclasses.Field, value) -> str | None:
    """None when `value` is valid for the config field `f`, else what the field takes (`valid_values`)."""
    kind, items = f.type, [value]
    if typing.get_origin(kind) is list:
        if not isinstance(value, list):
            return valid_values(f)
        kind, items = typing.get_args(kind)[0], value
        if len(value) < f.metadata.get("min_items", 0):
            return valid_values(f)
    for v in items:
        if kind in (bool, bool | None):
            ok = isinstance(v, bool) or (v is None and kind != bool)
        elif kind is int:
            ok = isinstance(v, int) and not isinstance(v, bool)
        elif kind is float:
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        else:
            ok = isinstance(v, kind)
        m = f.metadata
        ok = ok and (v in m["choices"] if m.get("choices") else True) and not (
            ("min" in m and v < m["min"]) or ("above" in m and v <= m["above"]) or
            ("max" in m and v > m["max"]) or ("below" in m and v >= m["below"]))
        if not ok:
            return valid_values(f)
    return None


def parse_config(config_class, argv=None, presets: dict | None = None, description: str = ""):
    """Flags → config_class. Precedence: field defaults < --preset < --config JSON file < flags given. Every value
    is checked against its field (`problem`); a bad one ends the run with one line naming it and what is valid."""
    parser = config_parser(config_class, description)
    parser.error = lambda message: parser.exit(2, f"{parser.prog}: error: {message}\n")  # one line, no usage
    parser.add_argument("--config", metavar="FILE", help="JSON file of config fields (flags given here win)")
    if presets:
        parser.add_argument("--preset", choices=sorted(presets), help="the paper's settings for a task on a 7B model")
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    for action in list(parser._actions):
        if action.dest in fields and fields[action.dest].type in (bool, bool | None):
            action.nargs, action.const = "?", True  # --flag alone means true, as --load-in-4bit always did
            action.metavar = "true|false"
            parser.add_argument(f"--no-{action.dest.replace('_', '-')}", dest=action.dest, action="store_false",
                                default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    given = vars(parser.parse_known_args(argv)[0])
    defaults = dict(presets[given["preset"]]) if given.get("preset") else {}
    if given.get("config"):
        defaults.update(read_config_file(given["config"], fields))
    parser.set_defaults(**defaults)
    args = parser.parse_args(argv)  # argparse's own one-line error and exit 2 for an unknown or malformed flag
    for name, f in fields.items():  # the config file's values were checked where they were read
        wrong = problem(f, getattr(args, name))
        if wrong:
            value = getattr(args, name)
            shown = " ".join(map(str, value)) if isinstance(value, list) else value
            parser.error(f"--{name.replace('_', '-')} {shown}: takes {wrong}")
    return config_class(**{name: getattr(args, name) for name in fields})


def read_config_file(path: str, fields: dict) -> dict:
    """The fields of a JSON config file (a run's config.json too); a field's old name (a flag alias) maps to it.
    A bad field or value ends the run with one line naming the file, the line and what is valid."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        loaded = json.loads(text)
    except (OSError, UnicodeDecodeError) as e:
        sys.exit(f"{path}: cannot read the config ({e})")
    except json.JSONDecodeError as e:
        sys.exit(f"{path}:{e.lineno}: not valid JSON ({e.msg})")
    if not isinstance(loaded, dict):
        sys.exit(f"{path}: a config file holds one JSON object of fields, not a {type(loaded).__name__}")

    def line(key):
        found = re.search(r'"%s"\s*:' % re.escape(key), text)
        return text.count("\n", 0, found.start()) + 1 if found else 1

    renamed = {alias.lstrip("-").replace("-", "_"): name for name, f in fields.items()
               for alias in f.metadata.get("aliases", [])}
    out = {}
    for key, value in loaded.items():
        name = renamed.get(key, key)
        if key == "script":
            continue
        if name not in fields:
            close = difflib.get_close_matches(key, list(fields) + list(renamed), 1)
            sys.exit(f"{path}:{line(key)}: unknown field {key!r}" + (f"; did you mean {close[0]!r}?" if close else
                     "; the fields are the flags of --help, with '_' for '-'"))
        wrong = problem(fields[name], value)
        if wrong:
            sys.exit(f"{path}:{line(key)}: \"{key}\": {json.dumps(value)} — {name} takes {wrong}")
        out[name] = value
    return out


def main(run: Callable, config_class, argv=None, presets: dict | None = None, description: str = "") -> None:
    """Parse the flags, run, and turn bad input into one line and a non-zero exit."""
    dist.state()  # under `accelerate launch`: join the process group; the main process alone prints
    cfg = parse_config(config_class, argv, presets, description)

    def checked():
        try:
            run(cfg)
        except data.DataError as e:
            sys.exit(f"{os.path.basename(run.__code__.co_filename)}: error: {e}")
    dist.run(checked)
