"""Serve one of our envs over AgentGym's HTTP protocol (FastAPI + uvicorn, JSON only).

    python -m envs.server babyai --port 36001          # or: agentgym-jax serve-env babyai

Each env answers route by route as its AgentGym server does, so AgentGym's own clients work
unchanged (see `PROTOCOLS`; an env without an AgentGym server of its own speaks BabyAI's):

  babyai     POST /create -> {"id"};  POST /reset {id, data_idx} -> {observation, reward, score,
             deleted, done};  POST /step {id, action} -> {observation, reward, score, done} (score
             accumulates; done only with reward > 0.5, reward 1 forces done);  GET /observation?id=
             -> the info object;  POST /close {id} -> true/false.
  textcraft  POST /create {commands?, goal?} creates and resets (data_idx = the new id) -> {id,
             observation, done, reward};  /reset {id, data_idx=0} -> {id, observation, done,
             reward};  /step -> {observation, reward 0/1, done};  GET /observation?id= -> string;
             GET /detail?id= -> info;  POST /close {id} -> true/false.
  sciworld   /create -> {"id"};  /reset -> {task_name, var_num, task_description, observation,
             reward, score, deleted, done};  /step -> {observation, reward, score (0-100), done};
             GET /observation, /detail, /action_hint ?id=;  POST /close {id} -> true.
  searchqa   POST /create {id: item} -> bare int;  /reset {env_idx, id?} -> string;  /step
             {env_idx, action: raw reply} -> {observation, reward, done, info: null};
             GET /observation?env_idx= -> instruction + question;  POST /close -> true/false.
  webshop    POST /create -> bare int (random);  /reset {env_idx, session_id?} -> [obs, null];
             /step -> {state, reward, done, info: null};  GET /observation, /available_actions,
             /instruction_text ?env_idx=;  POST /close {env_idx} -> {"closed": bool}.

Errors: BabyAI, TextCraft and SciWorld answer `{"error": str}` with HTTP 200, as theirs do.
Where an AgentGym server crashes instead (SearchQA, WebShop, SciWorld's /close of an unknown id:
HTTP 500 there), we answer a clean 4xx with `{"error": str}`; AgentGym clients assert 200, so
they fail the same way. A malformed body is a 422 everywhere (FastAPI's validation status).

Hardening: binds 127.0.0.1 unless told otherwise, and then only answers requests whose Host
(and Origin, when a browser sends one) is loopback, so a web page cannot drive it; POST bodies
must be JSON (415), at most `max_body` bytes (413), and arrive within `read_timeout` (408);
connections that never finish their headers are closed; strings with lone surrogates are refused
(400) before any env sees them; envs idle for `idle_timeout` seconds are closed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import random
import re
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

from fastapi import Request  # module level: FastAPI resolves handler annotations from globals

DEFAULT_PORT = 36001
# Above the default training concurrency (128 episodes), with room for an eval pass alongside.
DEFAULT_MAX_ENVS = 256
DEFAULT_IDLE_TIMEOUT = 1800.0  # seconds
MAX_BODY = 1 << 20
READ_TIMEOUT = 30.0  # seconds for a request body once its headers are in
HEADER_TIMEOUT = 30.0  # seconds for a connection to finish its request headers
ECHO_CHARS = 256  # longest string echoed back in a step's `info`
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


@dataclasses.dataclass(frozen=True)
class Protocol:
    env_key: str  # the request field (or query parameter) naming the env
    errors_in_body: bool  # env errors as {"error"} with HTTP 200 (else a 4xx)
    finished_check: bool  # a step after done is refused
    greeting: str  # GET /


PROTOCOLS = {
    "babyai": Protocol("id", True, True, "This is environment BabyAI."),
    "textcraft": Protocol("id", True, False, "This is environment TextCraft."),
    "sciworld": Protocol("id", True, True, "This is environment ScienceWorld."),
    "searchqa": Protocol("env_idx", False, False, "ok"),
    "webshop": Protocol("env_idx", False, False, "ok"),
}


class RequestError(Exception):
    """A request we refuse; `status` applies where the protocol has no in-body errors."""

    def __init__(self, message: str, status: int = 400, always_status: bool = False) -> None:
        super().__init__(message)
        self.status, self.always_status = status, always_status


class Malformed(RequestError):
    def __init__(self, message: str) -> None:
        super().__init__(message, 422, always_status=True)


@dataclasses.dataclass
class _Slot:
    env: Any
    last_used: float
    info: dict[str, Any] = dataclasses.field(
        default_factory=lambda: {"deleted": False, "done": False}
    )
    done: bool = False
    started: bool = False
    observation: str = ""
    prompt: str = ""  # SearchQA: the question the episode started with
    score: float = 0.0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _host_of(value: str) -> str | None:
    try:
        return urlsplit(value if "//" in value else "//" + value).hostname
    except ValueError:
        return None


def _has_lone_surrogate(value: Any, depth: int = 0) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if depth > 32:
        return False
    if isinstance(value, dict):
        items: Iterable[Any] = (x for kv in value.items() for x in kv)
    elif isinstance(value, list):
        items = value
    else:
        return False
    return any(_has_lone_surrogate(x, depth + 1) for x in items)


def _bounded_info(info: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in info.items():
        if isinstance(v, str):
            out[k] = v[:ECHO_CHARS]
        elif isinstance(v, (int, float, bool, type(None))):
            out[k] = v
    return out


class _Guard:
    """ASGI middleware: Host/Origin check, JSON-only bodies, body size cap and read deadline."""

    def __init__(self, app, *, max_body: int, read_timeout: float, allowed_hosts) -> None:
        self.app, self.max_body, self.read_timeout = app, max_body, read_timeout
        self.allowed_hosts = allowed_hosts

    @staticmethod
    async def _reply(send, status: int, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        if status in (408, 413):  # the unread rest of the body makes the connection unusable
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.allowed_hosts is not None:
            if _host_of(headers.get("host", "")) not in self.allowed_hosts:
                return await self._reply(send, 400, "invalid Host header for a loopback server")
            origin = headers.get("origin")
            if origin is not None and _host_of(origin) not in self.allowed_hosts:
                return await self._reply(send, 403, "cross-origin requests are not allowed")
        if scope["method"] != "POST":
            return await self.app(scope, receive, send)
        ctype = headers.get("content-type")
        if ctype is not None:
            mime = ctype.split(";", 1)[0].strip().lower()
            if mime != "application/json" and not mime.endswith("+json"):
                return await self._reply(send, 415, f"content type must be JSON, got {mime!r}")
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await self._reply(send, 413, f"request body over {self.max_body} bytes")
        body = bytearray()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.read_timeout
        while True:
            try:
                msg = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0))
            except TimeoutError:
                return await self._reply(send, 408, "request body not received in time")
            if msg["type"] == "http.disconnect":
                return
            body += msg.get("body", b"")
            if len(body) > self.max_body:
                return await self._reply(send, 413, f"request body over {self.max_body} bytes")
            if not msg.get("more_body"):
                break
        if body and ctype is None:
            return await self._reply(send, 415, "content type must be JSON (none given)")
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def create_app(
    name: str,
    max_envs: int = DEFAULT_MAX_ENVS,
    *,
    protocol: str | None = None,
    idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
    max_body: int = MAX_BODY,
    read_timeout: float = READ_TIMEOUT,
    allowed_hosts: Iterable[str] | None = LOOPBACK_HOSTS,
    **env_kwargs: Any,
) -> Any:
    """The FastAPI app serving env `name` over `protocol` (default: the env's own AgentGym
    protocol, else BabyAI's); kwargs go to `envs.make`. `allowed_hosts=None` skips the Host
    check (for non-loopback binds); `idle_timeout=None` keeps idle envs forever."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool

    import envs

    factory = envs.resolve(envs.factory_spec(name))
    envs._check_kwargs(name, factory, env_kwargs)
    kind = protocol or (name if name in PROTOCOLS else "babyai")
    if kind not in PROTOCOLS:
        raise ValueError(f"unknown protocol {kind!r}; valid: {', '.join(PROTOCOLS)}")
    proto = PROTOCOLS[kind]
    lock = threading.Lock()  # envs are not thread-safe; handlers run in a thread pool
    slots: dict[int, _Slot] = {}
    next_id = [0]
    rng = random.Random()

    # -- bookkeeping --------------------------------------------------------------------------
    def drop(idx: int) -> None:
        slot = slots.pop(idx)
        with contextlib.suppress(Exception):
            slot.env.close()

    def sweep() -> None:
        # A worker killed while holding envs never closes them; expiry is what frees those.
        if not idle_timeout:
            return
        now = time.monotonic()
        for idx in [i for i, s in slots.items() if now - s.last_used > idle_timeout]:
            drop(idx)

    def slot_of(data: dict[str, Any]) -> tuple[int, _Slot]:
        raw = data.get(proto.env_key)
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise Malformed(f"missing or non-integer {proto.env_key!r}: {raw!r}"[:300])
        if raw not in slots:
            raise RequestError(f"The id {raw} is not valid.", 404)
        slots[raw].last_used = time.monotonic()
        return raw, slots[raw]

    def as_int(value: Any, key: str, default: int | None = None) -> int:
        if value is None and default is not None:
            value = default
        if isinstance(value, bool) or not isinstance(value, int):
            raise Malformed(f"missing or non-integer {key!r}: {value!r}"[:300])
        return value

    def int_field(data: dict[str, Any], key: str, default: int | None = None) -> int:
        return as_int(data.get(key), key, default)

    def require_started(idx: int, slot: _Slot) -> None:
        if not slot.started:
            raise RequestError(f"The environment {idx} has not been reset.", 409)

    # -- routes -------------------------------------------------------------------------------
    def create(data: dict[str, Any]) -> Any:
        if len(slots) >= max_envs:
            raise RequestError(
                f"too many live envs ({len(slots)}, max_envs={max_envs}): start the server with "
                "--max-envs at least your number of concurrent episodes, or POST /close unused "
                f"envs (idle ones are closed after {idle_timeout} s)",
                503,
            )
        if kind == "textcraft" and (data.get("commands") or data.get("goal")):
            raise RequestError("custom commands/goal are not supported by this server", 422)
        if kind == "webshop":  # WebShop hands out random ids
            idx = rng.randrange(1 << 31)
            while idx in slots:
                idx = rng.randrange(1 << 31)
        else:
            idx, next_id[0] = next_id[0], next_id[0] + 1
        slot = _Slot(envs.make(name, **env_kwargs), time.monotonic())
        slots[idx] = slot
        try:
            if kind == "babyai" or kind == "sciworld":
                return {"id": idx}
            if kind == "textcraft":  # minecraft_dir is ignored: the server's data is used
                from envs.textcraft import NUM_GOALS

                # AgentGym resets to data_idx = the new id; ids past the shipped table would
                # take textcraft's slow live reset, so they wrap.
                obs = reset_env(idx, slot, idx % NUM_GOALS)
                slot.info.update(observation=obs, done=False, reward=0, deleted=False)
                return {"id": idx, "observation": obs, "done": False, "reward": 0}
            if kind == "searchqa":
                if data.get("id") is not None:
                    reset_env(idx, slot, int_field(data, "id"))
                return idx
            reset_env(idx, slot, 0)  # webshop: created reset, like WebAgentTextEnv
            return idx
        except BaseException:
            drop(idx)
            raise

    def reset_env(idx: int, slot: _Slot, task: int) -> str:
        try:
            obs = slot.env.reset(task)
        except (ValueError, IndexError, KeyError) as e:
            raise RequestError(f"cannot reset env {idx} to task {task}: {e}", 422) from None
        slot.started, slot.done, slot.score = True, False, 0.0
        slot.observation = slot.prompt = obs
        return obs

    def reset(data: dict[str, Any]) -> Any:
        idx, slot = slot_of(data)
        if kind == "searchqa":
            reset_env(idx, slot, int_field(data, "id", 0))
            return searchqa_prompt(slot)
        if kind == "webshop":
            # `idx` is what AgentGym's WebArena client sends; WebShop-lite stands in for it.
            key = "session_id" if data.get("session_id") is not None else "idx"
            obs = reset_env(idx, slot, as_int(data.get(key), key, 0))
            return [obs, None]
        task = int_field(data, "data_idx", 0 if kind == "textcraft" else None)
        obs = reset_env(idx, slot, task)
        if kind == "textcraft":
            slot.info.update(observation=obs, done=False, reward=0, deleted=False)
            return {"id": idx, "observation": obs, "done": False, "reward": 0}
        if kind == "sciworld":
            # Our SciWorld env returns description + "\n" + look; AgentGym sends them apart.
            look = getattr(slot.env, "observation", None)
            if isinstance(look, str) and look and obs.endswith("\n" + look):
                head = obs[: -len(look) - 1]
            else:
                head, look = "", obs
            task_info = getattr(slot.env, "task", {})
            slot.observation = look
            payload = {
                "task_name": task_info.get("task_name", ""),
                "var_num": task_info.get("var_num", 0),
                "task_description": head,
                "observation": look,
                "reward": 0,
                "score": 0,
                "deleted": False,
                "done": False,
            }
            slot.info.update(payload)
            return payload
        payload = {"observation": obs, "reward": 0, "score": 0, "deleted": False, "done": False}
        slot.info.update(payload)
        return payload

    def step(data: dict[str, Any]) -> Any:
        idx, slot = slot_of(data)
        action = data.get("action")
        if not isinstance(action, str):
            raise Malformed("missing string field 'action'")
        require_started(idx, slot)
        if proto.finished_check and slot.done:
            raise RequestError(f"The task with environment {idx} has finished.", 409)
        env = slot.env
        result = env.step(action) if env.server_parses else env.step_action(action)
        obs, reward, done = result.observation, float(result.reward), bool(result.done)
        slot.observation = obs
        info = _bounded_info(result.info)
        if kind == "babyai":
            if done and reward <= 0.5:  # BabyAI's rules: a low-reward end is not an end
                done = False
            if reward == 1:
                done = True
            slot.score += reward
            payload = {"observation": obs, "reward": reward, "score": slot.score, "done": done}
        elif kind == "sciworld":
            raw = result.info.get("score")
            if isinstance(raw, (int, float)) and not isinstance(raw, bool):
                score = float(raw)
            else:  # no score reported (e.g. an invalid action): unchanged unless rewarded
                score = reward * 100 if reward else slot.score
            payload = {
                "observation": obs,
                "reward": score - slot.score,  # ScienceWorld's reward is the score's change
                "score": score,
                "done": done,
            }
            slot.score = score
        elif kind == "textcraft":
            payload = {
                "observation": obs,
                "reward": int(reward) if reward.is_integer() else reward,
                "done": done,
            }
        elif kind == "searchqa":
            slot.done = done
            return {"observation": obs, "reward": reward, "done": done, "info": None}
        else:
            slot.done = done
            return {"state": obs, "reward": reward, "done": done, "info": None}
        slot.done = done
        slot.info.update(payload)
        return {**payload, "info": info}

    def searchqa_prompt(slot: _Slot) -> str:
        return slot.env.instruction() + "\n\n" + slot.prompt

    def observation(data: dict[str, Any]) -> Any:
        idx, slot = slot_of(data)
        if kind == "babyai":
            return slot.info
        require_started(idx, slot)
        if kind == "searchqa":
            return searchqa_prompt(slot)
        return slot.observation

    def detail(data: dict[str, Any]) -> Any:
        return slot_of(data)[1].info

    def started_env_part(data: dict[str, Any], attr: str, what: str) -> Any:
        """An env-specific object behind an extra route, on an env that has been reset."""
        idx, slot = slot_of(data)
        require_started(idx, slot)
        part = getattr(slot.env, attr, None)
        if part is None:
            raise RequestError(f"env {name!r} has no {what}", 404)
        return slot, part

    def action_hint(data: dict[str, Any]) -> Any:
        _, sim = started_env_part(data, "_sim", "action hints")
        return {
            "possible_actions": sim.get_possible_actions(),
            "possible_objects": sim.get_possible_objects(),
        }

    def available_actions(data: dict[str, Any]) -> Any:
        slot, clickables = started_env_part(data, "_clickables", "clickables")
        return {"has_search_bar": slot.env.page == "search", "clickables": clickables()}

    def instruction_text(data: dict[str, Any]) -> Any:
        _, goal = started_env_part(data, "goal", "instruction text")
        if not isinstance(goal, dict) or "instruction" not in goal:
            raise RequestError(f"env {name!r} has no instruction text", 404)
        return "Instruction: " + goal["instruction"]

    def close(data: dict[str, Any]) -> Any:
        raw = data.get(proto.env_key)
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise Malformed(f"missing or non-integer {proto.env_key!r}: {raw!r}"[:300])
        found = raw in slots
        if found:
            drop(raw)
        if kind == "sciworld" and not found:
            raise RequestError(f"The id {raw} is not valid.", 404, always_status=True)
        return {"closed": found} if kind == "webshop" else found

    # -- plumbing -----------------------------------------------------------------------------
    def call(fn: Callable[[dict[str, Any]], Any], data: dict[str, Any]) -> Any:
        with lock:
            sweep()
            return fn(data)

    async def parse(request: Request) -> dict[str, Any]:
        if request.method != "POST":
            data: dict[str, Any] = {}
            for key, value in request.query_params.items():
                data[key] = int(value) if re.fullmatch(r"-?[0-9]{1,18}", value) else value
            return data
        body = await request.body()
        if not body:
            return {}  # AgentGym clients POST /create without a body
        try:
            data = json.loads(body)
        except (ValueError, RecursionError) as e:
            raise Malformed(f"request body must be a JSON object: {e}"[:300]) from None
        if not isinstance(data, dict):
            raise Malformed("request body must be a JSON object")
        if _has_lone_surrogate(data):
            raise RequestError("strings must be valid Unicode (lone surrogate found)", 400, True)
        return data

    def route(fn: Callable[[dict[str, Any]], Any]):
        async def handler(request: Request):
            try:
                data = await parse(request)
                return JSONResponse(await run_in_threadpool(call, fn, data))
            except RequestError as e:
                status = 200 if proto.errors_in_body and not e.always_status else e.status
                return JSONResponse({"error": str(e)}, status_code=status)
            except Exception as e:  # an env bug: report it, keep serving
                status = 200 if proto.errors_in_body else 500
                return JSONResponse({"error": f"{type(e).__name__}: {e}"}, status_code=status)

        return handler

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        sweeper, stop = None, threading.Event()
        if idle_timeout:
            period = min(max(idle_timeout / 4, 0.05), 60.0)

            def loop() -> None:
                while not stop.wait(period):
                    with lock:
                        sweep()

            sweeper = threading.Thread(target=loop, name="env-idle-sweeper", daemon=True)
            sweeper.start()
        try:
            yield
        finally:
            stop.set()
            if sweeper is not None:
                sweeper.join(5)
            with lock:
                for idx in list(slots):
                    drop(idx)

    # Docs are off: nothing here needs them, and they are one more thing to serve.
    app = FastAPI(
        title=f"agentgym-jax env server: {name}",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        lifespan=lifespan,
    )
    app.state.slots = slots  # for tests and introspection
    app.add_api_route("/", lambda: proto.greeting, methods=["GET"])
    routes: list[tuple[str, Callable, str]] = [
        ("/create", create, "POST"),
        ("/reset", reset, "POST"),
        ("/step", step, "POST"),
        ("/observation", observation, "GET"),
        ("/close", close, "POST"),
    ]
    if kind in ("textcraft", "sciworld"):
        routes.append(("/detail", detail, "GET"))
    if kind == "sciworld":
        routes.append(("/action_hint", action_hint, "GET"))
    if kind == "webshop":
        routes += [
            ("/available_actions", available_actions, "GET"),
            ("/instruction_text", instruction_text, "GET"),
        ]
    for path, fn, method in routes:
        app.add_api_route(path, route(fn), methods=[method])
    hosts = None if allowed_hosts is None else frozenset(h.lower() for h in allowed_hosts)
    app.add_middleware(_Guard, max_body=max_body, read_timeout=read_timeout, allowed_hosts=hosts)
    return app


def make_server(
    app: Any,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    log_level: str = "warning",
    header_timeout: float = HEADER_TIMEOUT,
) -> Any:
    """A uvicorn server for `app` that also closes connections stuck before a full request."""
    import uvicorn

    class Server(uvicorn.Server):
        # uvicorn has no deadline for request headers; a half-sent request would hold its
        # connection forever, so connections waiting for headers too long are closed here.
        waiting: dict[Any, tuple[Any, float]]

        async def on_tick(self, counter: int) -> bool:
            now = time.monotonic()
            conns = set(getattr(self.server_state, "connections", ()))
            for conn in conns:
                cycle = getattr(conn, "cycle", None)
                if cycle is not None and not getattr(cycle, "response_complete", True):
                    self.waiting.pop(conn, None)  # in a request: the body deadline covers it
                    continue
                seen = self.waiting.get(conn)
                if seen is None or seen[0] is not cycle:
                    self.waiting[conn] = (cycle, now)
                elif now - seen[1] > header_timeout:
                    transport = getattr(conn, "transport", None)
                    if transport is not None and not transport.is_closing():
                        transport.close()
            for conn in [c for c in self.waiting if c not in conns]:
                del self.waiting[conn]
            return await super().on_tick(counter)

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_keep_alive=5,
        h11_max_incomplete_event_size=64 * 1024,  # bounds request headers
    )
    server = Server(config)
    server.waiting = {}
    return server


def serve(
    name: str,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    max_envs: int = DEFAULT_MAX_ENVS,
    log_level: str = "warning",
    idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
    **env_kwargs: Any,
) -> None:
    """Run the server in this thread until interrupted."""
    app = create_app(
        name,
        max_envs=max_envs,
        idle_timeout=idle_timeout,
        allowed_hosts=LOOPBACK_HOSTS if _is_loopback(host) else None,
        **env_kwargs,
    )
    make_server(app, host=host, port=port, log_level=log_level).run()


def main(argv: list[str] | None = None) -> None:
    import envs

    p = argparse.ArgumentParser(
        prog="agentgym-jax serve-env", description="Serve an env over AgentGym's HTTP protocol."
    )
    p.add_argument("name", choices=envs.list_envs(), help="env to serve")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument(
        "--max-envs",
        type=int,
        default=DEFAULT_MAX_ENVS,
        help="bound on live env instances; at least the number of concurrent episodes "
        f"(default {DEFAULT_MAX_ENVS})",
    )
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=DEFAULT_IDLE_TIMEOUT,
        help="close envs unused for this many seconds (0: never; default %(default)s)",
    )
    args = p.parse_args(argv)
    serve(
        args.name,
        host=args.host,
        port=args.port,
        max_envs=args.max_envs,
        idle_timeout=args.idle_timeout or None,
    )


if __name__ == "__main__":
    main()
