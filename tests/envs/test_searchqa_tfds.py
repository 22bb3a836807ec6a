"""SearchQA's ``tfds:<name>@<split>`` question source on TFDS's own mock data: no download.

Optional: skipped where tensorflow-datasets is not installed (it pulls TensorFlow, so it is not
in the test extra; ``pip install -e '.[test,tfds]'`` runs it).
"""

import pytest

tfds = pytest.importorskip("tensorflow_datasets")

import envs  # noqa: E402  (after the optional import)
from envs import searchqa  # noqa: E402
from envs.searchqa import TFDS_FIELDS, SearchQAEnv  # noqa: E402

N = 10


@pytest.fixture(autouse=True)
def fresh_question_cache():
    # Questions are cached per source: mock data must not leak into (or come from) other tests.
    searchqa._load_questions.cache_clear()
    yield
    searchqa._load_questions.cache_clear()


@pytest.mark.parametrize("name", sorted(TFDS_FIELDS))
def test_tfds_source_reads_questions_and_answers(name):
    source = f"tfds:{name}@validation"
    with tfds.testing.mock_data(num_examples=N):
        env = SearchQAEnv(questions=source)
        test = envs.task_ids("searchqa", "test", questions=source)
        train = envs.task_ids("searchqa", "train", questions=source)
    assert len(env.questions) == N
    assert sorted(test + train) == list(range(N)) and test == [0, 5]
    for q in env.questions:
        assert isinstance(q["question"], str)
        assert q["answers"] and all(isinstance(a, str) for a in q["answers"])
    assert env.reset(0) == f"Question: {env.questions[0]['question'].strip()}"
    gold = env.questions[0]["answers"][0]
    res = env.step(f"<think>known</think>\n<answer>{gold}</answer>")
    assert res.done and res.reward == 1.0 and res.info["success"]


def test_tfds_source_without_split_reads_validation():
    with tfds.testing.mock_data(num_examples=3):
        assert len(SearchQAEnv(questions="tfds:natural_questions_open").questions) == 3
