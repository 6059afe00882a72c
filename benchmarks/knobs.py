"""Run a benchmark with module knobs of mimo_jax set first (A/B of a choice without editing the library):

    python benchmarks/knobs.py ops.OUT_IN_FOLD_NORMS=1 engine.SPEC_LAYOUT=same layers.REDUCE_ATTENTION_MAX_Q=0 -- \
        benchmarks/bench_speculative.py --drafter block --k 8

Each NAME=VALUE names mimo_jax.<module>.<KNOB> (or pallas_kernels.<module>.<KNOB>), which must exist; VALUE is parsed as a Python literal (1/0 for
booleans also work) or kept as a string."""
import ast
import importlib
import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # mimo_jax and pallas_kernels from this checkout


def set_knob(assignment: str) -> str:
    name, _, value = assignment.partition("=")
    module_name, _, knob = name.rpartition(".")
    if not module_name or not knob or not _:
        raise SystemExit(f"knobs.py: expected module.KNOB=VALUE, got {assignment!r}")
    full = module_name if module_name.startswith("pallas_kernels.") else f"mimo_jax.{module_name}"
    module = importlib.import_module(full)
    if not hasattr(module, knob):
        raise SystemExit(f"knobs.py: {full} has no {knob}")
    old = getattr(module, knob)
    try:
        new = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        new = value
    if isinstance(old, bool):
        new = bool(new)
    setattr(module, knob, new)
    return f"{name}={new!r}"


def main(argv: list[str]) -> None:
    if "--" not in argv:
        raise SystemExit(__doc__)
    cut = argv.index("--")
    print("== " + " ".join(set_knob(a) for a in argv[:cut]), flush=True)
    sys.argv = argv[cut + 1:]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
