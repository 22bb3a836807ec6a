"""Environments for agentgym-jax: a registry, the `Env` protocol and the chat prompt helper.

    env = envs.make("babyai", levels=["GoToRedBallNoDists"])
    obs = env.reset(task_id)
    messages = envs.initial_messages(env, obs)      # feed to the chat template
    result = env.step(model_reply)                  # StepResult(observation, reward, done, info)

Factories are registered as "module:attr" strings (imported on first use, so `import envs` stays
cheap and spawn workers can rebuild any env) or as importable top-level callables.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any, Union

from envs.base import (
    ACK,
    Env,
    Parsed,
    StepResult,
    initial_messages,
    parse_agentgym_action,
    parse_last_action,
)

Factory = str | Callable[..., Env]

_REGISTRY: dict[str, Factory] = {
    "babyai": "envs.babyai:BabyAIEnv",
    "textcraft": "envs.textcraft:TextCraftEnv",
    "sciworld": "envs.sciworld:SciWorldEnv",
    "searchqa": "envs.searchqa:SearchQAEnv",
    "webshop": "envs.webshop:WebShopEnv",
    "http": "envs.http_client:HttpEnv",
}

__all__ = [
    "ACK",
    "Env",
    "Parsed",
    "StepResult",
    "initial_messages",
    "parse_agentgym_action",
    "parse_last_action",
    "make",
    "register",
    "list_envs",
    "resolve",
    "task_ids",
]


def register(name: str, factory: Factory, *, overwrite: bool = False) -> None:
    """Add an env. `factory` is "module:attr" or a top-level callable returning an `Env`.

    Pool workers rebuild envs from the factory, so it must be importable in a fresh process:
    define it at module level (see `envs/testing.py`), never as a lambda or closure.
    """
    if not isinstance(name, str) or not name:
        raise ValueError("env name must be a non-empty string")
    if name in _REGISTRY and not overwrite and _REGISTRY[name] != factory:
        raise ValueError(f"env {name!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[name] = factory


def list_envs() -> list[str]:
    return sorted(_REGISTRY)


def factory_spec(name: str) -> Factory:
    """The registered factory (as registered, unresolved); what the pool ships to workers."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown env {name!r}; valid envs: {', '.join(list_envs())}")
    return _REGISTRY[name]


def resolve(spec: Factory) -> Callable[..., Env]:
    if callable(spec):
        return spec
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


def _check_kwargs(name: str, factory: Callable[..., Any], kwargs: dict[str, Any]) -> None:
    """Check env arguments by name, then by value through the factory's optional classmethod
    ``check_kwargs(**kwargs)`` (cheap: no simulator is started), so a bad level or task fails
    when the driver is built rather than in a worker at the first reset."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = None
    if params is not None and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        valid = [n for n, p in params.items() if p.kind in kinds]
        bad = sorted(set(kwargs) - set(valid))
        if bad:
            raise TypeError(
                f"env {name!r} got unknown argument(s) {bad}; valid arguments: {valid or 'none'}"
            )
    check = getattr(factory, "check_kwargs", None)
    if callable(check):
        check(**kwargs)


def make(name: str, /, **kwargs: Any) -> Env:
    """Build env `name` with its keyword arguments; unknown names or arguments raise clearly."""
    factory = resolve(factory_spec(name))
    _check_kwargs(name, factory, kwargs)
    return factory(**kwargs)


def task_ids(name: str, split: str = "train", **kwargs: Any) -> list[int]:
    """Task ids of env `name` for `split` ("train" or "test"); kwargs as for `make`."""
    factory = resolve(factory_spec(name))
    if not hasattr(factory, "task_ids"):
        raise TypeError(f"env {name!r} factory has no task_ids(); register the Env class itself")
    return list(factory.task_ids(split, **kwargs))
