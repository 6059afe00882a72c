"""How the layers are stacked so that a 48-layer model traces a handful of layer bodies, not 48.

Layers come in kinds (attention type, MLP type). Consecutive layers of one kind form a `Run`, whose parameters
are stacked on a leading axis and scanned. A periodic stretch (MiMo-V2-Flash: layers 6..47 are 7 repeats of
"5 sliding + 1 full") becomes a `Loop`: an outer scan over the repeats whose body holds one scan per run, its
parameters stacked [repeats, run_length, ...]. The plan is a pure function of the layer kinds, so the
parameter and cache pytrees, the loader's index table and the forward pass all agree on it.

    MiMo-V2-Flash: Run(full,dense)x1, Run(sliding,moe)x4, Loop 7 x [Run(full,moe)x1, Run(sliding,moe)x5],
                   Run(full,moe)x1                      (5 traced layer bodies for 48 layers)
    Llama:         Run(full,dense)x30
"""
from __future__ import annotations

import dataclasses

Kind = tuple[str, str]


@dataclasses.dataclass(frozen=True)
class Run:
    kind: Kind
    length: int


@dataclasses.dataclass(frozen=True)
class Loop:
    repeats: int
    runs: tuple[Run, ...]


Item = Run | Loop


def _runs(kinds: tuple[Kind, ...]) -> list[Run]:
    out: list[Run] = []
    for k in kinds:
        if out and out[-1].kind == k:
            out[-1] = Run(k, out[-1].length + 1)
        else:
            out.append(Run(k, 1))
    return out


def make_plan(kinds: tuple[Kind, ...]) -> tuple[Item, ...]:
    """The plan with the fewest traced layer bodies: runs before, one loop, runs after."""
    n = len(kinds)
    best: tuple[int, tuple[Item, ...]] = (len(_runs(kinds)), tuple(_runs(kinds)))
    for start in range(n):
        for period in range(1, (n - start) // 2 + 1):
            repeats = (n - start) // period
            unit = kinds[start:start + period]
            if any(kinds[start + j] != unit[j % period] for j in range(repeats * period)):
                continue
            end = start + repeats * period
            pre, body, post = _runs(kinds[:start]), _runs(unit), _runs(kinds[end:])
            cost = len(pre) + len(body) + len(post)
            if cost < best[0]:
                best = (cost, (*pre, Loop(repeats, tuple(body)), *post))
    return best[1]


@dataclasses.dataclass(frozen=True)
class Slot:
    """Where layer i lives: plan item, run inside a Loop (None for a bare Run), and its index within the stack."""

    item: int
    run: int | None
    index: tuple[int, ...]  # (i,) in a Run's [length] stack, (repeat, i) in a Loop run's [repeats, length] stack


def layer_slots(plan: tuple[Item, ...]) -> list[Slot]:
    slots: list[Slot] = []
    for item_idx, item in enumerate(plan):
        if isinstance(item, Run):
            slots += [Slot(item_idx, None, (i,)) for i in range(item.length)]
        else:
            for rep in range(item.repeats):
                for run_idx, run in enumerate(item.runs):
                    slots += [Slot(item_idx, run_idx, (rep, i)) for i in range(run.length)]
    return slots


def stacked(plan: tuple[Item, ...], make):
    """A pytree mirroring the plan: make(kind, leading_shape) for each run."""
    out = []
    for item in plan:
        if isinstance(item, Run):
            out.append(make(item.kind, (item.length,)))
        else:
            out.append([make(run.kind, (item.repeats, run.length)) for run in item.runs])
    return out


# ---- reading a parameter / cache leaf's place in the plan (shared by the loaders, sharding, quantization) ----

def path_keys(path) -> tuple:
    """A jax.tree_util key path as plain keys: ("layers", 2, 0, "mlp", "w_gate"); list / node indices stay ints;
    a dataclass field (ops.OutInWeight's "t") is its name."""
    return tuple(p.key if hasattr(p, "key") else p.idx if hasattr(p, "idx") else p.name for p in path)


def stack_axes(keys: tuple) -> int:
    """Leading stack axes of a leaf: 0 top-level, 1 in a Run or params["mtp"], 2 in a Loop's run."""
    if keys[0] == "layers":
        return 2 if isinstance(keys[2], int) else 1
    return 1 if keys[0] == "mtp" else 0


def leaf_kind(plan: tuple[Item, ...], keys: tuple) -> Kind | None:
    """(attention, mlp) kind of the layer a leaf belongs to; MTP blocks are (sliding, dense); None top-level."""
    if keys[0] == "mtp":
        return ("sliding", "dense")
    if keys[0] != "layers":
        return None
    item = plan[keys[1]]
    return (item.runs[keys[2]] if isinstance(item, Loop) else item).kind
