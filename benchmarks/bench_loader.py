"""Loading a real-size checkpoint: a synthetic hub-layout FP8 checkpoint streamed onto the device, converted to
orbax and restored, each phase against the disk's own read speed measured in the same run.

    python benchmarks/bench_loader.py OUT_DIR [--work /tmp/mimo_bench] [--config configs/mid_mimo.json]
    python benchmarks/bench_loader.py OUT_DIR --quick          # a tiny config, seconds on a CPU

1. writes the checkpoint of --config as Xiaomi's hub stores MiMo-V2-Flash (per-expert tensors; q/k/v, expert and
   dense MLP, eh_proj weights FP8 e4m3 with 128x128 `weight_scale_inv` blocks; embeddings, norms, o_proj,
   router in bf16 / f32; an index over several shards), random bytes from pools (not a model init), then evicts
   it from the page cache (fsync + POSIX_FADV_DONTNEED; the residency left is measured with mincore and
   printed) so every phase below reads the disk;
2. raw read: the same files read with large preads, 1 and 8 threads: the ceiling every phase is compared to;
3. in a fresh process each (cold page cache, own peak RSS and device peak):
   (a) Engine.from_pretrained(dir, quant_experts="int4_sym"); (b) the same with quant_experts=None where the
   bf16 model fits the device; (c) `python -m mimo_jax.convert` to orbax; (d) Engine.from_pretrained of the
   converted directory; (a) and (d) generate 8 greedy tokens and checksum every parameter array on the device:
   restored == loaded is checked on the checksums (two 32-bit sums per array, positions weighted);
4. extrapolates to MiMo-V2-Flash (its FP8 bytes from configs/mimo_v2_flash.json, ~310 GB) on 2 x H200 at the
   measured rates.
Writes OUT_DIR/bench_loader.json and prints a table. --budget_s: phase (b) is skipped when what is left of the
budget would not cover it at phase (a)'s rate.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere without installing

import numpy as np  # noqa: E402

GB = 1e9
BLOCK = 128


# ---- the synthetic checkpoint ----

def bench_config(args):
    from mimo_jax.config import load_config

    cfg = load_config(ROOT / args.config)
    if args.quick:  # tiny: every kind of tensor, a few MB
        n = 3
        cfg = cfg.first_layers(n, vocab_size=4096, hidden_size=512, num_heads=4, num_kv_heads=2, swa_num_heads=4,
                          swa_num_kv_heads=2, intermediate_size=1024, moe_intermediate_size=256, num_experts=8,
                          num_experts_per_tok=2)
    if args.layers:
        cfg = cfg.first_layers(args.layers)
    if args.experts:
        cfg = cfg.replace(num_experts=args.experts, num_experts_per_tok=min(cfg.num_experts_per_tok, args.experts))
    return cfg


def hub_config(cfg) -> dict:
    """config.json in the hub dialect (what XiaomiMiMo/MiMo-V2-Flash ships), read back by config_from_hf."""
    return {"model_type": "mimo_v2_flash", "architectures": ["MiMoV2FlashForCausalLM"],
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
            "intermediate_size": cfg.intermediate_size, "moe_intermediate_size": cfg.moe_intermediate_size,
            "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
            "swa_num_attention_heads": cfg.swa_num_heads, "swa_num_key_value_heads": cfg.swa_num_kv_heads,
            "head_dim": cfg.head_dim, "v_head_dim": cfg.v_head_dim, "swa_head_dim": cfg.swa_head_dim,
            "swa_v_head_dim": cfg.swa_v_head_dim, "rope_theta": cfg.rope_theta, "swa_rope_theta": cfg.swa_rope_theta,
            "hybrid_layer_pattern": [int(t == "sliding") for t in cfg.layer_types],
            "moe_layer_freq": [int(t == "moe") for t in cfg.mlp_types],
            "partial_rotary_factor": cfg.partial_rotary_factor, "sliding_window_size": cfg.sliding_window,
            "add_full_attention_sink_bias": cfg.sink_full, "add_swa_attention_sink_bias": cfg.sink_swa,
            "attention_value_scale": cfg.attention_value_scale, "layernorm_epsilon": cfg.rms_norm_eps,
            "n_routed_experts": cfg.num_experts, "num_experts_per_tok": cfg.num_experts_per_tok,
            "norm_topk_prob": cfg.norm_topk_prob, "routed_scaling_factor": cfg.routed_scaling_factor,
            "n_group": 1, "topk_group": 1, "max_position_embeddings": 4096, "tie_word_embeddings": False,
            "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [BLOCK, BLOCK]}}


def hub_tensors(cfg) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, safetensors dtype) of every tensor, in the order the hub shards hold them."""
    out = []
    h, e = cfg.hidden_size, cfg.num_experts

    def fp8(name, o, i):
        out.append((name, (o, i), "F8_E4M3"))
        out.append((name + "_scale_inv", (-(-o // BLOCK), -(-i // BLOCK)), "F32"))

    def attention(p, kind):
        a = cfg.attention(kind)
        fp8(p + "self_attn.q_proj.weight", a.num_heads * a.head_dim, h)
        fp8(p + "self_attn.k_proj.weight", a.num_kv_heads * a.head_dim, h)
        fp8(p + "self_attn.v_proj.weight", a.num_kv_heads * a.v_head_dim, h)
        out.append((p + "self_attn.o_proj.weight", (h, a.num_heads * a.v_head_dim), "BF16"))
        if a.sink:
            out.append((p + "self_attn.attention_sink_bias", (a.num_heads,), "BF16"))

    def dense(p):
        fp8(p + "mlp.gate_proj.weight", cfg.intermediate_size, h)
        fp8(p + "mlp.up_proj.weight", cfg.intermediate_size, h)
        fp8(p + "mlp.down_proj.weight", h, cfg.intermediate_size)

    out.append(("model.embed_tokens.weight", (cfg.vocab_size, h), "BF16"))
    for j, (kind, mlp) in enumerate(zip(cfg.layer_types, cfg.mlp_types)):
        p = f"model.layers.{j}."
        out += [(p + "input_layernorm.weight", (h,), "BF16"), (p + "post_attention_layernorm.weight", (h,), "BF16")]
        attention(p, kind)
        if mlp == "moe":
            out += [(p + "mlp.gate.weight", (e, h), "F32"), (p + "mlp.gate.e_score_correction_bias", (e,), "F32")]
            for x in range(e):
                fp8(p + f"mlp.experts.{x}.gate_proj.weight", cfg.moe_intermediate_size, h)
                fp8(p + f"mlp.experts.{x}.up_proj.weight", cfg.moe_intermediate_size, h)
                fp8(p + f"mlp.experts.{x}.down_proj.weight", h, cfg.moe_intermediate_size)
        else:
            dense(p)
    for j in range(cfg.num_mtp_layers):  # an MTP block: sliding attention + dense MLP
        p = f"model.mtp.layers.{j}."
        out += [(p + n, (h,), "BF16") for n in ("enorm.weight", "hnorm.weight", "input_layernorm.weight",
                                                  "pre_mlp_layernorm.weight", "final_layernorm.weight")]
        fp8(p + "eh_proj.weight", h, 2 * h)
        attention(p, "sliding")
        dense(p)
    out += [("model.norm.weight", (h,), "BF16"), ("lm_head.weight", (h, cfg.vocab_size)[::-1], "BF16")]
    return out


ITEMSIZE = {"F8_E4M3": 1, "BF16": 2, "F32": 4}


def _pools(seed: int = 0) -> dict[str, np.ndarray]:
    """Byte pools each tensor is cut from at a random offset: FP8 codes (NaN codes cleared), bf16 ~ N(0, 0.02^2),
    f32 block scales ~ U(1e-4, 3e-4) (FP8 values up to 448: weights up to ~0.13)."""
    import ml_dtypes

    rng = np.random.default_rng(seed)
    fp8 = rng.integers(0, 256, 256 << 20, dtype=np.uint8)
    fp8[(fp8 & 0x7F) == 0x7F] = 0
    bf16 = (0.02 * rng.standard_normal(32 << 20, np.float32)).astype(ml_dtypes.bfloat16).view(np.uint8)
    f32 = rng.uniform(1e-4, 3e-4, 16 << 20).astype(np.float32).view(np.uint8)
    return {"F8_E4M3": fp8, "BF16": bf16, "F32": f32}


def _write_file(path: Path, items, pools, seed: int) -> None:
    """One safetensors file (our own writer: tensors written straight from the pools in slices, none made whole)."""
    header, offset = {}, 0
    for name, shape, dtype in items:
        n = int(np.prod(shape)) * ITEMSIZE[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    rng = np.random.default_rng(seed)
    with open(path, "wb", buffering=0) as fh:
        fh.write(len(raw).to_bytes(8, "little") + raw)
        for name, shape, dtype in items:
            pool, n = pools[dtype], int(np.prod(shape)) * ITEMSIZE[dtype]
            while n:
                step = min(n, len(pool) // 2)
                start = int(rng.integers(0, (len(pool) - step) // ITEMSIZE[dtype] + 1)) * ITEMSIZE[dtype]
                view = memoryview(pool[start:start + step])
                while view.nbytes:
                    view = view[fh.write(view):]
                n -= step
        os.fsync(fh.fileno())


def write_checkpoint(cfg, directory: Path, shard_bytes: float = 4e9, threads: int = 4) -> int:
    """The hub-layout checkpoint of cfg under directory (shards of ~shard_bytes + the index); returns its bytes."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(hub_config(cfg), indent=1))
    shards, size = [[]], 0
    for item in hub_tensors(cfg):
        n = int(np.prod(item[1])) * ITEMSIZE[item[2]]
        if shards[-1] and size + n > shard_bytes and not item[0].endswith("_scale_inv"):
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += n
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {item[0]: name for name, items in zip(names, shards) for item in items}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    pools = _pools()
    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(lambda i: _write_file(directory / names[i], shards[i], pools, i), range(len(shards))))
    return sum((directory / n).stat().st_size for n in names)


# ---- the page cache and the raw read ----

def data_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file())


def evict(files) -> None:
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_fraction(files) -> float | None:
    """Fraction of the files' pages in the page cache (mincore); None where it cannot be asked."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        page, total, resident = os.sysconf("SC_PAGE_SIZE"), 0, 0
        for f in files:
            size = f.stat().st_size
            if not size:
                continue
            fd = os.open(f, os.O_RDONLY)
            try:
                addr = libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
                if addr in (None, ctypes.c_void_p(-1).value):
                    return None
                pages = -(-size // page)
                vec = (ctypes.c_ubyte * pages)()
                ok = libc.mincore(addr, size, vec) == 0
                libc.munmap(addr, size)
                if not ok:
                    return None
                resident += sum(b & 1 for b in bytes(vec))
                total += pages
            finally:
                os.close(fd)
        return resident / total if total else None
    except (OSError, AttributeError):
        return None


def raw_read(files, threads: int, chunk: int = 64 << 20) -> float:
    """Seconds to read every byte of files with preads of `chunk` bytes over `threads` threads."""
    jobs = [(f, off, min(chunk, f.stat().st_size - off)) for f in files for off in range(0, f.stat().st_size, chunk)]
    lock = threading.Lock()

    def worker():
        buf = bytearray(chunk)
        view = memoryview(buf)
        while True:
            with lock:
                if not jobs:
                    return
                f, off, n = jobs.pop()
            fd = os.open(f, os.O_RDONLY)
            try:
                done = 0
                while done < n:
                    got = os.preadv(fd, [view[done:n]], off + done)
                    if got <= 0:
                        raise OSError(f"short read of {f}")
                    done += got
            finally:
                os.close(fd)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as ex:
        for fut in [ex.submit(worker) for _ in range(threads)]:
            fut.result()
    return time.perf_counter() - t0


def host_dequant_rate(directory: Path, n: int = 24) -> dict:
    """What the host alone does per checkpoint byte when it converts (the CPU-backend path, and the only path
    before conversions moved to the device): read + numpy FP8 block dequant to float32 + transpose and cast to
    bf16, on n expert tensors, one core, page cache warm."""
    import ml_dtypes

    from mimo_jax.loader import Checkpoint

    ckpt = Checkpoint(directory)
    keys = [k for k in ckpt.keys() if ".experts." in k and k.endswith("_proj.weight")][:n]
    raws = [ckpt.read_raw(k) for k in keys]
    nbytes = sum(ckpt.nbytes(k) for k in keys)
    t0 = time.perf_counter()
    for k, raw in zip(keys, raws):
        np.ascontiguousarray(ckpt.convert(k, raw).swapaxes(-1, -2)).astype(ml_dtypes.bfloat16)
    convert = time.perf_counter() - t0
    return {"tensors": len(keys), "bytes": nbytes, "GBps": nbytes / convert / GB if keys else None}


# ---- one phase in a fresh process ----

def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1)) * 1024


def _digests(params) -> dict[str, list[int]]:
    """Two 32-bit checksums per array, computed on its devices: the sum of its bits and a position-weighted sum."""
    import jax
    import jax.numpy as jnp

    @jax.jit
    def digest(x):
        width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
        bits = jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32).reshape(-1)
        i = jnp.arange(bits.size, dtype=jnp.uint32)
        return jnp.stack([bits.sum(dtype=jnp.uint32), (bits * (i * jnp.uint32(2654435761) + 1)).sum(dtype=jnp.uint32)])

    return {jax.tree_util.keystr(p): [int(v) for v in np.asarray(digest(x))]
            for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def phase(args) -> None:
    """What Engine.from_pretrained does, in two timed parts: the load (loader.load_checkpoint, or
    checkpoint.restore for a converted directory) and the Engine built on its params (today's Engine may re-lay
    the weights out: model.unroll_layers)."""
    import jax
    import jax.numpy as jnp

    from mimo_jax import checkpoint, loader
    from mimo_jax.engine import Engine

    jnp.zeros(8).block_until_ready()  # the runtime up: not part of the load
    base = _status("VmRSS")
    dev = jax.devices()[0]
    dtype = jnp.dtype(args.dtype)
    t0 = time.perf_counter()
    if checkpoint.is_converted(args.phase_dir):
        cfg, params = checkpoint.restore(args.phase_dir, dtype=dtype)
    else:
        cfg, params = loader.load_checkpoint(args.phase_dir, dtype, quant_experts=args.phase_quant, quant_group=128)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - t0
    stats = dev.memory_stats() or {}
    r = {"seconds": seconds, "rss_base": base, "rss_peak": _status("VmHWM"),
         "final_bytes": sum(x.nbytes for x in jax.tree_util.tree_leaves(params)),
         "device_peak": stats.get("peak_bytes_in_use"), "device_in_use": stats.get("bytes_in_use")}
    if args.digests:  # (a) and (d): every array checksummed, then the engine generates
        r["digests"] = _digests(params)
    t1 = time.perf_counter()
    engine = Engine(cfg, params, max_seq_len=256)
    del params
    jax.block_until_ready(engine.params)
    stats = dev.memory_stats() or {}
    r.update(engine_s=time.perf_counter() - t1, engine_layout=engine.layout, rss_peak_engine=_status("VmHWM"),
             device_peak_engine=stats.get("peak_bytes_in_use"))
    if args.digests:
        t1 = time.perf_counter()
        r["tokens"] = engine.generate([1, 2, 3, 4, 5], max_new_tokens=8, stop_at_eos=False).token_ids
        r["generate_s"] = time.perf_counter() - t1  # compile included
    print("RESULT " + json.dumps(r), flush=True)


CHILD_ENV = dict(os.environ)  # the phases see the accelerator; this process keeps jax on the CPU (below)


def probe() -> dict:
    """The accelerator as a fresh process sees it (this one never opens it: it would hold its memory)."""
    code = ("import jax, json; d = jax.devices()[0]; print('RESULT ' + json.dumps({'backend': jax.default_backend(), "
            "'device': d.device_kind, 'count': len(jax.devices()), "
            "'bytes_limit': (d.memory_stats() or {}).get('bytes_limit')}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=CHILD_ENV)
    return json.loads([x for x in out.stdout.splitlines() if x.startswith("RESULT ")][0][len("RESULT "):])


def run_phase(directory: Path, quant: str | None, dtype: str, digests: bool) -> dict:
    cmd = [sys.executable, __file__, "--phase", "x", "--phase_dir", str(directory), "--dtype", dtype]
    cmd += ["--phase_quant", quant] if quant else []
    cmd += ["--digests"] if digests else []
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=CHILD_ENV)
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if not line:
        raise RuntimeError(f"phase {quant} on {directory} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    r = json.loads(line[0][len("RESULT "):])
    r["wall_s"] = time.perf_counter() - t0
    return r


# ---- the extrapolation ----

def flash_figures(dtype: str = "bfloat16") -> dict:
    """Bytes of MiMo-V2-Flash: its hub FP8 checkpoint (from the tensor list above) and its int4_sym g128 params."""
    import jax
    import jax.numpy as jnp

    from mimo_jax.config import load_config
    from mimo_jax.model import param_shapes
    from mimo_jax.quantize_model import quantize_structs

    cfg = load_config(ROOT / "configs/mimo_v2_flash.json")
    fp8 = sum(int(np.prod(s)) * ITEMSIZE[d] for _, s, d in hub_tensors(cfg))
    q = quantize_structs(param_shapes(cfg, jnp.dtype(dtype)), "int4_sym", 128)
    return {"checkpoint_bytes": fp8, "int4_bytes": sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(q))}


# ---- the run ----

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?", help="directory for bench_loader.json")
    ap.add_argument("--work", default="/tmp/mimo_bench", help="where the checkpoints are written (local disk)")
    ap.add_argument("--config", default="configs/mid_mimo.json")
    ap.add_argument("--quick", action="store_true", help="a tiny config (CPU, seconds)")
    ap.add_argument("--layers", type=int, default=0, help="keep the first N layers of the config")
    ap.add_argument("--experts", type=int, default=0, help="routed experts per MoE layer")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on GPU, float32 on CPU")
    ap.add_argument("--budget_s", type=float, default=330.0)
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints under --work")
    ap.add_argument("--phase", help=argparse.SUPPRESS)
    ap.add_argument("--phase_dir", help=argparse.SUPPRESS)
    ap.add_argument("--phase_quant", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--digests", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        return phase(args)
    if not args.out:
        ap.error("OUT_DIR is required")
    t_start = time.perf_counter()
    import shutil

    os.environ["JAX_PLATFORMS"] = "cpu"  # before jax is imported: abstract shapes only here
    import jax

    out_dir, work = Path(args.out), Path(args.work)
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    dev = probe()
    dtype = args.dtype or ("bfloat16" if dev["backend"] != "cpu" else "float32")
    cfg = bench_config(args)
    res = {"device": dev["device"], "backend": dev["backend"], "device_bytes_limit": dev["bytes_limit"], "dtype": dtype,
           "config": args.config + (" --quick" if args.quick else ""), "layers": cfg.num_layers,
           "experts": cfg.num_experts, "host_cores": os.cpu_count()}
    ckpt = work / "hub_fp8"
    t0 = time.perf_counter()
    size = write_checkpoint(cfg, ckpt)
    res["write"] = {"bytes": size, "seconds": time.perf_counter() - t0}
    files = data_files(ckpt)
    evict(files)
    res["resident_after_evict"] = resident_fraction(files)

    res["raw_read"] = {}
    for threads in (1, 8):
        evict(files)
        s = raw_read(files, threads)
        res["raw_read"][f"{threads}_threads"] = {"seconds": s, "GBps": size / s / GB}
    ceiling = max(v["GBps"] for v in res["raw_read"].values())
    res["ceiling_GBps"] = ceiling

    res["host_fp8_dequant"] = host_dequant_rate(ckpt)

    def save():  # after every phase: a run cut short still leaves its figures
        res["total_wall_s"] = time.perf_counter() - t_start
        (out_dir / "bench_loader.json").write_text(json.dumps(res, indent=1))

    def timed(name, directory, quant, digests=False, nbytes=size):
        evict(data_files(directory))
        try:
            r = run_phase(directory, quant, dtype, digests)
        except RuntimeError as e:  # recorded; the other phases still run
            res[name] = {"error": str(e)[-2000:]}
            print(f"{name} failed:\n{e}", file=sys.stderr)
            save()
            return None
        r["GBps"] = nbytes / r["seconds"] / GB
        r["of_ceiling"] = r["GBps"] / ceiling
        res[name] = r
        save()
        return r

    a = timed("load_int4", ckpt, "int4_sym", digests=True)
    # (b) bf16 experts: skipped if they would not fit the device or the budget
    from mimo_jax.model import param_shapes

    full = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(param_shapes(cfg, dtype)))
    capacity = dev["bytes_limit"]
    left = args.budget_s - (time.perf_counter() - t_start)
    if a is not None:
        startup = a["wall_s"] - a["seconds"] - a["generate_s"]  # process start, runtime, digests, Engine
        need = (startup + a["seconds"]) * 2.5 + a["wall_s"]  # (b), (c) = a load + a save, (d) ~ (a)
    else:
        need = float("inf")
    if capacity and full > 0.9 * capacity:
        res["load_none"] = {"skipped": f"{dtype} params {full / GB:.1f} GB > 90% of {capacity / GB:.1f} GB"}
    elif left < need:
        res["load_none"] = {"skipped": f"budget: {left:.0f} s left, (b)-(d) need ~{need:.0f} s"}
    else:
        timed("load_none", ckpt, None)

    conv = work / "orbax_int4"
    evict(files)
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "mimo_jax.convert", "--checkpoint", str(ckpt), "--out", str(conv),
                          "--quant_experts", "int4_sym", "--dtype", dtype], capture_output=True, text=True, cwd=ROOT,
                         env=CHILD_ENV)
    wall = time.perf_counter() - t0
    m = re.search(r"load ([\d.]+) s, save ([\d.]+) s", out.stderr)
    d = None
    if out.returncode or not m:
        res["convert"] = {"error": out.stderr[-2000:]}
        print(f"convert failed:\n{out.stderr[-3000:]}", file=sys.stderr)
    else:
        conv_bytes = sum(f.stat().st_size for f in data_files(conv))
        res["convert"] = {"wall_s": wall, "load_s": float(m.group(1)), "save_s": float(m.group(2)),
                          "orbax_bytes": conv_bytes, "save_GBps": conv_bytes / float(m.group(2)) / GB}
        save()
        d = timed("restore", conv, None, digests=True, nbytes=conv_bytes)
    if a is not None and d is not None:
        da, dd = a.pop("digests"), d.pop("digests")
        res["restored_equals_loaded"] = da == dd
        res["restore_mismatch"] = sorted(k for k in set(da) | set(dd) if da.get(k) != dd.get(k))[:10]
        res["same_tokens"] = a["tokens"] == d["tokens"]
        res["flash"] = extrapolate(res, flash_figures(dtype), size)
    for r in (a, d):
        if r is not None:
            r.pop("digests", None)
    save()
    print_table(res)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


def extrapolate(res, flash, size) -> dict:
    """MiMo-V2-Flash on 2 x H200 at this run's rates: the load is host-side (read, H2D, dispatch) and reads every
    byte once; with two GPUs each expert goes to one of them, so the bytes per GPU halve but the host work does
    not: the single-GPU rate is what we assume (a floor for the 2-GPU rate)."""
    f = {"checkpoint_GB": flash["checkpoint_bytes"] / GB, "int4_params_GB": flash["int4_bytes"] / GB,
         "int4_per_gpu_GB": flash["int4_bytes"] / 2 / GB}
    f["disk_read_s"] = flash["checkpoint_bytes"] / GB / res["ceiling_GBps"]
    f["load_int4_s"] = flash["checkpoint_bytes"] / GB / res["load_int4"]["GBps"]
    scale = flash["checkpoint_bytes"] / size
    f["convert_s"] = res["convert"]["load_s"] * scale + res["convert"]["save_s"] * flash["int4_bytes"] / \
        res["convert"]["orbax_bytes"]
    f["restore_s"] = flash["int4_bytes"] / GB / res["restore"]["GBps"]
    f["peak_host_GB_over_base"] = (res["load_int4"]["rss_peak"] - res["load_int4"]["rss_base"]) / GB
    return f


def print_table(res) -> None:
    c = res["ceiling_GBps"]
    print(f"\n{res['device']} ({res['backend']}), {res['config']}: {res['layers']} layers x {res['experts']} experts, "
          f"{res['dtype']}, {res['host_cores']} host cores")
    print(f"checkpoint {res['write']['bytes'] / GB:.2f} GB written in {res['write']['seconds']:.1f} s; page cache "
          f"residency after eviction: {res['resident_after_evict']}")
    print("raw read: " + ", ".join(f"{k} {v['GBps']:.2f} GB/s" for k, v in res["raw_read"].items())
          + f" -> ceiling {c:.2f} GB/s")
    h = res.get("host_fp8_dequant") or {}
    if h.get("GBps"):
        print(f"host-side FP8 dequant + transpose + cast in numpy (one core, {h['tensors']} expert tensors): "
              f"{h['GBps']:.2f} GB/s of checkpoint bytes ({res['backend']} loads convert "
              f"{'on the device' if res['backend'] != 'cpu' else 'this way'})")
    print("\n| phase | seconds | GB/s | of ceiling | peak RSS over base | device peak / final | + Engine() | "
          "wall (process) |")
    print("|---|---|---|---|---|---|---|---|")
    for name in ("load_int4", "load_none", "restore"):
        r = res.get(name)
        if r is None:
            continue
        if "skipped" in r or "error" in r:
            print(f"| {name} | {'skipped: ' + r['skipped'] if 'skipped' in r else 'FAILED (see the JSON)'} "
                  f"| | | | | | |")
            continue
        dev = (f"{r['device_peak'] / GB:.2f} / {r['final_bytes'] / GB:.2f} GB" if r.get("device_peak")
               else f"n/a / {r['final_bytes'] / GB:.2f} GB")
        eng = f"{r['engine_s']:.1f} s ({r['engine_layout']})" + (
            f", device peak {r['device_peak_engine'] / GB:.2f} GB" if r.get("device_peak_engine") else "")
        print(f"| {name} | {r['seconds']:.1f} | {r['GBps']:.2f} | {r['of_ceiling']:.0%} | "
              f"{(r['rss_peak'] - r['rss_base']) / GB:.2f} GB | {dev} | {eng} | {r['wall_s']:.1f} s |")
    cv = res["convert"]
    if "error" in cv:
        print("| convert | FAILED (see the JSON) | | | | | | |")
        print(f"total wall {res['total_wall_s']:.0f} s")
        return
    print(f"| convert (load + orbax save) | {cv['load_s']:.1f} + {cv['save_s']:.1f} | save {cv['save_GBps']:.2f} | "
          f"| | {cv['orbax_bytes'] / GB:.2f} GB on disk | | {cv['wall_s']:.1f} s |")
    if "flash" not in res:
        print(f"total wall {res['total_wall_s']:.0f} s")
        return
    print(f"\nrestored == loaded (checksums of every array): {res['restored_equals_loaded']}; same 8 greedy tokens: "
          f"{res['same_tokens']} {res['load_int4']['tokens']}")
    f = res["flash"]
    print(f"\nMiMo-V2-Flash on 2 x H200 at these rates: FP8 checkpoint {f['checkpoint_GB']:.0f} GB, int4 params "
          f"{f['int4_params_GB']:.0f} GB ({f['int4_per_gpu_GB']:.0f} GB per GPU)")
    print(f"  disk read {f['disk_read_s']:.0f} s | streaming int4 load {f['load_int4_s']:.0f} s | convert "
          f"{f['convert_s']:.0f} s | restore {f['restore_s']:.0f} s | peak host RSS over base ~"
          f"{f['peak_host_GB_over_base']:.1f} GB")
    print(f"total wall {res['total_wall_s']:.0f} s")


if __name__ == "__main__":
    main()
