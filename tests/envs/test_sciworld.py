"""SciWorld: needs Java 17 (skipped otherwise); the JVM costs seconds, so tests are few."""

import pytest

import envs
from envs.sciworld import games, java_version

needs_java = pytest.mark.skipif((java_version() or 0) < 17, reason="SciWorld needs Java 17+")


def test_task_table_without_jvm():
    table = games()
    assert len(table) == 4639
    keys = {g[0] for g in table}
    assert not keys & {"5-1", "5-2", "9-1", "9-2", "9-3", "10-1", "10-2"}
    assert table[0][:3] == ("1-1", "boil", 0)
    train, test = envs.task_ids("sciworld", "train"), envs.task_ids("sciworld", "test")
    assert len(train) == 2312 and len(test) == 1171 and not set(train) & set(test)


@needs_java
@pytest.mark.slow
def test_gold_walk_reaches_full_score():
    env = envs.make("sciworld", gold_path=True)
    try:
        obs = env.reset(3461)  # find-non-living-thing: a 7-step reference solution
        assert obs.startswith("Your task is to find a(n) non-living thing.")
        bad = env.step("Thought: hmm\nAction: dance wildly")
        assert bad.observation.startswith("Invalid Action.\n\n") and bad.reward == 0.0
        for a in env.gold_actions():
            res = env.step(f"Thought:\nnext\n\nAction: {a}")
            if res.done:
                break
        assert res.done and res.reward == 1.0 and res.info["score"] == 100.0
    finally:
        env.close()


def test_tasks_select_split_ids_without_jvm():
    boil = envs.task_ids("sciworld", "test", tasks=["boil"])
    assert boil and all(games()[i][1] == "boil" for i in boil)
    both = envs.task_ids("sciworld", "train", tasks=["1-1", "find-non-living-thing"])
    assert {games()[i][0] for i in both} == {"1-1", "4-2"}
    assert set(both) <= set(envs.task_ids("sciworld", "train"))  # ids stay global
    with pytest.raises(ValueError, match="unknown SciWorld task"):
        envs.task_ids("sciworld", "train", tasks=["4-9"])
