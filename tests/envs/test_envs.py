"""Env protocol, registry, parsers, and one scripted walk to reward 1 per env."""

import pytest

import envs
from envs.babyai import ALL_LEVELS, BabyAIEnv, expert_action
from envs.base import MULTI_ACTION_ERROR, parse_agentgym_action, parse_last_action
from envs.searchqa import INVALID, exact_match, normalize_answer
from envs.textcraft import expert_plan
from envs.webshop import attribute_reward, expert_actions

EASY = ["GoToRedBallNoDists", "GoToObj", "GoToLocal"]


def act(text):
    return f"Thought:\nlet me think\n\nAction:\n{text}"


# -- registry -----------------------------------------------------------------------------------
def test_registry_lists_and_errors():
    assert {"babyai", "textcraft", "sciworld", "searchqa", "webshop", "http"} <= set(
        envs.list_envs()
    )
    with pytest.raises(ValueError, match="unknown env 'babycat'; valid envs: babyai, "):
        envs.make("babycat")
    with pytest.raises(
        TypeError, match=r"valid arguments: \['levels', 'reward', 'test_seeds', 'train_seeds'\]"
    ):
        envs.make("babyai", level="x")
    with pytest.raises(
        ValueError, match="unknown BabyAI level 'Nope'; valid levels: .*GoToRedBall"
    ):
        envs.make("babyai", levels=["Nope"])
    with pytest.raises(ValueError, match="valid splits: train, test"):
        envs.task_ids("babyai", "dev")
    with pytest.raises(ValueError, match="already registered"):
        envs.register("babyai", "envs.testing:FaultEnv")


def test_env_arguments_checked_by_value_when_the_driver_is_built(tmp_path):
    """A bad value fails in the trainer process when the driver is built (envs._check_kwargs,
    before anything compiles), not in a worker at the first reset; the error lists what is valid."""
    from agentgym_jax.envs_driver import EnvDriver

    def fails(name, kwargs, exc, match):
        with pytest.raises(exc, match=match):
            EnvDriver(name, kwargs)
        with pytest.raises(exc, match=match):
            envs._check_kwargs(name, envs.resolve(envs.factory_spec(name)), kwargs)

    fails("babyai", {"levels": ["GoToRedBall", "Nope"]}, ValueError, "unknown BabyAI level 'Nope'")
    fails("babyai", {"levels": ["Nope"]}, ValueError, "valid levels: .*GoToRedBallNoDists")
    fails("babyai", {"levels": []}, ValueError, "levels is empty; name at least one")
    fails("babyai", {"levels": [3]}, TypeError, "level names")
    fails("babyai", {"reward": "dense"}, ValueError, "reward must be one of success, score")
    fails("babyai", {"test_seeds": 0}, ValueError, "test_seeds")
    fails("sciworld", {"tasks": ["boil", "bake-a-cake"]}, ValueError, r"\['bake-a-cake'\]")
    fails("sciworld", {"tasks": ["x"]}, ValueError, "valid tasks .*1-1 boil, 1-2 melt")
    fails("sciworld", {"tasks": []}, ValueError, "SciWorld tasks is empty")
    fails("sciworld", {"step_limit": 0}, ValueError, "step_limit")
    fails("searchqa", {"questions": "tfds:squad@train"}, ValueError, "tfds:natural_questions_open")
    fails("searchqa", {"questions": str(tmp_path / "q.jsonl")}, FileNotFoundError, "questions")
    fails("searchqa", {"top_k": 0}, ValueError, "top_k")
    fails("textcraft", {"minecraft_dir": str(tmp_path / "no")}, FileNotFoundError, "minecraft_dir")
    fails("webshop", {"catalogue": str(tmp_path / "c.json")}, FileNotFoundError, "catalogue")
    # Good values pass; a single level name is one level, not its letters.
    EnvDriver("babyai", {"levels": "GoToRedBallNoDists"}).close()
    EnvDriver("sciworld", {"tasks": ["4-2", "boil"]}).close()
    assert envs.task_ids("babyai", "test", levels="GoToRedBallNoDists") == list(range(10))
    with pytest.raises(ValueError, match="levels is empty"):
        envs.task_ids("babyai", "test", levels=[])


def test_initial_messages_shape():
    env = envs.make("textcraft")
    obs = env.reset(0)
    msgs = envs.initial_messages(env, obs, system="sys")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert "Thought:" in msgs[1]["content"] and "Action:" in msgs[1]["content"]
    assert (
        msgs[2]["content"] == "OK. I'll follow your instructions and try my best to solve the task."
    )
    assert (
        msgs[3]["content"] == obs
        and obs.startswith("Crafting commands:\n")
        and "\n\nGoal: craft " in obs
    )


# -- parsers ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "reply, action",
    [
        ("Thought:\nhmm\n\nAction:\ngo to red ball 1", "go to red ball 1"),
        (
            "Action: craft 1 blue dye using 1 lapis lazuli!\nmore text",
            "craft 1 blue dye using 1 lapis lazuli",
        ),
        ("Action:   turn   left. ", "turn left"),
        ("no action at all", ""),
        ("Action:\n\nturn left", "turn left"),  # \s* crosses blank lines, as AgentGym's regex does
    ],
)
def test_agentgym_parser(reply, action):
    assert parse_agentgym_action(reply).action == action


def test_agentgym_parser_rejects_two_actions():
    parsed = parse_agentgym_action("Action: turn left\nAction: turn right")
    assert parsed.action is None and parsed.error == MULTI_ACTION_ERROR


def test_last_action_parser():
    assert parse_last_action("Action: a\nThought\nAction: look around</s>").action == "look around"
    assert parse_last_action("Thought: x\nAction: look around").action == "look around"
    assert parse_last_action("look at sink").action == "look at sink"


def test_two_actions_never_reach_env():
    env = envs.make("babyai", levels=EASY)
    env.reset(0)
    res = env.step("Action: turn left\nAction: turn left")
    assert (res.observation, res.reward, res.done) == (MULTI_ACTION_ERROR, 0.0, False)


# -- BabyAI -------------------------------------------------------------------------------------
def test_babyai_task_id_scheme():
    assert len(ALL_LEVELS) == 40 and ALL_LEVELS[0] == "GoToRedBallGrey"
    env = BabyAIEnv()
    assert env.level_of(0) == ("BabyAI-GoToRedBallGrey-v0", 0)
    assert env.level_of(40 * 3 + 2) == ("BabyAI-GoToRedBallNoDists-v0", 3)
    assert env.level_of(3) == ("BabyAI-GoToObjS6-v1", 0)  # v0 is gone from minigrid 3.2
    easy = BabyAIEnv(levels=EASY)
    assert easy.level_of(4) == ("BabyAI-GoToObj-v0", 1)
    assert BabyAIEnv.task_ids("test", levels=EASY) == list(range(30))
    assert (
        BabyAIEnv.task_ids("train")[:2] == [400, 401] and len(BabyAIEnv.task_ids("train")) == 4000
    )
    # A larger held-out split moves the train seeds up: the splits never share a (level, seed).
    kw = dict(levels=EASY, test_seeds=50, train_seeds=20)
    test, train = envs.task_ids("babyai", "test", **kw), envs.task_ids("babyai", "train", **kw)
    assert len(test) == 150 and len(train) == 60
    assert {easy.level_of(i) for i in test}.isdisjoint(easy.level_of(i) for i in train)
    assert envs.make("babyai", **kw).reset(test[-1]) == easy.reset(test[-1])
    with pytest.raises(ValueError, match="test_seeds"):
        BabyAIEnv.task_ids("test", test_seeds=0)


def test_babyai_text_and_actions():
    env = envs.make("babyai", levels=["GoToRedBallNoDists"])
    obs = env.reset(0)
    assert obs.startswith(
        "Your goal: go to the red ball\nIn front of you in this room, you can see several objects: "
        "There is a red ball 1 4 steps in front of you and 3 steps to your right.  "
    )
    assert obs.endswith(
        'You are not carrying anything.\nAvailable actions: ["turn left", "turn right", "move forward", '
        '"pick up red ball 1", "go to red ball 1", "check available actions"]'
    )
    assert env.reset(0) == obs  # deterministic per task id
    bad = env.step(act("fly away"))
    assert bad.observation.startswith(
        "The action is not recognized. Please check valid actions.\nAvailable actions: ["
    )
    assert (bad.reward, bad.done, bad.info["action_is_valid"]) == (0.0, False, False)
    assert env.step("no action").observation.startswith("No change in state.")
    turned = env.step(act("turn right"))
    assert "Available actions" in turned.observation and not turned.done
    check = env.step(act("check available actions"))
    assert check.observation.startswith("You can take the following actions: turn left, turn right")


def test_babyai_expert_reaches_reward_one():
    env = envs.make("babyai", levels=EASY)
    wins = 0
    for task in range(12):
        obs = env.reset(task)
        for turn in range(20):
            res = env.step(act(expert_action(obs, turn)))
            obs = res.observation
            if res.done:
                break
        wins += res.reward == 1.0 and res.info["success"] and 0 < res.info["score"] < 1
    assert wins >= 11


def test_babyai_score_reward_mode():
    env = envs.make("babyai", levels=["GoToRedBallNoDists"], reward="score")
    env.reset(0)
    res = env.step(act("go to red ball 1"))
    assert res.done and res.reward == pytest.approx(1 - 0.9 * res.info["low_level_steps"] / 64)


# -- TextCraft ----------------------------------------------------------------------------------
def test_textcraft_walk_and_errors():
    env = envs.make("textcraft")
    assert (
        envs.task_ids("textcraft", "test") == list(range(100))
        and len(envs.task_ids("textcraft")) == 319
    )
    obs = env.reset(0)
    assert obs.endswith("Goal: craft polished granite slab.")
    assert (
        env.step(act("get 1 polished granite slab")).observation
        == "Could not find polished granite slab"
    )
    assert env.step(act("inventory")).observation == "Inventory: You are not carrying anything."
    assert env.step("nothing").observation == "Could not execute "
    plan = expert_plan(obs, env._game.crafting_tree)
    for a in plan:
        res = env.step(act(a))
    assert res.done and res.reward == 1.0
    assert env.step(act("inventory")).observation.startswith("Error: the episode has ended")


def test_textcraft_expert_on_several_goals():
    env = envs.make("textcraft")
    for task in (2, 4, 150, 300):
        obs = env.reset(task)
        for a in expert_plan(obs, env._game.crafting_tree):
            res = env.step(act(a))
        assert res.reward == 1.0, (task, res)


# -- SearchQA -----------------------------------------------------------------------------------
def test_answer_normalisation():
    assert normalize_answer("The  Quick, brown fox!") == "quick brown fox"
    assert exact_match("an Apple.", ["apple"]) and not exact_match("apples", ["apple"])


def test_searchqa_search_then_answer():
    env = envs.make("searchqa")
    assert (
        len(envs.task_ids("searchqa", "test")) == 144
        and len(envs.task_ids("searchqa", "train")) == 576
    )
    obs = env.reset(0)
    assert obs == "Question: In which country was the cartographer Dunlun Praosnia born?"
    info = env.step("<think>who?</think>\n<search> Dunlun Praosnia </search>")
    assert info.observation.startswith(
        "\n\n<information>Doc 1(Title: Dunlun Praosnia) Dunlun Praosnia was a cartographer"
    )
    assert info.observation.endswith("</information>\n\n") and not info.done
    assert env.step("I think I know").observation == INVALID
    wrong = env.step("<answer>Arnov</answer>")
    assert wrong.done and wrong.reward == 0.0
    env.reset(0)
    right = env.step("<think>ok</think><answer> the Meldorbel </answer>")
    assert right.done and right.reward == 1.0


# -- WebShop-lite -------------------------------------------------------------------------------
def test_webshop_expert_and_partial_reward():
    env = envs.make("webshop")
    obs = env.reset(0)
    assert obs.startswith(
        "WebShop [SEP] Instruction: [SEP] i need slim fit and wrinkle free dress shirt with size medium"
    )
    assert obs.endswith('Available Actions: {"has_search_bar": true, "clickables": []}')
    assert env.step(act("click[Buy Now]")).info["invalid"]
    for a in expert_actions(env.goal):
        res = env.step(act(a))
    assert res.done and res.reward == 1.0
    goal = {
        "type": "t-shirt",
        "category": "clothing",
        "attributes": ["cotton", "slim fit"],
        "options": {"color": "red", "size": "large"},
        "price_upper": 20.0,
    }
    product = {"type": "t-shirt", "category": "clothing", "attributes": ["cotton"], "price": 30.0}
    assert attribute_reward(product, {"color": "red", "size": "small"}, goal)[
        "reward"
    ] == pytest.approx(2 / 5)
    product = dict(product, type="hoodie", price=10.0)
    assert attribute_reward(product, {"color": "red", "size": "large"}, goal)[
        "reward"
    ] == pytest.approx(0.5 * 4 / 5)


def test_webshop_navigation():
    env = envs.make("webshop")
    env.reset(3)
    res = env.step(act("search[waterproof lightweight]"))
    assert "Page 1 (Total results: " in res.observation and "Next >" in res.observation
    res = env.step(act("click[Next >]"))
    assert "Page 2 " in res.observation
    res = env.step(act("click[Back to Search]"))
    assert '"has_search_bar": true' in res.observation


def test_babyai_go_to_the_object_already_faced_does_not_crash():
    """An empty path plan (already facing the target) must still give an observation."""
    import random

    from agentgym_jax.recipes.tiny_babyai import offered_actions

    env = envs.make("babyai", levels=["GoToRedBall", "GoToLocal"])
    rng = random.Random(0)
    for t in range(60):
        obs = env.reset(t)
        for _ in range(6):
            res = env.step("Thought:\nx\n\nAction:\n" + rng.choice(offered_actions(obs)))
            assert isinstance(res.observation, str) and res.observation
            obs = res.observation
            if res.done:
                break
