"""The vLLM engine's own process (`machinery/engine.py` starts it): it loads the merged copy of M_{t-1} once, then
answers requests until its input closes. Run by path with the interpreter of an environment that has vLLM (which
pins its own transformers): it imports vLLM, transformers' tokenizer and the project's reward.py (standard library
only), nothing else of the project.

Protocol, one JSON object a line: argv[1] the settings (with the run's process id: the worker ends itself within a
second of the run's end, however it ended); each line read on stdin a batch {"prompts": [[token ids]],
"seeds": [int], "temperature": float, "max_tokens": int}; each line written to the result stream the batch's
completions {"tokens": [[token ids, without EOS]]}, in order. vLLM's own output goes to stderr.

The stop rule is the own loop's (`sampling.answer_done`): after a token that holds a newline or a colon, the row's
text is decoded and `reward.completion_end` asked whether it has ended; once it has, the row's next token is forced
to EOS, which ends it (the EOS is not kept, as in the own loop).
"""
import json
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project's reward.py
results = os.fdopen(os.dup(1), "w")  # the result stream: the real stdout; everything printed goes to stderr
os.dup2(2, 1)

SETTINGS = json.loads(sys.argv[1])


def end_with_parent(parent: int) -> None:
    """Ends this process within a second of the run's (its parent's) end, however that ended: a run killed with
    kill -9 leaves no engine holding the memory (and its files) behind."""
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(1)


threading.Thread(target=end_with_parent, args=(SETTINGS["parent"],), daemon=True).start()  # before vLLM loads

import reward  # noqa: E402
import torch  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402
from vllm import LLM, SamplingParams  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor  # noqa: E402


class AnswerStop(AdapterLogitsProcessor):
    """Ends a row once its answer line is complete: its next token can only be EOS."""

    def __init__(self, vllm_config, device, is_pin_memory):
        super().__init__(vllm_config, device, is_pin_memory)
        self.tokenizer = AutoTokenizer.from_pretrained(SETTINGS["model"])
        self.eos = SETTINGS["eos"]
        texts = self.tokenizer.batch_decode([[i] for i in range(len(self.tokenizer))])  # each token alone, once
        self.triggers = {i for i, text in enumerate(texts) if "\n" in text or ":" in text}  # may end a line

    def is_argmax_invariant(self) -> bool:
        return False

    def new_req_logits_processor(self, params):
        return self.stop_after_answer

    def stop_after_answer(self, output_ids: list, logits: torch.Tensor) -> torch.Tensor:
        if output_ids and output_ids[-1] in self.triggers and reward.completion_end(
                self.tokenizer.decode(output_ids, skip_special_tokens=True)) is not None:
            eos = logits[self.eos].clone()
            logits.fill_(float("-inf"))
            logits[self.eos] = eos if torch.isfinite(eos) else 0.0
        return logits


def main() -> None:
    llm = LLM(model=SETTINGS["model"], dtype=SETTINGS["dtype"], max_model_len=SETTINGS["max_model_len"],
              seed=0, enforce_eager=SETTINGS["enforce_eager"], generation_config="vllm",
              gpu_memory_utilization=SETTINGS.get("gpu_memory_utilization", 0.9), logits_processors=[AnswerStop],
              # whole prompts only: vLLM rewinds a seeded request's generator after a partial prefill, which a CPU
              # generator cannot do ("CPU Generator does not use offset", vLLM 0.32 on a CPU)
              enable_chunked_prefill=False, max_num_batched_tokens=max(8192, SETTINGS["max_model_len"]))
    eos = SETTINGS["eos"]
    results.write(json.dumps({"ready": True}) + "\n")
    results.flush()
    for line in sys.stdin:
        batch = json.loads(line)
        params = [SamplingParams(n=1, temperature=batch["temperature"], top_p=1.0, top_k=0, min_p=0.0,
                                 repetition_penalty=1.0, seed=seed, max_tokens=batch["max_tokens"], ignore_eos=True,
                                 stop_token_ids=[eos], detokenize=False) for seed in batch["seeds"]]
        outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in batch["prompts"]], params, use_tqdm=False)
        tokens = [list(o.outputs[0].token_ids) for o in outputs]
        tokens = [t[:-1] if t and t[-1] == eos else t for t in tokens]
        results.write(json.dumps({"tokens": tokens}) + "\n")
        results.flush()


if __name__ == "__main__":
    main()
