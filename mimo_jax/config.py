"""Model configuration: one frozen dataclass, JSON presets in configs/, and readers for HF config.json files.

Two MiMo config.json dialects exist and both are read here:
  * transformers' `MiMoV2FlashConfig` (`layer_types`, `mlp_layer_types`, `rope_parameters`, `sliding_window` = 129
    counting the current token; SWA layers have 2x the KV heads of full layers);
  * the XiaomiMiMo hub files (`hybrid_layer_pattern`, `moe_layer_freq`, `swa_*` keys, `sliding_window_size` = 128).
A Llama config (`model_type: llama`) maps onto the same fields: all full attention, all dense, full rotary.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from mimo_jax.errors import ConfigError

# Dense (non-expert) weight formats (quantize_model.quantize_dense): bf16; "fp8", the hub's FP8 set (q/k/v, dense MLP);
# "fp8_layers", also o_proj; "fp8_all", also o_proj and an untied lm_head. Here so that flag parsers need no jax.
DENSE_CHOICES = ("bf16", "fp8", "fp8_layers", "fp8_all")

FULL, SLIDING = "full", "sliding"
DENSE, MOE = "dense", "moe"


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """What one attention layer needs to know (derived from ModelConfig, per layer type)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int  # q and k
    v_head_dim: int
    rope_theta: float
    rope_dim: int  # leading dims of each q/k head that rotate
    window: int | None  # previous tokens visible besides the current one; None = full attention
    sink: bool
    value_scale: float


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    layer_types: tuple[str, ...]  # "full" | "sliding", one per layer
    mlp_types: tuple[str, ...]  # "dense" | "moe", one per layer
    # full-attention layers
    num_heads: int
    num_kv_heads: int
    head_dim: int
    v_head_dim: int
    rope_theta: float
    # sliding-window layers
    swa_num_heads: int
    swa_num_kv_heads: int
    swa_head_dim: int
    swa_v_head_dim: int
    swa_rope_theta: float
    sliding_window: int  # previous tokens visible (hub `sliding_window_size`; transformers stores this + 1)
    partial_rotary_factor: float = 1.0
    swa_partial_rotary_factor: float | None = None  # sliding layers' own factor; None = partial_rotary_factor
    attention_value_scale: float = 1.0
    sink_full: bool = False
    sink_swa: bool = False
    # MLPs
    intermediate_size: int = 0
    moe_intermediate_size: int = 0
    num_experts: int = 0
    num_experts_per_tok: int = 0
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    # misc
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 131072
    num_mtp_layers: int = 0
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    model_type: str = "mimo_v2_flash"

    def __post_init__(self):
        def need(cond, msg):
            if not cond:
                raise ConfigError(f"invalid config: {msg}")

        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "v_head_dim", "swa_num_heads", "swa_num_kv_heads", "swa_head_dim", "swa_v_head_dim"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0, f"{name} must be a positive int")
        need(len(self.layer_types) == self.num_layers, f"layer_types has {len(self.layer_types)} entries, "
             f"num_layers is {self.num_layers}")
        need(len(self.mlp_types) == self.num_layers, f"mlp_types has {len(self.mlp_types)} entries, "
             f"num_layers is {self.num_layers}")
        need(set(self.layer_types) <= {FULL, SLIDING}, f"layer_types must be '{FULL}' or '{SLIDING}'")
        need(set(self.mlp_types) <= {DENSE, MOE}, f"mlp_types must be '{DENSE}' or '{MOE}'")
        need(self.num_heads % self.num_kv_heads == 0, "num_heads must be a multiple of num_kv_heads")
        need(self.swa_num_heads % self.swa_num_kv_heads == 0, "swa_num_heads must be a multiple of swa_num_kv_heads")
        need(0.0 < self.partial_rotary_factor <= 1.0, "partial_rotary_factor must be in (0, 1]")
        need(self.swa_partial_rotary_factor is None or 0.0 < self.swa_partial_rotary_factor <= 1.0,
             "swa_partial_rotary_factor must be in (0, 1] (or null: the same as partial_rotary_factor)")
        for kind in set(self.layer_types):
            need(self.attention(kind).rope_dim % 2 == 0,
                 f"rotary dims of the {kind} layers (head_dim * partial_rotary_factor) must be even")
        if SLIDING in self.layer_types:
            need(self.sliding_window > 0, "sliding_window must be positive")
        if DENSE in self.mlp_types or self.num_mtp_layers:
            need(self.intermediate_size > 0, "intermediate_size must be positive")
        if MOE in self.mlp_types:
            need(self.num_experts > 0 and self.moe_intermediate_size > 0, "MoE layers need num_experts and "
                 "moe_intermediate_size")
            need(0 < self.num_experts_per_tok <= self.num_experts, "num_experts_per_tok must be in [1, num_experts]")
        need(self.num_mtp_layers >= 0, "num_mtp_layers must be >= 0")

    def attention(self, kind: str) -> AttentionSpec:
        if kind == FULL:
            heads, kv, hd, vd, theta, window, sink = (self.num_heads, self.num_kv_heads, self.head_dim,
                                                      self.v_head_dim, self.rope_theta, None, self.sink_full)
            factor = self.partial_rotary_factor
        else:
            heads, kv, hd, vd, theta, window, sink = (self.swa_num_heads, self.swa_num_kv_heads, self.swa_head_dim,
                                                      self.swa_v_head_dim, self.swa_rope_theta,
                                                      self.sliding_window, self.sink_swa)
            factor = self.partial_rotary_factor if self.swa_partial_rotary_factor is None \
                else self.swa_partial_rotary_factor
        return AttentionSpec(heads, kv, hd, vd, float(theta), int(hd * factor), window, sink,
                             float(self.attention_value_scale))

    @property
    def layer_kinds(self) -> tuple[tuple[str, str], ...]:
        return tuple(zip(self.layer_types, self.mlp_types))

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def first_layers(self, n: int, **changes) -> "ModelConfig":
        """The same model cut to its first n decoder layers (benchmarks at fewer layers, tests that need every
        layer kind but not the depth); `changes` as in replace."""
        return self.replace(num_layers=n, layer_types=self.layer_types[:n], mlp_types=self.mlp_types[:n], **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names - {"_comment", "_uncertain"})
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(unknown)}")
        d = {k: v for k, v in d.items() if k in names}
        for k in ("layer_types", "mlp_types", "eos_token_ids"):
            if k in d:
                d[k] = tuple(d[k])
        try:
            return cls(**d)
        except TypeError as e:  # missing required fields
            raise ConfigError(f"invalid config: {e}") from None


def load_config(path: str | Path) -> ModelConfig:
    """A config file: our own preset format (configs/*.json) or an HF config.json (detected by `model_type`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"config file {path} is not valid JSON: {e}") from None
    if "num_layers" in d and "layer_types" in d:
        return ModelConfig.from_dict(d)
    return config_from_hf(d)


def _eos_tuple(eos) -> tuple[int, ...]:
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)


def config_from_hf(d: dict) -> ModelConfig:
    """Map an HF config.json dict (MiMo-V2-Flash, either dialect, or Llama) onto ModelConfig."""
    model_type = d.get("model_type")
    try:
        if model_type == "llama":
            return _from_llama(_refuse_unsupported(d))
        if model_type in ("mimo_v2_flash", "mimo_v2"):
            return _from_mimo(_refuse_unsupported(d))
    except KeyError as e:
        raise ConfigError(f"config.json of model_type {model_type!r} lacks key {e.args[0]!r}") from None
    raise ConfigError(f"unknown model type {model_type!r} (supported: mimo_v2_flash, llama)")


def _rope_types(d: dict) -> dict[str, str]:
    """Every RoPE type a config asks for: `rope_scaling` (older files), `rope_parameters` (transformers 5: one
    dict, or one per layer type for MiMo) -> {field name: rope type}."""
    found = {}
    scaling = d.get("rope_scaling")
    if scaling:
        found["rope_scaling"] = scaling.get("rope_type", scaling.get("type", "default"))
    params = d.get("rope_parameters") or {}
    groups = {k: v for k, v in params.items() if isinstance(v, dict)} or {"": params}
    for kind, p in groups.items():
        if "rope_type" in p or "type" in p:
            found["rope_parameters" + (f".{kind}" if kind else "")] = p.get("rope_type", p.get("type"))
    return found


def _refuse_unsupported(d: dict) -> dict:
    """An HF config whose fields change the math in a way this engine does not implement is refused with the
    field named (rather than loaded and run as something else). Returns d."""
    def refuse(field, why):
        raise ConfigError(f"config field {field}={d.get(field)!r} is not supported: {why}")

    for field in ("attention_bias", "mlp_bias"):
        if d.get(field):
            refuse(field, "the projections here have no bias terms")
    if d.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", "the MLPs are SwiGLU (silu)")
    for field, kind in _rope_types(d).items():
        if kind != "default":
            raise ConfigError(f"config field {field} has rope_type {kind!r}, which is not supported "
                              f"(only the default RoPE, no scaling)")
    if d.get("model_type") == "llama":
        prf = d.get("partial_rotary_factor", (d.get("rope_parameters") or {}).get("partial_rotary_factor", 1.0))
        if prf not in (None, 1.0):
            refuse("partial_rotary_factor", "Llama models rotate whole heads here")
    else:
        if d.get("scoring_func", "sigmoid") != "sigmoid":
            refuse("scoring_func", "the router is sigmoid")
        if (d.get("topk_group") or 1) < (d.get("n_group") or 1):
            refuse("topk_group", f"group-limited routing (n_group={d.get('n_group')}) is not implemented")
    quant = d.get("quantization_config") or {}
    if quant and quant.get("quant_method") != "fp8":
        raise ConfigError(f"config field quantization_config.quant_method={quant.get('quant_method')!r} is not "
                          f"supported (only fp8 block-scaled checkpoints)")
    return d


def _from_llama(d: dict) -> ModelConfig:
    n, heads = d["num_hidden_layers"], d["num_attention_heads"]
    kv = d.get("num_key_value_heads") or heads
    hd = d.get("head_dim") or d["hidden_size"] // heads
    rope = d.get("rope_parameters") or {}
    theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
    return ModelConfig(
        vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], num_layers=n,
        layer_types=(FULL,) * n, mlp_types=(DENSE,) * n,
        num_heads=heads, num_kv_heads=kv, head_dim=hd, v_head_dim=hd, rope_theta=theta,
        swa_num_heads=heads, swa_num_kv_heads=kv, swa_head_dim=hd, swa_v_head_dim=hd, swa_rope_theta=theta,
        sliding_window=0, intermediate_size=d["intermediate_size"], rms_norm_eps=d.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        max_position_embeddings=d.get("max_position_embeddings", 8192),
        bos_token_id=d.get("bos_token_id"), eos_token_ids=_eos_tuple(d.get("eos_token_id")), model_type="llama")


def _from_mimo(d: dict) -> ModelConfig:
    n = d["num_hidden_layers"]
    if "hybrid_layer_pattern" in d:  # hub dialect
        layer_types = tuple(SLIDING if p else FULL for p in d["hybrid_layer_pattern"])
        freq = d.get("moe_layer_freq", [0] + [1] * (n - 1))
        mlp_types = tuple(MOE if f else DENSE for f in (freq if isinstance(freq, list) else [freq] * n))
        heads, kv = d["num_attention_heads"], d["num_key_value_heads"]
        hd, vd = d.get("head_dim", 192), d.get("v_head_dim", 128)
        swa = dict(swa_num_heads=d.get("swa_num_attention_heads", heads),
                   swa_num_kv_heads=d.get("swa_num_key_value_heads", kv),
                   swa_head_dim=d.get("swa_head_dim", hd), swa_v_head_dim=d.get("swa_v_head_dim", vd),
                   swa_rope_theta=d.get("swa_rope_theta", d.get("rope_theta", 10000.0)))
        theta, prf = d.get("rope_theta", 5_000_000.0), d.get("partial_rotary_factor", 1.0)
        window = d["sliding_window_size"] if "sliding_window_size" in d else d["sliding_window"] - 1
        sink_full = bool(d.get("add_full_attention_sink_bias", False))
        sink_swa = bool(d.get("add_swa_attention_sink_bias", True))
        eps = d.get("layernorm_epsilon", d.get("rms_norm_eps", 1e-5))
    else:  # transformers dialect
        default_types = ["full_attention" if (i == 0 or (i + 1) % 6 == 0) else "sliding_attention" for i in range(n)]
        layer_types = tuple(FULL if t == "full_attention" else SLIDING for t in d.get("layer_types") or default_types)
        mlp_types = tuple(DENSE if t == "dense" else MOE
                          for t in d.get("mlp_layer_types") or ["dense"] + ["sparse"] * (n - 1))
        heads, kv = d["num_attention_heads"], d["num_key_value_heads"]
        hd, vd = d.get("head_dim", 192), d.get("v_head_dim", 128)
        rope = d.get("rope_parameters") or {}
        # per layer type, as transformers reads them (a missing factor is 0.334 there too)
        full_rope = rope.get("full_attention", {"rope_theta": 5_000_000.0, "partial_rotary_factor": 0.334})
        swa_rope = rope.get("sliding_attention", {"rope_theta": 10_000.0, "partial_rotary_factor": 0.334})
        swa = dict(swa_num_heads=heads, swa_num_kv_heads=2 * kv, swa_head_dim=hd, swa_v_head_dim=vd,
                   swa_rope_theta=swa_rope["rope_theta"])
        theta, prf = full_rope["rope_theta"], full_rope.get("partial_rotary_factor", 0.334)
        swa_prf = swa_rope.get("partial_rotary_factor", 0.334)
        swa["swa_partial_rotary_factor"] = None if swa_prf == prf else swa_prf
        window = d.get("sliding_window", 129) - 1
        sink_full, sink_swa = False, True
        eps = d.get("rms_norm_eps", 1e-5)
    value_scale = d.get("attention_value_scale")
    scaling = d.get("routed_scaling_factor")
    return ModelConfig(
        vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], num_layers=n,
        layer_types=layer_types, mlp_types=mlp_types,
        num_heads=heads, num_kv_heads=kv, head_dim=hd, v_head_dim=vd, rope_theta=theta, **swa,
        sliding_window=window, partial_rotary_factor=prf,
        attention_value_scale=1.0 if value_scale is None else value_scale,
        sink_full=sink_full, sink_swa=sink_swa,
        intermediate_size=d["intermediate_size"], moe_intermediate_size=d.get("moe_intermediate_size", 0),
        num_experts=d.get("n_routed_experts", 0), num_experts_per_tok=d.get("num_experts_per_tok", 0),
        norm_topk_prob=bool(d.get("norm_topk_prob", True)),
        routed_scaling_factor=1.0 if scaling is None else scaling,
        rms_norm_eps=eps, tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        max_position_embeddings=d.get("max_position_embeddings", 131072),
        num_mtp_layers=d.get("num_nextn_predict_layers", 0),
        bos_token_id=d.get("bos_token_id"), eos_token_ids=_eos_tuple(d.get("eos_token_id")),
        model_type="mimo_v2_flash")
