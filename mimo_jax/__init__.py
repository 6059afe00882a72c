"""mimo_jax: a JAX inference engine for MiMo MoE LLMs.

    from mimo_jax import Engine
    engine = Engine.from_pretrained()            # the bundled SmolLM2 GGUF; or a checkpoint dir / .gguf path
    engine.generate("Hello", max_new_tokens=16).text

Errors are typed (all MimoError): ConfigError, CheckpointError, InputError.
"""
from mimo_jax.errors import CheckpointError, ConfigError, InputError, MimoError

__all__ = ["Engine", "Generation", "GenerationStats", "MimoError", "ConfigError", "CheckpointError", "InputError"]


def __getattr__(name):
    """Engine & co. import jax and the model: only when first asked for, so `mimo_jax.errors` stays light."""
    if name in ("Engine", "Generation", "GenerationStats"):
        from mimo_jax import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'mimo_jax' has no attribute {name!r}")
