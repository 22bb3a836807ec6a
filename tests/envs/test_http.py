"""HTTP compatibility: our client against our server, and against AgentGym-shaped stand-ins."""

import socket
import threading
import time

import httpx
import pytest
from fastapi import FastAPI

import envs
from envs.http_client import EnvServerError, HttpEnv
from envs.server import create_app, main

envs.register("fault", "envs.testing:FaultEnv", overwrite=True)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, app):
        import uvicorn

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                return self
            time.sleep(0.02)
        raise RuntimeError("server did not start")

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(5)


@pytest.fixture(scope="module")
def babyai_server():
    with Server(create_app("babyai", max_envs=3, levels=["GoToRedBallNoDists"])) as s:
        yield s


def test_client_against_our_server_reaches_reward(babyai_server):
    env = envs.make("http", base_url=babyai_server.url, env_name="babyai")
    local = envs.make("babyai", levels=["GoToRedBallNoDists"])
    obs = env.reset(7)
    assert obs == local.reset(7)
    assert env.instruction() == local.instruction()
    res = env.step("Thought:\nthe ball is ahead\n\nAction:\ngo to red ball 1")
    assert res.done and res.reward == 1.0 and res.info["raw_reward"] == 1.0
    # The server refuses a finished env; the client turns it into a recorded failure.
    env._done = False  # bypass the client-side guard to reach the server's refusal
    again = env.step_action("turn left")
    assert again.done and again.reward == 0.0 and "has finished" in again.info["error"]
    env.close()


def test_server_errors_follow_babyai_protocol(babyai_server):
    c = httpx.Client(base_url=babyai_server.url)
    bad = c.post("/step", content=b"{not json", headers={"content-type": "application/json"})
    assert bad.status_code == 422 and "error" in bad.json()
    assert c.post("/step", json={"id": 999, "action": "x"}).json() == {
        "error": "The id 999 is not valid."
    }
    assert "not valid" in c.post("/reset", json={"id": 999, "data_idx": 0}).json()["error"]
    assert "JSON object" in c.post("/create", json=[1, 2]).json()["error"]
    ids = [c.post("/create").json() for _ in range(4)]
    assert sum("error" in r for r in ids) >= 1 and "max_envs=3" in str(ids)
    for r in ids:
        if "id" in r:
            assert c.post("/close", json={"id": r["id"]}).json() is True
    r = c.post("/create").json()
    bad = c.post("/reset", json={"id": r["id"], "data_idx": "x"})
    assert bad.status_code == 422 and "non-integer 'data_idx'" in bad.json()["error"]
    step = c.post("/step", json={"id": r["id"], "action": "turn left"})
    assert step.status_code == 200 and "not been reset" in step.json()["error"]
    assert c.post("/close", json={"id": r["id"]}).json() is True
    assert c.post("/close", json={"id": r["id"]}).json() is False


def _agentgym_babyai_standin():
    """Reproduces AgentGym's BabyAI server shapes: reward vs score, {"error"} on HTTP 200."""
    app, state = FastAPI(), {"n": 0, "done": {}}

    @app.post("/create")
    def create():
        state["n"] += 1
        state["done"][state["n"] - 1] = False
        return {"id": state["n"] - 1}

    @app.post("/reset")
    def reset(body: dict):
        return {
            "observation": f'Your goal: go to the red ball\nTask {body["data_idx"]}\nAvailable actions: ["turn left"]',
            "reward": 0,
            "score": 0,
            "deleted": False,
            "done": False,
        }

    @app.post("/step")
    def step(body: dict):
        if state["done"][body["id"]]:
            return {"error": f"The task with environment {body['id']} has finished."}
        state["done"][body["id"]] = body["action"] == "go to red ball 1"
        hit = state["done"][body["id"]]
        return {
            "observation": f"did {body['action']}",
            "reward": 0.25 if hit else 0,
            "score": 0.9 if hit else 0,
            "done": hit,
        }

    return app


def _agentgym_searchqa_standin(prefix):
    """SearchQA's shapes: bare int id, string reset reply, the prompt from GET /observation."""
    app, state = FastAPI(), {}

    @app.post("/create")
    def create(body: dict):
        return 5

    @app.post("/reset")
    def reset(body: dict):
        assert body["env_idx"] == 5
        state["q"] = f"Question: q{body['id']}?"
        return "reset done"

    @app.get("/observation")
    def observation(env_idx: int):
        assert env_idx == 5
        return prefix + state["q"]

    @app.post("/step")
    def step(body: dict):
        assert body["env_idx"] == 5
        return {
            "observation": "",
            "reward": 1.0 if "<answer>" in body["action"] else 0.0,
            "done": True,
            "info": None,
        }

    return app


def test_client_against_agentgym_babyai_shapes():
    with Server(_agentgym_babyai_standin()) as s:
        env = HttpEnv(s.url, "babyai", retries=0)
        assert env.reset(3).startswith("Your goal: go to the red ball\nTask 3")
        miss = env.step("Action: turn left")
        assert miss.observation == "did turn left" and not miss.done
        hit = env.step("Thought: go\nAction: go to red ball 1!!")  # cleaned to [A-Za-z0-9, ]
        assert hit.done and hit.reward == 0.9 and hit.info["reward"] == 0.25  # score is the reward
        env._done = False  # force a post-finish step: the server's {"error"} becomes a failure
        late = env.step("Action: turn left")
        assert late.done and "has finished" in late.info["error"]
        env.close()  # upstream has no /close: must not raise


@pytest.mark.parametrize("ours", [True, False])
def test_client_against_agentgym_searchqa_shapes(ours):
    from envs.searchqa import INSTRUCTION

    # Our own instruction is already the first message, so it is cut from the prompt; a foreign
    # server's instruction stays, as AgentGym's client would show it.
    prefix = INSTRUCTION + "\n\n" if ours else "Answer well.\n"
    with Server(_agentgym_searchqa_standin(prefix)) as s:
        env = HttpEnv(s.url, "searchqa", retries=0)
        want = "Question: q11?" if ours else "Answer well.\nQuestion: q11?"
        assert env.env_id == 5 and env.reset(11) == want
        res = env.step("<think>x</think><answer>Paris</answer>")
        assert res.done and res.reward == 1.0


def test_connection_errors_retry_then_raise():
    port = _free_port()
    start = time.monotonic()
    with pytest.raises(EnvServerError, match="failed after 3 tries"):
        HttpEnv(f"http://127.0.0.1:{port}", "babyai", retries=2, backoff=0.05)
    assert time.monotonic() - start >= 0.15  # 0.05 + 0.1 of backoff


def test_unknown_env_and_bad_kwargs_for_server():
    with pytest.raises(ValueError, match="valid envs"):
        create_app("nope")
    with pytest.raises(TypeError, match="valid arguments"):
        create_app("fault", colour="red")
    with pytest.raises(SystemExit):
        main(["nope"])


def test_http_task_ids_come_from_the_config():
    from envs.http_client import HttpEnv

    assert HttpEnv.task_ids("train", train_ids=[50, 53]) == [50, 51, 52]
    assert HttpEnv.task_ids("test", train_ids=[50, 53], test_ids=[0, 2]) == [0, 1]
    with pytest.raises(ValueError, match="env.kwargs.train_ids"):
        HttpEnv.task_ids("test", train_ids=[50, 53])
    with pytest.raises(ValueError, match="start < stop"):
        HttpEnv.task_ids("train", train_ids=[5, 5])
