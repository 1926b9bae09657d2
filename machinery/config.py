"""A config field with its --help text, and the fields of a run that are no hyperparameter of either paper.

Each module declares the fields it reads, each default written once: `data.TaskConfig` (the task),
`sampling.SamplingConfig` (sampling and evaluation), `training.TrainConfig` (the optimisation), `model.ModelConfig`
(the model and its adapter), `RunConfig` below (seed, memory, trackers); each script's `Config` joins them and adds
its own, with the paper's values.
"""
from dataclasses import dataclass, field

from machinery.trackers import REPORT_TO

# Settings of speed (and of where metrics also go) alone: no sample, score or step depends on them, so a run may
# resume with other values.
SPEED = {"sample_batch_size", "memory_budget", "save_minutes", "report_to", "threads", "vllm_python"}


def arg(default, help: str, **metadata):
    """A config field with its --help text (the paper's value in brackets), for `transformers.HfArgumentParser`;
    metadata: `min`, `above`, `max`, `below`, `min_items` (its valid range), `choices`, `aliases` (other flags)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **metadata})
    return field(default=default, metadata={"help": help, **metadata})


@dataclass
class RunConfig:
    """What a run needs that no paper gives: its seed, the memory it may use, where its metrics also go."""
    memory_budget: float = arg(0.0, "GiB this process may hold on its device (weights included): each stage plans "
                               "its rows from it, the batch-size flags as upper bounds; 0 = on a GPU what it reports "
                               "free less 1 GiB, on a CPU no plan", min=0)
    seed: int = arg(0, "seed of data, sampling, LoRA init and shuffling")
    threads: int = arg(0, "CPU threads torch computes with; 0 = torch's default (one per core). Fewer where other "
                       "jobs share the cores: two threads on two busy cores ran slower than one", min=0)
    report_to: list[str] = arg(["none"], "trackers the metrics also go to (TRL's flag): none, tensorboard, trackio, "
                               "wandb, several allowed; each is its own package (pip install tensorboard, trackio, "
                               "wandb)", choices=REPORT_TO, min_items=1)
    engine: str = arg("own", "what samples and evaluates: own = this project's token loop (the reference), vllm = "
                      "vLLM on a merged copy of the policy, in a process of its own (pip install \".[vllm]\"; "
                      "README, \"Sampling with vLLM\")", choices=("own", "vllm"))
    vllm_python: str = arg("", "with --engine vllm: the Python of an environment that has vLLM (it pins its own "
                           "transformers), default this one")
