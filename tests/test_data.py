"""data.py: every extraction rule on realistic completions, the normalisations, the loaders and their errors."""
import json
import os
import time

import pytest

import data
import reward
from data import DataError, arith_problems, build_prompt, load_examples
from reward import extract_answer


# --- extraction and reward -------------------------------------------------------------------------------------

@pytest.mark.parametrize("completion, gold, want", [
    # the paper's format
    ("Tom has 3 apples and buys 4 more, so 3 + 4 = 7.\nFinal answer: 7", "7", 1),
    ("3 + 4 = 7\nFinal answer: 8", "7", 0),
    # "Final answer:" followed by more text: a small model rambling on with a new question
    ("3 + 4 = 7.\nFinal answer: 7\n\nQuestion: Ann has 2 pens... Final answer: 12", "7", 1),
    ("Final answer: 7 apples. Tom started with 3 apples.", "7", 1),
    ("Final answer: 3 + 4 = 7", "7", 1),
    ("final answer is: 7", "7", 1),
    # numeric normalisation
    ("Final answer: $1,234", "1234", 1),
    ("Final answer: 72.0", "72", 1),
    ("Final answer: 72.50 dollars", "72.5", 1),
    ("Final answer: 1/2", "0.5", 1),
    ("Final answer: 50%", "50", 1),
    ("Final answer: -3", "-3", 1),
    ("Final answer: -3", "3", 0),
    ("Final answer: 18 cups of flour.", "18", 1),
    # GSM8K's own format
    ("Natalia sold 48/2 = 24 clips in May.\n48 + 24 = 72\n#### 72", "72", 1),
    # last \boxed{}
    ("So the total is \\boxed{72} apples.", "72", 1),
    # last number fallback, several numbers
    ("Tom has 3 apples. He buys 4 more. 3 + 4 = 7. So Tom has 7 apples.", "7", 1),
    ("Tom has 3 apples. He buys 4 more, so now he has 3 apples and 4 apples.", "7", 0),
    ("I don't know.", "7", 0),
    ("", "7", 0),
])
def test_numeric_reward(completion, gold, want):
    assert reward.judge(completion, gold, "gsm8k")[1] == want
    assert reward.judge(completion, gold, "arith")[1] == want


@pytest.mark.parametrize("completion, gold, want", [
    ("Plants make food by photosynthesis.\nFinal answer: B", "B", 1),
    ("Final answer: (B)", "B", 1),
    ("Final answer: B) sunlight", "B", 1),
    ("Final answer: (C) water", "B", 0),
    ("Final answer: The answer is B.", "B", 1),
    ("Sunlight is the source, so the answer is (B).", "B", 1),
    ("The answer is B because plants need light. Option A is wrong.", "B", 1),
    ("Final answer: 2", "2", 1),  # digit labels
    ("Final answer: (3)", "2", 0),
    ("Final answer: Paris", "B", 0),
    ("Final answer: a plant needs light", "A", 0),  # "a" is a word, not a label
])
def test_arc_reward(completion, gold, want):
    assert reward.judge(completion, gold, "arc")[1] == want


@pytest.mark.parametrize("completion, gold, want", [
    ("We get $x = \\frac{1}{2}$, so \\boxed{\\frac{1}{2}}.\nFinal answer: \\boxed{\\frac{1}{2}}", "\\frac{1}{2}", 1),
    ("Final answer: $\\dfrac{1}{2}$", "\\frac12", 1),
    ("Final answer: 0.5", "\\frac{1}{2}", 1),
    ("Final answer: \\boxed{90^\\circ}", "90", 1),
    ("Final answer: 5 \\text{ cm}", "5", 1),
    ("Final answer: x = 3", "3", 1),
    ("Final answer: \\left( 1, 2 \\right)", "(1,2)", 1),
    ("Final answer: \\sqrt2", "\\sqrt{2}", 1),
    ("the area is \\boxed{\\frac{\\sqrt{3}}{4}} square units", "\\frac{\\sqrt{3}}{4}", 1),
    ("Final answer: \\boxed{\\frac{1}{3}}", "\\frac{1}{2}", 0),
    ("The answer is 12.", "12", 0),  # MATH has no last-number fallback: the format is asked for
])
def test_math_reward(completion, gold, want):
    assert reward.judge(completion, gold, "math")[1] == want


def test_last_boxed_nested_braces():
    assert reward.last_boxed("a \\boxed{1} then \\boxed{\\frac{a^{2}}{b}} end") == "\\frac{a^{2}}{b}"
    assert reward.last_boxed("\\boxed{unclosed") is None
    assert reward.last_boxed("no box") is None


def test_extract_answer_alone():
    assert extract_answer("blah\nFinal answer: 42\nmore", "gsm8k") == "42"
    assert extract_answer("nothing here", "math") is None


def test_huge_inputs_are_fast():
    cases = [("word " * 200_000 + "Final answer: 7", "7"), ("1" * 10_000, "7"), ("7 " * 500_000, "7"),
             ("Final answer: " + "9" * 10_000, "9" * 10_000), ("\\boxed{" * 100_000, "7"), ("{" * 1_000_000, "7")]
    for task in ("gsm8k", "arc", "math"):
        for completion, gold in cases:
            start = time.perf_counter()
            reward.judge(completion, gold, task)[1]
            assert time.perf_counter() - start < 0.5, (task, completion[:20])


def test_unknown_task():
    with pytest.raises(ValueError):
        reward.judge("Final answer: 1", "1", "gsm9k")[1]


# --- the built-in arithmetic task -------------------------------------------------------------------------------

def test_arith_deterministic_disjoint_and_exact():
    a = arith_problems(100, "train", seed=3, operands=3, ops="+-*")
    assert a == arith_problems(100, "train", seed=3, operands=3, ops="+-*")
    assert a != arith_problems(100, "train", seed=4, operands=3, ops="+-*")
    test = arith_problems(100, "test", seed=4, operands=3, ops="+-*")
    assert not {p["question"] for p in a} & {p["question"] for p in test}
    for p in a + test:
        numbers = [int(w) for w in p["question"].replace(".", " ").split() if w.isdigit()]
        assert reward.judge(data.gold_solution(p), p["answer"], "arith")[1] == 1
        assert int(p["answer"]) >= 0 and len(numbers) == 3


def test_arith_splits_disjoint_as_expressions_across_seeds():
    train = {p["solution"] for s in range(5) for p in arith_problems(60, "train", seed=s)}
    test = {p["solution"] for s in range(5) for p in arith_problems(20, "test", seed=s)}
    assert not train & test


def test_arith_test_every_sets_the_share_of_expressions_and_keeps_splits_disjoint():
    kw = dict(operands=2, digits=1, ops="+-*", test_every=2)
    train, test = arith_problems(87, "train", **kw), arith_problems(120, "test", **kw)  # all 207 expressions
    assert not {p["solution"] for p in train} & {p["solution"] for p in test}
    with pytest.raises(ValueError, match="only 120 distinct test problems"):
        arith_problems(121, "test", **kw)
    with pytest.raises(ValueError, match="only 25 distinct test problems"):  # one in 5, + and − alone
        arith_problems(26, "test", operands=2, digits=1, ops="+-", test_every=5)


def test_arith_too_many_asked():
    with pytest.raises(ValueError, match="distinct"):
        arith_problems(1000, "train", operands=1)


def test_prompts_follow_the_paper():
    p = build_prompt({"task": "gsm8k", "question": "What is 2+2?"})
    assert p.startswith("Your task is to answer the question below. Give step by step reasoning")
    assert '"Final answer: ..."' in p and p.endswith("Question: What is 2+2?\n\nSolution:")
    arc = build_prompt({"task": "arc", "question": "Q?", "choices": [("A", "x"), ("B", "y")]})
    assert "(insert letter here)" in arc and "Q?\n(A) x\n(B) y\n\nSolution:" in arc
    shots = [{"question": f"q{i}", "solution": f"s{i} \\boxed{{{i}}}", "answer": str(i)} for i in range(4)]
    math = build_prompt({"task": "math", "question": "last?"}, shots)
    assert math.startswith("Your task is to answer the last question below.") and "\\boxed" in math
    assert math.count("Question:") == 5 and math.endswith("Question: last?\n\nSolution:")
    # every shot ends with the "Final answer:" line that the prompt asks for, and sampling waits for
    assert "Solution: s0 \\boxed{0}\nFinal answer: 0\n\nQuestion: q1" in math


@pytest.mark.parametrize("text, end", [
    ("3 + 4 = 7.\nFinal answer: 7\nQuestion: next", len("3 + 4 = 7.\nFinal answer: 7")),
    ("3 + 4 = 7.\nFinal answer: 7", None),  # the answer line is not complete yet
    ("3 + 4 = 7.\n\nQuestion: Ann has 2 pens", len("3 + 4 = 7.")),  # the model starts a question of its own
    ("so the question: is it 7?", None),
])
def test_a_completion_ends_after_its_answer_line_or_before_a_new_question(text, end):
    assert reward.completion_end(text) == end


# --- loaders and bad input --------------------------------------------------------------------------------------

def write(tmp_path, name, lines):
    path = tmp_path / name
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


def test_load_gsm8k(tmp_path):
    path = write(tmp_path, "g.jsonl", [{"question": "Q", "answer": "48/2 = <<48/2=24>>24\n#### 1,024"}])
    (ex,) = load_examples("gsm8k", path)
    assert ex["answer"] == "1024" and ex["solution"] == "48/2 = 24" and ex["task"] == "gsm8k"


def test_load_arc_letters_and_digits(tmp_path):
    path = write(tmp_path, "a.jsonl", [
        {"id": "x", "question": "Q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "B"},
        {"question": "Q", "choices": {"text": ["a", "b", "c"], "label": ["1", "2", "3"]}, "answerKey": "3"}])
    a, b = load_examples("arc", path)
    assert a["answer"] == "B" and a["id"] == "x" and b["choices"][2] == ("3", "c")
    assert "(3) c" in build_prompt(b)


def test_load_math_nested_boxed(tmp_path):
    path = write(tmp_path, "m.jsonl", [{"problem": "P", "solution": "so \\boxed{2} no, \\boxed{\\frac{1}{2}}."}])
    assert load_examples("math", path)[0]["answer"] == "\\frac{1}{2}"


def test_load_preferences_both_layouts(tmp_path):
    path = write(tmp_path, "p.jsonl", [
        {"prompt": "P", "chosen": "good", "rejected": "bad"},
        {"prompt": [{"role": "user", "content": "P"}], "chosen": [{"role": "assistant", "content": "good"}],
         "rejected": [{"role": "assistant", "content": "bad"}]}])
    a, b = data.load_preferences(path)
    assert a == {"prompt": "P", "chosen": "good", "rejected": "bad"}
    assert b["prompt"] == [{"role": "user", "content": "P"}] and b["chosen"] == "good" and b["rejected"] == "bad"


def test_parquet(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa
    path = str(tmp_path / "g.parquet")
    pq.write_table(pa.Table.from_pylist([{"question": "Q", "answer": "x\n#### 5"}]), path)
    assert load_examples("gsm8k", path)[0]["answer"] == "5"


@pytest.mark.parametrize("task, lines, message", [
    ("gsm8k", ['{"question": "Q", "answer": "#### 1"}', "{not json"], r"g\.jsonl:2: not valid JSON"),
    ("gsm8k", [{"question": "Q"}], r"g\.jsonl:1: missing field 'answer'"),
    ("gsm8k", [{"question": "Q", "answer": "5"}], r"g\.jsonl:1: GSM8K answer has no '#### <number>' line"),
    ("gsm8k", [{"question": "Q", "answer": "x ####  "}], r"g\.jsonl:1: nothing after '####'"),
    ("gsm8k", [], r"g\.jsonl: no records \(empty file\)"),
    ("gsm8k", ["[1, 2]"], r"g\.jsonl:1: expected a JSON object"),
    ("arc", [{"question": "Q", "choices": {"text": ["a"], "label": ["A"]}, "answerKey": "C"}], r":1: answerKey 'C'"),
    ("arc", [{"question": "Q", "choices": {"text": ["a"]}, "answerKey": "A"}], r":1: 'choices' needs"),
    ("math", [{"problem": "P", "solution": "no box"}], r":1: MATH solution has no \\boxed"),
    ("math", [{"problem": 3, "solution": "\\boxed{1}"}], r":1: field 'problem' should be str, got int"),
])
def test_bad_input_names_file_line_and_problem(tmp_path, task, lines, message):
    path = write(tmp_path, "g.jsonl", lines)
    with pytest.raises(DataError, match=message) as err:
        load_examples(task, path)
    assert "\n" not in str(err.value) and str(err.value).startswith(path)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_examples("gsm8k", str(tmp_path / "missing.jsonl"))


def test_bad_preferences(tmp_path):
    path = write(tmp_path, "p.jsonl", [{"prompt": "P", "chosen": "c", "rejected": "r"}, {"prompt": "P", "chosen": 1,
                                                                                       "rejected": "r"}])
    with pytest.raises(DataError, match=r"p\.jsonl:2: field 'chosen' should be str or list"):
        data.load_preferences(path)
    path = write(tmp_path, "q.jsonl", [{"prompt": "P", "chosen": [{"role": "user", "content": "c"}], "rejected": "r"}])
    with pytest.raises(DataError, match=r"q\.jsonl:1: the last message of 'chosen'"):
        data.load_preferences(path)


@pytest.mark.parametrize("answer, gold, want", [
    ("", "\\text{east}", 0),  # a word gold must not normalise to the empty string, which any empty answer matched
    ("\\text{west}", "\\text{east}", 0),
    ("\\boxed{\\text{odd}}", "\\text{even}", 0),
    ("Evelyn", "\\text{Evelyn}", 1),
    ("\\mbox{Evelyn}", "\\text{Evelyn}", 1),
    ("(C)", "\\text{(C)}", 1),
    ("14/3", "\\frac{14}{3}", 1),
    ("-\\frac{35}{9}", "\\frac{-35}{9}", 1),
    ("\\frac{35}{9}", "\\frac{-35}{9}", 0),
    ("-2, 1", "1,-2", 1),  # solutions listed in any order
    ("-2, 3", "1,-2", 0),
    ("1", "1,-2", 0),
    ("(2, 1)", "(1,2)", 0),  # a tuple keeps its order
    ("[1, 2)", "[1,2)", 1),
    ("1,000", "1000", 1),
    ("0.5", "\\frac{1}{2}", 1),
    ("0.33", "\\frac{1}{3}", 0),  # decimals equal fractions only where exact
    ("5.4 \\text{ cents}.", "5.4", 1),
])
def test_math_answers_equal_in_value_never_by_accident(answer, gold, want):
    assert reward.judge(f"So.\nFinal answer: {answer}", gold, "math")[1] == want


CHOICES = [("A", "a plant needs light"), ("B", "sunlight"), ("C", "A mouse runs from a coyote."), ("D", "13")]


@pytest.mark.parametrize("answer, gold, want", [
    ("A mouse runs from a coyote.", "A", 0),  # a wrong choice's text starting with "A" is that choice, not label A
    ("A mouse runs from a coyote.", "C", 1),
    ("a plant needs light", "A", 1),
    ("13", "D", 1),  # a number that is a choice's text, where the labels are letters
    ("The answer is 13.", "D", 1),
    ("(B) sunlight", "B", 1),
    ("B.", "B", 1),
    ("Sunlight", "B", 1),
])
def test_arc_answer_by_label_or_by_the_text_of_a_choice(answer, gold, want):
    assert reward.judge(f"Final answer: {answer}", gold, "arc", CHOICES)[1] == want


def test_load_arc_in_ai2_layout_with_numeric_keys(tmp_path):
    path = tmp_path / "arc.jsonl"
    path.write_text(json.dumps({"id": "q1", "question": {"stem": "Which?", "choices": [
        {"text": "ice", "label": "1"}, {"text": "steam", "label": "2"}, {"text": "water", "label": "3"}]},
        "answerKey": "3"}) + "\n")
    ex = load_examples("arc", str(path))[0]
    assert (ex["id"], ex["question"], ex["answer"], ex["choices"]) == ("q1", "Which?", "3",
                                                                      [("1", "ice"), ("2", "steam"), ("3", "water")])
    assert build_prompt(ex).count("(3) water") == 1
    assert reward.judge("Final answer: (3)", "3", "arc", ex["choices"])[1] == 1
    assert reward.judge("Final answer: water", "3", "arc", ex["choices"])[1] == 1
    path.write_text(json.dumps({"question": {"stem": "Which?", "choices": [{"label": "1"}]}, "answerKey": "1"}) + "\n")
    with pytest.raises(DataError, match=r"arc\.jsonl:1: each of 'question.choices' needs a 'label' and a 'text'"):
        load_examples("arc", str(path))


@pytest.mark.parametrize("answer, gold, want", [
    ("\\sqrt{3}/2", "\\frac{\\sqrt{3}}{2}", 1),
    ("2(k+1)", "2k+2", 1),
    ("3\\sqrt{2}", "\\sqrt{18}", 1),
    ("x = \\text{Evelyn}", "\\text{Evelyn}", 1),  # the built-in half of the union
    ("2k+1", "2k+2", 0),
    ("\\frac{\\sqrt{3}}{3}", "\\frac{1}{2}", 0),
    ("", "\\text{east}", 0),
    ("\\frac{1}{" * 10 + "2" + "}" * 10, "1", 0),  # too deep for math-verify: refused without parsing
])
def test_math_verify_grader_adds_algebraic_equivalence(answer, gold, want):
    pytest.importorskip("math_verify")
    assert reward.judge(f"So.\nFinal answer: {answer}", gold, "math")[1] == (want and answer in (
        "x = \\text{Evelyn}",))  # the built-in grader: notation only
    assert reward.judge(f"So.\nFinal answer: {answer}", gold, "math", grader="math-verify")[1] == want


# --- a right answer followed by a remark earns its reward; a wrong one never does, whatever its remark names -------

REMARKS = ["{a} (= 5 x 4)", "{a} (because 5 x 4 = {g})", "{a} (5 x 4)", "{a} = 5 x 4", "{a}. Tom has {g} apples now.",
           "{a}, because 5 x 4 = {g}", "{a} apples (since 4 x 5 = {g})", "{a} because 4 x 5 = {g}"]


@pytest.mark.parametrize("remark", REMARKS)
@pytest.mark.parametrize("task", ["gsm8k", "arith", "math"])
def test_a_remark_after_the_answer_keeps_the_reward(task, remark):
    assert reward.judge("So.\nFinal answer: " + remark.format(a="20", g="20"), "20", task)[1] == 1
    assert reward.judge("So.\nFinal answer: " + remark.format(a="21", g="20"), "20", task)[1] == 0


@pytest.mark.parametrize("answer, gold, want", [
    ("3 + 4 = 7", "7", 1), ("20 = 21", "20", 0), ("21 = 20 + 1", "20", 0), ("x = 20 apples", "20", 1),
    ("$1,234.", "1234", 1), ("72.5 dollars, not 70", "72.5", 1), ("21, not 20", "20", 0), ("1 = 2 = 3", "2", 0),
])
def test_of_several_values_one_is_judged(answer, gold, want):
    assert reward.judge(f"Final answer: {answer}", gold, "gsm8k")[1] == want


@pytest.mark.parametrize("answer, gold, want", [
    ("\\frac{1}{2} (= 0.5)", "\\frac{1}{2}", 1), ("2 + 3 = 5", "5", 1), ("20 = 5 \\times 4", "20", 1),
    ("20 = 21", "20", 0), ("\\frac{1}{2} = 0.5", "\\frac{1}{2}", 1), ("5. This is the answer.", "5", 1),
    ("0", "5x - 7y + 11z + 4 = 0", 0),  # a gold that is an equation is never read as its right-hand side
    ("5x - 7y + 11z + 4 = 0", "5x - 7y + 11z + 4 = 0", 1), ("(0,9) \\cup (9,36)", "(0,9) \\cup (9,36)", 1),
])
def test_math_remarks_and_equations(answer, gold, want):
    assert reward.judge(f"So.\nFinal answer: {answer}", gold, "math")[1] == want


@pytest.mark.parametrize("answer, want", [
    ("B (because plants need light)", 1), ("B = sunlight", 1), ("(B) (= sunlight)", 1), ("B since it shines", 1),
    ("sunlight (because plants need it)", 1), ("B. Plants need light.", 1), ("A (because of sunlight)", 0),
    ("a plant needs light (not sunlight)", 0),
])
def test_arc_remarks_after_a_label_or_a_choice(answer, want):
    assert reward.judge(f"Final answer: {answer}", "B", "arc", CHOICES)[1] == want


def test_a_remark_does_not_fool_math_verify():
    """math-verify alone reads "5 (= 4)" as equal to 4; the grader is given the answer without its remark."""
    pytest.importorskip("math_verify")
    assert reward.judge("Final answer: 5 (= 4)", "4", "math", grader="math-verify")[1] == 0
    assert reward.judge("Final answer: 4 (= 2 + 2)", "4", "math", grader="math-verify")[1] == 1


# --- majority voting (maj@k): equal answers grouped whatever their order and form ----------------------------------

def test_same_answer_is_symmetric():
    assert reward.answers_match("3 + 4 = 7", "7", "gsm8k") and reward.same_answer("7", "3 + 4 = 7", "gsm8k")
    assert reward.same_answer("x = 5", "5", "math") and reward.same_answer("5", "x = 5", "math")
    assert not reward.same_answer("7", "8", "gsm8k") and not reward.same_answer(None, "7", "gsm8k")


def test_preferences_keep_a_loser_cut_off_at_the_token_limit(tmp_path):
    path = write(tmp_path, "p.jsonl", [{"prompt": "P", "chosen": "c", "rejected": "r", "rejected_truncated": True},
                                       {"prompt": "P", "chosen": "c", "rejected": "r", "rejected_truncated": "yes"}])
    with pytest.raises(DataError, match=r"p\.jsonl:2: field 'rejected_truncated' should be true or false"):
        data.load_preferences(path)
    path = write(tmp_path, "q.jsonl", [{"prompt": "P", "chosen": "c", "rejected": "r", "rejected_truncated": True}])
    assert data.load_preferences(path)[0]["rejected_truncated"] is True


def test_the_arith_defaults_are_the_flags_defaults():
    task = data.TaskConfig()
    assert (task.arith_operands, task.arith_digits, task.arith_ops, task.arith_test_every) == \
        (data.OPERANDS, data.DIGITS, data.OPS, data.TEST_EVERY)
    assert arith_problems(5, "test") == arith_problems(5, "test", operands=task.arith_operands,
                                                       digits=task.arith_digits, ops=task.arith_ops,
                                                       test_every=task.arith_test_every)


# --- lm-evaluation-harness' GSM8K scores, to set ours beside published ones -------------------------------------

@pytest.mark.parametrize("completion, gold, extracted, right", [
    ("So 3 + 4 = 7.\nFinal answer: 7", "7", "7", 1),
    ("It costs $1,234.", "1234", "$1,234.", 1),  # "$", "," and a final "." are ignored in the comparison
    ("7.5 then 8", "8", "8", 1),  # the last match
    ("= 72.50", "72.5", "72.50", 0),  # compared as strings, as there: not equal by value
    ("Final answer: 20 (= 5 x 4)", "20", "4", 0),  # the last number, whatever it is
    ("no number at all", "5", "[invalid]", 0),
    ("-3 degrees", "-3", "-3", 1),
])
def test_flexible_extract_is_lm_evaluation_harness_rule(completion, gold, extracted, right):
    """Its regex (-?[$0-9.,]{2,})|(-?[0-9]+), the last match, first non-empty group; exact_match with ",", "\\$",
    "(?s).*#### " and "\\.$" removed from both sides, case folded (lm_eval/tasks/gsm8k/gsm8k.yaml, version 3.0)."""
    assert reward.flexible_extract(completion) == extracted
    assert reward.lm_eval_exact_match(extracted, gold) == right


# --- the preference layouts users bring, and data by name ------------------------------------------------------

def test_the_preference_layouts_of_the_sdpo_papers_data_sets(tmp_path):
    """Rows shaped as the published ones: Intel/orca_dpo_pairs (sDPO's first data set), trl-lib/ultrafeedback_binarized
    (TRL's implicit prompt), argilla/ultrafeedback-binarized-preferences-cleaned (sDPO's second)."""
    orca = write(tmp_path, "orca.jsonl", [
        {"system": "You are an AI assistant.", "question": "What is 2 + 2?", "chosen": "4.", "rejected": "5."},
        {"system": "", "question": "Name a colour.", "chosen": "Blue.", "rejected": "Seven."}])
    a, b = data.load_preferences(orca)
    assert a == {"prompt": [{"role": "system", "content": "You are an AI assistant."},
                            {"role": "user", "content": "What is 2 + 2?"}], "chosen": "4.", "rejected": "5."}
    assert b["prompt"] == [{"role": "user", "content": "Name a colour."}]  # no empty system message
    implicit = write(tmp_path, "implicit.jsonl", [{
        "chosen": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}],
        "rejected": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Go away."}],
        "score_chosen": 8.0, "score_rejected": 2.0}])
    (pair,) = data.load_preferences(implicit)
    assert pair == {"prompt": [{"role": "user", "content": "Hi?"}], "chosen": "Hello.", "rejected": "Go away."}
    argilla = write(tmp_path, "argilla.jsonl", [{
        "prompt": "Hi?", "chosen": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}],
        "rejected": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "No."}]}])
    assert data.load_preferences(argilla)[0] == {"prompt": "Hi?", "chosen": "Hello.", "rejected": "No."}
    unknown = write(tmp_path, "unknown.jsonl", [{"instruction": "Hi?", "output": "Hello."}])
    with pytest.raises(DataError, match=r"unknown\.jsonl:1: not a preference pair: looked for 'prompt', 'chosen', "
                                        r"'rejected' \(TRL's layouts\), 'question'"):
        data.load_preferences(unknown)


def test_a_data_set_folder_written_by_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"question": "Tom has 3 apples and gets 4 more. How many?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "splits"))
    for spec in (str(tmp_path / "one"), str(tmp_path / "splits") + ":train"):
        (ex,) = load_examples("gsm8k", spec)
        assert (ex["answer"], ex["solution"], ex["id"]) == ("7", "3 + 4 = 7", "gsm8k-1")
    with pytest.raises(DataError, match=r"splits: holds the splits train; name one: .*splits:train"):
        load_examples("gsm8k", str(tmp_path / "splits"))
    datasets.Dataset.from_list([{"q": "x"}]).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(DataError, match=r"bad:1: missing field 'question'"):
        load_examples("gsm8k", str(tmp_path / "bad"))


def test_a_data_set_by_name_that_cannot_be_reached_is_one_line(tmp_path):
    """Offline (HF_HUB_OFFLINE), an id that is in no cache: one line naming it, before any work."""
    pytest.importorskip("datasets")
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "rpo.py", "--model", "tiny-random", "--task", "gsm8k", "--train-file",
                           "nobody/no-such-gsm8k:main:train", "--test-file", "nobody/no-such-gsm8k:main:test", "--out",
                           str(tmp_path / "run")], cwd=root, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.startswith("rpo.py: error: nobody/no-such-gsm8k:main:train: not a file, and datasets cannot "
                                  "load it")
    assert not (tmp_path / "run").exists()
