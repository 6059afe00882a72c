"""Checkpoint loading: one mapping table from checkpoint keys to pytree paths and transforms.

The layouts of MiMo checkpoints read by the same table:
  * transformers' in-memory layout: fused experts `mlp.experts.gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I],
    sinks in `self_attn.sinks`;
  * the XiaomiMiMo hub layout: per-expert `mlp.experts.{e}.{gate,up,down}_proj.weight`, sinks in
    `self_attn.attention_sink_bias`, FP8 e4m3 weights with `<name>_scale_inv` 128x128 block scales;
  * Xiaomi's FP4 releases: routed experts in MXFP4 (`...experts.{e}.*_proj.weight` uint8 e2m1 pairs and
    `...weight_scale` e8m0 bytes; see convert.py), imported as stored into quant.py's mxfp4 format.
Llama checkpoints use the subset of names they share. `model.mtp.layers.{j}.*` land in params["mtp"].

load_checkpoint streams: tensors are read in file order (plain reads, safetensors_io; two reader threads a bounded
read-ahead in front), FP8-dequantized, transposed and cast (on an accelerator all of it on the device: the host
only reads and copies bytes), quantized when it is a routed expert and quant_experts asks (one expert matrix at
a time), and written into their device shards (placement.DeviceSink); host memory stays at a few times the
largest tensor, each device at its final share plus the pieces in flight. Every leaf must be filled exactly; a missing, misshapen or unknown
tensor (one no rule maps, e.g. a bias) is a CheckpointError naming it, and so is a truncated file, a shard the
index lists but the directory lacks, and a block-scale tensor of the wrong shape.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import json
import re
from pathlib import Path
from typing import Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from mimo_jax import fp8, quant, safetensors_io
from mimo_jax.config import MOE, ModelConfig, config_from_hf
from mimo_jax.errors import CheckpointError, ConfigError
from mimo_jax.model import param_shapes, plan_of
from mimo_jax.plan import layer_slots, leaf_kind, path_keys, stack_axes
from mimo_jax.quantize_model import check_format, dense_structs, quantize_structs


# ---- transforms: source tensor (torch layout [out, in]) -> {target leaf name: array in our [in, out] layout} ----

def _same(a):
    return a


def _t(a):  # numpy (a view) or a jax array (transposed on its device)
    return a.swapaxes(-1, -2)


def _split_gate_up(a):  # [E, 2I, H] -> gate, up as [E, H, I]
    i = a.shape[1] // 2
    return _t(a[:, :i]), _t(a[:, i:])


@dataclasses.dataclass(frozen=True)
class Rule:
    pattern: str  # regex over the key suffix after the layer prefix
    targets: tuple[tuple[str, ...], ...]  # pytree sub-paths filled
    fn: Callable = _same  # returns one array, or a tuple of arrays (one per target)
    per_expert: bool = False  # the key carries an expert index and fills one expert's slice


TOP_RULES = {
    "model.embed_tokens.weight": Rule("", (("embed",),)),
    "model.norm.weight": Rule("", (("final_norm",),)),
    "lm_head.weight": Rule("", (("lm_head",),), _t),
}

LAYER_RULES = (
    Rule(r"input_layernorm\.weight", (("attn_norm",),)),
    Rule(r"(post_attention_layernorm|pre_mlp_layernorm)\.weight", (("mlp_norm",),)),
    Rule(r"self_attn\.q_proj\.weight", (("attn", "wq"),), _t),
    Rule(r"self_attn\.k_proj\.weight", (("attn", "wk"),), _t),
    Rule(r"self_attn\.v_proj\.weight", (("attn", "wv"),), _t),
    Rule(r"self_attn\.o_proj\.weight", (("attn", "wo"),), _t),
    Rule(r"self_attn\.(sinks|attention_sink_bias)", (("attn", "sink"),)),
    Rule(r"mlp\.gate_proj\.weight", (("mlp", "w_gate"),), _t),
    Rule(r"mlp\.up_proj\.weight", (("mlp", "w_up"),), _t),
    Rule(r"mlp\.down_proj\.weight", (("mlp", "w_down"),), _t),
    Rule(r"mlp\.gate\.weight", (("mlp", "router"),), _t),
    Rule(r"mlp\.gate\.e_score_correction_bias", (("mlp", "router_bias"),)),
    Rule(r"mlp\.experts\.gate_up_proj", (("mlp", "w_gate"), ("mlp", "w_up")), _split_gate_up),
    Rule(r"mlp\.experts\.down_proj", (("mlp", "w_down"),), _t),
    Rule(r"mlp\.experts\.(?P<e>\d+)\.gate_proj\.weight", (("mlp", "w_gate"),), _t, per_expert=True),
    Rule(r"mlp\.experts\.(?P<e>\d+)\.up_proj\.weight", (("mlp", "w_up"),), _t, per_expert=True),
    Rule(r"mlp\.experts\.(?P<e>\d+)\.down_proj\.weight", (("mlp", "w_down"),), _t, per_expert=True),
    # MTP-only tensors
    Rule(r"enorm\.weight", (("enorm",),)),
    Rule(r"hnorm\.weight", (("hnorm",),)),
    Rule(r"eh_proj\.weight", (("eh_proj",),), _t),
    Rule(r"final_layernorm\.weight", (("final_norm",),)),
)
_LAYER_KEY = re.compile(r"model\.(layers|mtp\.layers)\.(\d+)\.(.+)")
IGNORED = re.compile(r".*(rotary_emb\.inv_freq|_scale_inv|\.weight_scale)$")
# the canonical (hub) key reported when a leaf is missing
_CANONICAL = {("attn_norm",): "input_layernorm.weight", ("mlp_norm",): "post_attention_layernorm.weight",
              ("attn", "wq"): "self_attn.q_proj.weight", ("attn", "wk"): "self_attn.k_proj.weight",
              ("attn", "wv"): "self_attn.v_proj.weight", ("attn", "wo"): "self_attn.o_proj.weight",
              ("attn", "sink"): "self_attn.attention_sink_bias", ("mlp", "w_gate"): "mlp.gate_proj.weight",
              ("mlp", "w_up"): "mlp.up_proj.weight", ("mlp", "w_down"): "mlp.down_proj.weight",
              ("mlp", "router"): "mlp.gate.weight", ("mlp", "router_bias"): "mlp.gate.e_score_correction_bias",
              ("enorm",): "enorm.weight", ("hnorm",): "hnorm.weight", ("eh_proj",): "eh_proj.weight",
              ("final_norm",): "final_layernorm.weight"}


def _match_layer_rule(suffix: str):
    for rule in LAYER_RULES:
        m = re.fullmatch(rule.pattern, suffix)
        if m:
            return rule, m
    return None, None


# ---- the checkpoint directory ----

INDEX = "model.safetensors.index.json"
_EXPERT_WEIGHT = re.compile(r".*\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight")
_PACKED = ("U8", "I8")  # an expert weight stored in bytes is MXFP4 (e2m1 pairs) with a `weight_scale` of e8m0s
# The target layers' FP8 tensors that load_checkpoint(dense="fp8") keeps in FP8 (quantize_model.DENSE_FP8_LEAVES)
DENSE_FP8_KEY = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkv]_proj|mlp\.(gate|up|down)_proj)\.weight")
# Per dense format, the stored-FP8 tensors kept as stored (quantize_model.is_dense_fp8_leaf's leaves): "fp8_layers" and
# "fp8_all" also o_proj (and lm_head) where a checkpoint ships them in FP8 (MiMo's hub does not)
_LAYERS = r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight"
FP8_KEPT = {"fp8": DENSE_FP8_KEY, "fp8_layers": re.compile(_LAYERS),
            "fp8_all": re.compile(_LAYERS + r"|lm_head\.weight")}


class Checkpoint:
    """config.json + *.safetensors (+ the index): tensors read one at a time with plain reads, FP8 blocks
    dequantized to float32, MXFP4 experts imported as stored (quant.from_mxfp4_blocks).

    device None: every conversion in numpy on the host. A device: read() puts the stored bytes there and
    dequantizes there (_dequant_fp8_on_device), so the host only reads; callers transform and cast on the device
    (loader rules, placement). read() = convert(read_raw()): read_raw does the file I/O only (reader threads)."""

    def __init__(self, path: str | Path, device=None, keep_fp8: bool = False, fp8_keys: re.Pattern = DENSE_FP8_KEY):
        self.path = Path(path)
        self.device = device
        self.keep_fp8 = keep_fp8  # read(): the fp8_keys tensors stored in FP8 as fp8.Fp8Weight, as stored
        self.fp8_keys = fp8_keys
        if not self.path.is_dir():
            raise CheckpointError(f"checkpoint directory not found: {self.path}")
        cfg_file = self.path / "config.json"
        if not cfg_file.is_file():
            raise CheckpointError(f"no config.json in checkpoint directory {self.path}")
        try:
            self.hf_config = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{cfg_file} is not valid JSON: {e}") from None
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"no *.safetensors files in {self.path}")
        self.entries: dict[str, safetensors_io.Entry] = {}
        for f in files:
            self.entries.update(safetensors_io.read_header(f))
        self._check_index()
        quant = self.hf_config.get("quantization_config") or {}
        self.block = tuple(quant.get("weight_block_size", (128, 128)))
        self.square_blocks = len(self.block) == 2 and self.block[0] == self.block[1]

    def _check_index(self) -> None:
        """Every shard the index names is there and holds the tensors the index puts in it."""
        index = self.path / INDEX
        if not index.is_file():
            return
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{INDEX} is not a valid index ({e})") from None
        for name in sorted(set(weight_map.values())):
            if not (self.path / name).is_file():
                raise CheckpointError(f"checkpoint shard {name} is missing (listed in {INDEX})")
        for key, name in weight_map.items():
            e = self.entries.get(key)
            if e is None or e.file.name != name:
                raise CheckpointError(f"tensor {key} is not in {name}, where {INDEX} puts it")

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.entries[key].shape

    def nbytes(self, key: str) -> int:
        """Bytes read for this tensor, its block scales included."""
        return sum(self.entries[k].nbytes for k in (key, key + "_scale_inv", key + "_scale") if k in self.entries)

    def stores_mxfp4(self, key: str) -> bool:
        return self.entries[key].dtype in _PACKED and bool(_EXPERT_WEIGHT.fullmatch(key))

    def read(self, key: str):
        """The tensor as float numpy (torch layout; a jax array on self.device when there is one), or, for an
        MXFP4 expert, a quant.QuantizedWeight [in, out]; with keep_fp8, a dense FP8 tensor as an fp8.Fp8Weight
        [in, out]."""
        return self.convert(key, self.read_raw(key))

    def read_raw(self, key: str) -> tuple[np.ndarray, np.ndarray | None]:
        """(stored tensor, its scales or None) as read from the file, shapes checked; file I/O only."""
        a = safetensors_io.read_tensor(self.entries[key])
        if self.stores_mxfp4(key):
            scale_key = key + "_scale"
            if scale_key not in self.entries:
                raise CheckpointError(f"MXFP4 expert tensor {key} ({self.entries[key].dtype}) has no {scale_key}")
            scales = safetensors_io.read_tensor(self.entries[scale_key])
            want = (*a.shape[:-1], 2 * a.shape[-1] // 32)
            if scales.shape != want or scales.dtype.itemsize != 1:
                raise CheckpointError(f"{scale_key} has shape {scales.shape} {scales.dtype}, expected {want} e8m0 "
                                      f"bytes for MXFP4 {key} {a.shape}")
            return a, scales
        if a.dtype != ml_dtypes.float8_e4m3fn:
            return a, None
        scale_key = key + "_scale_inv"
        if scale_key not in self.entries:
            raise CheckpointError(f"FP8 tensor {key} has no {scale_key}")
        scale = safetensors_io.read_tensor(self.entries[scale_key]).astype(np.float32)
        bo, bi = self.block
        want = (-(-a.shape[0] // bo), -(-a.shape[1] // bi)) if a.ndim == 2 else None
        if a.ndim != 2 or scale.shape != want:
            raise CheckpointError(f"{scale_key} has shape {scale.shape}, expected {want} for {key} {a.shape}")
        return a, scale

    def convert(self, key: str, raw: tuple[np.ndarray, np.ndarray | None]):
        """read()'s value from read_raw()'s bytes: FP8 dequantized, MXFP4 imported, on self.device if any."""
        a, scale = raw
        if self.stores_mxfp4(key):
            return quant.from_mxfp4_blocks(a, scale)
        if scale is not None and self.keep_fp8 and self.fp8_keys.fullmatch(key) and self.square_blocks:
            if self.device is not None:  # kept as stored: "out, in" values and scales
                a, scale = jax.device_put(a, self.device), jax.device_put(scale, self.device)
            return fp8.from_checkpoint(a, scale, block=self.block[0])
        if self.device is not None:
            a = jax.device_put(a, self.device)
            return a if scale is None else _dequant_fp8_on_device(a, jax.device_put(scale, self.device), self.block)
        if scale is None:
            return a
        bo, bi = self.block
        if a.shape[0] % bo == 0 and a.shape[1] % bi == 0:  # whole blocks: broadcast the scales, no full-size copy
            blocks = a.reshape(scale.shape[0], bo, scale.shape[1], bi).astype(np.float32)
            return (blocks * scale[:, None, :, None]).reshape(a.shape)
        full = np.repeat(np.repeat(scale, bo, axis=0), bi, axis=1)[: a.shape[0], : a.shape[1]]
        return a.astype(np.float32) * full


@functools.partial(jax.jit, static_argnames="block")
def _dequant_fp8_on_device(a, scale, block):
    """FP8 e4m3 [out, in] x float32 block scales -> float32, on the device holding a (the numpy path's numbers:
    an exact widening, then one float32 product per element)."""
    bo, bi = block
    so, si = scale.shape
    full = jnp.broadcast_to(scale[:, None, :, None], (so, bo, si, bi)).reshape(so * bo, si * bi)
    return a.astype(jnp.float32) * full[: a.shape[0], : a.shape[1]]


def _np_dtype(dtype):
    return np.dtype(jnp.dtype(dtype).name) if jnp.dtype(dtype) != jnp.bfloat16 else np.dtype(ml_dtypes.bfloat16)


class HostSink:
    """Leaves as host numpy buffers (the GGUF path and small models): put() copies into the leaf's buffer."""

    def __init__(self, structs):
        self.structs = structs
        self.buffers = {path_keys(p): np.zeros(s.shape, _np_dtype(s.dtype))
                        for p, s in jax.tree_util.tree_flatten_with_path(structs)[0]}

    def put(self, leaf, index, value):
        if isinstance(value, (quant.QuantizedWeight, fp8.Fp8Weight)):
            raise CheckpointError(f"parameter {'.'.join(map(str, leaf))} is stored quantized; load it with "
                                  f"load_checkpoint")
        self.buffers[leaf][index] = value

    def result(self):
        return _unflatten(self.structs, self.buffers)


def assemble(cfg: ModelConfig, tensors: Iterable[tuple[str, np.ndarray]], dtype=jnp.bfloat16) -> dict:
    """Fill the parameter pytree of `cfg` from (checkpoint key, array) pairs through the mapping table.

    Returns host numpy leaves. Raises CheckpointError for a misshapen, duplicate or missing tensor.
    """
    return fill(cfg, tensors, HostSink(param_shapes(cfg, dtype)))


def fill(cfg: ModelConfig, tensors: Iterable[tuple[str, np.ndarray]], sink):
    """Route each (checkpoint key, array) through the mapping table into sink.put(leaf, index, value), checking
    shapes, duplicates and that every leaf (every expert of every layer) is filled; returns sink.result()."""
    structs = param_shapes(cfg)
    shapes = {path_keys(p): s.shape for p, s in jax.tree_util.tree_flatten_with_path(structs)[0]}
    plan = plan_of(cfg)
    slots = layer_slots(plan)
    filled = {k: np.zeros(s[: stack_axes(k) + _is_expert_leaf(k, plan)], bool) for k, s in shapes.items()}

    stored = ()  # the shape of the tensor being placed, as stored

    def place(key, leaf, index, value, expert=None):
        if leaf not in shapes:
            raise CheckpointError(f"tensor {key} does not fit the config (no parameter {'.'.join(map(str, leaf))})")
        idx = index + ((expert,) if expert is not None else ())
        want = shapes[leaf][len(idx):]
        if tuple(value.shape) != tuple(want):
            raise CheckpointError(f"tensor {key} has shape {stored}, which does not match the config "
                                  f"(expected {tuple(want)} after the layout transform, got {tuple(value.shape)})")
        if np.any(filled[leaf][idx]):
            raise CheckpointError(f"tensor {key} is given twice")
        sink.put(leaf, idx, value)
        filled[leaf][idx] = True

    for key, array in tensors:
        stored = tuple(array.shape)
        if key in TOP_RULES:
            rule = TOP_RULES[key]
            if rule.targets[0] not in shapes:  # e.g. lm_head of a tied model
                continue
            value, array = _apply(rule.fn, array), None  # the untransformed copy freed before placing
            place(key, rule.targets[0], (), value)
            continue
        m = _LAYER_KEY.fullmatch(key)
        rule, rm = _match_layer_rule(m.group(3)) if m else (None, None)
        if rule is None:
            if not IGNORED.fullmatch(key):  # e.g. a bias this model has no place for: loading without it would
                raise CheckpointError(f"checkpoint tensor {key} is not supported (no parameter of this model "
                                      f"takes it)")  # run another model
            continue
        j = int(m.group(2))
        if m.group(1) == "layers":
            if j >= cfg.num_layers:
                raise CheckpointError(f"tensor {key}: layer {j} is past num_hidden_layers={cfg.num_layers}")
            slot = slots[j]
            prefix = ("layers", slot.item) + ((slot.run,) if slot.run is not None else ())
            index = slot.index
        else:
            if j >= cfg.num_mtp_layers:
                continue
            prefix, index = ("mtp",), (j,)
        if isinstance(array, quant.QuantizedWeight) and not rule.per_expert:
            raise CheckpointError(f"tensor {key} is stored as MXFP4; only routed experts may be")
        kept = isinstance(array, (quant.QuantizedWeight, fp8.Fp8Weight))  # [in, out] already
        values = array if kept else _apply(rule.fn, array)  # as [in, out]
        array = None
        values = values if isinstance(values, tuple) else (values,)
        expert = int(rm.group("e")) if rule.per_expert else None
        for target, value in zip(rule.targets, values):
            place(key, prefix + target, index, value, expert)
    for leaf, done in filled.items():
        if not done.all():
            raise CheckpointError(f"checkpoint is missing tensor {_missing_name(cfg, leaf, done, slots)}")
    return sink.result()


def _apply(fn, array):
    """A rule's transform: numpy views on the host, one compiled program on a jax array's device."""
    if fn is _same:
        return array
    return fn(array) if isinstance(array, np.ndarray) else _jitted(fn)(array)


@functools.cache
def _jitted(fn):
    return jax.jit(fn)


def _is_expert_leaf(leaf: tuple, plan) -> int:
    """1 for the expert weights of a MoE layer (filled expert by expert), else 0."""
    kind = leaf_kind(plan, leaf)
    return int(kind is not None and kind[1] == MOE and leaf[-1] in ("w_gate", "w_up", "w_down"))


def _missing_name(cfg, leaf, done, slots) -> str:
    if leaf[0] in ("embed", "final_norm", "lm_head"):
        return {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight",
                "lm_head": "lm_head.weight"}[leaf[0]]
    first = tuple(int(i) for i in np.argwhere(~done)[0])
    if leaf[0] == "mtp":
        j, sub, rest = first[0], leaf[1:], first[1:]
        prefix = f"model.mtp.layers.{j}."
    else:
        lead = 2 if isinstance(leaf[2], int) else 1
        item, run = leaf[1], (leaf[2] if lead == 2 else None)
        layer = next(i for i, s in enumerate(slots) if s.item == item and s.run == run and s.index == first[:lead])
        sub, rest = leaf[2 + (lead == 2):], first[lead:]
        prefix = f"model.layers.{layer}."
    name = _CANONICAL.get(tuple(sub), ".".join(sub))
    if rest:  # one expert's slice
        name = name.replace("mlp.", f"mlp.experts.{rest[0]}.")
    return prefix + name


def _unflatten(structs, buffers):
    paths, treedef = jax.tree_util.tree_flatten_with_path(structs)
    return jax.tree_util.tree_unflatten(treedef, [buffers[path_keys(p)] for p, _ in paths])


def _mtp_count(keys: Iterable[str]) -> int:
    found = [int(m.group(1)) for k in keys if (m := re.match(r"model\.mtp\.layers\.(\d+)\.", k))]
    return max(found) + 1 if found else 0


def checkpoint_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of a checkpoint directory (safetensors: config.json + the MTP layers its headers hold;
    a converted directory: the config it was written with), read without any weight."""
    from mimo_jax import checkpoint

    if checkpoint.is_converted(path):
        return checkpoint.read_meta(path)[0]
    ckpt = Checkpoint(path)
    return config_from_hf(ckpt.hf_config).replace(num_mtp_layers=_mtp_count(ckpt.keys()))


def expert_format(ckpt: Checkpoint, cfg: ModelConfig, quant_experts: str | None, quant_group: int):
    """(format, group) the routed experts are held in: what quant_experts asks; MXFP4-stored experts stay MXFP4
    (None or "mxfp4"; another format would requantize already-4-bit weights: refused)."""
    fmt, group = check_format(quant_experts, quant_group)
    stored = sorted({ckpt.entries[k].dtype for k in ckpt.keys() if ckpt.stores_mxfp4(k)})
    if stored:
        if fmt not in ("none", "mxfp4"):
            raise ConfigError(f"this checkpoint stores its experts in MXFP4; quant_experts={quant_experts!r} would "
                              f"requantize them (load with quant_experts=None or 'mxfp4')")
        fmt, group = "mxfp4", 32
    if fmt != "none" and not cfg.num_experts:
        raise ConfigError(f"quant_experts={fmt!r} quantizes routed experts; this model ({cfg.model_type}) has none")
    return fmt, group


PREFETCH_BYTES = 1 << 30  # at most this much read ahead of the tensor being placed, and at most twice the largest
READERS = 2  # tensor (host memory: a small multiple of the largest tensor; one tensor is always read ahead)


def load_checkpoint(path: str | Path, dtype=jnp.bfloat16, mesh=None, attention: str = "tp",
                    quant_experts: str | None = None, quant_group: int = 128,
                    prefetch_bytes: int = PREFETCH_BYTES, on_device: bool | None = None,
                    dense: str = "bf16") -> tuple[ModelConfig, dict]:
    """(config, params on the devices) from a directory of config.json + *.safetensors, streamed: reader threads
    read tensors ahead (at most prefetch_bytes, and twice the largest tensor, beyond the one being placed); each
    tensor is FP8-dequantized, transposed and cast, quantized when it is a routed expert and `quant_experts` names
    a format, and written into its device shards (placement.DeviceSink). mesh None: the default device. Under
    jax.distributed each process fills its own devices' shards.

    on_device (None: when the devices are accelerators): the stored bytes go to a device of this process and the
    dequant / transpose / cast run there, so the host only reads (numpy's FP8 dequant + transpose + cast ran at
    ~0.1 GB/s on one core: BENCHMARKS.md). On a CPU backend the device is the host: numpy does it, one copy of
    the tensor fewer.

    dense "fp8": q/k/v and the dense MLP of the target layers as fp8.Fp8Weight (quantize_model.DENSE_FP8_LEAVES):
    an FP8 checkpoint's values and 128 x 128 block scales kept as stored (nothing rounded again), a float
    checkpoint's tensors quantized while loading (== quantize_dense after a load in `dtype`). dense "fp8_layers" /
    "fp8_all": also o_proj (/ and an untied lm_head), which the hub stores in bf16, quantized while loading."""
    from mimo_jax import placement

    devices = list(mesh.devices.flat) if mesh is not None else jax.devices()
    stage = next(d for d in devices if d.process_index == jax.process_index())
    if on_device is None:
        on_device = stage.platform != "cpu"
    ckpt = Checkpoint(path, device=stage if on_device else None, keep_fp8=dense != "bf16",
                      fp8_keys=FP8_KEPT.get(dense, DENSE_FP8_KEY))
    cfg = config_from_hf(ckpt.hf_config).replace(num_mtp_layers=_mtp_count(ckpt.keys()))
    fmt, group = expert_format(ckpt, cfg, quant_experts, quant_group)
    # FP8 kept in the checkpoint's own square blocks (fp8.Fp8Weight.block), else quantized in 128 x 128 ones
    block = ckpt.block[0] if ckpt.square_blocks and any(ckpt.entries[k].dtype == "F8_E4M3" for k in ckpt.keys()) \
        else fp8.BLOCK
    targets = dense_structs(quantize_structs(param_shapes(cfg, dtype), fmt, group), dense, block=block)
    shardings = placement.shardings(targets, cfg, mesh, attention)
    largest = max(ckpt.nbytes(k) for k in ckpt.keys())
    tensors = iter_tensors(ckpt, progress=True, prefetch_bytes=min(prefetch_bytes, 2 * largest))
    return cfg, fill(cfg, tensors, placement.DeviceSink(targets, shardings, dtype=dtype))


def iter_tensors(ckpt: Checkpoint, progress: bool = False, prefetch_bytes: int = 0) -> Iterator[tuple[str, object]]:
    """Stream (key, ckpt.read(key)) in file order; block scales are consumed by their weights. prefetch_bytes > 0:
    READERS threads read the following tensors' bytes (read_raw) while this one is converted and placed, at most
    prefetch_bytes of them held at a time. progress: a bar of bytes (and tensors) read on stderr when it is a
    terminal."""
    import sys
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    keys = [k for k in ckpt.keys() if not IGNORED.fullmatch(k)]
    bar = tqdm(total=sum(ckpt.nbytes(k) for k in keys), unit="B", unit_scale=True, unit_divisor=1024,
               desc=f"loading {ckpt.path.name}", file=sys.stderr, leave=False, disable=None if progress else True)
    pool = ThreadPoolExecutor(READERS, thread_name_prefix="mimo-read") if prefetch_bytes > 0 else None
    pending, ahead, nxt = collections.deque(), 0, 0
    try:
        for i, k in enumerate(keys):
            if pool is None:
                yield k, ckpt.convert(k, ckpt.read_raw(k))  # no local holds the bytes once converted
            else:
                while nxt < len(keys) and (nxt == i or ahead + ckpt.nbytes(keys[nxt]) <= prefetch_bytes):
                    pending.append(pool.submit(ckpt.read_raw, keys[nxt]))
                    ahead += ckpt.nbytes(keys[nxt])
                    nxt += 1
                ahead -= ckpt.nbytes(k)
                yield k, ckpt.convert(k, pending.popleft().result())
            bar.update(ckpt.nbytes(k))
            bar.set_postfix_str(f"{i + 1}/{len(keys)} tensors", refresh=False)
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
