"""Tasks, prompts, answer extraction, rewards and loaders for Iterative RPO (arXiv 2404.19733v3) and sDPO.

Standard library only, so it imports in a blink. An example is a dict:
    {"id": str, "task": str, "question": str, "answer": str (the gold final answer), "solution": str | None}
ARC examples also carry "choices": [(label, text), ...].

The reward of Sec. 2 of the paper: r = 1 if the final answer extracted from a completion equals the gold answer
after normalisation, else 0. The chain of thought itself is never judged.
"""
import hashlib
import json
import os
import random
import re
from fractions import Fraction

TASKS = ("arith", "gsm8k", "arc", "math")
NUMERIC_TASKS = ("arith", "gsm8k")

# Model text is untrusted: every parse below works on bounded slices, so a 1 MB completion costs milliseconds.
MAX_ANSWER_CHARS = 1000  # the span after "Final answer:" / "####" / inside \boxed{} that is looked at
TAIL_CHARS = 4000  # the end of a completion searched by the fallbacks (last \boxed{}, last number)
MAX_NUMBER_DIGITS = 60  # longer numerals are compared as strings, never converted


class DataError(ValueError):
    """Bad input: the message is one line naming the file, the line and the problem."""


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
                lines = f.read().decode("utf-8").split("\n")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not a UTF-8 text file of JSON lines (byte {e.start}); a Parquet file's name "
                            "ends in .parquet") from None
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


# ---------------------------------------------------------------------------------------------------------------
# Answer extraction and the exact-match reward

FINAL_RE = re.compile(r"final answer\s*(?:is)?\s*[:：]", re.IGNORECASE)
NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+)?|-?\.\d+")
# ARC labels are capital letters or digits: "B", "(B)", "B)", "B.", "answer is B". A capital letter that starts a
# sentence ("A mouse runs ...") is no label, nor is "a" in "answer is a dog".
# A label may be followed by a remark: "B (because ...)", "B = sunlight", "B since ...".
LABEL_RE = re.compile(r"^[\s*_\"'\[]*(?:\(\s*([A-Z]|\d{1,2})\s*\)|([A-Z]|\d{1,2})(?:\s*(?:[).:,;-]|$)|"
                      r"\s+(?=[(\[=]|(?:because|since|as)\b)))")
# A remark after a MATH answer or an ARC choice's text: in brackets starting with "=" or a word ("(= 5 x 4)",
# "(since ...)"), a new sentence, or a reason ("because ...").
MATH_REMARK_RE = re.compile(r"\s+\((?:=|[A-Za-z]{2,}\s)|\.\s+[A-Z]|,?\s+(?:because|since|which|where)\s")
ANSWER_IS_RE = re.compile(r"(?i:answer\s+is)\s*:?\s*\(?\s*([A-Z]|\d{1,2})\s*\)?(?![A-Za-z0-9])")


def last_boxed(text: str, limit: int = TAIL_CHARS) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}) in the last `limit` characters; braces may nest."""
    text = text[-limit:]
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = start + (6 if text.startswith("\\boxed", start) else 5)
    if i < len(text) and text[i] == " ":  # \boxed 5
        return text[i + 1:].split("$")[0].split()[0] if text[i + 1:].strip() else None
    if i >= len(text) or text[i] != "{":
        return None
    depth = 0
    for j in range(i, min(len(text), i + MAX_ANSWER_CHARS)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None


def _first_line(text: str) -> str:
    return text[:MAX_ANSWER_CHARS].strip().split("\n", 1)[0].strip()


def extract_answer(completion: str, task: str) -> str | None:
    """The final answer of a completion, as a raw string, or None.

    Order: the paper's "Final answer: ..." (its first occurrence: a small model may go on with new questions
    after it), then "#### ...", then the last \\boxed{...}, then, for ARC, "answer is B", and, for numeric tasks,
    the last number. After "Final answer:" a \\boxed{} on that line wins (MATH asks for both).
    """
    match = FINAL_RE.search(completion)
    if match:
        span = _first_line(completion[match.end():])
        return last_boxed(span) or span
    hashes = completion.find("####")
    if hashes >= 0:
        return _first_line(completion[hashes + 4:])
    boxed = last_boxed(completion)
    if boxed is not None:
        return boxed
    tail = completion[-TAIL_CHARS:]
    if task == "arc":
        found = ANSWER_IS_RE.findall(tail)
        return found[-1] if found else None
    if task in NUMERIC_TASKS:
        numbers = NUMBER_RE.findall(tail)
        return numbers[-1] if numbers else None
    return None


ANSWER_LINE_RE = re.compile(r"\s*\S[^\n]*\n")
NEW_QUESTION_RE = re.compile(r"\n\s*Question\s*:")


def completion_end(text: str) -> int | None:
    """Where a completion ends, once it has: at the newline that closes its "Final answer: ..." line, or where the
    model starts a new "Question:" of its own (it imitates the prompt's, and MATH's shots); else None. Sampling stops
    there: what a model writes after that is neither judged nor paid for."""
    match = FINAL_RE.search(text)
    line = ANSWER_LINE_RE.match(text, match.end()) if match else None
    question = NEW_QUESTION_RE.search(text)
    ends = [i for i in (line.end() - 1 if line else None, question.start() if question else None) if i is not None]
    return min(ends) if ends else None


# A remark after a numeric answer starts at one of these, after the answer's first digit: a bracket ("20 (= 5 x 4)"),
# a sentence's end ("20. Tom has ..."; a decimal point has no space after it), a comma and a space (thousands
# separators have none), or a word that starts a reason ("20 because ...").
NUMERIC_REMARK_RE = re.compile(r"\s*[(\[]|[.;!?](?=\s|$)|,(?=\s)|\s+(?:because|since|as|which|so|from|by)\b",
                               re.IGNORECASE)
NOT_BARE_RE = re.compile(r"[\d+\-*/×÷^]|\bx\b")  # another number or an operation beside a number


def numeric_answer(answer: str) -> str:
    """The part of a numeric answer that states its value: the text before a remark (`NUMERIC_REMARK_RE`), and of
    "a = b = ..." the last side that is a number alone, with its unit if any: "3 + 4 = 7" → "7", "20 = 5 x 4" →
    "20", "x = 7 apples" → "7 apples". One candidate only, so writing several values never earns a reward."""
    text = answer[:MAX_ANSWER_CHARS]
    digit = re.search(r"\d", text)
    remark = NUMERIC_REMARK_RE.search(text, digit.end()) if digit else None
    sides = (text[:remark.start()] if remark else text).split("=")
    bare = [side for side in sides if (m := NUMBER_RE.search(side)) and
            not NOT_BARE_RE.search(side[:m.start()] + side[m.end():])]
    return (bare or sides)[-1]


def parse_number(text: str) -> Fraction | None:
    """The first number in `text` as an exact Fraction: commas, `$`, `%` and units dropped, "72.0" = 72,
    "1/2" = 0.5. Numbers of more than MAX_NUMBER_DIGITS digits are not converted (returns None)."""
    match = NUMBER_RE.search(text[:MAX_ANSWER_CHARS])
    if not match:
        return None
    numeral = match.group().replace(",", "").replace(" ", "")
    if sum(c.isdigit() for c in numeral) > MAX_NUMBER_DIGITS:
        return None
    try:
        return Fraction(numeral)
    except (ValueError, ZeroDivisionError):
        return None


def normalize_math(answer: str) -> str:
    """The usual string normalisation of MATH answers (after Hendrycks et al.'s `is_equiv`), before comparing.
    A word answer keeps its word (`\text{Evelyn}` → `Evelyn`); only a unit after a number is dropped."""
    s = answer[:MAX_ANSWER_CHARS].strip().rstrip(".").strip().strip("$").strip()
    s = s.replace("\n", "").replace("\\!", "").replace("\\left", "").replace("\\right", "")
    s = s.replace("dfrac", "frac").replace("tfrac", "frac").replace("\\$", "").replace("$", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("\\%", "").replace("%", "")
    s = re.sub(r"(?<=[\d}])\s*\\(?:text|mbox|mathrm)\{\s*[a-zA-Z ]*\}(?:\^\{?\d\}?)?\s*$", "", s)  # 5 \text{ cm}
    s = re.sub(r"(?<=\d)\s+[a-zA-Z]{2,}(?:\s+[a-zA-Z]{2,})*$", "", s)  # a unit in plain words: 20 apples, 5 cm
    s = re.sub(r"\\(?:text|textbf|mbox|mathrm)\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"^[a-zA-Z]\s*=", "", s)  # a leading "x ="
    s = s.replace(" ", "").rstrip(".")
    s = re.sub(r"^\(([A-Z])\)$", r"\1", s)  # the multiple-choice answer (C) → C
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)  # \frac12 -> \frac{1}{2}
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)  # \sqrt2 -> \sqrt{2}
    s = re.sub(r"(^|[^\d])\.(\d)", r"\g<1>0.\2", s)  # .5 -> 0.5
    return s


def _math_value(s: str) -> Fraction | None:
    """The exact value of a normalised answer that is a plain number: an integer, a decimal, 1,000 with thousands
    separators, a/b, or \frac{a}{b} with its sign in front or on the numerator."""
    m = re.fullmatch(r"(-?)\\frac\{(-?\d{1,30})\}\{(\d{1,30})\}", s) or re.fullmatch(r"(-?)(\d{1,30})/(\d{1,30})", s)
    if m:
        return Fraction(int(m.group(2)), int(m.group(3))) * (-1 if m.group(1) else 1) if int(m.group(3)) else None
    if re.fullmatch(r"-?(?:\d{1,3}(?:,\d{3})+|\d{1,30})(?:\.\d{1,30})?", s):
        return Fraction(s.replace(",", ""))
    return None


MAX_LIST_ITEMS = 20  # longer comma lists are compared as strings only, so a hostile answer costs no more
GRADERS = ("builtin", "math-verify")
# math-verify parses with sympy: a new 10-deep \frac (20 braces) took it 0.37 s, a 6-deep one 0.26 s, a 100-deep one a
# second. MATH-500's golds hold at most 53 characters and 4 braces.
MATH_VERIFY_MAX_CHARS, MATH_VERIFY_MAX_BRACES = 200, 8


def math_verify_equal(predicted: str, gold: str) -> bool:
    """Hugging Face's math-verify (pip install math-verify), which also knows algebraic equivalence (2(k+1) = 2k+2,
    3√2 = √18), for answers short and shallow enough to parse quickly; False for the rest. It is given the answer
    without its remark (`_math_head`): on "5 (= 4)" against the gold 4, math-verify alone says equal."""
    from math_verify import parse, verify

    answer = _math_head(predicted, gold)[:MATH_VERIFY_MAX_CHARS + 1].strip().rstrip(".").strip().strip("$")
    if len(answer) > MATH_VERIFY_MAX_CHARS or answer.count("{") > MATH_VERIFY_MAX_BRACES or not answer:
        return False
    return bool(verify(parse(f"${gold}$"), parse(f"${answer}$")))


def _top_level_sides(answer: str) -> list[str]:
    """`answer` split at each "=" outside braces, brackets and parentheses."""
    sides, depth, start = [], 0, 0
    for i, c in enumerate(answer):
        depth += (c in "{[(") - (c in "}])")
        if c == "=" and depth == 0:
            sides.append(answer[start:i])
            start = i + 1
    return sides + [answer[start:]]


def _math_head(predicted: str, gold: str) -> str:
    """The part of a MATH answer that is its value, where a remark follows it: the text before a remark in brackets
    ("20 (= 5 x 4)", "5 (since ...)"), a sentence ("5. This is ...") or "because ..."; then, unless the gold is an
    equation, of "a = b" the last side that is a plain number ("2 + 3 = 5" → 5, "20 = 5 \times 4" → 20), else the
    last side. One candidate only, so an answer that writes several values is judged on one of them."""
    text = predicted[:MAX_ANSWER_CHARS].strip()
    remark = MATH_REMARK_RE.search(text, 1)
    text = text[:remark.start()] if remark else text
    number = re.match(r"([^(]*?\S)\s+\(", text)  # "20 (5 x 4)": brackets after a plain number; not "(0,9) \cup (9,36)"
    if number and _math_value(normalize_math(number.group(1))) is not None:
        text = number.group(1)
    if len(_top_level_sides(gold)) > 1:
        return text
    sides = _top_level_sides(text)
    valued = [s for s in sides if _math_value(normalize_math(s)) is not None]
    return (valued or sides)[-1]


def _math_equal(a: str, b: str) -> bool:
    """Two normalised MATH answers are equal: the same string, or the same exact number."""
    if not a or not b:
        return False  # an empty answer is never right, whatever the gold normalises to
    if a == b:
        return True
    va, vb = _math_value(a), _math_value(b)
    return va is not None and va == vb


def _math_match(predicted: str, gold: str) -> bool:
    """Equal as written, or once the remark after the answer is dropped (`_math_head`)."""
    head = _math_head(predicted, gold)
    return _math_match_normalized(predicted, gold) or (head != predicted and _math_match_normalized(head, gold))


def _math_match_normalized(predicted: str, gold: str) -> bool:
    a, b = normalize_math(predicted), normalize_math(gold)
    if _math_equal(a, b):
        return True
    # A list of solutions without brackets ("1,-2") is unordered; tuples and intervals keep their brackets and order.
    items_a, items_b = a.split(","), b.split(",")
    if len(items_b) < 2 or len(items_a) != len(items_b) or len(items_b) > MAX_LIST_ITEMS or a[0] in "([{" or \
            b[0] in "([{" or _math_value(a) is not None or _math_value(b) is not None:
        return False
    rest = list(items_a)
    for item in items_b:
        found = next((i for i, x in enumerate(rest) if _math_equal(x, item)), None)
        if found is None:
            return False
        rest.pop(found)
    return True


def _words(text: str) -> str:
    """A choice's text for comparing: punctuation dropped but for signs and decimal points."""
    return " ".join(re.sub(r"[^A-Za-z0-9+\-.]+", " ", text).split()).strip(" .")


def _arc_label(answer: str, choices: list | None = None) -> str | None:
    """The label an ARC answer names: "answer is B", a label alone or in brackets, or, given the question's
    choices, the text of exactly one of them (after a label in brackets, if any)."""
    answer = answer[:MAX_ANSWER_CHARS]
    labels = [label for label, _ in choices or []]
    match = LABEL_RE.match(answer)
    for named in (ANSWER_IS_RE.findall(answer)[-1:] or [None])[0], match and (match.group(1) or match.group(2)):
        if named and (not labels or named.upper() in labels):  # "13" is a choice's text where the labels are A-D
            return named.upper()
    # The whole answer, what follows "answer is", then the answer without its remark ("sunlight (because ...)"), cut
    # at the last remark first: a choice's own text may hold "because" or brackets.
    heads = [answer[:m.start()] for m in reversed(list(MATH_REMARK_RE.finditer(answer, 1)))]
    for said in dict.fromkeys([answer, re.split(r"(?i)answer\s+is\s*:?", answer)[-1]] + heads):
        said = _words(said)
        for fold in (lambda t: t, str.lower):  # case first: "Rr" and "RR" are different genotypes
            named = [label for label, text in choices or [] if said and fold(_words(text)) == fold(said)]
            if len(named) == 1:
                return named[0]
    return None


def answers_match(predicted: str | None, gold: str, task: str, choices: list | None = None,
                  grader: str = "builtin") -> bool:
    """Whether an extracted answer equals the gold one after the task's normalisation (ARC: given the question's
    `choices`, the text of a choice counts as that choice; MATH with grader "math-verify": equal by either
    the built-in normalisation or math-verify)."""
    if predicted is None:
        return False
    if task == "arc":
        return _arc_label(predicted, choices) == gold.strip().upper()
    if task in NUMERIC_TASKS:
        predicted, gold = numeric_answer(predicted), numeric_answer(gold)
        value, gold_value = parse_number(predicted), parse_number(gold)
        if value is None or gold_value is None:
            return predicted.strip() == gold.strip()
        return value == gold_value
    return _math_match(predicted, gold) or (grader == "math-verify" and math_verify_equal(predicted, gold))


def same_answer(a: str | None, b: str | None, task: str, choices: list | None = None, grader: str = "builtin") -> bool:
    """Whether two extracted answers say the same (majority voting): `answers_match` either way round, since it
    reads its first argument as a model's answer and its second as a gold one."""
    if a is None or b is None:
        return False
    return a == b or answers_match(a, b, task, choices, grader) or answers_match(b, a, task, choices, grader)


# lm-evaluation-harness' GSM8K scores (lm_eval/tasks/gsm8k/gsm8k.yaml, version 3.0), for setting ours beside
# published ones: "flexible-extract" takes the last match of this pattern in the completion (its first non-empty
# group), "[invalid]" if none, and exact_match compares it with the gold after removing these patterns from both,
# case folded. Its "strict-match" reads "#### <number>"; ours reads the paper's "Final answer:" line (`judge`).
FLEXIBLE_RE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
LM_EVAL_IGNORE = (",", r"\$", r"(?s).*#### ", r"\.$")


def flexible_extract(completion: str) -> str:
    """lm-evaluation-harness' flexible-extract of a completion: its last number-like span, or "[invalid]"."""
    found = FLEXIBLE_RE.findall(completion[-TAIL_CHARS:])
    return next(group for group in found[-1] if group).strip() if found else "[invalid]"


def lm_eval_exact_match(prediction: str, gold: str) -> int:
    """lm-evaluation-harness' exact_match with GSM8K's settings: 1 if equal once the ignored patterns are removed."""
    def clean(text):
        for pattern in LM_EVAL_IGNORE:
            text = re.sub(pattern, "", text)
        return text.lower()

    return int(clean(prediction) == clean(gold))


def judge(completion: str, gold: str, task: str, choices: list | None = None, truncated: bool = False,
          grader: str = "builtin") -> tuple[str | None, int]:
    """(the extracted final answer, r): r = 1 if the completion's final answer equals the gold answer after
    normalisation, else 0 (Sec. 2). The reward of the training samples and the score of the test answers. For ARC,
    given the question's `choices`, the answer is the label it names (a choice's text names that choice).
    A `truncated` completion, cut off at the token limit before it ended, gave no final answer: r = 0, whatever
    its last number (it is recorded, not rewarded). `grader`: see `answers_match`."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {TASKS}")
    answer = extract_answer(completion, task)
    if task == "arc" and answer is not None:
        answer = _arc_label(answer, choices) or answer
    return answer, int(not truncated and answers_match(answer, gold, task, choices, grader))


def exact_match_reward(completion: str, gold: str, task: str, choices: list | None = None) -> int:
    """r alone: 1 if the completion's final answer equals the gold answer after normalisation, else 0."""
    return judge(completion, gold, task, choices)[1]
