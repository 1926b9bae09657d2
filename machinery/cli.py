"""The command line of rpo.py and sdpo.py: every config field is a flag (`transformers.HfArgumentParser`, as TRL's
scripts use); --config reads a JSON file of the same fields, --preset the paper's settings; every value is checked
against its field's range; bad input ends the run with one line and a non-zero exit, before any work.

    parse_config   flags → the script's config dataclass: defaults < --preset < --config JSON file < flags
    main           parse, run, and turn bad input (`DataError`) into one line
"""
import argparse
import copy
import dataclasses
import difflib
import errno
import json
import math
import os
import re
import shutil
import signal
import sys
import types
import typing
from collections.abc import Callable

from machinery import dist

RANGE = ("min", "above", "max", "below", "min_items")  # a field's valid range, in its metadata (`config.arg`)
# Fields a run directory written by an earlier version may hold, no longer flags: accepted, and ignored.
RETIRED = {"sampler"}


class DataError(ValueError):
    """Bad input: the message is one line naming the file, the line and the problem."""



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

    def _split_lines(self, text, width):  # a flag is never cut at its hyphens (--max-new-\ntokens)
        import textwrap

        return textwrap.wrap(self._whitespace_matcher.sub(" ", text).strip(), width, break_on_hyphens=False)

    def _get_help_string(self, action):
        empty = action.default in ("", None, argparse.SUPPRESS) or action.default == []
        return action.help if empty else super()._get_help_string(action)


def config_parser(config_class, description: str, paper: dict | None = None):
    """`transformers.HfArgumentParser` over the config dataclass, which passes a field's metadata to argparse:
    the range keys are ours, checked by `problem`, and are kept from it. `paper`: the paper's value of a shared
    field, shown in brackets after its help (each script's own fields carry theirs in their help)."""
    from transformers import HfArgumentParser

    class Parser(HfArgumentParser):
        @staticmethod
        def _parse_dataclass_field(parser, f):
            f = copy.copy(f)
            metadata = {k: v for k, v in f.metadata.items() if k not in RANGE}
            if f.name in (paper or {}):
                metadata["help"] += f" [{paper[f.name]}]"
            f.metadata = types.MappingProxyType(metadata)
            HfArgumentParser._parse_dataclass_field(parser, f)

    parser = Parser(config_class, description=f"{description}\n\n{config_class.__doc__ or ''}",
                    formatter_class=HelpFormatter, allow_abbrev=False,  # a typo is an error, never another flag
                    usage="%(prog)s [options]   (every option below)")
    own = set(vars(config_class).get("__annotations__", {}))  # the script's own fields first in --help
    parser._optionals._group_actions.sort(key=lambda action: (action.dest != "help", action.dest not in own))
    return parser


def valid_values(f: dataclasses.Field) -> str:
    """What a config field takes, in words: its type, its range (metadata min, above, max, below), its choices."""
    kind, each = f.type, ""
    if typing.get_origin(kind) is list:
        kind, each = typing.get_args(kind)[0], "a list, each "
    if f.metadata.get("choices"):
        return each + "one of " + ", ".join(map(str, f.metadata["choices"]))
    words = {int: "an integer", float: "a finite number", str: "a string", bool: "true or false",
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


def parse_config(config_class, argv=None, presets: dict | None = None, description: str = "",
                 paper: dict | None = None):
    """Flags → config_class. Precedence: field defaults < --preset < --config JSON file < flags given. Every value
    is checked against its field (`problem`); a bad one ends the run with one line naming it and what is valid."""
    parser = config_parser(config_class, description, paper)
    parser.error = lambda message: parser.exit(2, f"{parser.prog}: error: {message}\n")  # one line, no usage
    parser.add_argument("--config", metavar="FILE", help="JSON file of config fields (flags given here win)")
    if presets:
        parser.add_argument("--preset", choices=sorted(presets),
                            help="a reproduction's settings (flags given here win): *-7b the paper's on a 7B model "
                            "(QLoRA, one GPU); gsm8k-cpu the built-in Qwen2.5-Coder-0.5B on GSM8K, sized for 2 CPU "
                            "cores. Each sets: " + "; ".join(f"{name}: " + ", ".join(
                                f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                                for k, v in values.items()) for name, values in sorted(presets.items())))
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
        with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark is read, not refused
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
        if key == "script" or key in RETIRED:
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


def main(run: Callable, config_class, argv=None, presets: dict | None = None, description: str = "",
         paper: dict | None = None) -> None:
    """Parse the flags, run, and turn bad input into one line and a non-zero exit."""
    dist.state()  # under `accelerate launch`: join the process group; the main process alone prints
    cfg = parse_config(config_class, argv, presets, description, paper)

    script = os.path.basename(run.__code__.co_filename)
    from machinery import engine  # it raises this module's DataError

    def checked():
        try:
            engine.check(cfg)  # --engine vllm can run: before any work
            run(cfg)
        except DataError as e:
            sys.exit(f"{script}: error: {e}")
        except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (`Terminated`): what was finished is on disk
            print(f"\n{script}: stopped; the same command resumes the run", file=sys.stderr)
            sys.exit(143 if isinstance(e, Terminated) else 130)
        except Exception as e:
            path = disk_full(e, cfg.out if os.path.isdir(cfg.out) else ".")
            if path is None:
                raise
            free = shutil.disk_usage(path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))).free
            sys.exit(f"{script}: {path}: no space left on the device ({free / 2**20:.1f} MiB free); free some space "
                     "and the same command resumes the run")

    signal.signal(signal.SIGTERM, stopped)  # a scheduler's or a container's stop: as Ctrl-C
    dist.run(checked)


def disk_full(error: BaseException, out: str = ".") -> str | None:
    """The path a full disk stopped a write to, or None if `error` is something else: an OSError(ENOSPC) anywhere
    in its chain, or what safetensors' writer makes of one ("os error 28"), or torch's writer failing ("iostream
    error", "unexpected pos": no errno) with under 1 GiB free where the run writes."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return seen.filename or out
        text = str(seen)
        if "No space left on device" in text or "os error 28" in text or "code: 28" in text:
            return out
        torch_writer = ("file write failed", "iostream error", "unexpected pos")  # torch.save's zip writer
        if any(s in text for s in torch_writer) and shutil.disk_usage(out).free < 2**30:  # says no errno
            return out
        seen = seen.__cause__ or seen.__context__
    return None


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C raises KeyboardInterrupt: the run ends the same way, with exit code 143."""


def stopped(signum, frame) -> None:
    raise Terminated
