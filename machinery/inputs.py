"""What sdpo.py reads besides its flags, checked before any work: its preference files against --split and --steps,
and the config.json of the rpo.py run its pairs came from (whose test split then measures task accuracy).

    check_files(files, split, steps)   the flags' combination: one line (exit 2) if it cannot work
    check_steps(cfg, files, keep, held, pool)   every step keeps pairs to train on, else one line naming the file
    rpo_config(task_config, files)     (config, its path) of the rpo.py run, or (None, "")
"""
import os
import sys

from machinery.cli import DataError
from machinery.files import read


def check_files(files: list, split: str, steps: int) -> None:
    """Preference files given, and with --split given one per step, each once."""
    if not files:
        sys.exit("sdpo.py: give the preference data with --data FILE [FILE ...]")
    if split == "given" and len(files) != steps:
        sys.exit(f"sdpo.py: --split given takes one file per step: {len(files)} files for --steps {steps}")
    if split == "given" and len(set(files)) < len(files):
        sys.exit(f"sdpo.py: --split given takes one file per step, each once: {' '.join(files)}")


def check_steps(cfg, files: list, keep: set, held: set, pool: list) -> None:
    """DataError unless every step gets pairs to train on: with --split given, a file whose pairs were all dropped
    (longer than --max-length) or drawn into --heldout is named. `files[i]`: the file of pair i; `keep`: the pairs
    left after the drops, `held` those drawn into --heldout, `pool` those left to train on."""
    if cfg.split != "given":
        if len(pool) < cfg.steps:
            raise DataError(f"--steps {cfg.steps}: only {len(pool)} pairs are left to train on after --heldout "
                            f"{cfg.heldout}; give more pairs, fewer steps or a smaller --heldout")
        return
    left = {files[i] for i in pool}
    for t, path in enumerate(cfg.data, start=1):
        if path not in left:
            mine = [i for i, f in enumerate(files) if f == path]
            raise DataError(
                f"{path}: none of its {len(mine)} pairs is left for step {t} ({sum(i not in keep for i in mine)} "
                f"longer than --max-length {cfg.max_length}, {sum(i in held for i in mine)} drawn into --heldout "
                f"{cfg.heldout}); give a larger --max-length, a smaller --heldout, or another --split")


def rpo_config(task_config: str, files: list) -> tuple:
    """(config, path) of the rpo.py run the pairs came from: the config.json given by --task-config, or one found
    beside the pairs (runs/x/iter_1/pairs.jsonl -> runs/x/config.json) whose task reads no file. A path is followed
    only from a file the user named: a found config that names data files is not used, and a line says how to use
    it. (None, "") when there is none."""
    def config_of(path: str) -> dict | None:  # the config.json of an rpo.py run, or None
        try:
            config = read(path) if os.path.isfile(path) else None
        except (ValueError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: not valid JSON ({str(e).splitlines()[0]}); the config.json of an rpo.py run "
                            "was expected") from None
        return config if isinstance(config, dict) and config.get("script") == "rpo.py" else None

    if task_config and config_of(task_config) is None:
        raise DataError(f"--task-config {task_config}: not the config.json of an rpo.py run")
    paths = [task_config] if task_config else [
        os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(p))), "config.json") for p in files]
    for path in paths:
        config = config_of(path)
        if config is None:
            continue
        named = [config.get(k) for k in ("train_file", "test_file") if config.get(k)]
        if named and not task_config:
            print(f"sdpo.py: {path}, found beside --data, names the files of its task ({', '.join(map(str, named))}); "
                  f"a path is followed only from a file you name: give --task-config {path} to measure task "
                  "accuracy on its test split. Going on without it", file=sys.stderr)
            return None, ""
        return config, path
    return None, ""
