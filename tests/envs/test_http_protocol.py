"""`serve-env` answers each AgentGym server's dialect route by route (REFERENCE.md, "AgentGym env
server protocol"), and `HttpEnv` speaks each dialect back against it."""

import pytest
from fastapi.testclient import TestClient

import envs
from envs.base import Env, StepResult
from envs.http_client import HttpEnv
from envs.sciworld import java_version
from envs.server import create_app
from tests.helpers.env_server import LoopbackServer

KINDS = ["babyai", "textcraft", "sciworld", "searchqa", "webshop"]
IN_BODY = {"babyai", "textcraft", "sciworld"}  # errors as {"error"} with HTTP 200
KEY = {k: "env_idx" if k in ("searchqa", "webshop") else "id" for k in KINDS}  # env field


class PartialEnv(Env):
    """Rewards on demand: `quarter` 0.25, `half` 0.5 and done, `one` 1 not done, `win` 1 done."""

    name = "partial"
    REWARDS = {"quarter": (0.25, False), "half": (0.5, True), "one": (1.0, False)}

    @classmethod
    def task_ids(cls, split="train", **_):
        return list(range(10))

    def instruction(self):
        return "A partial-reward test env."

    def _reset(self, task_id):
        return f"Start {task_id}"

    def _step(self, action):
        if action == "win":
            return StepResult("won", 1.0, True, {})
        reward, done = self.REWARDS.get(action, (0.0, False))
        return StepResult(f"did {action}", reward, done, {})


envs.register("fault", "envs.testing:FaultEnv", overwrite=True)
envs.register("partial", PartialEnv, overwrite=True)


def client(kind, name="fault", **kw):
    return TestClient(create_app(name, protocol=kind, **kw), base_url="http://127.0.0.1:36001")


def created(c, kind, body=None):
    r = c.post("/create", json=body) if body is not None else c.post("/create")
    assert r.status_code == 200, r.text
    data = r.json()
    return data if isinstance(data, int) and not isinstance(data, bool) else data["id"]


def do_reset(c, kind, idx, task=3):
    body = {
        "babyai": {"id": idx, "data_idx": task},
        "textcraft": {"id": idx, "data_idx": task},
        "sciworld": {"id": idx, "data_idx": task},
        "searchqa": {"env_idx": idx, "id": task},
        "webshop": {"env_idx": idx, "session_id": task},
    }[kind]
    return c.post("/reset", json=body)


def started(kind, name="fault"):
    """A client and the id of one created and reset env."""
    c = client(kind, name=name)
    idx = created(c, kind)
    do_reset(c, kind, idx)
    return c, idx


@pytest.mark.parametrize("kind", KINDS)
def test_root_greeting(kind):
    want = {"babyai": "BabyAI", "textcraft": "TextCraft", "sciworld": "ScienceWorld"}
    assert client(kind).get("/").json() == (
        f"This is environment {want[kind]}." if kind in want else "ok"
    )


@pytest.mark.parametrize("kind", KINDS)
def test_create(kind):
    c = client(kind)
    r = c.post("/create", json={"id": 4}) if kind == "searchqa" else c.post("/create")
    data = r.json()
    if kind in ("babyai", "sciworld"):
        assert data == {"id": 0}
    elif kind == "textcraft":  # creates and resets with data_idx = the new id
        assert data["id"] == 0 and data["done"] is False and data["reward"] == 0
        assert data["observation"] == "Task 0"
        assert set(data) == {"id", "observation", "done", "reward"}
        assert c.get("/observation", params={"id": 0}).json() == data["observation"]
    elif kind == "searchqa":  # bare int; the body's id is the data item
        assert data == 0
        assert c.get("/observation", params={"env_idx": 0}).json().endswith("\n\nTask 4")
    else:  # webshop: a bare (random) int, env already reset
        assert isinstance(data, int) and not isinstance(data, bool)
        assert c.get("/observation", params={"env_idx": data}).json() == "Task 0"


@pytest.mark.parametrize("kind", KINDS)
def test_reset(kind):
    c = client(kind)
    idx = created(c, kind)
    data = do_reset(c, kind, idx).json()
    if kind == "babyai":
        assert data == {
            "observation": data["observation"],
            "reward": 0,
            "score": 0,
            "deleted": False,
            "done": False,
        }
    elif kind == "textcraft":
        assert data == {"id": idx, "observation": data["observation"], "done": False, "reward": 0}
        assert c.post("/reset", json={"id": idx}).json()["observation"] == "Task 0"
    elif kind == "sciworld":
        keys = {"task_name", "var_num", "task_description", "observation", "reward", "score"}
        assert set(data) == keys | {"deleted", "done"} and data["done"] is False
    elif kind == "searchqa":
        assert isinstance(data, str) and data.endswith("\n\nTask 3")
    else:
        assert isinstance(data, list) and len(data) == 2 and data[1] is None
        assert data[0] == "Task 3"
    if kind != "searchqa" and kind != "webshop":
        assert data["observation"] == "Task 3"


@pytest.mark.parametrize("kind", KINDS)
def test_step_reply_shape(kind):
    c, idx = started(kind)
    data = c.post("/step", json={KEY[kind]: idx, "action": "echo hi"}).json()
    want = {
        "babyai": {"observation", "reward", "score", "done", "info"},
        "textcraft": {"observation", "reward", "done", "info"},
        "sciworld": {"observation", "reward", "score", "done", "info"},
        "searchqa": {"observation", "reward", "done", "info"},
        "webshop": {"state", "reward", "done", "info"},
    }[kind]
    assert set(data) == want
    assert data.get("observation", data.get("state")) == "echo: hi" and data["done"] is False
    if kind in ("searchqa", "webshop"):
        assert data["info"] is None
    win = c.post("/step", json={KEY[kind]: idx, "action": "win"}).json()
    assert win["done"] is True
    if kind == "textcraft":
        assert win["reward"] == 1 and isinstance(win["reward"], int)
    if kind == "sciworld":  # reward is the change of ScienceWorld's 0-100 score
        assert win["score"] == 100 and win["reward"] == 100


@pytest.mark.parametrize("kind", KINDS)
def test_step_after_done(kind):
    c, idx = started(kind)
    c.post("/step", json={KEY[kind]: idx, "action": "win"})
    r = c.post("/step", json={KEY[kind]: idx, "action": "win"})
    assert r.status_code == 200
    if kind in ("babyai", "sciworld"):
        assert r.json() == {"error": f"The task with environment {idx} has finished."}
    else:  # no check upstream: the env answers for itself
        assert "error" not in r.json() and r.json()["done"] is True


def test_babyai_score_accumulates_and_done_rules():
    c, idx = started("babyai", name="partial")

    def step(action):
        return c.post("/step", json={"id": idx, "action": action}).json()

    assert step("quarter") == {
        "observation": "did quarter",
        "reward": 0.25,
        "score": 0.25,
        "done": False,
        "info": {"action": "quarter"},
    }
    half = step("half")  # the env ends with reward 0.5: BabyAI turns that back into not done
    assert half["done"] is False and half["score"] == 0.75
    assert step("quarter")["score"] == 0.75  # the env is over: reward 0 from here
    info = c.get("/observation", params={"id": idx}).json()  # the info object
    assert info == {
        "deleted": False,
        "done": False,
        "observation": info["observation"],
        "reward": 0.0,
        "score": 0.75,
    }
    do_reset(c, "babyai", idx)
    one = step("one")  # reward exactly 1 forces done
    assert one["done"] is True and one["score"] == 1.0
    assert "has finished" in step("quarter")["error"]


@pytest.mark.parametrize("kind", KINDS)
def test_observation_route(kind):
    c, idx = started(kind)
    c.post("/step", json={KEY[kind]: idx, "action": "echo there"})
    data = c.get("/observation", params={KEY[kind]: idx}).json()
    if kind == "babyai":
        assert data["observation"] == "echo: there" and data["deleted"] is False
    elif kind == "searchqa":  # the prompt: instruction + question, whatever was stepped since
        assert data.startswith(envs.make("fault").instruction() + "\n\nTask 3")
    else:
        assert data == "echo: there"
    wrong = "env_idx" if KEY[kind] == "id" else "id"
    assert c.get("/observation", params={wrong: idx}).status_code == 422


@pytest.mark.parametrize("kind", ["textcraft", "sciworld"])
def test_detail_route(kind):
    c, idx = started(kind)
    info = c.get("/detail", params={"id": idx}).json()
    assert info["deleted"] is False and info["observation"] == "Task 3"


def test_detail_route_only_where_upstream_has_it():
    assert client("babyai").get("/detail", params={"id": 0}).status_code == 404


@pytest.mark.parametrize("kind", KINDS)
def test_close(kind):
    c = client(kind)
    idx = created(c, kind)
    first = c.post("/close", json={KEY[kind]: idx})
    again = c.post("/close", json={KEY[kind]: idx})
    if kind == "webshop":
        assert first.json() == {"closed": True} and again.json() == {"closed": False}
    elif kind == "sciworld":  # upstream crashes on an unknown id; we answer a clean 404
        assert first.json() is True and again.status_code == 404 and "error" in again.json()
    else:
        assert first.json() is True and again.json() is False


@pytest.mark.parametrize("kind", KINDS)
def test_errors(kind):
    c = client(kind)
    r = c.post("/step", json={KEY[kind]: 99, "action": "x"})
    assert r.json() == {"error": "The id 99 is not valid."}
    assert r.status_code == (200 if kind in IN_BODY else 404)
    # A malformed body is FastAPI's validation status everywhere.
    assert c.post("/step", json={"action": "x"}).status_code == 422
    assert c.post("/step", json={KEY[kind]: "0", "action": "x"}).status_code == 422
    idx = created(c, kind) if kind != "textcraft" else None
    if idx is not None and kind != "webshop":  # webshop resets on create
        r = c.post("/step", json={KEY[kind]: idx, "action": "x"})
        assert "not been reset" in r.json()["error"]
        assert r.status_code == (200 if kind in IN_BODY else 409)


def test_textcraft_create_rejects_custom_tasks_in_body():
    r = client("textcraft").post("/create", json={"commands": "craft x", "goal": "x"})
    assert r.status_code == 200 and "not supported" in r.json()["error"]


# -- the real envs, first observation and a finished task -----------------------------------


def test_babyai_real_env_over_protocol():
    c = client("babyai", name="babyai")
    idx = created(c, "babyai")
    # data_idx 282: level all_levels[282 % 40 + 1] (GoToRedBallNoDists), seed 282 // 40
    obs = c.post("/reset", json={"id": idx, "data_idx": 282}).json()["observation"]
    assert obs == envs.make("babyai").reset(282)
    assert obs.startswith("Your goal: go to the red ball\n") and "Available actions: [" in obs
    r = c.post("/step", json={"id": idx, "action": "go to red ball 1"}).json()
    assert r["reward"] == 1.0 and r["score"] == 1.0 and r["done"] is True


def test_textcraft_real_env_over_protocol():
    from envs.textcraft import TextCraftEnv

    c = client("textcraft", name="textcraft")
    data = c.post("/create", json={"commands": None, "goal": None, "minecraft_dir": "x"}).json()
    assert data["observation"] == TextCraftEnv().reset(0)
    assert (
        data["observation"].startswith("Crafting commands:\n")
        and "Goal: craft" in data["observation"]
    )


def test_searchqa_real_env_over_protocol():
    from envs.searchqa import INSTRUCTION

    c = client("searchqa", name="searchqa")
    idx = c.post("/create", json={"id": 0}).json()
    assert c.post("/reset", json={"env_idx": idx, "id": 2}).status_code == 200
    prompt = c.get("/observation", params={"env_idx": idx}).json()
    assert prompt == INSTRUCTION + "\n\n" + envs.make("searchqa").reset(2)
    r = c.post("/step", json={"env_idx": idx, "action": "<search>capital</search>"}).json()
    assert "<information>" in r["observation"] and r["info"] is None and r["done"] is False


def test_webshop_real_env_over_protocol():
    c = client("webshop", name="webshop")
    idx = created(c, "webshop")
    obs, none = c.post("/reset", json={"env_idx": idx, "session_id": 3}).json()
    assert obs == envs.make("webshop").reset(3) and none is None
    q = {"env_idx": idx}
    assert c.get("/available_actions", params=q).json() == {
        "has_search_bar": True,
        "clickables": [],
    }
    assert c.get("/instruction_text", params=q).json().startswith("Instruction: ")
    r = c.post("/step", json={"env_idx": idx, "action": "search[shirt]"}).json()
    assert set(r) == {"state", "reward", "done", "info"} and "Back to Search" in r["state"]


needs_java = pytest.mark.skipif((java_version() or 0) < 17, reason="SciWorld needs Java 17+")


@needs_java
def test_sciworld_real_env_over_protocol():
    pytest.importorskip("scienceworld")
    c = client("sciworld", name="sciworld")
    idx = created(c, "sciworld")
    data = c.post("/reset", json={"id": idx, "data_idx": 0}).json()
    assert data["task_description"].startswith("Your task is")
    assert (
        data["observation"]
        and c.get("/observation", params={"id": idx}).json() == data["observation"]
    )
    hint = c.get("/action_hint", params={"id": idx}).json()
    assert set(hint) == {"possible_actions", "possible_objects"}
    assert c.post("/close", json={"id": idx}).json() is True


# -- our client, each dialect, against our server ------------------------------------------


def _win_plan(name, local):
    if name == "babyai":
        return ["Thought: go\nAction: go to red ball 1"]
    if name == "textcraft":
        from envs.textcraft import expert_plan

        return [f"Action: {a}" for a in expert_plan(local.observation, local._game.crafting_tree)]
    if name == "searchqa":
        return [f"<answer>{local.item['answers'][0]}</answer>"]
    from envs.webshop import expert_actions

    return [f"Thought: buy\nAction: {a}" for a in expert_actions(local.goal)]


@pytest.mark.parametrize(
    "name, task",
    [("babyai", 282), ("textcraft", 2), ("searchqa", 1), ("webshop", 7)],
)
def test_client_speaks_each_dialect(name, task):
    with LoopbackServer(create_app(name)) as s:
        env = HttpEnv(s.url, name, retries=0)
        local = envs.make(name)
        assert env.reset(task) == local.reset(task)
        for reply in _win_plan(name, local):
            res = env.step(reply)
        assert res.done and res.reward > 0.99 and "error" not in res.info, res
        env.close()
        assert s.server.config.app.state.slots == {}  # /close freed it


@needs_java
def test_client_speaks_sciworld():
    pytest.importorskip("scienceworld")
    with LoopbackServer(create_app("sciworld")) as s:
        env = HttpEnv(s.url, "sciworld", retries=0)
        local = envs.make("sciworld")
        try:
            assert env.reset(0) == local.reset(0)
            res = env.step("Thought: look\nAction: look around")
            assert not res.done and 0.0 <= res.reward <= 1.0 and "score" in res.info
        finally:
            env.close()
            local.close()


def test_client_recreates_an_expired_env():
    with LoopbackServer(create_app("fault")) as s:
        env = HttpEnv(s.url, "babyai", retries=0)
        old = env.env_id
        s.server.config.app.state.slots.clear()  # as the idle expiry would
        assert env.reset(5) == "Task 5" and env.env_id != old


def test_webarena_client_drives_webshop_standin():
    with LoopbackServer(create_app("webshop")) as s:
        env = HttpEnv(s.url, "webarena", retries=0)
        assert env.reset(3).startswith("WebShop [SEP]")
        res = env.step("In summary, the next action I will perform is ```click [1]```")
        assert not res.done and res.observation and "error" not in res.info
        env.close()
