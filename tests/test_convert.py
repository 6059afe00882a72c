"""mimo_jax.convert: MXFP4-layout checkpoints (as Xiaomi's FP4 releases store experts) load as stored and give
the logits of their dequantized twin; orbax conversion round trips exactly; bad input is one typed error."""
import json
import shutil

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_fixtures import save_hub_layout
from mimo_jax import checkpoint, convert, quantize_model, safetensors_io
from mimo_jax.engine import Engine
from mimo_jax.errors import CheckpointError, ConfigError
from mimo_jax.loader import Checkpoint, load_checkpoint
from mimo_jax.quant import QuantizedWeight, dequantize, to_layout
from test_loader import assert_same_params, mtp_tensors, quant_model

E2M1 = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6], np.float32)


def decode_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """An independent reading of the stored layout: [out, in/2] bytes (low nibble = even input), [out, in/32]
    e8m0 -> float32 [out, in]."""
    codes = np.stack([blocks & 15, blocks >> 4], axis=-1).reshape(blocks.shape[0], -1)
    return E2M1[codes] * np.repeat(np.exp2(scales.astype(np.float32) - 127), 32, axis=1)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    hf = quant_model()
    root = tmp_path_factory.mktemp("convert")
    hub = save_hub_layout(hf, root / "hub", extra=mtp_tensors(hf.config), shards=3, index=True)
    mx = convert.to_mxfp4_safetensors(hub, root / "mxfp4")
    twin = shutil.copytree(mx, root / "twin")  # experts dequantized to float32 by the decoder above
    for f in sorted(twin.glob("*.safetensors")):
        tensors = load_file(str(f))
        for k in [k for k in tensors if k.endswith("_proj.weight") and ".experts." in k]:
            tensors[k] = torch.from_numpy(decode_mxfp4(tensors[k].numpy(), tensors.pop(k + "_scale").numpy()))
        save_file(tensors, str(f))
    (twin / "model.safetensors.index.json").unlink()
    return hf, hub, mx, twin


def test_mxfp4_layout_names_and_dtypes(dirs):
    _, hub, mx, _ = dirs
    ckpt = Checkpoint(mx)
    k = "model.layers.1.mlp.experts.3.down_proj.weight"
    out_dim, in_dim = Checkpoint(hub).shape(k)
    assert (ckpt.entries[k].dtype, ckpt.shape(k)) == ("U8", (out_dim, in_dim // 2))
    assert (ckpt.entries[k + "_scale"].dtype, ckpt.shape(k + "_scale")) == ("U8", (out_dim, in_dim // 32))
    assert k + "_scale_inv" not in ckpt.entries
    assert json.loads((mx / "config.json").read_text())["quantization_config"]["store_dtype"] == "mxfp4"
    assert ckpt.entries["model.layers.1.self_attn.q_proj.weight"].dtype == "F8_E4M3"  # the rest as stored


def test_mxfp4_checkpoint_loads_as_stored_to_its_twins_logits(dirs):
    _, _, mx, twin = dirs
    cfg, p_mx = load_checkpoint(mx, jnp.float32)
    _, p_twin = load_checkpoint(twin, jnp.float32)
    w = p_mx["layers"][1]["mlp"]["w_up"]
    assert isinstance(w, QuantizedWeight) and (w.fmt, w.group_size) == ("mxfp4", 32)
    np.testing.assert_array_equal(dequantize(w, jnp.float32), p_twin["layers"][1]["mlp"]["w_up"])  # bit-exact
    ids = list(range(1, 30))
    a = Engine(cfg, p_mx, max_seq_len=64).score(ids)
    b = Engine(cfg, p_twin, max_seq_len=64).score(ids)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())


def test_mxfp4_checkpoint_refuses_requantizing(dirs):
    with pytest.raises(ConfigError, match="stores its experts in MXFP4"):
        load_checkpoint(dirs[2], quant_experts="int4_sym", quant_group=32)
    _, p = load_checkpoint(dirs[2], jnp.float32, quant_experts="mxfp4")
    assert p["layers"][1]["mlp"]["w_gate"].fmt == "mxfp4"


def test_mxfp4_scale_of_wrong_shape(dirs, tmp_path):
    d = shutil.copytree(dirs[2], tmp_path / "c")
    k = "model.layers.2.mlp.experts.0.gate_proj.weight_scale"
    f = d / json.loads((d / "model.safetensors.index.json").read_text())["weight_map"][k]
    tensors = load_file(str(f))
    tensors[k] = tensors[k][:, :1].contiguous()
    save_file(tensors, str(f))
    with pytest.raises(CheckpointError, match=rf"{k.replace('.', '[.]')} has shape"):
        load_checkpoint(d)


# ---- orbax ----

@pytest.fixture(scope="module")
def converted(dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("orbax") / "int4"
    rc = convert.main(["--checkpoint", str(dirs[1]), "--out", str(out), "--quant_experts", "int4_sym",
                       "--quant_group", "32", "--dtype", "float32"])
    assert rc == 0
    return out


def test_orbax_round_trip_exact(dirs, converted):
    _, want = load_checkpoint(dirs[1], jnp.float32, quant_experts="int4_sym", quant_group=32)
    cfg, got = checkpoint.restore(converted)
    assert_same_params(got, want)
    assert cfg.num_mtp_layers == 2 and not list(converted.parent.glob(".*partial*"))
    e = Engine.from_pretrained(converted, max_seq_len=64)  # dtype None: the stored float32
    ids = list(range(1, 20))
    ref = Engine(cfg, want, max_seq_len=64).score(ids)
    np.testing.assert_array_equal(e.score(ids), ref)
    _, bf16 = checkpoint.restore(converted, dtype=jnp.bfloat16)  # another dtype: unquantized leaves cast on read
    np.testing.assert_array_equal(bf16["embed"], np.asarray(want["embed"]).astype(ml_dtypes.bfloat16))
    np.testing.assert_array_equal(bf16["layers"][1]["mlp"]["w_gate"].packed, want["layers"][1]["mlp"]["w_gate"].packed)
    with pytest.raises(ConfigError, match="converted with experts int4_sym g32"):
        Engine.from_pretrained(converted, quant_experts="int4_asym", quant_group=32)


def test_mxfp4_checkpoint_loads_into_the_nk_layout(dirs, monkeypatch):
    monkeypatch.setattr(quantize_model, "EXPERT_LAYOUT", "kn")
    cfg, kn = load_checkpoint(dirs[2], jnp.float32)
    monkeypatch.setattr(quantize_model, "EXPERT_LAYOUT", "nk")
    _, nk = load_checkpoint(dirs[2], jnp.float32)
    a, b = nk["layers"][1]["mlp"]["w_down"], kn["layers"][1]["mlp"]["w_down"]
    assert (a.layout, b.layout) == ("nk", "kn")
    np.testing.assert_array_equal(to_layout(a, "kn").packed, b.packed)  # bytes moved, not requantized


def test_orbax_round_trip_keeps_the_nk_layout(dirs, tmp_path, monkeypatch):
    monkeypatch.setattr(quantize_model, "EXPERT_LAYOUT", "nk")
    out = tmp_path / "nk"
    assert convert.main(["--checkpoint", str(dirs[1]), "--out", str(out), "--quant_experts", "int4_asym",
                         "--quant_group", "32", "--dtype", "float32"]) == 0
    assert json.loads((out / checkpoint.META).read_text())["expert_layout"] == "nk"
    _, want = load_checkpoint(dirs[1], jnp.float32, quant_experts="int4_asym", quant_group=32)
    monkeypatch.setattr(quantize_model, "EXPERT_LAYOUT", "kn")  # restoring follows the directory, not the table
    _, got = checkpoint.restore(out)
    assert_same_params(got, want)
    assert got["layers"][1]["mlp"]["w_up"].layout == "nk"


def test_orbax_directory_from_another_config(dirs, converted, tmp_path):
    d = shutil.copytree(converted, tmp_path / "c")
    meta = json.loads((d / checkpoint.META).read_text())
    meta["config"]["moe_intermediate_size"] = 64
    (d / checkpoint.META).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"written for another config: params\['layers'\]"):
        checkpoint.restore(d)


def test_interrupted_conversion_never_looks_complete(dirs, converted, tmp_path, monkeypatch, capsys):
    partial = shutil.copytree(converted, tmp_path / "partial")
    (partial / checkpoint.META).unlink()  # what a conversion killed before its last write leaves
    with pytest.raises(CheckpointError, match="incomplete conversion"):
        Engine.from_pretrained(partial)

    import orbax.checkpoint as ocp

    def interrupted(self, *a, **k):
        raise KeyboardInterrupt

    def disk_full(self, *a, **k):
        raise OSError(28, "No space left on device")

    for fail, rc, said in ((interrupted, 130, "interrupted"), (disk_full, 1, "No space left on device")):
        monkeypatch.setattr(ocp.StandardCheckpointer, "save", fail)
        out = tmp_path / f"out{rc}"
        assert convert.main(["--checkpoint", str(dirs[1]), "--out", str(out), "--quant_group", "32"]) == rc
        assert said in capsys.readouterr().err
        assert not out.exists() and not list(tmp_path.glob(".*partial*"))


def test_convert_bad_input_one_line(dirs, tmp_path, capsys):
    d = shutil.copytree(dirs[1], tmp_path / "c")
    (d / "model-00002-of-00003.safetensors").unlink()
    assert convert.main(["--checkpoint", str(d), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "error: checkpoint shard model-00002-of-00003.safetensors is missing " \
                  "(listed in model.safetensors.index.json)"
    assert convert.main(["--checkpoint", str(dirs[1]), "--out", str(dirs[1])]) == 1
    assert "exists" in capsys.readouterr().err


def test_safetensors_writer_round_trip(tmp_path):
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(5, ml_dtypes.bfloat16),
              "c": np.arange(4, dtype=np.uint8)}
    safetensors_io.write(tmp_path / "x.safetensors", [(k, v.shape, v.dtype, lambda v=v: v) for k, v in arrays.items()])
    got = load_file(str(tmp_path / "x.safetensors"))  # the reference reader
    np.testing.assert_array_equal(got["a"].numpy(), arrays["a"])
    assert got["b"].dtype == torch.bfloat16 and got["c"].dtype == torch.uint8
    entries = safetensors_io.read_header(tmp_path / "x.safetensors")
    np.testing.assert_array_equal(safetensors_io.read_tensor(entries["c"]), arrays["c"])
