"""The run directory of rpo.py or sdpo.py: its config, its stages, its metrics.

    RunDir         the directory, locked for the run (one run at a time: `files.DirectoryLock`)
    RunDir.stage   a finished stage's output is read back once checked against what it was when written, a missing
                   or damaged one computed (given its `Stage`), seeded and written atomically: the same command
                   resumes a stopped run
    config.json    a resumed run must have the same config, but for the number of iterations and speed settings
    manifest.json  each finished stage's files, their sizes and SHA-256s, in the order the stages finished
    inputs.json    the SHA-256 of each file a finished stage was computed from (`SOURCES`): a stage whose input has
                   changed since is done again, with every stage after it, with or without a manifest
    metrics.jsonl  rebuilt from the finished stages, so a stopped stage's records are never counted twice

A run directory may come from someone else (a shared folder, a tarball): every path read from its own files is
resolved and refused unless it lies inside it (`files.inside`), a symbolic link leading out of it is refused, and
nothing outside it is ever written or removed. A directory that cannot be written is read: a finished run's table
is printed, an unfinished one ends in one line.
"""
import dataclasses
import errno
import json
import os
import sys
import time
from collections.abc import Callable

from machinery import dist, trackers
from machinery.cli import RETIRED
from machinery.clock import Clock
from machinery.config import SPEED
from machinery.files import (DirectoryLock, digest, discard, fingerprint, inside, links_out, read, seed_everything,
                             write, write_atomic)
from machinery.resume import Parts, Stage
from machinery.results import folders


def config_diff(have: dict, want: dict, ignore=()) -> list:
    """'key (value there, value here)' for every key on which two configs differ."""
    return [f"{k} ({have.get(k)!r} there, {want.get(k)!r} here)" for k in sorted(set(have) | set(want))
            if k not in ignore and have.get(k) != want.get(k)]


PARTS = ".parts"
MANIFEST = "manifest.json"
INPUTS = "inputs.json"
# What a stage writes beside its own file, by its file: training's adapter (M_t).
BESIDE = {"train_log.jsonl": ("adapter",)}
# What a stage is computed from, by its last file: files of its own folder, and "<": the adapter of the folder
# before (the model M_{t-1} it sampled or scored with). Those that exist when it finishes are recorded in inputs.json.
SOURCES = {"samples.jsonl": ("<adapter",), "pairs.jsonl": ("samples.jsonl",),
           "reference.jsonl": ("pairs.jsonl", "<adapter"), "stats.json": ("reference.jsonl",),
           "train_log.jsonl": ("pairs.jsonl", "reference.jsonl"), "heldout_logps.jsonl": ("adapter",),
           "eval.json": ("adapter",)}
# The errors of a directory that cannot be written: then it is only read.
READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)
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


# Fields added since a config.json may have been written, and the value its run had: the default.
ADDED = {"engine": "own"}


def before_resolved(have: dict, want: dict) -> dict:
    """A config.json written before `--dtype auto` was resolved says "auto": it meant what this run resolves it to;
    one written before a field was added (`ADDED`) meant its default."""
    have = {**{k: v for k, v in ADDED.items() if k in want}, **have}
    return {**have, "dtype": want.get("dtype")} if have.get("dtype") == "auto" else have


def read_config(path: str) -> dict:
    """A run directory's config.json; a damaged one (a file cut short by a full disk or a copy) is one line."""
    try:
        have = read(path)
    except (ValueError, UnicodeDecodeError) as e:
        sys.exit(f"{path}: damaged ({e}); it is the run's config: restore it, or delete the directory to start over")
    if not isinstance(have, dict):
        sys.exit(f"{path}: damaged (not a JSON object); restore it, or delete the directory to start over")
    return have


def manifest_shape(found) -> str | None:
    """What is wrong with the shape of a manifest, {stage: {file: {"size": bytes, "sha256": hex}}}; None if nothing."""
    def fine(r):
        return (isinstance(r, dict) and isinstance(r.get("size"), int) and not isinstance(r["size"], bool)
                and isinstance(r.get("sha256"), str))
    return record_shape(found, fine, 'a {"size", "sha256"} record')


def inputs_shape(found) -> str | None:
    """What is wrong with the shape of inputs.json, {stage: {file: hex}}; None if nothing."""
    return record_shape(found, lambda r: isinstance(r, str), "a SHA-256")


def record_shape(found, fine: Callable, what: str) -> str | None:
    if not isinstance(found, dict):
        return f"not a JSON object of stages but a JSON {type(found).__name__}"
    for stage, files in found.items():
        if not isinstance(files, dict):
            return f"stage {stage!r}: {json.dumps(files)[:40]} where an object of its files belongs"
        bad = next((f for f, r in files.items() if not fine(r)), None)
        if bad is not None:
            return f"stage {stage!r}: file {bad!r} has {json.dumps(files[bad])[:40]} where {what} belongs"
    return None


def as_written(folder: str, rel: str) -> str | None:
    """Why the file `rel` of another run directory cannot be taken as that run wrote it (its manifest.json is missing,
    damaged or has no record of it, or the file differs from its record); None where it is as written."""
    path = os.path.join(folder, MANIFEST)
    try:
        manifest = read(path)
    except FileNotFoundError:
        return f"{path}: missing, so {rel} cannot be checked"
    except (ValueError, UnicodeDecodeError):
        return f"{path}: damaged, so {rel} cannot be checked"
    shape = manifest_shape(manifest)
    if shape:
        return f"{path}: {shape}"
    want = next((files[rel] for files in manifest.values() if rel in files), None)
    if want is None:
        return f"{path}: no record of {rel}"
    why = RunDir.differs(os.path.join(folder, rel), want)
    return f"{os.path.join(folder, rel)}: {why}" if why else None


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
        link = links_out(self.out) if os.path.isdir(self.out) else None
        if link:  # before the lock too: a planted .lock link would have its target truncated
            sys.exit(f"{link}: a symbolic link out of the run directory; a run writes and removes files inside its "
                     "--out only: remove the link, or give another --out")
        self.lock, self.read_only = DirectoryLock(self.out), ""
        if dist.is_main():
            try:  # before the config is read: a second run into the directory is refused here
                self.lock.acquire()
            except OSError as e:  # a read-only file system, a folder of someone else's: read, never written
                if e.errno not in READ_ONLY:
                    raise
                self.read_only = e.strerror
        try:
            self.check_config(script, grows)
            self.manifest = self.read_record(MANIFEST, manifest_shape)
            self.inputs = self.read_record(INPUTS, inputs_shape)
        except BaseException:
            self.lock.release()
            raise
        self.trackers = trackers.Trackers(cfg.report_to, self.out, self.config)
        self.redo, self.read_back, self.computed, self.unrecorded = False, 0, 0, 0
        if self.resumed and dist.is_main() and not self.read_only:
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
            differs = config_diff(before_resolved(have, self.config), self.config, set(grows) | SPEED | RETIRED)
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
            if dist.is_main() and not self.read_only:  # what a run stopped just after writing its file left behind
                discard(paths[-1] + PARTS)
        else:
            label = f"{self.prefix} {t}: {LABELS.get(names[-1], names[-1].split('.')[0])}"
            self.writable(f"the run is not finished ({label} is still to do)")
            if seed is not None:
                seed_everything(self.seed, t, seed)
            start = time.time()
            self.claim()  # from here on the directory holds this run: a stage's finished parts may be kept
            if self.read_back and not self.computed:
                print(f"{self.out}: {self.read_back} finished stage(s) read back, {self.checked()}; going on with "
                      f"{label}", file=sys.stderr)
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

    def read_record(self, name: str, shape: Callable) -> dict:
        """manifest.json or inputs.json: {stage: {file: record}}, a stage named by the relative path of its last file,
        in the order the stages finished. A damaged one, or one of another shape, is set aside in one line: each
        finished stage is then checked by reading it, and recorded anew. One naming a path outside the run directory
        is refused in one line: the directory has been tampered with, and nothing is removed."""
        path = os.path.join(self.out, name)
        if not os.path.exists(path):
            return {}
        try:
            found = read(path)
        except (ValueError, UnicodeDecodeError):
            found, why = None, "damaged"
        else:
            why = shape(found)
        if why:
            print(f"{path}: {why}; each finished stage is checked by reading it instead, and recorded anew",
                  file=sys.stderr)
            return {}
        outside = next((f for stage, files in found.items() for f in (stage, *files) if not inside(self.out, f)),
                       None)
        if outside is not None:
            sys.exit(f"{path}: names {outside!r}, a path outside the run directory; refused, nothing was removed. A "
                     f"run directory names its own files only: delete {name} to resume with each finished stage "
                     "checked by reading it")
        return found

    def record(self, t: int | None, names: tuple) -> None:
        key = self.rel(self.path(t, names[-1]))
        self.manifest.pop(key, None)  # a stage done again goes last, where it now finished
        self.manifest[key] = {self.rel(p): fingerprint(p) for p in self.stage_files(t, names)}
        write(os.path.join(self.out, MANIFEST), self.manifest)
        self.inputs.pop(key, None)
        self.inputs[key] = {self.rel(p): sha for p in self.sources(t, names) if (sha := digest(p))}
        write(os.path.join(self.out, INPUTS), self.inputs)

    def sources(self, t: int | None, names: tuple) -> list:
        """The paths of what the stage was computed from (`SOURCES`): files of its folder, the adapter before."""
        before = [self.path(t - 1, n[1:]) for n in SOURCES.get(names[-1], ()) if n.startswith("<") and t]
        return [self.path(t, n) for n in SOURCES.get(names[-1], ()) if not n.startswith("<")] + before

    def finished(self, t: int | None, names: tuple) -> bool:
        """Whether the stage that writes `names` finished and its files are as it wrote them (main process). A stage
        found missing a file, cut short or changed, or computed from a file that has changed since (inputs.json), is
        done again, and so is every stage after it: their files are removed. A stage without a record (a run of an
        earlier version, one stopped between writing the stage's file and its record, a lost manifest) counts as
        finished if its files can be read, and is recorded."""
        key = self.rel(self.path(t, names[-1]))
        recorded = self.manifest.get(key)
        if not dist.is_main() or self.redo or not (recorded or os.path.exists(self.path(t, names[-1]))):
            return False
        if recorded is None:
            problem = self.unreadable(t, names)
        else:
            problem = next((f"{f}: {why}" for f, want in recorded.items()
                            if (why := self.differs(os.path.join(self.out, f), want))), None)
        problem = problem or next((f"{key}: computed from {f} as it was then, and {f} has changed since"
                                   for f, sha in self.inputs.get(key, {}).items()
                                   if digest(os.path.join(self.out, f)) != sha), None)
        if problem is None:
            if recorded is None and not self.unrecorded and not os.path.exists(os.path.join(self.out, MANIFEST)):
                print(f"{os.path.join(self.out, MANIFEST)}: missing; each finished stage is checked only for being "
                      f"readable and for the files it was computed from ({INPUTS}), not for being the bytes its run "
                      "wrote", file=sys.stderr)
            self.unrecorded += recorded is None
            if (recorded is None or key not in self.inputs) and not self.read_only:
                self.record(t, names)
            return True
        self.writable(f"{problem}; the stage would be done again")
        print(f"{problem}; the stage is done again, and every stage after it", file=sys.stderr)
        self.redo = True
        later = list(self.manifest)[list(self.manifest).index(key) + 1:] if key in self.manifest else []
        for stage in later:  # what was computed from the damaged stage's output
            for f in self.manifest.pop(stage):
                discard(inside(self.out, f))  # inside: checked when the manifest was read
            self.inputs.pop(stage, None)
        self.manifest.pop(key, None)
        self.inputs.pop(key, None)
        write(os.path.join(self.out, MANIFEST), self.manifest)
        write(os.path.join(self.out, INPUTS), self.inputs)
        return False

    def checked(self) -> str:
        """How the stages read back were checked, for the lines that say so."""
        if not self.unrecorded:
            return f"each checked against its record in {MANIFEST}"
        return (f"{self.read_back - self.unrecorded} checked against their record in {MANIFEST}, {self.unrecorded} "
                f"without one only for being readable and for the files they were computed from ({INPUTS}): not "
                "for being the bytes their run wrote")

    def writable(self, why: str) -> None:
        """One line and exit where the directory cannot be written and the run needs to write it."""
        if self.read_only:
            sys.exit(f"{self.out}: cannot be written ({self.read_only}) and {why}; copy the directory to a place "
                     "that can be written and give that as --out")

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
        """Copy the files `names` (relative paths, each a stage's only file) from another run directory whose config
        agrees with this one on every field but those in `ignore`, each checked against that run's manifest; files
        this run already has are kept."""
        path = os.path.join(source, "config.json")
        if not os.path.exists(path):
            sys.exit(f"{path}: no such file; give a run directory")
        diff = config_diff(before_resolved(read_config(path), self.config), self.config,
                           set(ignore) | SPEED | RETIRED)
        if diff:
            sys.exit(f"{path}: its files do not fit this run; it differs in " + ", ".join(diff))
        todo = [n for n in names if not os.path.exists(os.path.join(self.out, n))]
        missing = [os.path.join(source, n) for n in todo if not os.path.exists(os.path.join(source, n))]
        if missing:
            sys.exit(f"{missing[0]}: no such file; that run has not got that far")
        why = next((why for n in todo if (why := as_written(source, n))), None)
        if why:
            sys.exit(f"--samples-from {source}: {why}; run that run's command once more: it checks its files, redoes "
                     "what is damaged and records them")
        if todo:
            self.writable("files are to be copied into it")
        self.claim()
        for name in todo if dist.is_main() else ():
            with open(os.path.join(source, name), encoding="utf-8") as f:
                write_atomic(os.path.join(self.out, name), f.read())
            self.manifest[name] = {name: fingerprint(os.path.join(self.out, name))}  # as checked in `source`
        if todo and dist.is_main():
            write(os.path.join(self.out, MANIFEST), self.manifest)
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
            if self.read_back and not self.computed and not self.unrecorded:
                print(f"{self.out}: the {self.read_back} stages asked for were finished already and are as they were "
                      f"written ({MANIFEST}); nothing computed", file=sys.stderr)
            elif self.read_back and not self.computed:
                print(f"{self.out}: the {self.read_back} stages asked for were finished already, {self.checked()}; "
                      "nothing computed", file=sys.stderr)
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


