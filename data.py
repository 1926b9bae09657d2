"""The data of Iterative RPO (arXiv 2404.19733v3) and sDPO (arXiv 2403.19270v1): tasks, their prompts, loaders.

    build_prompt, gold_solution   the paper's zero-shot (GSM8K, ARC) and 4-shot (MATH) prompts; GSM8K's gold
                                  solution in the prompt's format
    arith_problems                the built-in arithmetic word problems (offline; the demo's task)
    load_examples, load_task      a task's published files (JSONL, Parquet, a data set by name), its splits and the
                                  held-out training questions
    load_preferences              preference pairs for sDPO (rpo.py's pairs.jsonl, OpenOrca's or TRL's layout)

Standard library only, so it imports in a blink. An example is a dict:
    {"id": str, "task": str, "question": str, "answer": str (the gold final answer), "solution": str | None}
ARC examples also carry "choices": [(label, text), ...]. The reward that judges answers is `reward.py`.
"""
import hashlib
import importlib.util
import json
import os
import random
import re
from dataclasses import dataclass

from machinery.cli import DataError
from machinery.config import arg
from reward import GRADERS, TASKS, last_boxed


# ---------------------------------------------------------------------------------------------------------------
# Prompts (arXiv 2404.19733v3, Sec. 3; quoted in shared/PAPERS.md)

GSM8K_INSTRUCTION = (
    "Your task is to answer the question below. Give step by step reasoning before you answer, and when you're "
    'ready to answer, please use the format "Final answer: ..."'
)
ARC_INSTRUCTION = (
    "Your task is to answer the question below. Give step by step reasoning before you answer, and when you're "
    'ready to answer, please use the format "Final answer: (insert letter here)"'
)
MATH_INSTRUCTION = (
    "Your task is to answer the last question below. Give step by step reasoning before you answer, and when "
    "you're ready to answer, please wrap your answer in \\boxed, and conclude using the format "
    '"Final answer: ..."'
)
MATH_SHOTS = 4  # MATH is prompted 4-shot with fixed train examples


def question_text(example: dict) -> str:
    """The question as shown to the model; ARC lists its choices as (A) ... (D)."""
    if example["task"] == "arc":
        return example["question"] + "\n" + "\n".join(f"({label}) {text}" for label, text in example["choices"])
    return example["question"]


def build_prompt(example: dict, shots: list[dict] | None = None) -> str:
    """The paper's zero-shot prompt (GSM8K, ARC, and `arith`, which uses the GSM8K one), or 4-shot for MATH."""
    task = example["task"]
    if task == "math":
        parts = [MATH_INSTRUCTION]
        for shot in shots or []:  # each shot ends with the "Final answer:" line the prompt asks for
            parts.append(f"Question: {shot['question']}\n\nSolution: {gold_solution(shot)}")
        parts.append(f"Question: {example['question']}\n\nSolution:")
        return "\n\n".join(parts)
    instruction = ARC_INSTRUCTION if task == "arc" else GSM8K_INSTRUCTION
    return f"{instruction}\n\nQuestion: {question_text(example)}\n\nSolution:"


def gold_solution(example: dict) -> str | None:
    """The gold chain of thought in the paper's answer format, for adding the gold solution to the winners."""
    if not example.get("solution"):
        return None
    return f"{example['solution'].rstrip()}\nFinal answer: {example['answer']}"


# ---------------------------------------------------------------------------------------------------------------
# The built-in task: seeded arithmetic word problems with exact answers, for the offline demo and the tests

NAMES = ("Tom", "Ann", "Sam", "Lily", "Ben", "Mia", "Max", "Zoe", "Leo", "Eva")
ITEMS = ("apples", "pencils", "marbles", "stickers", "books", "coins", "cookies", "stamps")
STEP_TEXT = {
    "+": "Then {name} gets {n} more {item}.",
    "-": "Then {name} gives away {n} {item}.",
    "*": "Then the number of {item} {name} has becomes {n} times as many.",
}
# The task's knobs, owned here (rpo.py's --arith-* flags take their defaults from these): two 1-digit numbers and one
# of + − ×, one expression in 2 in the test split, so that its 120 problems are all scored (docs/LOG.md says why).
OPERANDS, DIGITS, OPS, TEST_EVERY = 2, 1, "+-*", 2


def _split_of(expression: str, test_every: int = TEST_EVERY) -> str:
    # A problem's split is a function of its arithmetic alone, so the train and test splits never share a
    # problem, whatever the seed or the number of problems asked for.
    digest = hashlib.sha256(expression.encode()).digest()
    return "test" if digest[0] % test_every == 0 else "train"


def arith_problems(
    n: int, split: str = "train", seed: int = 0, operands: int = OPERANDS, digits: int = DIGITS, ops: str = OPS,
    test_every: int = TEST_EVERY,
) -> list[dict]:
    """`n` distinct arithmetic word problems of one split, the same ones for the same arguments.

    Knobs: `operands` numbers, each of `digits` digits, combined left to right with operations from `ops` (any
    of "+-*"). Subtraction never takes more than there is, so every answer is a non-negative integer. One
    expression in `test_every` (by its hash, about) belongs to the test split, the rest to the train split.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    if operands < 1 or digits < 1 or not ops or set(ops) - set(STEP_TEXT) or test_every < 2:
        raise ValueError(f"bad arith knobs: operands={operands} digits={digits} ops={ops!r} test_every={test_every}")
    rng = random.Random(f"{seed}-{split}")
    low, high = max(1, 10 ** (digits - 1)), 10**digits - 1
    seen, problems = set(), []
    for _ in range(200 * n + 1000):
        if len(problems) == n:
            break
        total = rng.randint(max(low, 1), high)
        expression, steps = str(total), []
        for _ in range(operands - 1):
            op = rng.choice([o for o in ops if o != "-" or total >= low] or ["+"])
            k = rng.randint(low, min(high, total) if op == "-" else high)
            new = {"+": total + k, "-": total - k, "*": total * k}[op]
            expression += f" {op} {k}"
            steps.append((op, k, total, new))
            total = new
        if expression in seen or _split_of(expression, test_every) != split:
            continue
        seen.add(expression)
        name, item = rng.choice(NAMES), rng.choice(ITEMS)
        first = int(expression.split()[0])
        text = [f"{name} has {first} {item}."]
        text += [STEP_TEXT[op].format(name=name, n=k, item=item) for op, k, _, _ in steps]
        text.append(f"How many {item} does {name} have now?")
        solution = " ".join(f"{a} {op} {k} = {b}." for op, k, a, b in steps) or f"{name} has {first} {item}."
        problems.append({"id": f"arith-{split}-{len(problems)}", "task": "arith", "question": " ".join(text),
                         "answer": str(total), "solution": solution})
    if len(problems) < n:
        raise ValueError(f"only {len(problems)} distinct {split} problems exist for operands={operands} "
                         f"digits={digits} ops={ops!r} test_every={test_every}; asked for {n}")
    return problems


# ---------------------------------------------------------------------------------------------------------------
# Loaders of the public formats, from local files (JSONL; Parquet when pyarrow is installed)

# A data set by name: owner/name, then :config and :split as `datasets.load_dataset` takes them
HUB_ID_RE = re.compile(r"[\w.-]+/[\w.-]+(?::[\w.-]*){0,2}")


def read_records(path: str) -> list[tuple[int, dict]]:
    """(line number, record) for each record of a JSONL or Parquet file, or (row, record) of a data set read through
    Hugging Face `datasets` (an optional extra): a folder written by `save_to_disk` (`folder:split` for a
    DatasetDict), or a data set by name, `owner/name:config:split`. DataError on anything malformed or missing."""
    folder = path.rsplit(":", 1)[0] if ":" in path and os.path.isdir(path.rsplit(":", 1)[0]) else path
    if os.path.isdir(folder) or (not os.path.exists(path) and HUB_ID_RE.fullmatch(path)
                                 and not path.endswith((".jsonl", ".json", ".parquet"))):
        return _dataset_records(path, folder if os.path.isdir(folder) else None)
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
        try:
            records = list(enumerate(pq.read_table(path).to_pylist(), start=1))
        except Exception as e:  # pyarrow.ArrowInvalid and kin: not a Parquet file, or a damaged one
            raise DataError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
    else:
        records = []
        try:
            with open(path, "rb") as f:
                raw = f.read()
            raw = raw.removeprefix(b"\xef\xbb\xbf")  # the byte-order mark many Windows editors write: not text
            lines = raw.decode("utf-8").split("\n")
        except UnicodeDecodeError as e:
            line, column = raw.count(b"\n", 0, e.start) + 1, e.start - raw.rfind(b"\n", 0, e.start)
            raise DataError(f"{path}:{line}: not UTF-8 text (byte {raw[e.start]:#04x} at column {column}); a file of "
                            "JSON lines is UTF-8, and a Parquet file's name ends in .parquet") from None
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            records.append((number, record))
    if not records:
        raise DataError(f"{path}: no records (empty file)")
    return records


def _dataset_records(spec: str, folder: str | None) -> list[tuple[int, dict]]:
    """The rows of a data set through `datasets`: a saved folder (`load_from_disk`), or by name from the hub (or the
    Hugging Face cache, offline)."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"{spec}: a data set folder or name is read with Hugging Face datasets: pip install "
                        "datasets") from None
    split = spec[len(folder) + 1:] if folder and spec != folder else None
    try:
        if folder:
            loaded = datasets.load_from_disk(folder)
            loaded = loaded[split] if split else loaded
        else:
            name, config, split = (spec.split(":") + ["", ""])[:3]
            loaded = datasets.load_dataset(name, config or None, split=split or None)
    except Exception as e:  # offline and not cached, no such data set, no such config or split
        raise DataError(f"{spec}: not a file, and datasets cannot load it ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200] if str(e) else 'no message'})") from None
    if isinstance(loaded, datasets.DatasetDict):
        raise DataError(f"{spec}: holds the splits {', '.join(loaded)}; name one: {spec}:{next(iter(loaded))}")
    if not len(loaded):
        raise DataError(f"{spec}: no records (an empty data set)")
    return list(enumerate(loaded, start=1))


def _field(record: dict, key: str, kind: type, where: str):
    if key not in record:
        raise DataError(f"{where}: missing field '{key}'")
    if not isinstance(record[key], kind):
        wanted = " or ".join(k.__name__ for k in kind) if isinstance(kind, tuple) else kind.__name__
        raise DataError(f"{where}: field '{key}' should be {wanted}, got {type(record[key]).__name__}")
    return record[key]


def _gsm8k(record: dict, where: str) -> dict:
    question, answer = _field(record, "question", str, where), _field(record, "answer", str, where)
    if "####" not in answer:
        raise DataError(f"{where}: GSM8K answer has no '#### <number>' line")
    solution, final = answer.rsplit("####", 1)
    final = final.strip().replace(",", "")
    if not final:
        raise DataError(f"{where}: nothing after '####' in the GSM8K answer")
    solution = re.sub(r"<<[^>]*>>", "", solution).strip()  # drop the calculator annotations <<48/2=24>>
    return {"question": question, "answer": final, "solution": solution}


def _arc(record: dict, where: str) -> dict:
    """ARC in either published layout: AI2's (`question.stem`, `question.choices[{text, label}]`) or Hugging Face's
    (`question` a string, `choices` with `text` and `label` lists). Labels are letters, or digits 1-4 in some of
    AI2's rows."""
    question = _field(record, "question", (str, dict), where)
    if isinstance(question, dict):  # AI2
        stem, listed = _field(question, "stem", str, where), _field(question, "choices", list, where)
        if not all(isinstance(c, dict) and isinstance(c.get("label"), str) and isinstance(c.get("text"), str)
                   for c in listed):
            raise DataError(f"{where}: each of 'question.choices' needs a 'label' and a 'text' string")
        labels, texts = [c["label"] for c in listed], [c["text"] for c in listed]
    else:  # Hugging Face
        stem, choices = question, _field(record, "choices", dict, where)
        labels, texts = choices.get("label"), choices.get("text")
        if not isinstance(labels, list) or not isinstance(texts, list) or len(labels) != len(texts):
            raise DataError(f"{where}: 'choices' needs 'label' and 'text' lists of the same length")
    if not labels:
        raise DataError(f"{where}: the question has no choices")
    key = str(_field(record, "answerKey", str, where)).strip()
    if key not in labels:
        raise DataError(f"{where}: answerKey {key!r} is not one of the labels {labels}")
    return {"question": stem, "answer": key, "solution": None, "choices": list(zip(labels, texts))}


def _math(record: dict, where: str) -> dict:
    problem, solution = _field(record, "problem", str, where), _field(record, "solution", str, where)
    boxed = last_boxed(solution, limit=len(solution))
    if boxed is None:
        raise DataError(f"{where}: MATH solution has no \\boxed{{...}} answer")
    return {"question": problem, "answer": boxed, "solution": solution}


PARSERS = {"gsm8k": _gsm8k, "arc": _arc, "math": _math}


def load_examples(task: str, path: str) -> list[dict]:
    """Examples of a public task from a local file in its published format:
    GSM8K: `question`, `answer` ending in `#### <number>`. ARC: AI2's layout (`question.stem`,
    `question.choices[{text, label}]`, `answerKey`) or Hugging Face's (`question`, `choices` with `text` and `label`
    lists, `answerKey`). MATH: `problem`, `solution` whose last \\boxed{...} is the answer.
    """
    if task not in PARSERS:
        raise ValueError(f"no file format for task {task!r}; files are read for {sorted(PARSERS)}")
    examples = []
    for number, record in read_records(path):
        example = PARSERS[task](record, f"{path}:{number}")
        examples.append({"id": str(record.get("id", f"{task}-{number}")), "task": task, **example})
    return examples


ROLES = ("system", "user", "assistant")  # the roles of a chat message that chat templates know


def _message_text(value, key: str, where: str, prompt: bool):
    """A preference field as a string, or as a list of chat messages (TRL's conversational layout)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m and "content" in m
                                                 for m in value):
        roles = [m["role"] for m in value if m["role"] not in ROLES]
        if roles:
            raise DataError(f"{where}: role {roles[0]!r} in '{key}' is none of {', '.join(ROLES)}")
        if prompt:
            return [{"role": m["role"], "content": m["content"]} for m in value]
        if value[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last message of '{key}' should be the assistant's")
        return value[-1]["content"]
    raise DataError(f"{where}: field '{key}' should be a string or a list of {{role, content}} messages")


def _preference_layout(record: dict, where: str) -> dict:
    """A preference record with a `prompt`: as it is (TRL's explicit layouts); the sDPO paper's OpenOrca pairs
    (Intel/orca_dpo_pairs: `system`, `question`, `chosen`, `rejected` strings), the system prompt kept as a system
    message; or TRL's implicit prompt (trl-lib/ultrafeedback_binarized: `chosen` and `rejected` conversations that
    share their opening turns, which are the prompt)."""
    if "prompt" in record:
        return record
    if isinstance(record.get("question"), str) and "chosen" in record and "rejected" in record:
        system = record.get("system") or ""
        prompt = ([{"role": "system", "content": system}] if system.strip() else []) + \
            [{"role": "user", "content": record["question"]}]
        return {**record, "prompt": prompt}
    chosen, rejected = record.get("chosen"), record.get("rejected")
    if isinstance(chosen, list) and isinstance(rejected, list) and chosen and rejected:
        shared = next((i for i, (c, r) in enumerate(zip(chosen, rejected)) if c != r), min(len(chosen), len(rejected)))
        if not shared:
            raise DataError(f"{where}: 'chosen' and 'rejected' share no opening turn, and there is no 'prompt'")
        return {**record, "prompt": chosen[:shared], "chosen": chosen[shared:], "rejected": rejected[shared:]}
    raise DataError(f"{where}: not a preference pair: looked for 'prompt', 'chosen', 'rejected' (TRL's layouts), "
                    "'question', 'chosen', 'rejected' with an optional 'system' (OpenOrca's), or 'chosen' and "
                    "'rejected' conversations that share their opening turns (TRL's implicit prompt)")


def load_preferences(path: str) -> list[dict]:
    """Preference pairs {prompt, chosen, rejected} from JSONL/Parquet or a data set (`read_records`), TRL's standard
    (strings) or conversational (message lists) layout, OpenOrca's or TRL's implicit prompt (`_preference_layout`).
    `prompt` stays a string or a message list; `chosen`/`rejected` become the response strings. The `pairs.jsonl`
    written by rpo.py is in this layout too; its `rejected_truncated` (a loser cut off at the token limit) is kept,
    so that sDPO scores that loser without an EOS, as rpo.py does.
    """
    pairs = []
    for number, record in read_records(path):
        where = f"{path}:{number}"
        record = _preference_layout(record, where)
        pair = {key: _message_text(_field(record, key, (str, list), where), key, where, key == "prompt")
                for key in ("prompt", "chosen", "rejected")}
        for key in ("id", "answer", "task"):
            if key in record:
                pair[key] = record[key]
        for key in ("chosen_truncated", "rejected_truncated"):  # cut off at the token limit: scored without an EOS
            if key in record:
                if not isinstance(record[key], bool):
                    raise DataError(f"{where}: field '{key}' should be true or false, got {json.dumps(record[key])}")
                pair[key] = record[key]
        pairs.append(pair)
    return pairs


def load_preference_files(paths: list) -> tuple[list, list]:
    """(pairs, the file each pair came from) of several preference files, in order."""
    pairs, files = [], []
    for path in paths:
        loaded = load_preferences(path)
        pairs += loaded
        files += [path] * len(loaded)
    return pairs, files


# ---------------------------------------------------------------------------------------------------------------
# A task's splits

@dataclass
class TaskConfig:
    """A task: which, from which files, how many questions (flags of rpo.py; sdpo.py reads them from an rpo.py run)."""
    task: str = arg("arith", "arith (built-in, offline), gsm8k, arc or math", choices=TASKS)
    train_file: str = arg("", "training examples in the task's published format (JSONL or Parquet); not for arith")
    test_file: str = arg("", "held-out test examples, same format; not for arith")
    n_train: int = arg(32, "training questions (arith: generated; files: the first n, 0 = all)", min=0)
    n_test: int = arg(120, "test questions (arith: generated, at most 120 for the default knobs, whose test split "
                      "holds 120 distinct problems; files: the first n, 0 = all)", min=0)
    arith_operands: int = arg(OPERANDS, "arith: numbers per problem", min=1)
    arith_digits: int = arg(DIGITS, "arith: digits per number", min=1)
    arith_ops: str = arg(OPS, "arith: operations to draw from, any of '+-*'")
    arith_test_every: int = arg(TEST_EVERY, "arith: one arithmetic expression in this many belongs to the test "
                                "split", min=2)
    math_grader: str = arg("builtin", "MATH answers equal by: builtin (notation: fractions, signs, units, \\text{}, "
                           "unordered lists; exact values) or math-verify (also algebraic equivalence; pip install "
                           "math-verify; about 75x slower a call)", choices=GRADERS)


def load_task(task: TaskConfig, seed: int, heldout: int = 0, train: bool = True):
    """(train examples, test examples, few-shot examples, held-out train examples). MATH's 4 shots are the first
    train examples, which are then not trained on. `heldout` training questions, a seeded random draw, are kept
    apart (never sampled for pairs) to pick checkpoints; the train examples are the first n_train of the rest.
    Without `train` (an evaluation-only run) a task's training file is needed only for MATH's shots."""
    if task.math_grader == "math-verify" and importlib.util.find_spec("math_verify") is None:
        raise DataError("--math-grader math-verify needs the package: pip install math-verify")
    if task.task == "arith":
        if task.train_file or task.test_file:
            raise DataError(f"--train-file / --test-file {task.train_file or task.test_file}: the arith task "
                            "is built in and reads no files; give --task gsm8k, arc or math with files")
        if not task.n_train or not task.n_test:
            raise DataError(f"--n-train {task.n_train} / --n-test {task.n_test}: the arith task generates this "
                            "many problems; give 1 or more of each")
        if not task.arith_ops or set(task.arith_ops) - set(STEP_TEXT):
            raise DataError(f"--arith-ops {task.arith_ops!r}: takes one or more of '+-*'")
        kw = dict(seed=seed, operands=task.arith_operands, digits=task.arith_digits, ops=task.arith_ops,
                  test_every=task.arith_test_every)
        try:
            train_examples = arith_problems(task.n_train + heldout, "train", **kw)
            test, shots = arith_problems(task.n_test, "test", **kw), []
        except ValueError as e:  # more problems asked for than the knobs make
            raise DataError(f"--n-train {task.n_train} (+ {heldout} held out) / --n-test {task.n_test}: {e}; "
                            "ask for fewer, or change --arith-operands, --arith-digits, --arith-ops or "
                            "--arith-test-every") from None
    elif not task.test_file or (not task.train_file and (train or task.task == "math")):
        needs = "--train-file and --test-file" if train else "--test-file (and --train-file, for MATH's 4 shots)"
        raise DataError(f"--task {task.task} needs {needs} (JSONL or Parquet, the published format)")
    else:
        train_examples = load_examples(task.task, task.train_file) if task.train_file else []
        heldout = heldout if train_examples else 0
        test = load_examples(task.task, task.test_file)[:task.n_test or None]
        shots = []
        if task.task == "math":
            shots, train_examples = train_examples[:MATH_SHOTS], train_examples[MATH_SHOTS:]
    if heldout and heldout >= len(train_examples):
        raise DataError(f"--heldout-questions {heldout} leaves no training questions of {len(train_examples)}")
    held = set(random.Random(f"{seed}-heldout-questions").sample(range(len(train_examples)), heldout))
    rest = [ex for i, ex in enumerate(train_examples) if i not in held]
    return rest[:task.n_train or None], test, shots, [train_examples[i] for i in sorted(held)]
