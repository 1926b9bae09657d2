"""Files a run writes, each atomically; what a finished file was (its size and hash); the lock that lets one run at a
time into a directory; the seeding of its random generators."""
import contextlib
import hashlib
import json
import os
import random
import shutil
import socket
import sys
import time

try:
    import fcntl  # POSIX; Windows has no flock, and runs there go unlocked
except ImportError:
    fcntl = None


@contextlib.contextmanager
def atomic(path: str):
    """A temporary path beside `path` to write a file or a folder to, renamed to `path` once written: a stopped run
    never leaves half of it behind. A folder already at `path` is replaced."""
    tmp = path + ".tmp"
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    discard(tmp)  # what a stopped write left
    try:
        yield tmp
    except BaseException:  # a full disk, a stop: no half-written file is left behind
        discard(tmp)
        raise
    if os.path.isdir(path):
        shutil.rmtree(path)
    os.replace(tmp, path)


def discard(path: str) -> None:
    """Remove a file or a folder, if there is one."""
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def write_atomic(path: str, text: str) -> None:
    with atomic(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def fingerprint(path: str) -> dict:
    """What a finished file was: its size in bytes and its SHA-256, to tell it later from a damaged or changed one."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"size": os.path.getsize(path), "sha256": digest.hexdigest()}


def digest(path: str) -> str | None:
    """The SHA-256 of a file, or of a folder (its files' relative names and SHA-256s, in order); None if neither."""
    if os.path.isfile(path):
        return fingerprint(path)["sha256"]
    if not os.path.isdir(path):
        return None
    whole = hashlib.sha256()
    for root, dirs, found in os.walk(path):
        dirs.sort()
        for name in sorted(found):
            file = os.path.join(root, name)
            whole.update(f"{os.path.relpath(file, path)}\0{fingerprint(file)['sha256']}\n".encode())
    return whole.hexdigest()


def inside(root: str, rel) -> str | None:
    """A relative path read from a run directory's own files, joined to the directory and resolved (symbolic links
    followed); None unless it is a relative path that stays inside the directory. What a run removes or writes
    because a file said so goes through here: a crafted file cannot point it elsewhere."""
    if not isinstance(rel, str) or not rel or "\0" in rel or os.path.isabs(rel) or os.path.splitdrive(rel)[0]:
        return None
    root = os.path.realpath(root)
    path = os.path.realpath(os.path.join(root, rel))
    return path if path != root and os.path.commonpath([root, path]) == root else None


def links_out(root: str) -> str | None:
    """The first symbolic link under `root` that leads outside it, as 'LINK -> TARGET'; None if there is none. A run
    writes and removes files under its directory only, so a link planted there must not lead it elsewhere."""
    real = os.path.realpath(root)
    for folder, dirs, found in os.walk(root):
        for name in dirs + found:
            path = os.path.join(folder, name)
            if os.path.islink(path):
                target = os.path.realpath(path)
                if target == real or os.path.commonpath([real, target]) != real:
                    return f"{path} -> {target}"
    return None


class DirectoryLock:
    """One run at a time in a directory: an OS lock (flock) on `<folder>/.lock`, held while the run lives and
    released by the OS however its process ends, so a killed run never blocks its own restart. The file names the
    holder (process, host, start, command) for whoever is refused; the holder removes it when the run ends. A
    process may take a lock it holds already (a test running several runs into one folder)."""

    NAME = ".lock"
    held: dict = {}  # this process's locks, by folder

    def __init__(self, folder: str):
        self.folder, self.path = os.path.realpath(folder), os.path.join(os.path.realpath(folder), self.NAME)
        self.made = not os.path.exists(self.folder)  # then the folder goes too, if the run leaves it empty
        self.file = None

    def acquire(self) -> None:
        """Take the lock, or end the run with one line naming the holder."""
        if fcntl is None or self.folder in DirectoryLock.held:
            return
        os.makedirs(self.folder, exist_ok=True)
        while True:
            file = open(self.path, "a+", encoding="utf-8")
            try:
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                file.seek(0)
                holder = file.read().strip() or "a process that has not said who it is yet"
                file.close()
                sys.exit(f"{self.folder}: another run is using this directory ({holder}); wait for it to end, or "
                         "give another --out")
            try:  # the file may have been removed (its run ended) between the open and the lock: lock the new one
                same = os.stat(self.path).st_ino == os.fstat(file.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            file.close()
        file.seek(0)
        file.truncate()
        file.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                   f"{' '.join([os.path.basename(sys.argv[0])] + sys.argv[1:])}\n")
        file.flush()
        self.file, DirectoryLock.held[self.folder] = file, self

    def release(self) -> None:
        """Remove the lock file, then let go of the lock; and the folder, if this run made it and left it empty."""
        mine = DirectoryLock.held.pop(self.folder, None)
        if mine is None:
            return
        with contextlib.suppress(OSError):
            os.remove(mine.path)
        mine.file.close()
        if mine.made:
            with contextlib.suppress(OSError):
                os.rmdir(mine.folder)  # only if empty


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
