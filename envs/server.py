"""Serve one of our envs over AgentGym's HTTP protocol (FastAPI + uvicorn, JSON only).

    python -m envs.server babyai --port 36001          # or: agentgym-jax serve-env babyai

Endpoints as AgentGym's servers: POST /create -> {"id"}; POST /reset {"id", "data_idx"};
POST /step {"id", "action"} -> {observation, reward, score, done, info}; GET /observation?id=;
POST /close {"id"}. Every failure (malformed body, unknown id, stepping a finished env, too many
live envs) is answered `{"error": str}` with HTTP 200, the way AgentGym clients expect. The
number of live envs is bounded by `max_envs`; it binds to 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import argparse
import threading
from typing import Any

from fastapi import Request  # module level: FastAPI resolves handler annotations from globals

DEFAULT_PORT = 36001


def create_app(name: str, max_envs: int = 64, **env_kwargs: Any) -> Any:
    """The FastAPI app serving env `name`; kwargs go to `envs.make`."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    import envs

    factory = envs.resolve(envs.factory_spec(name))
    envs._check_kwargs(name, factory, env_kwargs)
    app = FastAPI(title=f"agentgym-jax env server: {name}")
    lock = threading.Lock()  # envs are not thread-safe; FastAPI runs sync handlers in a pool
    live: dict[int, Any] = {}
    done: dict[int, bool] = {}
    next_id = [0]

    async def body_of(request: Request) -> dict[str, Any]:
        if not await request.body():
            return {}  # AgentGym clients POST /create without a body
        try:
            data = await request.json()
        except Exception as e:
            raise ValueError(f"request body must be a JSON object: {e}") from None
        if not isinstance(data, dict):
            raise ValueError("request body must be a JSON object")
        return data

    def env_id(data: dict[str, Any]) -> int:
        raw = data.get("id", data.get("env_idx"))
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise ValueError(f"missing or non-integer env id: {raw!r}")
        if raw not in live:
            raise ValueError(f"The id {raw} is not valid; live ids: {sorted(live)[:20]}")
        return raw

    def guarded(fn):
        async def handler(request: Request) -> JSONResponse:
            try:
                with_body = request.method == "POST"
                data = await body_of(request) if with_body else dict(request.query_params)
                if not with_body and "id" in data:
                    data["id"] = int(data["id"]) if data["id"].lstrip("-").isdigit() else data["id"]
                with lock:
                    return JSONResponse(fn(data))
            except Exception as e:  # AgentGym protocol: errors are a 200 with {"error"}
                return JSONResponse({"error": f"{type(e).__name__}: {e}"})

        return handler

    def create(_: dict[str, Any]) -> dict[str, Any]:
        if len(live) >= max_envs:
            raise RuntimeError(f"too many live envs (max_envs={max_envs}); POST /close some first")
        idx = next_id[0]
        live[idx] = envs.make(name, **env_kwargs)
        done[idx] = False
        next_id[0] += 1
        return {"id": idx}

    def reset(data: dict[str, Any]) -> dict[str, Any]:
        idx = env_id(data)
        task = data.get("data_idx")
        if isinstance(task, bool) or not isinstance(task, int):
            raise ValueError(f"missing or non-integer data_idx: {task!r}")
        obs = live[idx].reset(task)
        done[idx] = False
        return {
            "id": idx,
            "observation": obs,
            "reward": 0.0,
            "score": 0.0,
            "done": False,
            "deleted": False,
        }

    def step(data: dict[str, Any]) -> dict[str, Any]:
        idx = env_id(data)
        action = data.get("action")
        if not isinstance(action, str):
            raise ValueError("missing string field 'action'")
        if done[idx]:
            raise RuntimeError(f"The task with environment {idx} has finished.")
        env = live[idx]
        result = env.step(action) if env.server_parses else env.step_action(action)
        if result.info.get("error") == "not reset":
            raise RuntimeError(f"environment {idx} has not been reset")
        done[idx] = result.done
        info = {
            k: v
            for k, v in result.info.items()
            if isinstance(v, (str, int, float, bool, type(None)))
        }
        return {
            "observation": result.observation,
            "reward": result.reward,
            "score": result.reward,
            "done": result.done,
            "info": info,
        }

    def observation(data: dict[str, Any]) -> Any:
        return getattr(live[env_id(data)], "observation", "")

    def close(data: dict[str, Any]) -> dict[str, Any]:
        idx = env_id(data)
        live.pop(idx).close()
        done.pop(idx, None)
        return {"closed": True, "id": idx}

    app.add_api_route("/", lambda: f"This is environment {name} (agentgym-jax).", methods=["GET"])
    for path, fn, method in (
        ("/create", create, "POST"),
        ("/reset", reset, "POST"),
        ("/step", step, "POST"),
        ("/observation", observation, "GET"),
        ("/close", close, "POST"),
    ):
        app.add_api_route(path, guarded(fn), methods=[method])
    return app


def serve(
    name: str,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    max_envs: int = 64,
    log_level: str = "warning",
    **env_kwargs: Any,
) -> None:
    """Run the server in this thread until interrupted."""
    import uvicorn

    uvicorn.run(
        create_app(name, max_envs=max_envs, **env_kwargs), host=host, port=port, log_level=log_level
    )


def main(argv: list[str] | None = None) -> None:
    import envs

    p = argparse.ArgumentParser(
        prog="agentgym-jax serve-env", description="Serve an env over AgentGym's HTTP protocol."
    )
    p.add_argument("name", choices=envs.list_envs(), help="env to serve")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--max-envs", type=int, default=64, help="bound on live env instances")
    args = p.parse_args(argv)
    serve(args.name, host=args.host, port=args.port, max_envs=args.max_envs)


if __name__ == "__main__":
    main()
