"""Convert a checkpoint once, load it fast afterwards.

    python -m mimo_jax.convert --checkpoint DIR --quant_experts int4_sym --out DIR2 [--num_devices N]
        streams DIR onto the devices (experts quantized as they load: loader.load_checkpoint) and saves the
        result with orbax (checkpoint.save: sharded, atomic). Engine.from_pretrained(DIR2) / launch.py
        --checkpoint DIR2 restore it onto the mesh with no quantization work.
    python -m mimo_jax.convert --checkpoint DIR --to mxfp4_safetensors --out DIR3
        writes DIR with its routed experts in the MXFP4 layout of Xiaomi's FP4 releases (below), everything else
        byte for byte: a stand-in for such a release in tests.

The MXFP4 expert layout (as SGLang's MiMo-V2 loader reads the FP4 checkpoints; quant.from_mxfp4_blocks): per
expert `model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight` uint8 [out, in/2] (element 2j of a row in
the low nibble of byte j, 2j + 1 in the high nibble, e2m1 codes: sign bit 3) and `...weight_scale` uint8
[out, in/32] (e8m0: 2^(s - 127) per 32 consecutive inputs); config.json quantization_config.store_dtype "mxfp4".

Bad input prints one `error: ...` line and exits 1; Ctrl-C prints `interrupted` and exits 130; neither leaves a
directory under the output name.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

FUSED = re.compile(r".*\.mlp\.experts\.(gate_up_proj|down_proj)$")


def to_orbax(src, out, quant_experts: str = "int4_sym", quant_group: int = 128, dtype="bfloat16",
             num_devices: int = 1, attention: str = "tp") -> Path:
    import jax
    import jax.numpy as jnp

    from mimo_jax import checkpoint, quant, sharding
    from mimo_jax.errors import CheckpointError
    from mimo_jax.loader import load_checkpoint

    if checkpoint.is_converted(src):
        raise CheckpointError(f"{src} is already a converted checkpoint")
    if Path(out).exists():
        raise CheckpointError(f"{out} exists; remove it or choose another --out")
    mesh = sharding.make_mesh(num_devices) if num_devices > 1 else None
    dtype = jnp.dtype(dtype)
    t0 = time.perf_counter()
    cfg, params = load_checkpoint(src, dtype, mesh=mesh, attention=attention, quant_experts=quant_experts,
                                  quant_group=quant_group)
    jax.block_until_ready(params)
    t1 = time.perf_counter()
    qs = [w for w in jax.tree_util.tree_leaves(params, is_leaf=lambda x: isinstance(x, quant.QuantizedWeight))
          if isinstance(w, quant.QuantizedWeight)]
    fmt, group = (qs[0].fmt, qs[0].group_size) if qs else ("none", 0)
    checkpoint.save(out, cfg, params, fmt, group, dtype, src)
    print(f"converted {src} -> {out}: experts {fmt}{f' g{group}' if group else ''}, load {t1 - t0:.1f} s, "
          f"save {time.perf_counter() - t1:.1f} s", file=sys.stderr)
    return Path(out)


def to_mxfp4_safetensors(src, out) -> Path:
    """DIR with its routed experts rewritten in the MXFP4 storage layout (module docstring), one expert at a time;
    other tensors are copied as stored. Written under a hidden sibling, renamed when complete."""
    import jax.numpy as jnp

    from mimo_jax import quant, safetensors_io
    from mimo_jax.errors import CheckpointError
    from mimo_jax.loader import INDEX, Checkpoint

    ckpt = Checkpoint(src)
    out = Path(out)
    if out.exists():
        raise CheckpointError(f"{out} exists; remove it or choose another --out")
    fused = [k for k in ckpt.keys() if FUSED.fullmatch(k)]
    if fused:
        raise CheckpointError(f"{src} holds fused experts ({fused[0]}); the MXFP4 layout is per expert (hub layout)")
    experts = {k for k in ckpt.keys() if re.fullmatch(r".*\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight", k)}
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        current = {}

        def mxfp4(key):  # the (blocks, scales) of one expert, computed once for its two output tensors
            if current.get("key") != key:
                w = ckpt.read(key)
                if isinstance(w, quant.QuantizedWeight):  # already MXFP4
                    current.update(key=key, arrays=quant.to_mxfp4_blocks(w))
                else:
                    try:
                        qw = quant.quantize_jit(jnp.asarray(w.T), fmt="mxfp4", group_size=32)
                    except ValueError as e:
                        raise CheckpointError(f"{key} cannot be stored as MXFP4: {e}") from None
                    current.update(key=key, arrays=quant.to_mxfp4_blocks(qw))
            return current["arrays"]

        weight_map = {}
        for f in sorted({e.file for e in ckpt.entries.values()}):
            items = []
            for key, e in ckpt.entries.items():
                if e.file != f or (key.endswith("_scale_inv") and key[: -len("_scale_inv")] in experts) \
                        or (key.endswith("_scale") and key[: -len("_scale")] in experts):
                    continue
                if key in experts:
                    out_dim, in_dim = ckpt.shape(key) if e.dtype not in ("U8", "I8") else \
                        (e.shape[0], 2 * e.shape[1])
                    items.append((key, (out_dim, in_dim // 2), "uint8", lambda k=key: mxfp4(k)[0]))
                    items.append((key + "_scale", (out_dim, in_dim // 32), "uint8", lambda k=key: mxfp4(k)[1]))
                else:
                    items.append((key, e.shape, safetensors_io.DTYPES[e.dtype],
                                  lambda e=e: safetensors_io.read_tensor(e)))
            safetensors_io.write(tmp / f.name, items)
            weight_map.update(dict.fromkeys((name for name, *_ in items), f.name))
        cfg = dict(ckpt.hf_config)
        quant_cfg = dict(cfg.get("quantization_config") or
                         {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(ckpt.block)})
        cfg["quantization_config"] = {**quant_cfg, "store_dtype": "mxfp4"}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
        if (Path(src) / INDEX).is_file():
            (tmp / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
        for f in Path(src).iterdir():
            if f.is_file() and not (tmp / f.name).exists() and not f.name.endswith(".safetensors"):
                shutil.copy2(f, tmp / f.name)
        os.rename(tmp, out)
    except OSError as e:
        raise CheckpointError(f"writing {out} failed ({e.strerror or e}); nothing was left under that name") \
            from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv=None) -> int:
    from mimo_jax.quantize_model import CHOICES

    ap = argparse.ArgumentParser(prog="python -m mimo_jax.convert", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="a config.json + *.safetensors directory")
    ap.add_argument("--out", required=True, help="the directory to write (must not exist)")
    ap.add_argument("--to", default="orbax", choices=["orbax", "mxfp4_safetensors"])
    ap.add_argument("--quant_experts", "--quant-experts", default="int4_sym", choices=CHOICES)
    ap.add_argument("--quant_group", "--quant-group", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--num_devices", "--num-devices", type=int, default=1,
                    help="load onto N devices and save each shard from its device")
    ap.add_argument("--attention", default="tp", choices=["tp", "replicated"])
    args = ap.parse_args(argv)
    from mimo_jax.errors import MimoError

    try:
        if args.to == "orbax":
            to_orbax(args.checkpoint, args.out, args.quant_experts, args.quant_group, args.dtype, args.num_devices,
                     args.attention)
        else:
            to_mxfp4_safetensors(args.checkpoint, args.out)
    except MimoError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
