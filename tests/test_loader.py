"""Checkpoint loading: the hub layout (FP8 blocks, per-expert tensors, shards, MTP) and bad checkpoints; experts
quantized while streaming == quantized after loading (bit for bit); sharded loading over 8 simulated devices ==
one device (a subprocess: `python tests/test_loader.py sharded DIR`); peak host RSS of a >= 2 GB load (slow)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_fixtures import (fp8_round_trip, hf_logits, random_hf_model, save_hub_layout,
                         save_transformers_layout)
from mimo_jax.engine import Engine
from mimo_jax.errors import CheckpointError, ConfigError
from mimo_jax import quantize_model, safetensors_io
from mimo_jax.loader import Checkpoint, load_checkpoint
from mimo_jax.model import plan_of
from mimo_jax.plan import Loop, layer_slots
from mimo_jax.quant import QuantizedWeight, to_layout
from mimo_jax.quantize_model import quantize_experts

FORMATS = ("int4_sym", "int4_asym", "mxfp4")


def mtp_tensors(cfg, n=2, seed=5):
    """Random model.mtp.layers.{j}.* tensors in hub names (SWA block + dense MLP)."""
    g = torch.Generator().manual_seed(seed)
    h, hd, vd = cfg.hidden_size, cfg.head_dim, cfg.v_head_dim
    q, kv, i = cfg.num_attention_heads, 2 * cfg.num_key_value_heads, cfg.intermediate_size
    shapes = {"enorm.weight": (h,), "hnorm.weight": (h,), "eh_proj.weight": (h, 2 * h),
              "input_layernorm.weight": (h,), "pre_mlp_layernorm.weight": (h,), "final_layernorm.weight": (h,),
              "self_attn.q_proj.weight": (q * hd, h), "self_attn.k_proj.weight": (kv * hd, h),
              "self_attn.v_proj.weight": (kv * vd, h), "self_attn.o_proj.weight": (h, q * vd),
              "self_attn.attention_sink_bias": (q,), "mlp.gate_proj.weight": (i, h),
              "mlp.up_proj.weight": (i, h), "mlp.down_proj.weight": (h, i)}
    return {f"model.mtp.layers.{j}.{k}": torch.randn(s, generator=g) for j in range(n) for k, s in shapes.items()}


@pytest.fixture(scope="module")
def both_layouts(tmp_path_factory):
    hf = random_hf_model(3, num_layers=4, window=5)
    fp8_round_trip(hf)  # both layouts and the reference now hold the same FP8-representable numbers
    root = tmp_path_factory.mktemp("layouts")
    tf_dir = save_transformers_layout(hf, root / "transformers")
    hub_dir = save_hub_layout(hf, root / "hub", extra=mtp_tensors(hf.config), shards=3)
    return hf, tf_dir, hub_dir


def test_hub_layout_loads_to_same_params_and_logits(both_layouts):
    hf, tf_dir, hub_dir = both_layouts
    cfg_tf, p_tf = load_checkpoint(tf_dir, jnp.float32)
    cfg_hub, p_hub = load_checkpoint(hub_dir, jnp.float32)
    assert cfg_hub.replace(num_mtp_layers=0, model_type="x") == cfg_tf.replace(model_type="x")
    assert cfg_hub.num_mtp_layers == 2 and "mtp" in p_hub and "mtp" not in p_tf
    main = {k: v for k, v in p_hub.items() if k != "mtp"}
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), main, p_tf)
    ids = list(range(1, 30))
    e_tf = Engine.from_pretrained(tf_dir, dtype=jnp.float32, max_seq_len=64)
    e_hub = Engine.from_pretrained(hub_dir, dtype=jnp.float32, max_seq_len=64)
    ref = hf_logits(hf, ids)
    a, b = e_tf.score(ids), e_hub.score(ids)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert np.max(np.abs(b - ref)) / np.max(np.abs(ref)) < 1e-4


def test_mtp_tensors_land_in_pytree(both_layouts):
    hf, _, hub_dir = both_layouts
    _, params = load_checkpoint(hub_dir, jnp.float32)
    src = mtp_tensors(hf.config)
    np.testing.assert_allclose(params["mtp"]["eh_proj"][1], src["model.mtp.layers.1.eh_proj.weight"].numpy().T,
                               rtol=0.07, atol=1e-3)  # FP8-rounded on save
    np.testing.assert_array_equal(params["mtp"]["attn"]["sink"][0],
                                  src["model.mtp.layers.0.self_attn.attention_sink_bias"].numpy())
    np.testing.assert_array_equal(params["mtp"]["mlp_norm"][0], src["model.mtp.layers.0.pre_mlp_layernorm.weight"])


def test_fp8_dequant_matches_blocks(both_layouts):
    hf, _, hub_dir = both_layouts
    cfg, params = load_checkpoint(hub_dir, jnp.float32)
    for layer in (1, 3):
        slot = layer_slots(plan_of(cfg))[layer]
        stack = params["layers"][slot.item] if slot.run is None else params["layers"][slot.item][slot.run]
        w = hf.model.layers[layer].mlp.experts.gate_up_proj.detach()[2]  # expert 2: gate rows, then up rows
        i = w.shape[0] // 2
        np.testing.assert_allclose(stack["mlp"]["w_gate"][slot.index][2], w[:i].numpy().T, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(stack["mlp"]["w_up"][slot.index][2], w[i:].numpy().T, rtol=1e-6, atol=1e-7)


# ---- bad checkpoints: each is a typed error with the culprit named ----

def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope")


def test_missing_config(both_layouts, tmp_path):
    d = _copy(both_layouts[1], tmp_path / "c")
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        load_checkpoint(d)


def test_unknown_model_type(both_layouts, tmp_path):
    d = _copy(both_layouts[1], tmp_path / "c")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt_neo"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="unknown model type 'gpt_neo'"):
        load_checkpoint(d)


def test_missing_tensor(both_layouts, tmp_path):
    d = _copy(both_layouts[2], tmp_path / "c")
    f = sorted(d.glob("*.safetensors"))[0]
    tensors = load_file(str(f))
    victim = sorted(k for k in tensors if "experts.3.up_proj.weight" in k and "scale" not in k)[0]
    del tensors[victim]
    save_file(tensors, str(f))
    with pytest.raises(CheckpointError, match=f"missing tensor {victim.replace('.', '[.]')}"):
        load_checkpoint(d)


def test_wrong_shape_named(both_layouts, tmp_path):
    d = _copy(both_layouts[1], tmp_path / "c")
    f = d / "model.safetensors"
    tensors = load_file(str(f))
    tensors["model.layers.2.self_attn.q_proj.weight"] = tensors["model.layers.2.self_attn.q_proj.weight"][:-1]
    save_file(tensors, str(f))
    with pytest.raises(CheckpointError, match="model.layers.2.self_attn.q_proj.weight has shape"):
        load_checkpoint(d)


def test_no_safetensors(both_layouts, tmp_path):
    d = _copy(both_layouts[1], tmp_path / "c")
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load_checkpoint(d)


def test_unknown_tensor_refused_by_name(both_layouts, tmp_path):
    """A tensor no parameter takes (here a q_proj bias) would be dropped and another model run: refused."""
    d = _copy(both_layouts[1], tmp_path / "c")
    f = d / "model.safetensors"
    tensors = load_file(str(f))
    tensors["model.layers.1.self_attn.q_proj.bias"] = torch.zeros(tensors["model.layers.1.self_attn.q_proj.weight"]
                                                                  .shape[0])
    save_file(tensors, str(f))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.q_proj\.bias is not supported"):
        load_checkpoint(d)


def test_config_field_we_cannot_honour_refused(both_layouts, tmp_path):
    d = _copy(both_layouts[1], tmp_path / "c")
    cfg = json.loads((d / "config.json").read_text())
    cfg["attention_bias"] = True
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="attention_bias"):
        load_checkpoint(d)


@pytest.mark.parametrize("keep", [0.5, 0.999, 100])  # cut in the tensor bytes, near the end, in the header
def test_truncated_safetensors_says_truncated(both_layouts, tmp_path, keep):
    d = _copy(both_layouts[1], tmp_path / "c")
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: keep if keep > 1 else int(len(data) * keep)])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated"):
        load_checkpoint(d)


def test_not_a_safetensors_file(both_layouts, tmp_path):
    d = _copy(both_layouts[1], tmp_path / "c")
    (d / "model.safetensors").write_bytes(b"<html>not found</html>" * 10)
    with pytest.raises(CheckpointError, match=r"model\.safetensors is not a safetensors file"):
        load_checkpoint(d)



def test_shard_missing_from_index(quant_dirs, tmp_path):
    d = _copy(quant_dirs[1][0], tmp_path / "c")
    (d / "model-00003-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"shard model-00003-of-00003\.safetensors is missing \(listed in "
                                              r"model\.safetensors\.index\.json\)"):
        load_checkpoint(d)


def test_fp8_scale_of_wrong_shape(quant_dirs, tmp_path):
    d = _copy(quant_dirs[1][0], tmp_path / "c")
    key = "model.layers.1.self_attn.q_proj.weight_scale_inv"
    f = d / json.loads((d / "model.safetensors.index.json").read_text())["weight_map"][key]
    tensors = load_file(str(f))
    tensors[key] = tensors[key][:-1].contiguous()
    save_file(tensors, str(f))
    with pytest.raises(CheckpointError, match=rf"{key.replace('.', '[.]')} has shape \(\d+, \d+\), expected"):
        load_checkpoint(d)

# ---- experts quantized while streaming ----

def quant_model():
    """Dims that groups of 32 divide (hidden 64, expert intermediate 32), 8 experts (split 8 ways)."""
    hf = random_hf_model(7, num_layers=4, window=5, hidden_size=64, moe_intermediate_size=32, n_routed_experts=8)
    fp8_round_trip(hf)
    return hf


@pytest.fixture(scope="module")
def quant_dirs(tmp_path_factory):
    hf = quant_model()
    root = tmp_path_factory.mktemp("quant")
    return hf, (save_hub_layout(hf, root / "hub", extra=mtp_tensors(hf.config), shards=3, index=True),
                save_transformers_layout(hf, root / "transformers"))


def assert_same_params(got, want):
    """Same tree, same QuantizedWeight metadata, every array bit-identical (dtype included)."""
    is_q = lambda x: isinstance(x, QuantizedWeight)  # noqa: E731
    assert jax.tree_util.tree_structure(got, is_leaf=is_q) == jax.tree_util.tree_structure(want, is_leaf=is_q)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got, is_leaf=is_q)[0],
                            jax.tree_util.tree_leaves(want, is_leaf=is_q)):
        if is_q(a):
            assert (a.fmt, a.group_size, a.kn, a.dtype, a.layout) == (b.fmt, b.group_size, b.kn, b.dtype, b.layout), path
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
            assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y)), jax.tree_util.keystr(path)


@pytest.mark.parametrize("layout", [0, 1], ids=["hub_fp8", "transformers"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_quantized_while_loading_equals_load_then_quantize(quant_dirs, fmt, dtype, layout):
    path = quant_dirs[1][layout]
    _, ref = load_checkpoint(path, dtype)
    cfg, got = load_checkpoint(path, dtype, quant_experts=fmt, quant_group=32)
    assert_same_params(got, quantize_experts(ref, fmt, 32))
    runs = [r for item in plan_of(cfg) for r in (item.runs if isinstance(item, Loop) else (item,))]
    n_q = sum(isinstance(x, QuantizedWeight) for x in
              jax.tree_util.tree_leaves(got, is_leaf=lambda x: isinstance(x, QuantizedWeight)))
    assert n_q == 3 * sum(r.kind[1] == "moe" for r in runs)  # gate / up / down of every MoE stack


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantized_while_loading_in_the_nk_layout(quant_dirs, fmt, monkeypatch):
    """Experts stored "nk" (quantize_model.EXPERT_LAYOUT): quantized while loading == load then quantize, and the
    same bits as the "kn" load with its bytes transposed."""
    path = quant_dirs[1][0]
    _, ref = load_checkpoint(path, jnp.float32)
    monkeypatch.setattr(quantize_model, "EXPERT_LAYOUT", "kn")
    _, kn = load_checkpoint(path, jnp.float32, quant_experts=fmt, quant_group=32)
    monkeypatch.setattr(quantize_model, "EXPERT_LAYOUT", {fmt: "nk"})
    _, got = load_checkpoint(path, jnp.float32, quant_experts=fmt, quant_group=32)
    assert_same_params(got, quantize_experts(ref, fmt, 32))
    is_q = lambda x: isinstance(x, QuantizedWeight)  # noqa: E731
    as_kn = jax.tree_util.tree_map(lambda w: to_layout(w, "kn") if is_q(w) else w, got, is_leaf=is_q)
    assert any(w.layout == "nk" for w in jax.tree_util.tree_leaves(got, is_leaf=is_q) if is_q(w))
    assert_same_params(as_kn, kn)


def test_engine_from_pretrained_quant_experts(quant_dirs):
    hf, (hub, _) = quant_dirs
    e = Engine.from_pretrained(hub, dtype=jnp.float32, quant_experts="int4_asym", quant_group=32, max_seq_len=64)
    _, ref = load_checkpoint(hub, jnp.float32)
    ref_e = Engine(e.cfg, quantize_experts(ref, "int4_asym", 32), max_seq_len=64)
    ids = list(range(1, 20))
    np.testing.assert_array_equal(e.score(ids), ref_e.score(ids))
    ref = hf_logits(hf, ids)  # 4-bit random experts: close, not equal (test_quantize_model.py reports the cost)
    assert np.max(np.abs(e.score(ids) - ref)) / np.max(np.abs(ref)) < 0.5


def test_quant_experts_refused_where_it_cannot_apply(quant_dirs, both_layouts):
    with pytest.raises(ConfigError, match="quant_group 48 must be a positive multiple of 32"):
        load_checkpoint(quant_dirs[1][0], quant_experts="int4_sym", quant_group=48)
    with pytest.raises(ConfigError, match="unknown expert quantization 'int3'"):
        load_checkpoint(quant_dirs[1][0], quant_experts="int3")
    with pytest.raises(ConfigError, match="K must be a multiple of group_size=128"):  # hidden 64
        load_checkpoint(quant_dirs[1][0], quant_experts="int4_sym", quant_group=128)


@pytest.mark.parametrize("fmt", [None, "int4_sym"])
def test_conversion_on_device_equals_host(quant_dirs, tmp_path, fmt):
    """The accelerator path (stored bytes put on the device; FP8 dequant, transpose and cast run there) gives the
    host path's params bit for bit, both layouts; FP8 with partial edge blocks dequantizes identically."""
    for path in quant_dirs[1]:
        _, host = load_checkpoint(path, jnp.bfloat16, quant_experts=fmt, quant_group=32, on_device=False)
        _, dev = load_checkpoint(path, jnp.bfloat16, quant_experts=fmt, quant_group=32, on_device=True,
                                 prefetch_bytes=0)
        assert_same_params(dev, host)
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, (20, 13), dtype=np.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0
    tensors = {"w": codes.view(ml_dtypes.float8_e4m3fn), "w_scale_inv": rng.uniform(0.1, 2, (3, 2)).astype(np.float32)}
    safetensors_io.write(tmp_path / "x.safetensors", [(k, v.shape, v.dtype, lambda v=v: v) for k, v in tensors.items()])
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"weight_block_size": [8, 8]}}))
    a, b = Checkpoint(tmp_path).read("w"), Checkpoint(tmp_path, device=jax.devices()[0]).read("w")
    assert isinstance(b, jax.Array) and b.dtype == a.dtype and np.array_equal(np.asarray(b), a)


def test_two_processes_fill_their_own_shards(quant_dirs, tmp_path):
    """jax.distributed with 2 CPU processes, one device each, a mesh over both: each process allocates and fills
    only its own shards (experts owned by the other process are neither quantized nor placed), and every shard
    equals the same slice of the single-process load, host path and device path."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    env.pop("XLA_FLAGS", None)
    procs = [subprocess.Popen([sys.executable, __file__, "distributed", str(i), port, str(quant_dirs[1][0]),
                               str(tmp_path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=900)
        assert p.returncode == 0, err.decode()[-3000:]
    _, ref = load_checkpoint(quant_dirs[1][0], jnp.bfloat16, quant_experts="int4_sym", quant_group=32)
    want = {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(ref)[0]}
    for mode in ("host", "device"):
        seen = {}
        for i in range(2):
            with np.load(tmp_path / f"shards_{mode}{i}.npz") as z:
                for name in z.files:
                    leaf, bounds = name.split("|")
                    part = want[leaf][tuple(slice(lo, hi) for lo, hi in json.loads(bounds))]
                    assert np.array_equal(z[name], part.view(np.uint8).reshape(part.shape + (-1,))), (mode, name)
                    seen.setdefault(leaf, []).append(z[name].size)
        assert set(seen) == set(want), mode
        split = [k for k, sizes in seen.items() if sum(sizes) == want[k].nbytes and len(sizes) == 2]
        assert any("w_gate" in k and "flat index 0" in k for k in split), (mode, split)  # experts: packed, split


def _distributed_worker(pid: int, port: str, path: str, out: str) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    from mimo_jax import sharding

    assert jax.process_count() == 2 and len(jax.devices()) == 2 and len(jax.local_devices()) == 1
    for mode in ("host", "device"):
        _, params = load_checkpoint(path, jnp.bfloat16, mesh=sharding.make_mesh(2), quant_experts="int4_sym",
                                    quant_group=32, on_device=mode == "device")
        shards = {}
        for p, x in jax.tree_util.tree_flatten_with_path(params)[0]:
            for s in x.addressable_shards:
                bounds = [list(sl.indices(n)[:2]) for sl, n in zip(s.index, x.shape)]
                data = np.asarray(s.data)
                shards[jax.tree_util.keystr(p) + "|" + json.dumps(bounds)] = \
                    data.view(np.uint8).reshape(data.shape + (-1,))
        np.savez(Path(out) / f"shards_{mode}{pid}.npz", **shards)


def test_sharded_loading_equals_single_device(quant_dirs, tmp_path):
    """8 simulated CPU devices in a subprocess: every leaf (bf16 and int4 experts) loaded onto the mesh equals
    the single-device load, each device holding its slice only; the same for an orbax round trip onto the mesh."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, __file__, "sharded", str(quant_dirs[1][0]), str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=900)
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    assert line, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads(line[0][len("RESULT "):])
    assert result["devices"] == 8
    assert result["mismatch"] == [], result["mismatch"]
    assert result["expert_shard_fraction"] == 1 / 8
    assert result["checked"] > 50


def _sharded_worker(path: str, tmp: str) -> None:
    from mimo_jax import checkpoint, sharding

    mesh = sharding.make_mesh(8)
    out = {"devices": len(jax.devices()), "mismatch": [], "checked": 0}

    def compare(name, got, want):
        for (p, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree_util.tree_leaves(want)):
            out["checked"] += 1
            if not (a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))):
                out["mismatch"].append(name + jax.tree_util.keystr(p))

    quantize_model.EXPERT_LAYOUT = "kn"  # then "nk" below
    for fmt in (None, "int4_sym", "mxfp4"):
        cfg, single = load_checkpoint(path, jnp.bfloat16, quant_experts=fmt, quant_group=32)
        _, sharded = load_checkpoint(path, jnp.bfloat16, mesh=mesh, quant_experts=fmt, quant_group=32)
        compare(str(fmt), sharded, single)
        if fmt == "int4_sym":
            w = sharded["layers"][1]["mlp"]["w_gate"]
            out["expert_shard_fraction"] = w.packed.addressable_shards[0].data.size / w.packed.size
            d = checkpoint.save(Path(tmp) / "conv", cfg, sharded, fmt, 32, jnp.bfloat16, path)
            compare("orbax", checkpoint.restore(d, mesh=mesh)[1], single)
            compare("orbax_1dev", checkpoint.restore(d)[1], single)
    quantize_model.EXPERT_LAYOUT = "nk"  # experts stored "nk": placed on the mesh the same way
    _, single = load_checkpoint(path, jnp.bfloat16, quant_experts="int4_sym", quant_group=32)
    _, sharded = load_checkpoint(path, jnp.bfloat16, mesh=mesh, quant_experts="int4_sym", quant_group=32)
    assert sharded["layers"][1]["mlp"]["w_gate"].layout == "nk"
    compare("nk", sharded, single)
    print("RESULT " + json.dumps(out))


# ---- peak host memory of a >= 2 GB load ----

SYNTH = dict(vocab_size=32768, hidden_size=2048, num_hidden_layers=6, intermediate_size=4096,
             moe_intermediate_size=1024, n_routed_experts=64, num_experts_per_tok=4, num_attention_heads=16,
             num_key_value_heads=4, head_dim=128, v_head_dim=128)


def write_synthetic_fp8(directory: Path, block: int = 128, seed: int = 0) -> int:
    """A hub-layout FP8 checkpoint of SYNTH (~2.2 GB: 5 MoE layers of 64 experts), written one tensor at a time
    (random bytes as e4m3, NaN codes cleared). Returns its size in bytes."""
    c = SYNTH
    directory.mkdir(parents=True)
    n, h = c["num_hidden_layers"], c["hidden_size"]
    cfg = {"model_type": "mimo_v2_flash", "vocab_size": c["vocab_size"], "hidden_size": h, "num_hidden_layers": n,
           "intermediate_size": c["intermediate_size"], "moe_intermediate_size": c["moe_intermediate_size"],
           "num_attention_heads": c["num_attention_heads"], "num_key_value_heads": c["num_key_value_heads"],
           "swa_num_attention_heads": c["num_attention_heads"], "swa_num_key_value_heads": c["num_key_value_heads"],
           "head_dim": c["head_dim"], "v_head_dim": c["v_head_dim"], "swa_head_dim": c["head_dim"],
           "swa_v_head_dim": c["v_head_dim"], "hybrid_layer_pattern": [0] + [1] * (n - 1),
           "moe_layer_freq": [0] + [1] * (n - 1), "rope_theta": 5e6, "swa_rope_theta": 1e4,
           "partial_rotary_factor": 0.5, "sliding_window_size": 128, "add_swa_attention_sink_bias": True,
           "add_full_attention_sink_bias": False, "layernorm_epsilon": 1e-5, "attention_value_scale": 0.707,
           "n_routed_experts": c["n_routed_experts"], "num_experts_per_tok": c["num_experts_per_tok"],
           "norm_topk_prob": True, "routed_scaling_factor": 1.0, "n_group": 1, "topk_group": 1,
           "max_position_embeddings": 4096, "tie_word_embeddings": False,
           "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [block, block]}}
    (directory / "config.json").write_text(json.dumps(cfg))
    rng = np.random.default_rng(seed)
    hd, q, kv, i, mi = c["head_dim"], c["num_attention_heads"], c["num_key_value_heads"], c["intermediate_size"], \
        c["moe_intermediate_size"]

    def fp8(shape):
        b = rng.integers(0, 256, shape, dtype=np.uint8)
        b[(b & 0x7F) == 0x7F] = 0
        return b.view(ml_dtypes.float8_e4m3fn)

    items = []

    def add(name, shape, dtype, make):
        items.append((name, shape, np.dtype(dtype), make))

    def linear(name, out_dim, in_dim):
        add(name, (out_dim, in_dim), ml_dtypes.float8_e4m3fn, lambda: fp8((out_dim, in_dim)))
        sb = (-(-out_dim // block), -(-in_dim // block))
        add(name + "_scale_inv", sb, np.float32, lambda: rng.uniform(1e-4, 2e-3, sb).astype(np.float32))

    def bf16(name, shape, scale=0.02):
        add(name, shape, ml_dtypes.bfloat16, lambda: (scale * rng.standard_normal(shape, np.float32))
            .astype(ml_dtypes.bfloat16))

    bf16("model.embed_tokens.weight", (c["vocab_size"], h))
    bf16("lm_head.weight", (c["vocab_size"], h))
    bf16("model.norm.weight", (h,))
    for layer in range(n):
        p = f"model.layers.{layer}."
        bf16(p + "input_layernorm.weight", (h,))
        bf16(p + "post_attention_layernorm.weight", (h,))
        linear(p + "self_attn.q_proj.weight", q * hd, h)
        linear(p + "self_attn.k_proj.weight", kv * hd, h)
        linear(p + "self_attn.v_proj.weight", kv * hd, h)
        bf16(p + "self_attn.o_proj.weight", (h, q * hd))
        if layer:
            bf16(p + "self_attn.attention_sink_bias", (q,), 1.0)
            add(p + "mlp.gate.weight", (c["n_routed_experts"], h), np.float32,
                lambda: rng.standard_normal((c["n_routed_experts"], h), np.float32))
            add(p + "mlp.gate.e_score_correction_bias", (c["n_routed_experts"],), np.float32,
                lambda: rng.standard_normal(c["n_routed_experts"], np.float32))
            for e in range(c["n_routed_experts"]):
                linear(p + f"mlp.experts.{e}.gate_proj.weight", mi, h)
                linear(p + f"mlp.experts.{e}.up_proj.weight", mi, h)
                linear(p + f"mlp.experts.{e}.down_proj.weight", h, mi)
        else:
            linear(p + "mlp.gate_proj.weight", i, h)
            linear(p + "mlp.up_proj.weight", i, h)
            linear(p + "mlp.down_proj.weight", h, i)
    for part in range(2):  # two files, one tensor in memory at a time
        safetensors_io.write(directory / f"model-{part + 1:05d}-of-00002.safetensors", items[part::2])
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


@pytest.mark.slow
def test_peak_host_rss_of_a_2gb_load(tmp_path):
    """Loading a ~2.2 GB FP8 checkpoint with int4 experts, in a fresh process (CPU: the 'device' buffers are host
    memory too): peak RSS grows by at most the final parameter bytes + RSS_SLACK, never by a bf16 copy of the
    model (~4.4 GB here) or an f32 copy of an expert stack."""
    size = write_synthetic_fp8(tmp_path / "synth")
    assert size >= 2 * 1024 ** 3
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", RSS_WORKER, str(tmp_path / "synth")], env=env, capture_output=True,
                         text=True, timeout=1500)
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    assert line, out.stdout[-3000:] + out.stderr[-3000:]
    r = json.loads(line[0][len("RESULT "):])
    grown = r["peak"] - r["base"]
    print(f"checkpoint {size / 2**30:.2f} GiB: load {r['seconds']:.1f} s, peak RSS {r['peak'] / 2**30:.2f} GiB "
          f"(+{grown / 2**30:.2f} GiB over {r['base'] / 2**30:.2f} GiB after start-up), final params "
          f"{r['final'] / 2**30:.2f} GiB, largest tensor {r['largest'] / 2**20:.0f} MiB")
    assert grown <= r["final"] + RSS_SLACK, (grown, r)


RSS_SLACK = 768 * 2**20  # staging (one tensor, its FP8 scales expanded, its f32 copy), XLA's compiled kernels


# run as `python -c RSS_WORKER DIR`: jax and mimo_jax only (torch, imported by this file, would swell the baseline)
RSS_WORKER = """
import json, re, sys, time
import jax, jax.numpy as jnp
from mimo_jax.loader import Checkpoint, load_checkpoint

def peak_rss():  # VmHWM: this process image's own peak RSS (ru_maxrss would carry the parent's over exec)
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\\s+(\\d+) kB", f.read()).group(1)) * 1024

jnp.zeros(8).block_until_ready()  # the runtime up: part of the baseline
base = peak_rss()
largest = max(e.nbytes for e in Checkpoint(sys.argv[1]).entries.values())
t0 = time.perf_counter()
_, params = load_checkpoint(sys.argv[1], jnp.bfloat16, quant_experts="int4_sym", quant_group=128)
jax.block_until_ready(params)
seconds = time.perf_counter() - t0
peak = peak_rss()
final = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
print("RESULT " + json.dumps(dict(base=base, peak=peak, final=final, largest=largest, seconds=seconds)))
"""

if __name__ == "__main__" and sys.argv[1:2] == ["sharded"]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    jax.config.update("jax_default_matmul_precision", "highest")
    _sharded_worker(sys.argv[2], sys.argv[3])
if __name__ == "__main__" and sys.argv[1:2] == ["distributed"]:
    _distributed_worker(int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])

