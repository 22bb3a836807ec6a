import os

# 8 fake CPU devices so sharding is exercised; must be set before jax is imported.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402  (after the environment above)


@pytest.fixture(scope="session")
def agent_dir(tmp_path_factory) -> str:
    """A tiny random Qwen2 and a local ChatML tokenizer in one HF directory (built once)."""
    from tests.helpers.agent import make_agent_dir

    return make_agent_dir(str(tmp_path_factory.mktemp("agent")), hidden=32)
