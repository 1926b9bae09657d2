"""Step 2 of Iterative RPO (arXiv 2404.19733v3, Sec. 2), the reward: r = 1 if the final answer extracted from a
completion equals the gold answer after normalisation, else 0. The chain of thought itself is never judged.

    extract_answer      the final answer of a completion: its "Final answer:" line, else "####", the last \\boxed{},
                        and (GSM8K, arith) the last number
    completion_end      where a completion ends: after its final-answer line, or where it starts a new "Question:"
    judge               (extracted answer, r) of a completion against the gold answer: the reward of the training
                        samples and the score of the test answers
    answers_match, same_answer   equality after each task's normalisation (numbers, MATH notation, ARC labels)
    majority            maj@k: the most common answer, equal answers grouped
    flexible_extract    lm-evaluation-harness' second GSM8K score (the last number-like span), to compare with it

Standard library only (math-verify where it is asked for), so it imports in a blink.
"""
import re
from fractions import Fraction

TASKS = ("arith", "gsm8k", "arc", "math")
NUMERIC_TASKS = ("arith", "gsm8k")

# Model text is untrusted: every parse below works on bounded slices, so a 1 MB completion costs milliseconds.
MAX_ANSWER_CHARS = 1000  # the span after "Final answer:" / "####" / inside \boxed{} that is looked at
TAIL_CHARS = 4000  # the end of a completion searched by the fallbacks (last \boxed{}, last number)
MAX_NUMBER_DIGITS = 60  # longer numerals are compared as strings, never converted


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


def majority(answers: list, task: str, choices: list | None = None, grader: str = "builtin"):
    """The most common extracted answer (maj@k), grouping the answers that `same_answer` finds equal (the task's
    normalisation, either way round, with the run's grader); ties go to the answer seen first."""
    groups = []  # [representative, count]
    for a in answers:
        if a is None:
            continue
        for g in groups:
            if same_answer(a, g[0], task, choices, grader):
                g[1] += 1
                break
        else:
            groups.append([a, 1])
    return max(groups, key=lambda g: g[1])[0] if groups else None
