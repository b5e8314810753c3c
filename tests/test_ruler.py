"""RULER-style generators: the context holds the answer, the scorer takes it and rejects others (byte tokenizer)."""
import re
from collections import Counter

import pytest
from test_eval import byte_tokenizer

from holokv.eval import ruler
from holokv.eval.tasks import match_all


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def generate(tok, task, length=1200, seed=0):
    return ruler.prompts(tok, [task], [length], 1, seed)[0]


@pytest.mark.parametrize("task", ruler.TASKS)
def test_context_holds_the_answers_and_the_scorer_knows_them(tok, task):
    prompt = generate(tok, task)
    text, answers = tok.decode(prompt.context), prompt.info["answers"]
    assert 1150 <= len(prompt.context) <= 1200 and prompt.info["task"] == task
    assert all(a in text for a in answers) and answers
    assert prompt.score(" " + ", ".join(answers)) == 1.0
    assert prompt.score(" 1234567, QWERT, nothing") == 0.0
    assert prompt.score(" " + answers[0]) == pytest.approx(1 / len(answers))
    assert generate(tok, task).context == prompt.context  # seeded
    assert generate(tok, task, seed="tune:0").context != prompt.context


def test_needles_and_distractors(tok):
    def needles(task):  # the prompt and its (key, value) needles
        prompt = generate(tok, task)
        return prompt, re.findall(r"numbers for (\S+) is: (\d{7})\.", tok.decode(prompt.context))

    single, found = needles("single")
    assert [v for _, v in found] == single.info["answers"] and found[0][0] in tok.decode(single.question)
    multikey, found = needles("multikey")  # four keys, three of them distractors
    asked = [k for k, _ in found if k in tok.decode(multikey.question)]
    assert len({k for k, _ in found}) == 4 and len(asked) == 1 and dict(found)[asked[0]] == multikey.info["answers"][0]
    multivalue, found = needles("multivalue")  # one key, four values, all asked
    assert len({k for k, _ in found}) == 1 and sorted(v for _, v in found) == sorted(multivalue.info["answers"])


def test_variable_chain_in_order(tok):
    prompt = generate(tok, "vt")
    text = tok.decode(prompt.context)
    first, *rest = prompt.info["answers"]
    value = re.search(rf"VAR {first} = (\d+)\.", text).group(1)
    assert value in tok.decode(prompt.question)
    positions = [text.index(f"VAR {b} = VAR {a}.") for a, b in zip(prompt.info["answers"], rest)]
    assert positions == sorted(positions) and text.index(f"VAR {first} =") < positions[0]


def test_common_words_are_the_most_frequent(tok):
    prompt = generate(tok, "cwe")
    counts = Counter(re.findall(r"\d+\. (\w+)", tok.decode(prompt.context)))
    assert {w for w, _ in counts.most_common(10)} == set(prompt.info["answers"])
    assert set(counts[w] for w in prompt.info["answers"]) == {6} and max(
        c for w, c in counts.items() if w not in prompt.info["answers"]) == 1


def test_match_all():
    assert match_all(["12", "AB"], "ab and 12") == 1.0 and match_all(["12", "AB"], "13") == 0.0


@pytest.mark.parametrize("task", ruler.TASKS)
def test_too_short(tok, task):
    with pytest.raises(ValueError, match="too short"):
        generate(tok, task, length=40)
