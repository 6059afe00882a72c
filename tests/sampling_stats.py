"""Exact next-token distributions of a tiny model (by enumeration) and a chi-square goodness-of-fit check,
for the tests that sampling (plain and speculative) draws from the model's distribution."""
import math

import jax
import jax.numpy as jnp
import numpy as np

from mimo_jax import model, sampling


def exact_dists(cfg, params, prompt, settings, depth):
    """[p(t1), p(t2 | t1), ...] up to `depth` tokens: arrays [V], [V, V], [V, V, V] (float64)."""
    v, out = cfg.vocab_size, []
    prefixes = [list(prompt)]
    for d in range(depth):
        n = len(prefixes[0])
        cache = model.init_cache(cfg, len(prefixes), 64, jnp.float32)
        logits, _ = model.forward(params, jnp.asarray(prefixes), jnp.arange(n, dtype=jnp.int32), cache, cfg)
        p = np.asarray(jax.nn.softmax(sampling.filtered_logits(logits[:, -1], *settings), axis=-1), np.float64)
        out.append(p.reshape((v,) * (d + 1)))
        prefixes = [q + [a] for q in prefixes for a in range(v)]
    return out


def chi2_check(observed, exact, n, min_expected=5.0):
    """Pearson chi-square of counts against n * exact, cells with expected < min_expected pooled into one;
    asserts no count falls where exact is 0 and the statistic is below its p = 1e-3 critical value
    (Wilson-Hilferty). Returns the statistic."""
    observed, exact = np.ravel(observed), np.ravel(exact)
    support = exact > 1e-12
    assert observed[~support].sum() == 0, "a token the target cannot produce was sampled"
    obs, exp = observed[support], exact[support] * n
    small = exp < min_expected
    obs = np.append(obs[~small], obs[small].sum())
    exp = np.append(exp[~small], exp[small].sum())
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    stat = float(((obs - exp) ** 2 / exp).sum())
    df = len(exp) - 1
    z = 3.0902  # one-sided normal quantile of 1e-3
    critical = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    assert stat < critical, f"chi-square {stat:.1f} >= {critical:.1f} (df {df})"
    return stat
