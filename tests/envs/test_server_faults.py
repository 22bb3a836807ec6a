"""`serve-env` under hostile or careless clients: one test per fault (issue "Faults")."""

import socket
import threading
import time

import pytest
from fastapi.testclient import TestClient

import envs
from envs import server
from envs.server import DEFAULT_MAX_ENVS, create_app, make_server
from tests.helpers.env_server import free_port

envs.register("fault", "envs.testing:FaultEnv", overwrite=True)
BASE = "http://127.0.0.1:36001"


def client(**kw):
    return TestClient(create_app("fault", **kw), base_url=BASE)


def started(c):
    idx = c.post("/create").json()["id"]
    c.post("/reset", json={"id": idx, "data_idx": 1})
    return idx


class Running:
    """make_server on loopback in a thread (what `serve` runs)."""

    def __init__(self, app, **kw):
        self.port = free_port()
        self.server = make_server(app, port=self.port, log_level="error", **kw)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)

    def raw(self, data: bytes, wait: float = 5.0) -> bytes:
        with socket.create_connection(("127.0.0.1", self.port), timeout=wait) as s:
            s.sendall(data)
            chunks = []
            try:
                while chunk := s.recv(65536):
                    chunks.append(chunk)
            except TimeoutError:
                pass
            return b"".join(chunks)


def test_oversized_body_is_413():
    c = client()
    big = b'{"id": 0, "action": "' + b"x" * (1 << 20) + b'"}'
    r = c.post("/step", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "error" in r.json()
    small = client(max_body=64)
    r = small.post("/step", json={"id": 0, "action": "y" * 100})
    assert r.status_code == 413


def test_half_sent_body_times_out_408():
    with Running(create_app("fault", read_timeout=0.5)) as s:
        start = time.monotonic()
        head = (
            b"POST /step HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"id": 0'
        )
        reply = s.raw(head)
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        assert time.monotonic() - start < 4


def test_half_sent_headers_are_dropped():
    with Running(create_app("fault"), header_timeout=0.5) as s:
        start = time.monotonic()
        reply = s.raw(b"POST /step HTTP/1.1\r\nHost: 127.0", wait=6)
        assert reply == b"" and time.monotonic() - start < 4  # closed by the server


def test_idle_envs_expire_and_free_their_slot():
    # A pool worker killed while holding envs never closes them: expiry is what frees those.
    app = create_app("fault", max_envs=1, idle_timeout=0.3)
    c = TestClient(app, base_url=BASE)
    idx = started(c)
    time.sleep(0.15)
    assert c.post("/step", json={"id": idx, "action": "echo a"}).json()["observation"] == "echo: a"
    time.sleep(0.15)  # used 0.15 s ago: still alive
    assert "error" not in c.post("/step", json={"id": idx, "action": "echo b"}).json()
    time.sleep(0.45)
    assert c.post("/step", json={"id": idx, "action": "x"}).json() == {
        "error": f"The id {idx} is not valid."
    }
    assert "id" in c.post("/create").json()  # its slot under max_envs=1 is free again


def test_idle_expiry_runs_without_requests():
    app = create_app("fault", idle_timeout=0.2)
    with TestClient(app, base_url=BASE) as c:  # runs the lifespan: the background sweeper
        started(c)
        assert len(app.state.slots) == 1
        deadline = time.monotonic() + 5
        while app.state.slots and time.monotonic() < deadline:
            time.sleep(0.05)
        assert app.state.slots == {}


@pytest.mark.parametrize(
    "ctype", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; b=x"]
)
def test_non_json_content_type_is_415(ctype):
    c = client()
    r = c.post("/create", content=b"", headers={"content-type": ctype})
    assert r.status_code == 415 and "JSON" in r.json()["error"]
    r = c.post("/step", content=b'{"id": 0, "action": "x"}', headers={"content-type": ctype})
    assert r.status_code == 415
    # No content type with a body is refused too; JSON with a charset is fine.
    assert c.post("/step", content=b'{"id": 0}').status_code == 415
    ok = c.post(
        "/create", content=b"{}", headers={"content-type": "application/json; charset=utf-8"}
    )
    assert ok.status_code == 200 and "id" in ok.json()


def test_foreign_host_or_origin_is_refused():
    c = client()
    assert c.post("/create", headers={"host": "evil.example:36001"}).status_code == 400
    assert c.get("/", headers={"host": "attacker.test"}).status_code == 400
    r = c.post("/create", headers={"origin": "http://evil.example"})
    assert r.status_code == 403
    assert c.post("/create", headers={"origin": "http://localhost:3000"}).status_code == 200
    assert c.post("/create", headers={"host": "localhost:36001"}).status_code == 200
    assert c.post("/create", headers={"host": "[::1]:36001"}).status_code == 200
    # A non-loopback bind has no fixed name to check.
    anyhost = client(allowed_hosts=None)
    assert anyhost.post("/create", headers={"host": "gpu-node-7:36001"}).status_code == 200
    assert server._is_loopback("127.0.0.1") and not server._is_loopback("0.0.0.0")


def test_docs_are_off_cleanly():
    c = client()
    for path in ("/openapi.json", "/docs", "/redoc"):
        assert c.get(path).status_code == 404


def test_max_envs_covers_training_and_says_what_to_set():
    assert DEFAULT_MAX_ENVS >= 128  # the default training concurrency
    c = client(max_envs=1)
    c.post("/create")
    err = c.post("/create").json()["error"]
    assert "max_envs=1" in err and "--max-envs" in err


def test_action_echo_in_info_is_bounded():
    c = client()
    idx = started(c)
    r = c.post("/step", json={"id": idx, "action": "echo " + "x" * 100_000}).json()
    assert len(r["info"]["action"]) <= server.ECHO_CHARS
    assert len(str(r["info"])) < 2 * server.ECHO_CHARS


def test_lone_surrogate_is_refused_before_the_env_sees_it():
    app = create_app("fault")
    c = TestClient(app, base_url=BASE)
    idx = started(c)
    body = b'{"id": %d, "action": "echo \\ud800"}' % idx
    r = c.post("/step", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "surrogate" in r.json()["error"]
    assert app.state.slots[idx].env.turns == 0  # not applied
    ok = c.post("/step", json={"id": idx, "action": "echo \u00e9"}).json()
    assert ok["observation"] == "echo: \u00e9"


def test_malformed_json_is_a_clean_422():
    c = client()
    r = c.post("/step", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "JSON object" in r.json()["error"]
    deep = b"[" * 100_000 + b"]" * 100_000
    r = c.post("/step", content=deep, headers={"content-type": "application/json"})
    assert r.status_code in (413, 422)
