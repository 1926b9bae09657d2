"""The whole run's estimate of the time left, printed after each stage: from each planned stage's rough work
(`rpo_stages`, `sdpo_stages`) and the seconds per token measured so far."""
import sys
import time


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


def rpo_stages(cfg, questions: int, tests: int, heldout: int) -> dict:
    """An Iterative RPO run's stages and their rough work in tokens (generated, scored), for the estimate of the time
    left."""
    evaluation = (tests * (1 + cfg.eval_k) * cfg.max_new_tokens, 0)
    pairs = questions * (1 if cfg.sft else cfg.pairs_per_question) * 2 * cfg.max_new_tokens
    stages = {(0, "eval.json"): evaluation}
    for t in range(1, cfg.iterations + 1):
        stages |= {(t, "samples.jsonl"): (questions * cfg.samples_per_question * cfg.max_new_tokens, 0),
                   (t, "reference.jsonl"): (0, pairs),
                   (t, "train_log.jsonl"): (heldout * cfg.checkpoints * cfg.max_new_tokens, 3 * pairs * cfg.epochs),
                   (t, "eval.json"): evaluation}
    return stages


def sdpo_stages(cfg, task, pool: list, heldout: int) -> dict:
    """An sDPO run's stages and their rough work in tokens (generated, scored), for the estimate of the time left."""
    per_pair = sum(len(p["chosen"]) + len(p["rejected"]) for p in pool) / max(1, len(pool)) / 4  # ~4 chars a token
    tests = len(task[2]) * (1 + task[1].eval_k) * task[1].max_new_tokens if task else 0
    stages = {(0, "heldout_logps.jsonl"): (0, heldout * per_pair), (0, "eval.json"): (tests, 0)}
    for t in range(1, cfg.steps + 1):
        chunk = len(pool) / cfg.steps * per_pair
        stages |= {(t, "reference.jsonl"): (0, chunk), (t, "train_log.jsonl"): (0, 3 * chunk * cfg.epochs),
                   (t, "heldout_logps.jsonl"): (0, heldout * per_pair), (t, "eval.json"): (tests, 0)}
    return stages
