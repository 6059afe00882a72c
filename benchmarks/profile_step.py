"""One decode step (plain, and the speculative step) under the JAX profiler, as a table of kernels.

    python benchmarks/profile_step.py --config configs/smollm2_135m.json
    python benchmarks/profile_step.py --config configs/mid_mimo.json --quant_experts int4_sym --k 8
    python benchmarks/profile_step.py --config configs/mimo_v2_flash.json --layers 48 --devices 2 --k 8
    python benchmarks/profile_step.py --config configs/smollm2_135m.json --out_in on,fuse,fold --decode_steps 8
    python benchmarks/profile_step.py --config configs/smollm2_135m.json --k 8 --drafter block --spec_only \
        --layout scan --spec_layout unrolled

--out_in and --spec_layout set mimo_jax.ops / mimo_jax.engine knobs before each Engine is built (small dense
weights "out, in", q/k/v fused, norms folded; the speculative step's own unrolled layers) to compare variants.

The step runs through the Engine (the path a user takes), warmed up with the exact request shape, timed
without the profiler, then profiled. Every GPU kernel of the decode module is attributed to a group by the
JAX name scope of the HLO op it runs (model.py / layers.py / moe.py set them: attention, norm, residual,
mlp, router, experts, lm_head, sampling) or by its kind (collectives, copies); the table gives each group's
kernels and time per step, kernels per layer, the kernel sum against the step's wall time (the gaps: launch
latency and host work), and the step against its floor (bytes it must read over the read ceiling measured
in this run). Weight-sized copies (a layer loop materialising a slice before a GEMM) show up under copies.
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import sys
import tempfile
from pathlib import Path

_DUMP = tempfile.mkdtemp(prefix="profile_step_hlo_")
# Entry point: the optimized HLO of the step is dumped so every kernel can be traced back to its JAX op.
# On a CPU each thunk is traced too (the flag is read by XLA:CPU only).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={_DUMP} --xla_dump_hlo_as_text"
                           " --xla_dump_hlo_module_re=.*(decode|step).* --xla_cpu_enable_xprof_traceme=true").strip()
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax
import jax.numpy as jnp
import numpy as np

from mimo_jax import engine as engine_module
from mimo_jax import model, ops, sharding
from mimo_jax.config import DENSE_CHOICES, MOE, load_config
from mimo_jax.engine import Engine

from bench_decode import step_bytes
from ceiling import read_ceiling

GROUPS = ("attention", "norm", "residual", "mlp", "router", "experts", "lm_head", "sampling", "drafter")
COLLECTIVE = re.compile(r"nccl|all.?reduce|all.?gather|reduce.?scatter|all.?to.?all|collective", re.I)
COPY = re.compile(r"copy|memcpy|memset|dynamic.?slice|transpose", re.I)


def group_of(kernel: str, op_name: str) -> str:
    if COLLECTIVE.search(kernel) or COLLECTIVE.search(op_name):
        return "collectives"
    scopes = op_name.split("/")
    if "drafter" in scopes:
        return "drafter"
    for scope in reversed(scopes):  # innermost named scope wins
        if scope in GROUPS:
            return scope
    if COPY.search(kernel):
        return "copies"
    return "other"


def op_names_by_module(dump_dir: str) -> dict[str, dict[str, str]]:
    """{module name: {HLO instruction name: metadata op_name}} from the optimized HLO text dumps."""
    out = {}
    for path in glob.glob(os.path.join(dump_dir, "*after_optimizations.txt")):
        name = re.sub(r"^module_\d+\.", "", os.path.basename(path)).split(".")[0]
        ops = out.setdefault(name, {})
        for line in open(path):
            m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name=\"([^\"]*)\"", line)
            if m:
                ops[m.group(1)] = m.group(2)
    return out


KERNEL_GROUPS = (("_attn", "attention"), ("_mlp_kernel", "mlp"), ("int4_grouped", "experts"), ("int4_", "experts"))


def op_name_of(op_names: dict, module: str, hlo_op: str, tf_op: str = "", kernel: str = "") -> str:
    """The JAX op_name of a kernel's HLO op (its named scopes), from the dump of its module. Inside a command
    buffer (CUDA graph) the event names the command buffer, not the fusion: then the kernel's own name is the
    fusion's with '.N' spelled '_N'; Pallas kernels are named by their Python function."""
    mod = module.split("(")[0]
    table = op_names.get(mod)
    if table is None:
        table = next((t for name, t in op_names.items() if name in module or mod in name), {})
    name = table.get(hlo_op, "")
    if not name and kernel:
        name = table.get(kernel, "") or table.get(re.sub(r"_(\d+)$", r".\1", kernel), "")
        name = name or next((f"/{g}/" for key, g in KERNEL_GROUPS if key in kernel), "")
    return name or tf_op


def kernel_events(xplane: str):
    """(kernel name, duration us, stats dict) of every GPU kernel in the trace, and the per-module executions.
    On a CPU the "kernels" are XLA:CPU's thunks (one per fusion, dot or copy; traced on the threads that run
    them when compiled with --xla_cpu_enable_xprof_traceme, which this script sets); the two cores' thunks are
    summed, so the kernel time can exceed the wall time."""
    pd = jax.profiler.ProfileData.from_file(xplane)
    kernels, modules, line_names = [], collections.Counter(), set()
    for plane in pd.planes:
        if plane.name.startswith("/host:CPU") and jax.default_backend() == "cpu":
            for line in plane.lines:
                for ev in line.events:
                    st = dict(ev.stats)
                    # a loop's or call's thunk spans its body's thunks: the body's are counted
                    if "hlo_op" in st and "hlo_module" in st and not re.match(r"(while|conditional|call)\b", ev.name):
                        line_names.add(line.name.split("/")[0])
                        kernels.append((ev.name, ev.duration_ns / 1e3, st))
            continue
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            line_names.add(line.name)
            if line.name == "XLA Modules":
                for ev in line.events:
                    modules[ev.name.split("(")[0]] += 1
                continue
            if not line.name.startswith("Stream"):
                continue
            for ev in line.events:
                kernels.append((ev.name, ev.duration_ns / 1e3, dict(ev.stats)))
    return kernels, modules, sorted(line_names)


def profile(engine: Engine, ids, n_new: int, module_re: str, n_layers: int, floor_s: float, trace_dir: str,
            wall_only: bool = False, top: int = 18):
    """Time the step (no profiler), then trace it; returns the summary dict and prints the table. With
    engine.decode_steps = S > 1 a module run is S steps, and a generation computes whole chunks of S."""
    per = engine.decode_steps
    n_new = 1 + -(-(n_new - 1) // per) * per  # whole chunks
    engine.warm_up(ids, n_new)
    walls = []
    for _ in range(3):  # best of 3 generations
        stats = engine.generate(ids, max_new_tokens=n_new, stop_at_eos=False).stats
        steps = stats.spec_steps if stats.speculative_k else stats.new_tokens - 1
        walls.append(stats.decode_s / max(-(-steps // per) * per, 1))
    wall = min(walls)
    if wall_only:
        print(f"  wall {1e3 * wall:.3f} ms/step (untraced, best of 3: "
              f"{', '.join(f'{1e3 * w:.3f}' for w in walls)}) | floor {1e3 * floor_s:.3f} ms -> "
              f"{100 * floor_s / wall:.1f}% of the floor")
        return {"wall_ms": 1e3 * wall, "floor_ms": 1e3 * floor_s, "pct_floor": 100 * floor_s / wall}
    with jax.profiler.trace(trace_dir):
        pstats = engine.generate(ids, max_new_tokens=n_new, stop_at_eos=False).stats
    xplane = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))[-1]
    kernels, modules, line_names = kernel_events(xplane)
    if kernels:
        st = kernels[len(kernels) // 2][2]
        print(f"  (a kernel event: module {st.get('hlo_module')!r}, op {st.get('hlo_op')!r}, tf_op "
              f"{str(st.get('tf_op'))[:80]!r}; dumped modules: {sorted(op_names_by_module(_DUMP))[:6]})")
    op_names = op_names_by_module(_DUMP)
    mods = [m for m in modules if re.search(module_re, m)]
    runs = per * sum(modules[m] for m in mods) or (pstats.spec_steps if pstats.speculative_k else pstats.new_tokens - 1)
    per = collections.defaultdict(lambda: [0, 0.0])  # (group, kernel) -> [count, us]
    for name, us, st in kernels:
        module = str(st.get("hlo_module", ""))
        if not re.search(module_re, module):
            continue
        op_name = op_name_of(op_names, module, str(st.get("hlo_op", "")), str(st.get("tf_op", "")), name)
        g = group_of(name, op_name)
        per[(g, name)][0] += 1
        per[(g, name)][1] += us
    groups = collections.defaultdict(lambda: [0, 0.0])
    for (g, _), (c, us) in per.items():
        groups[g][0] += c
        groups[g][1] += us
    total_k = sum(c for c, _ in groups.values()) / runs
    total_us = sum(us for _, us in groups.values()) / runs
    print(f"  modules traced: {', '.join(f'{m} x{modules[m]}' for m in mods) or '(no XLA Modules line)'}; "
          f"GPU lines: {', '.join(line_names[:6])}")
    print(f"  wall {1e3 * wall:.3f} ms/step (untraced) | kernels {total_k:.0f}/step = {total_k / n_layers:.1f}/layer | "
          f"kernel time {total_us / 1e3:.3f} ms/step | gaps {1e3 * wall - total_us / 1e3:.3f} ms "
          f"({100 * (1 - total_us / 1e6 / wall):.0f}% of the step) | floor {1e3 * floor_s:.3f} ms -> "
          f"{100 * floor_s / wall:.1f}% of the floor")
    print("  | group | kernels/step | us/step | % of kernel time |")
    print("  |---|---|---|---|")
    for g, (c, us) in sorted(groups.items(), key=lambda kv: -kv[1][1]):
        print(f"  | {g} | {c / runs:.0f} | {us / runs:.1f} | {100 * us / runs / max(total_us, 1e-9):.0f}% |")
    print("  top kernels: | group | kernel | count/step | us/step | us each |")
    for (g, name), (c, us) in sorted(per.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"  | {g} | {name[:60]} | {c / runs:.1f} | {us / runs:.1f} | {us / c:.2f} |")
    return {"wall_ms": 1e3 * wall, "kernels_per_step": total_k, "kernels_per_layer": total_k / n_layers,
            "kernel_ms": total_us / 1e3, "floor_ms": 1e3 * floor_s, "pct_floor": 100 * floor_s / wall,
            "groups": {g: {"kernels": c / runs, "us": us / runs} for g, (c, us) in groups.items()},
            "top": [{"group": g, "kernel": n, "count": c / runs, "us": us / runs}
                    for (g, n), (c, us) in sorted(per.items(), key=lambda kv: -kv[1][1])[:max(40, top)]]}


def random_block_drafter(cfg, layers: int) -> str:
    """A block drafter file with random weights shaped for `cfg` (timing only)."""
    from mimo_jax import block_drafter

    heads = max(1, cfg.hidden_size // 128)
    d = block_drafter.BlockConfig.for_target(cfg, num_layers=layers, num_heads=heads, num_kv_heads=max(1, heads // 8),
                                             head_dim=128, intermediate_size=2 * cfg.hidden_size,
                                             draft_vocab=min(32768, cfg.vocab_size))
    w = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float16),
                               block_drafter.init_weights(d, jax.random.PRNGKey(1), jnp.float32))
    path = os.path.join(tempfile.mkdtemp(prefix="drafter_"), "random_block.safetensors")
    block_drafter.save(path, d, w, np.arange(d.draft_vocab), target=cfg)
    return path


def build(args, cfg, mesh):
    from mimo_jax.quantize_model import check_format, quantize_dense, quantize_experts

    dtype = jnp.dtype(args.dtype)
    fmt, group = check_format(mesh_format(args, mesh), args.quant_group)
    per_weight = None if fmt == "none" else 0.5 + {"int4_sym": 2, "int4_asym": 4, "mxfp4": 1}[fmt] / group
    if mesh is not None or (args.random_experts and fmt != "none"):
        # random 4-bit experts generated on their devices (bench_sharded; one device: a mesh of one)
        import bench_sharded

        bench_sharded.GROUP = args.quant_group
        params = bench_sharded.random_params(cfg, mesh or sharding.make_mesh(1), args.attention, fmt)
        return quantize_dense(params, args.dense), per_weight
    params = quantize_dense(model.init_params(cfg, jax.random.PRNGKey(0), dtype), args.dense)
    if fmt == "none":
        return params, None
    return quantize_experts(params, fmt, args.quant_group), per_weight


def mesh_format(args, mesh) -> str:
    """The experts' format: --quant_experts; under a mesh "none" means int4_sym (random codes made on the devices:
    a bf16 Flash does not fit 2 GPUs)."""
    return "int4_sym" if mesh is not None and args.quant_experts == "none" else args.quant_experts


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/smollm2_135m.json")
    ap.add_argument("--layers", type=int, default=0, help="use the first N layers (0 = all)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--quant_experts", default="none")
    ap.add_argument("--quant_group", type=int, default=128)
    ap.add_argument("--dense", default="bf16", choices=DENSE_CHOICES,
                    help="q/k/v and the dense MLP: bf16, or fp8 with 128 x 128 block scales (the hub's format); "
                         "fp8_layers: also o_proj; fp8_all: o_proj, lm_head")
    ap.add_argument("--random_experts", action="store_true",
                    help="one device: random 4-bit expert codes made on the device (as under a mesh) instead of "
                         "quantizing random bf16 experts (a Flash-sized bf16 stack takes minutes to quantize)")
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--attention", default="tp")
    ap.add_argument("--k", type=int, default=0, help="also profile the speculative step with k drafts (MTP)")
    ap.add_argument("--prompt_len", type=int, default=64)
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--tag", default="")
    ap.add_argument("--layout", default="auto", help="Engine layout(s), comma separated: auto, scan, unrolled")
    ap.add_argument("--drafter", default="auto",
                    help="speculative drafter: auto / mtp, or 'block' (a random block drafter of --block_layers "
                         "layers, target width, draft vocab 32K: times the one-pass drafter, not its acceptance)")
    ap.add_argument("--block_layers", type=int, default=2)
    ap.add_argument("--spec_only", action="store_true", help="with --k: skip the plain decode step")
    ap.add_argument("--wall_only", action="store_true", help="time the step only (no profiler trace)")
    ap.add_argument("--top", type=int, default=18, help="kernels listed in the printed table")
    ap.add_argument("--decode_steps", default="1", help="steps per dispatch (Engine decode_steps), comma separated: "
                    "each value is a run")
    ap.add_argument("--keep_hlo", action="store_true", help="copy each step's optimized HLO to --out")
    ap.add_argument("--out_in", default="default", help="small dense weights' layout (mimo_jax.ops), comma separated, "
                    "each a run: default (the Engine's knobs), off, on, fuse, fold, fuse+fold")
    ap.add_argument("--spec_layout", default=None, choices=("same", "unrolled"),
                    help="the speculative step's own layout under a scan Engine (mimo_jax.engine.SPEC_LAYOUT)")
    args = ap.parse_args()
    if args.spec_layout:
        engine_module.SPEC_LAYOUT = args.spec_layout
    cfg = load_config(args.config)
    if args.layers:
        n = args.layers
        cfg = cfg.first_layers(n)
    if not args.k:
        cfg = cfg.replace(num_mtp_layers=0)
    mesh = sharding.make_mesh(args.devices) if args.devices > 1 else None
    ceiling = read_ceiling()  # per device
    params, expert_itemsize = build(args, cfg, mesh)
    itemsize = jnp.dtype(args.dtype).itemsize
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, args.prompt_len).tolist()
    tag = args.tag or Path(args.config).stem
    print(f"== {tag}: {jax.devices()[0].device_kind} x{args.devices}, jax {jax.__version__}, {cfg.num_layers} "
          f"layers, {args.dtype}, dense {args.dense}, experts {mesh_format(args, mesh)}"
          f"{' (random codes)' if mesh is not None or args.random_experts else ''}; "
          f"read ceiling {ceiling / 1e9:.0f} GB/s per device (measured now)")
    summary = {"tag": tag, "device": jax.devices()[0].device_kind, "devices": args.devices, "jax": jax.__version__,
               "ceiling_GBps": ceiling / 1e9}
    drafter = random_block_drafter(cfg, args.block_layers) if args.drafter == "block" else args.drafter
    ks = ([args.k] if args.spec_only else [0, args.k]) if args.k else [0]
    runs = [(layout, o, k, int(s)) for layout in args.layout.split(",") for o in args.out_in.split(",") for k in ks
            for s in args.decode_steps.split(",")]
    knobs = (ops.OUT_IN_ELEMENTS, ops.OUT_IN_FUSE, ops.OUT_IN_FOLD_NORMS)
    for layout, out_in, k, per_dispatch in runs:
        ops.OUT_IN_ELEMENTS, ops.OUT_IN_FUSE, ops.OUT_IN_FOLD_NORMS = knobs if out_in == "default" else (
            0 if out_in == "off" else knobs[0], "fuse" in out_in, "fold" in out_in)
        for stale in glob.glob(os.path.join(_DUMP, "*.txt")):  # each run's kernels are named from its own dumps
            os.remove(stale)
        engine = Engine(cfg, params, max_seq_len=4096, prefill_chunk=64, mesh=mesh, attention=args.attention,
                        speculative_k=k, layout=layout, drafter=drafter, decode_steps=per_dispatch)
        cap = engine.capacity(len(ids), args.new_tokens)
        if k == 0:
            nbytes = step_bytes(cfg, itemsize, cap, expert_itemsize=expert_itemsize, dense=args.dense)
        else:
            e_uniform = (cfg.num_experts * (1 - (1 - cfg.num_experts_per_tok / cfg.num_experts) ** (k + 1))
                         if MOE in cfg.mlp_types else None)
            nbytes = step_bytes(cfg, itemsize, cap, k + 1, e_uniform, ring=k + 1, expert_itemsize=expert_itemsize,
                                dense=args.dense)
        floor = nbytes / (ceiling * args.devices)
        spec_tag = f", step layout {args.spec_layout}" if args.spec_layout and k else ""
        print(f"-- {layout}{'' if out_in == 'default' else ', out-in ' + out_in}{spec_tag}: {'plain decode' if k == 0 else f'speculative step k={k}'}, {per_dispatch} step(s) per dispatch (cache bucket {cap}, "
              f"{nbytes / 1e6:.1f} MB per step over {args.devices} device(s))")
        key = (("plain" if k == 0 else f"spec_k{k}") + ("" if layout == "auto" else f"_{layout}")
               + ("" if out_in == "default" else f"_outin_{out_in}") + (f"_step_{args.spec_layout}" if spec_tag else ""))
        summary[key + (f"_x{per_dispatch}" if per_dispatch > 1 else "")] = profile(
            engine, ids, args.new_tokens, r"decode" if k == 0 else r"step", cfg.num_layers, floor,
            tempfile.mkdtemp(prefix="trace_"), args.wall_only, args.top)
        if args.keep_hlo:  # the step's optimized HLO, for reading offline (which op a kernel is)
            import shutil

            Path(args.out).mkdir(parents=True, exist_ok=True)
            for path in sorted(glob.glob(os.path.join(_DUMP, "*after_optimizations.txt")), key=os.path.getsize)[-1:]:
                shutil.copy(path, Path(args.out) / f"hlo_{tag}_{'plain' if k == 0 else f'spec_k{k}'}_{layout}.txt")
        del engine
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with open(Path(args.out) / f"profile_{tag}.json", "w") as f:
        json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
