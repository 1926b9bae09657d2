"""The run directory of rpo.py or sdpo.py: its config, its stages, its metrics.

    RunDir         the directory, locked for the run (one run at a time: `files.DirectoryLock`)
    RunDir.stage   a finished stage's output is read back once checked against what it was when written, a missing
                   or damaged one computed (given its `Stage`), seeded and written atomically: the same command
                   resumes a stopped run
    config.json    a resumed run must have the same config, but for the number of iterations and speed settings
    manifest.json  each finished stage's files, their sizes and SHA-256s, in the order the stages finished
    metrics.jsonl  rebuilt from the finished stages, so a stopped stage's records are never counted twice
"""
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable

from machinery import dist, trackers
from machinery.cli import RETIRED
from machinery.clock import Clock
from machinery.config import SPEED
from machinery.files import DirectoryLock, discard, fingerprint, read, seed_everything, write, write_atomic
from machinery.resume import Parts, Stage
from machinery.results import folders


def config_diff(have: dict, want: dict, ignore=()) -> list:
    """'key (value there, value here)' for every key on which two configs differ."""
    return [f"{k} ({have.get(k)!r} there, {want.get(k)!r} here)" for k in sorted(set(have) | set(want))
            if k not in ignore and have.get(k) != want.get(k)]


PARTS = ".parts"
MANIFEST = "manifest.json"
# What a stage writes beside its own file, by its file: training's adapter (M_t).
BESIDE = {"train_log.jsonl": ("adapter",)}
# What a stage's progress lines call it, by its file.
LABELS = {"samples.jsonl": "sample", "eval.json": "eval", "reference.jsonl": "reference", "train_log.jsonl": "train",
          "heldout_logps.jsonl": "held-out log-probs", "pool_logps.jsonl": "γ_ref of the pool"}


def check_out(out: str) -> None:
    """--out names a directory, or a path one can be made at: one line, before any work, otherwise."""
    if os.path.exists(out) and not os.path.isdir(out):
        sys.exit(f"--out {out}: a file, not a directory; give a run directory")
    parent = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        sys.exit(f"--out {out}: {parent} is a file, so no directory can be made there; give another --out")


def read_config(path: str) -> dict:
    """A run directory's config.json; a damaged one (a file cut short by a full disk or a copy) is one line."""
    try:
        have = read(path)
    except (ValueError, UnicodeDecodeError) as e:
        sys.exit(f"{path}: damaged ({e}); it is the run's config: restore it, or delete the directory to start over")
    if not isinstance(have, dict):
        sys.exit(f"{path}: damaged (not a JSON object); restore it, or delete the directory to start over")
    return have


class RunDir:
    """The run directory `cfg.out`: config.json, metrics.jsonl, and one folder per iteration or step, `{prefix}_t`."""

    def __init__(self, cfg, script: str, prefix: str, grows: tuple = ()):
        """Checks the directory; writes nothing until the first stage starts its work (`claim`), so that a run that
        fails on its input leaves nothing behind. A directory whose config.json is from a start that failed before
        any stage began holds nothing to protect: the new config replaces it. The fields in `grows` (the number of
        iterations) and the speed settings (`SPEED`) may differ from the run's: it continues with them, and its
        config.json is written anew."""
        trackers.check(cfg.report_to)  # a tracker that is not installed: one line, before any work
        self.out, self.seed, self.prefix, self.claimed, self.resumed = cfg.out, cfg.seed, prefix, False, False
        self.clock, self.records = Clock({}, f"{prefix} "), []
        # The directory's own path is not part of its config: a moved run directory still resumes.
        self.config = {"script": script, **{k: v for k, v in dataclasses.asdict(cfg).items() if k != "out"}}
        check_out(self.out)
        self.lock = DirectoryLock(self.out)
        if dist.is_main():
            self.lock.acquire()  # before the config is read: a second run into the directory is refused here
        try:
            self.check_config(script, grows)
        except BaseException:
            self.lock.release()
            raise
        self.trackers = trackers.Trackers(cfg.report_to, self.out, self.config)
        self.manifest = self.read_manifest()
        self.redo, self.read_back, self.computed = False, 0, 0
        if self.resumed and dist.is_main():
            self.rebuild_metrics()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def check_config(self, script: str, grows: tuple) -> None:
        """config.json against this run's: another script's run, or another config with finished stages, is one
        line; so is a damaged one. A run asked for fewer iterations than the directory holds says so."""
        path = os.path.join(self.out, "config.json")
        if os.path.exists(path):
            have = read_config(path)
            finished = set(os.listdir(self.out)) - {"config.json", "metrics.jsonl", DirectoryLock.NAME}
            if have.get("script") != script and finished:
                sys.exit(f"{self.out}: holds a run of {have.get('script')}, not of {script}; give {script} its own "
                         "--out")
            differs = config_diff(have, self.config, set(grows) | SPEED | RETIRED)
            if differs and finished:
                sys.exit(f"{path}: this run directory holds a run with another config ({', '.join(differs)}); use "
                         "another --out, or delete the directory to start over")
            for name in grows if finished else ():
                if isinstance(have.get(name), int) and have[name] > self.config[name]:
                    print(f"{self.out}: holds a run of --{name.replace('_', '-')} {have[name]}; this command asks "
                          f"for {self.config[name]} and ends there (give {have[name]} for the whole run)",
                          file=sys.stderr)
            self.claimed, self.resumed = have == self.config, bool(finished)
        elif os.path.isdir(self.out) and set(os.listdir(self.out)) - {DirectoryLock.NAME}:
            sys.exit(f"{self.out}: the directory is not empty and holds no config.json; use another --out")

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

    def stage(self, t: int | None, name: str | tuple, compute: Callable[[Stage], object], seed: str | None = None):
        """The output of a stage of iteration (step) t: read back if a finished run wrote it (resume), else
        `compute(stage)`, given the stage's `Stage` (its parts, its log), and written atomically. With `seed`, the
        random generators are first seeded from (config seed, t, seed), so a resumed run draws what an unbroken one
        drew. A tuple of names: `compute` returns one value per name, written in order, and the last file marks the
        stage as finished."""
        names = name if isinstance(name, tuple) else (name,)
        paths = [self.path(t, n) for n in names]
        # Under a launcher the main process decides for all: the others must not see the file it is about to write.
        values = [read(p) for p in paths] if dist.broadcast(self.finished(t, names)) else None
        if values is not None:
            self.clock.skip((t, names[-1]))  # read back: no time left to spend on it
            self.read_back += 1
            if dist.is_main():  # what a run stopped just after writing the stage's file had left behind
                discard(paths[-1] + PARTS)
        else:
            if seed is not None:
                seed_everything(self.seed, t, seed)
            start = time.time()
            self.claim()  # from here on the directory holds this run: a stage's finished parts may be kept
            label = f"{self.prefix} {t}: {LABELS.get(names[-1], names[-1].split('.')[0])}"
            if self.read_back and not self.computed:
                print(f"{self.out}: {self.read_back} finished stage(s) read back, each checked against its record in "
                      f"{MANIFEST}; going on with {label}", file=sys.stderr)
            self.computed += 1
            if self.redo and dist.is_main():  # inputs of a stage done again may have changed: no parts from before
                discard(paths[-1] + PARTS)
            dist.barrier()
            stage = Stage(label, self.parts(t, names[-1]), self.log, self.path(t), t)
            values = compute(stage) if isinstance(name, tuple) else [compute(stage)]
            if dist.is_main():  # under a launcher every process computed the same values: one writes
                for p, v in zip(paths, values):
                    write(p, v)
                self.record(t, names)
                self.rebuild_metrics()
                discard(paths[-1] + PARTS)  # the stage is finished: its parts are spent
            dist.barrier()
            self.clock.finished((t, names[-1]), time.time() - start)
        if dist.is_main():
            for n, v in zip(names, values):
                self.trackers.stage_table(f"{self.prefix}_{t}", n, v, self.seed)
        return values if isinstance(name, tuple) else values[0]

    # -------------------------------------------------------------------------------------------------------------
    # What each finished stage wrote, recorded in manifest.json and checked when it is read back

    def rel(self, path: str) -> str:
        return os.path.relpath(path, self.out).replace(os.sep, "/")

    def stage_files(self, t: int | None, names: tuple) -> list:
        """Every file a stage wrote: its own, and what it writes beside them (the adapter of a training stage)."""
        files = [self.path(t, n) for n in names]
        for folder in BESIDE.get(names[-1], ()):
            for root, _, found in sorted(os.walk(self.path(t, folder))):
                files += [os.path.join(root, f) for f in sorted(found)]
        return files

    def read_manifest(self) -> dict:
        """{stage: {file: {"size", "sha256"}}}, a stage named by the relative path of its last file; in the order the
        stages finished. A damaged one is set aside: each finished stage is then checked by reading it."""
        path = os.path.join(self.out, MANIFEST)
        try:
            return read(path) if os.path.exists(path) else {}
        except (ValueError, UnicodeDecodeError):
            print(f"{path}: damaged; each finished stage is checked by reading it instead, and recorded anew",
                  file=sys.stderr)
            return {}

    def record(self, t: int | None, names: tuple) -> None:
        key = self.rel(self.path(t, names[-1]))
        self.manifest.pop(key, None)  # a stage done again goes last, where it now finished
        self.manifest[key] = {self.rel(p): fingerprint(p) for p in self.stage_files(t, names)}
        write(os.path.join(self.out, MANIFEST), self.manifest)

    def finished(self, t: int | None, names: tuple) -> bool:
        """Whether the stage that writes `names` finished and its files are as it wrote them (main process). A stage
        found missing a file, cut short or changed is done again, and so is every stage after it: their files are
        removed. A stage without a record (a run of an earlier version, or one stopped between writing the stage's
        file and its record) counts as finished if its files can be read, and is recorded."""
        key = self.rel(self.path(t, names[-1]))
        recorded = self.manifest.get(key)
        if not dist.is_main() or self.redo or not (recorded or os.path.exists(self.path(t, names[-1]))):
            return False
        if recorded is None:
            problem = self.unreadable(t, names)
        else:
            problem = next((f"{f}: {why}" for f, want in recorded.items()
                            if (why := self.differs(os.path.join(self.out, f), want))), None)
        if problem is None:
            if recorded is None:
                self.record(t, names)
            return True
        print(f"{problem}; the stage is done again, and every stage after it", file=sys.stderr)
        self.redo = True
        later = list(self.manifest)[list(self.manifest).index(key) + 1:] if key in self.manifest else []
        for stage in later:  # what was computed from the damaged stage's output
            for f in self.manifest.pop(stage):
                discard(os.path.join(self.out, f))
        self.manifest.pop(key, None)
        write(os.path.join(self.out, MANIFEST), self.manifest)
        return False

    @staticmethod
    def differs(path: str, want: dict) -> str | None:
        if not os.path.exists(path):
            return "missing"
        if os.path.getsize(path) != want["size"]:
            return f"{os.path.getsize(path)} bytes where {want['size']} were written"
        return None if fingerprint(path)["sha256"] == want["sha256"] else "changed since it was written"

    def unreadable(self, t: int | None, names: tuple) -> str | None:
        for n in names:
            path = self.path(t, n)
            try:
                read(path)
            except FileNotFoundError:
                return f"{self.rel(path)}: missing"
            except (ValueError, UnicodeDecodeError) as e:
                return f"{self.rel(path)}: cannot be read ({str(e).splitlines()[0]})"
        for folder in BESIDE.get(names[-1], ()):
            if not os.path.isdir(self.path(t, folder)) or not os.listdir(self.path(t, folder)):
                return f"{self.rel(self.path(t, folder))}: missing"
        return None

    def parts(self, t: int | None, name: str) -> Parts:
        """Where the stage that writes `name` of iteration (step) t keeps its finished parts while it runs
        (`{name}.parts/`), so that a restarted run computes only the rest; removed once the stage's file is written."""
        return Parts(self.path(t, name) + PARTS)

    def copy_from(self, source: str, names: list, ignore: set) -> None:
        """Copy the files `names` (relative paths) from another run directory whose config agrees with this one on
        every field but those in `ignore`; files this run already has are kept."""
        path = os.path.join(source, "config.json")
        if not os.path.exists(path):
            sys.exit(f"{path}: no such file; give a run directory")
        diff = config_diff(read(path), self.config, set(ignore) | SPEED | RETIRED)
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

    def close(self) -> None:
        """The run ends: trackers closed, the directory unlocked. A run that found everything finished says so."""
        if dist.is_main():
            if self.read_back and not self.computed:
                print(f"{self.out}: the {self.read_back} stages asked for were finished already and are as they were "
                      f"written ({MANIFEST}); nothing computed", file=sys.stderr)
            self.trackers.close()
        self.lock.release()

    def rebuild_metrics(self) -> None:
        """metrics.jsonl from the finished stages only: what a stopped stage logged is dropped, never duplicated.
        Per folder in order: its stats.json and eval.json as one record each, its training log's records."""
        records = []
        for _, folder in folders(self.out):
            for stage in ("stats.json", "train_log.jsonl", "eval.json"):
                path = os.path.join(folder, stage)
                try:
                    found = read(path) if os.path.exists(path) else None
                except (ValueError, UnicodeDecodeError):  # damaged: the stage is done again, then this runs again
                    found = None
                if found is not None:
                    records += found if stage.endswith(".jsonl") else [
                        {"folder": os.path.basename(folder), "stage": stage[:-5],
                         **{k: v for k, v in found.items() if k != "results"}}]
        write(os.path.join(self.out, "metrics.jsonl"), records)
        self.records = records
        self.trackers.sync(records)  # a resumed run's trackers go on after what they logged


