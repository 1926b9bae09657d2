"""A run of rpo.py or sdpo.py: its command line and config, and its directory.

    parse_config   flags → the script's config dataclass: defaults < --preset < --config JSON file < flags
    RunDir         the run directory: config.json (a resumed run must have the same), `stage` (a finished stage's
                   output is read back, a missing one computed, seeded and written atomically), metrics.jsonl
    markdown_table the tables the scripts print

Imports only the standard library and data.py (torch where a seed is set), so plot.py can use it too.
"""
import argparse
import contextlib
import dataclasses
import glob
import hashlib
import json
import os
import random
import shutil
import sys
from collections.abc import Callable

import data


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


def config_diff(have: dict, want: dict, ignore=()) -> list:
    """'key (value there, value here)' for every key on which two configs differ."""
    return [f"{k} ({have.get(k)!r} there, {want.get(k)!r} here)" for k in sorted(set(have) | set(want))
            if k not in ignore and have.get(k) != want.get(k)]


class RunDir:
    """The run directory `cfg.out`: config.json, metrics.jsonl, and one folder per iteration or step, `{prefix}_t`."""

    def __init__(self, cfg, script: str, prefix: str):
        self.out, self.seed, self.prefix = cfg.out, cfg.seed, prefix
        # The directory's own path is not part of its config: a moved run directory still resumes.
        self.config = {"script": script, **{k: v for k, v in dataclasses.asdict(cfg).items() if k != "out"}}
        path = os.path.join(self.out, "config.json")
        if os.path.exists(path):
            have = read(path)
            if have != self.config:
                sys.exit(f"{path}: this run directory holds a run with another config "
                         f"({', '.join(config_diff(have, self.config))}); use another --out, or delete the directory "
                         "to start over")
        elif os.path.isdir(self.out) and os.listdir(self.out):
            sys.exit(f"{self.out}: the directory is not empty and holds no config.json; use another --out")
        write_atomic(path, json.dumps(self.config, indent=2) + "\n")
        self.rebuild_metrics()

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
        if os.path.exists(paths[-1]):
            values = [read(p) for p in paths]
        else:
            if seed is not None:
                seed_everything(self.seed, t, seed)
            values = compute() if isinstance(name, tuple) else [compute()]
            for p, v in zip(paths, values):
                write(p, v)
            self.rebuild_metrics()
        return values if isinstance(name, tuple) else values[0]

    def copy_from(self, source: str, names: list, ignore: set) -> None:
        """Copy the files `names` (relative paths) from another run directory whose config agrees with this one on
        every field but those in `ignore`; files this run already has are kept."""
        path = os.path.join(source, "config.json")
        if not os.path.exists(path):
            sys.exit(f"{path}: no such file; give a run directory")
        diff = config_diff(read(path), self.config, ignore)
        if diff:
            sys.exit(f"{path}: its files do not fit this run; it differs in " + ", ".join(diff))
        for name in names:
            if not os.path.exists(os.path.join(self.out, name)):
                if not os.path.exists(os.path.join(source, name)):
                    sys.exit(f"{os.path.join(source, name)}: no such file; that run has not got that far")
                with open(os.path.join(source, name), encoding="utf-8") as f:
                    write_atomic(os.path.join(self.out, name), f.read())

    def log(self, record: dict) -> None:
        """Append a record (a training step) to metrics.jsonl as it comes; `rebuild_metrics` tidies up after."""
        with open(os.path.join(self.out, "metrics.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

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
        return action.help if action.default in ("", None, argparse.SUPPRESS) else super()._get_help_string(action)


def parse_config(config_class, argv=None, presets: dict | None = None, description: str = ""):
    """Flags → config_class. Precedence: field defaults < --preset < --config JSON file < flags given."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(config_class, description=description, formatter_class=HelpFormatter,
                              usage="%(prog)s [options]   (every option below; --help for this list)")
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
    return config_class(**{name: getattr(args, name) for name in fields})


def read_config_file(path: str, fields: dict) -> dict:
    """The fields of a JSON config file (a run's config.json too); a field's old name (a flag alias) maps to it."""
    try:
        with open(path, encoding="utf-8") as f:
            loaded = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        sys.exit(f"{path}: cannot read the config ({e})")
    renamed = {alias.lstrip("-").replace("-", "_"): name for name, f in fields.items()
               for alias in f.metadata.get("aliases", [])}
    loaded = {renamed.get(k, k): v for k, v in loaded.items() if k != "script"}
    unknown = sorted(set(loaded) - set(fields))
    if unknown:
        sys.exit(f"{path}: unknown field(s) {', '.join(unknown)}")
    return loaded


def main(run: Callable, config_class, argv=None, presets: dict | None = None, description: str = "") -> None:
    """Parse the flags, run, and turn bad input into one line and a non-zero exit."""
    cfg = parse_config(config_class, argv, presets, description)
    try:
        run(cfg)
    except data.DataError as e:
        sys.exit(f"error: {e}")
