"""agentgym-jax: multi-turn agentic RL for LLMs on JAX."""

__version__ = "0.1.0"
