"""Understanding adapters: spectra, effective rank, truncation, extraction.

Every function here looks at the update ``dW = scale * a @ b`` of each
adapted weight as an ``(in, out)`` matrix (per layer of a stacked leaf):

* `analyze` gives its singular values from the factors alone: QR of ``a``
  and of ``b.T``, then the SVD of the small ``r x r`` core, so the
  ``in x out`` matrix is never formed;
* `truncate` re-factorizes an adapter at a lower rank, keeping the best
  rank-k approximation of ``dW`` exactly;
* `extract` turns a full fine-tune into adapters by a truncated (for large
  matrices, randomized) SVD of ``tuned - base``.

All three report through `Analysis`, a list of `Spectrum` rows whose ``str``
is a table.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._checkpoint.checkpointer import restore
from lora_jax._core.config import LoraConfig, LoraWarning
from lora_jax._init import leaf_key
from lora_jax._core.leaf import dense_float32
from lora_jax._core.paths import leaves_with_paths, mirror, resolve, unflatten_params
from lora_jax._core.fmt import table
from lora_jax._core.weights import LoraWeights, check_adapters, flatten_adapters, is_lora, map_adapters

__all__ = ["Spectrum", "Analysis", "Truncation", "Extraction", "analyze", "truncate",
           "extract"]

_HI = jax.lax.Precision.HIGHEST

# `extract(svd="auto")` switches to the randomized SVD above this min(in, out).
_EXACT_SVD_MAX = 1024


# ----------------------------------------------------------------------------- report


@dataclasses.dataclass(frozen=True, eq=False)   # holds an array: compare to_dict()s
class Spectrum:
    """The singular values of one update ``dW`` (one layer of one leaf).

    Attributes:
      path: the leaf's ``'/'``-joined path.
      layer: index into the leaf's stacked axes (``()`` for an unstacked leaf).
      shape: ``(in, out)``, the update as a matrix.
      singular_values: descending, float64.
      tail_energy: ``||dW||_F**2`` not accounted for by ``singular_values``
        (0 when they are all of them; > 0 after a randomized SVD that
        computed only the leading ones).
      base_norm: ``||W||_F`` of the frozen weight's layer, when known.
      rank_kept: the rank a truncation or extraction kept, if any.
      error: the measured ``||dW - dW_kept||_F / ||dW||_F``, if any.
    """

    path: str
    layer: tuple
    shape: tuple
    singular_values: np.ndarray
    tail_energy: float = 0.0
    base_norm: float | None = None
    rank_kept: int | None = None
    error: float | None = None

    @property
    def norm(self) -> float:
        """``||dW||_F``."""
        return math.sqrt(float(np.sum(self.singular_values ** 2)) + self.tail_energy)

    @property
    def relative_norm(self) -> float | None:
        """``||dW||_F / ||W||_F`` (None without the base weight)."""
        if self.base_norm is None:
            return None
        return self.norm / self.base_norm if self.base_norm > 0 else math.inf

    @property
    def energy(self) -> np.ndarray:
        """Cumulative energy: ``energy[k-1]`` = fraction of ``||dW||_F**2`` in
        the top ``k`` singular directions (all zeros for a zero update)."""
        total = self.norm ** 2
        c = np.cumsum(self.singular_values ** 2)
        return c / total if total > 0 else np.zeros_like(c)

    def rank_for_energy(self, fraction: float) -> int:
        """The smallest ``k`` whose top-k directions hold ``fraction`` of the
        energy (0 for a zero update)."""
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"energy fraction {fraction!r} must be in (0, 1]; "
                             f"use e.g. 0.9 or 0.99.")
        if self.norm == 0:
            return 0
        e = self.energy
        hit = np.nonzero(e >= fraction * (1 - 1e-12))[0]
        # A partial spectrum may never reach the fraction: all of it is needed.
        return int(hit[0]) + 1 if hit.size else len(e)

    @property
    def effective_rank(self) -> float:
        """Roy & Vetterli's entropy effective rank ``exp(H(p))``, ``p = s / sum(s)``
        (0 for a zero update; over the listed values when the spectrum is partial)."""
        s = self.singular_values
        total = float(np.sum(s))
        if total <= 0:
            return 0.0
        p = s[s > 0] / total
        return float(np.exp(-np.sum(p * np.log(p))))

    def error_at(self, k: int) -> float:
        """Relative error ``||dW - dW_k||_F / ||dW||_F`` of the best rank-k approximation."""
        total = self.norm ** 2
        if total == 0:
            return 0.0
        tail = float(np.sum(self.singular_values[k:] ** 2)) + self.tail_energy
        return math.sqrt(max(tail, 0.0) / total)

    def to_dict(self) -> dict:
        """Plain Python values (lists, floats, ints), JSON-ready."""
        return {
            "path": self.path, "layer": list(self.layer), "shape": list(self.shape),
            "singular_values": [float(x) for x in self.singular_values],
            "norm": self.norm, "relative_norm": self.relative_norm,
            "rank_90": self.rank_for_energy(0.9), "rank_99": self.rank_for_energy(0.99),
            "effective_rank": self.effective_rank, "rank_kept": self.rank_kept,
            "error": self.error,
        }


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def _layer_str(layer: tuple) -> str:
    return ",".join(map(str, layer)) if layer else "-"


@dataclasses.dataclass(frozen=True)
class Analysis:
    """A list of `Spectrum` rows (one per layer of each adapted leaf).

    ``str`` is a table; `summary` aggregates stacked layers; `to_dicts`
    gives plain values. Iterating yields the rows.
    """

    spectra: tuple

    def __iter__(self):
        return iter(self.spectra)

    def __len__(self) -> int:
        return len(self.spectra)

    def to_dicts(self) -> list[dict]:
        """One plain dict per row (see `Spectrum.to_dict`)."""
        return [s.to_dict() for s in self.spectra]

    def _columns(self):
        rel = any(s.base_norm is not None for s in self.spectra)
        kept = any(s.rank_kept is not None for s in self.spectra)
        return rel, kept

    def __str__(self) -> str:
        rel, kept = self._columns()
        header = ["path", "layer", "in x out", "n_sv", "|dW|", "r90", "r99", "erank"]
        align = "<<>>>>>>"
        if rel:
            header.insert(5, "|dW|/|W|")
            align += ">"
        if kept:
            header += ["kept", "energy kept", "rel. error"]
            align += ">>>"
        rows = []
        for s in self.spectra:
            row = [s.path, _layer_str(s.layer), "x".join(map(str, s.shape)),
                   len(s.singular_values), _fmt(s.norm), s.rank_for_energy(0.9),
                   s.rank_for_energy(0.99), f"{s.effective_rank:.2f}"]
            if rel:
                row.insert(5, _fmt(s.relative_norm))
            if kept:
                k = s.rank_kept
                row += ["-", "-", "-"] if k is None else [
                    k, f"{(1.0 - s.error_at(k) ** 2 if s.norm else 1.0):.4f}", _fmt(s.error)]
            rows.append(row)
        return table(header, rows, align)

    __repr__ = __str__

    def summary(self) -> str:
        """One row per leaf: layers, mean ``|dW|``, max ``r90``/``r99``, mean erank.

        Example:
          >>> import jax.numpy as jnp, lora_jax as lj
          >>> a = jnp.stack([jnp.eye(4, 2), 2 * jnp.eye(4, 2)])  # 2 stacked layers
          >>> ad = {"w": lj.LoraWeights(a, jnp.eye(2, 3).at[1, 1].set(0.5)[None].repeat(2, 0),
          ...                           jnp.float32(1.0))}
          >>> print(lj.analyze(ad, lj.LoraConfig(rank=2, targets="w")).summary())
          ... # doctest: +NORMALIZE_WHITESPACE
          path  layers  in x out  rank  mean |dW|  max r90  max r99  mean erank
          ----  ------  --------  ----  ---------  -------  -------  ----------
          w          2       4x3     2       1.68        2        2        1.89
        """
        groups: dict[str, list[Spectrum]] = {}
        for s in self.spectra:
            groups.setdefault(s.path, []).append(s)
        rows = []
        for path, ss in groups.items():
            rows.append([path, len(ss), "x".join(map(str, ss[0].shape)),
                         len(ss[0].singular_values), _fmt(float(np.mean([s.norm for s in ss]))),
                         max(s.rank_for_energy(0.9) for s in ss),
                         max(s.rank_for_energy(0.99) for s in ss),
                         f"{np.mean([s.effective_rank for s in ss]):.2f}"])
        return table(["path", "layers", "in x out", "rank", "mean |dW|", "max r90",
                       "max r99", "mean erank"], rows, "<>>>>>>>")


# ----------------------------------------------------------------------------- factors


def _lora_nodes(adapters, config: LoraConfig, params=None):
    """``[(path, node, w_or_None, spec_or_None)]`` for the LoraWeights of ``adapters``.

    Without params, checks that a and b fit each other and the config's rank.
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"expected a lj.LoraConfig as config, got {type(config).__name__}. "
                        f"Fix: pass the config the adapters were made with.")
    if params is not None:
        return [(p, n, leaf, spec) for p, leaf, n, spec in
                check_adapters(params, adapters, config) if is_lora(n)]
    out = []
    for path, node in flatten_adapters(adapters)[0]:
        if not is_lora(node):
            continue  # None (frozen) or a fully-trained leaf
        sa, sb = tuple(np.shape(node.a)), tuple(np.shape(node.b))
        if len(sa) < 2 or len(sa) != len(sb) or sa[:-2] != sb[:-2] or sa[-1] != sb[-2]:
            raise ValueError(
                f"{path}: a {sa} and b {sb} do not form a LoRA pair; expected a "
                f"(*stacked, in, r) and b (*stacked, r, out). Fix: pass adapters made by "
                f"lj.init (or restored with their config).")
        if sa[-1] != config.rank_for(path):
            raise ValueError(
                f"{path}: the adapter has rank {sa[-1]} but the config gives rank "
                f"{config.rank_for(path)} for this path. Fix: pass the config the adapters "
                f"were made with (after lj.truncate, the config it returned).")
        out.append((path, node, None, None))
    if not out:
        raise ValueError(
            "the adapter tree holds no LoraWeights (only None / fully-trained leaves). "
            "Fix: pass the tree returned by lj.init, lj.truncate, lj.extract or lj.restore.")
    return out


def _f64(x) -> np.ndarray:
    return np.asarray(x).astype(np.float64)


def _scales(node: LoraWeights, lead: tuple) -> np.ndarray:
    """The scale broadcast over the leading (stacked / adapter-set) axes."""
    s = _f64(node.scale)
    if s.ndim > len(lead) or s.shape != lead[: s.ndim]:
        raise ValueError(f"scale of shape {s.shape} does not fit the leading axes {lead} "
                         f"of a and b.")
    return np.broadcast_to(s.reshape(s.shape + (1,) * (len(lead) - s.ndim)), lead)


def factor_svd(node: LoraWeights):
    """``(left, s, right)`` with ``scale * a @ b == left @ diag(s) @ right``, from
    QR of a and b.T and the SVD of the ``r x r`` core; float64, batched."""
    a, b = _f64(node.a), _f64(node.b)
    lead = a.shape[:-2]
    scale = _scales(node, lead)
    qa, ra = np.linalg.qr(a)                               # (..., in, r), (..., r, r)
    qb, rb = np.linalg.qr(np.swapaxes(b, -1, -2))          # (..., out, r), (..., r, r)
    core = scale[..., None, None] * (ra @ np.swapaxes(rb, -1, -2))
    u, s, vt = np.linalg.svd(core)
    return qa @ u, s, vt @ np.swapaxes(qb, -1, -2)


def _base_norms(leaf, spec, lead: tuple) -> np.ndarray:
    """``||W||_F`` per stacked layer, broadcast over an adapter set's extra axis."""
    w = dense_float32(leaf).reshape(*spec.stacked_shape, -1)
    return np.broadcast_to(_f64(jnp.linalg.norm(w, axis=-1)), lead)


def analyze(adapters, config: LoraConfig, params=None) -> Analysis:
    """Singular values and effective rank of every adapter's update.

    For each `LoraWeights` leaf (each layer of a stacked leaf, each adapter
    of an adapter set), the singular values of ``dW = scale * a @ b`` are
    computed in float64 from the factors: QR of ``a`` and of ``b.T``, then
    the SVD of the ``r x r`` core. The ``in x out`` matrix is never formed.
    Fully-trained and frozen leaves are skipped.

    Each `Spectrum` row reports the ``r`` singular values, ``||dW||_F``, the
    ranks holding 90% and 99% of the energy ``sum(s**2)``, and the entropy
    effective rank of Roy & Vetterli (2007); with ``params``, also
    ``||dW||_F / ||W||_F``. An untrained adapter (B = 0) has all of them 0.

    Args:
      adapters: an adapter tree (`lj.init`, `lj.restore`, `truncate`, ...);
        float32 or bfloat16 factors.
      config: the `LoraConfig` the adapters were made with.
      params: the frozen params, optional: adds ``||dW|| / ||W||`` and checks
        the adapters against them.

    Returns:
      An `Analysis`: ``str`` is a table; ``.spectra`` the rows.

    Example:
      >>> import jax.numpy as jnp, lora_jax as lj
      >>> params = {"w": jnp.ones((4, 3))}
      >>> cfg = lj.LoraConfig(rank=2, alpha=2, targets="w")   # scale 1
      >>> b = jnp.array([[3.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
      >>> ad = {"w": lj.LoraWeights(jnp.eye(4, 2), b, jnp.float32(1.0))}
      >>> rep = lj.analyze(ad, cfg, params)
      >>> rep.spectra[0].singular_values
      array([3., 1.])
      >>> print(rep)  # doctest: +NORMALIZE_WHITESPACE
      path  layer  in x out  n_sv  |dW|  |dW|/|W|  r90  r99  erank
      ----  -----  --------  ----  ----  --------  ---  ---  -----
      w     -           4x3     2  3.16     0.913    1    2   1.75
    """
    rows = []
    for path, node, leaf, spec in _lora_nodes(adapters, config, params):
        lead = tuple(np.shape(node.a)[:-2])
        shape = (int(np.shape(node.a)[-2]), int(np.shape(node.b)[-1]))
        _, s, _ = factor_svd(node)
        norms = _base_norms(leaf, spec, lead) if leaf is not None else None
        for idx in np.ndindex(*lead):
            rows.append(Spectrum(path, tuple(int(i) for i in idx), shape, s[idx],
                                 base_norm=None if norms is None else float(norms[idx])))
    return Analysis(tuple(rows))


# ----------------------------------------------------------------------------- truncate


class Truncation(NamedTuple):
    """What `truncate` returns: ``adapters, config, report = lj.truncate(...)``."""

    adapters: Any
    config: LoraConfig
    report: Analysis


def truncate(adapters, config: LoraConfig, *, rank: int | None = None,
             energy: float | None = None) -> Truncation:
    """Lower-rank adapters holding the best rank-k approximation of each update.

    For each `LoraWeights` leaf the SVD of ``dW = scale * a @ b`` is taken
    from the factors (as in `analyze`) and its top ``k`` directions are kept,
    so ``dW_k`` is exactly the best rank-k approximation (Eckart-Young).
    ``rank=k`` keeps at most ``k`` (leaves already at or below ``k`` are
    returned unchanged); ``energy=f`` keeps, per leaf, the smallest rank
    holding a fraction ``f`` of ``||dW||_F**2`` in *every* stacked layer
    (a stacked leaf has one rank for all its layers).

    Scale semantics: ``alpha`` is kept and the rank changes, so the new scale
    is ``alpha / k`` (``alpha / sqrt(k)`` with rsLoRA), as the returned config
    computes it; the singular values are split evenly between the new
    factors, ``a = U sqrt(S / scale)``, ``b = sqrt(S / scale) V^T``. Use the
    returned config with the returned adapters (`lj.merge`, `lj.save`): it
    sets the new ranks (``rank``, or exact-path ``rank_pattern`` entries).
    Factors keep their dtype; fully-trained leaves are passed through.

    Args:
      adapters: an adapter tree.
      config: the `LoraConfig` the adapters were made with.
      rank: keep at most this rank. Exactly one of ``rank`` and ``energy``.
      energy: keep this fraction of the energy, in ``(0, 1]``.

    Returns:
      ``Truncation(adapters, config, report)``; the report (an `Analysis`)
      lists per layer the rank kept, the energy kept and the relative error.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> params = {"w": jnp.zeros((16, 8))}
      >>> cfg = lj.LoraConfig(rank=4, alpha=8, targets="w")
      >>> ad = lj.init(params, cfg, key=jax.random.key(0))
      >>> ad = {"w": ad["w"]._replace(b=jax.random.normal(jax.random.key(1), (4, 8)))}
      >>> small, cfg2, report = lj.truncate(ad, cfg, rank=2)
      >>> small["w"].a.shape, cfg2.rank, float(small["w"].scale)   # alpha 8 / rank 2
      ((16, 2), 2, 4.0)
      >>> dw = lj.merge(params, ad, cfg)["w"]
      >>> u, s, vt = jnp.linalg.svd(dw)
      >>> best = (u[:, :2] * s[:2]) @ vt[:2]
      >>> bool(jnp.allclose(lj.merge(params, small, cfg2)["w"], best, atol=1e-5))
      True
    """
    if (rank is None) == (energy is None):
        raise ValueError("truncate needs exactly one of rank=k or energy=f; got "
                         f"rank={rank!r}, energy={energy!r}. Fix: e.g. "
                         "lj.truncate(adapters, config, rank=4) or energy=0.99.")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, (int, np.integer))
                             or rank < 1):
        raise ValueError(f"truncate: rank={rank!r} must be a positive int, e.g. rank=4.")
    if energy is not None and (isinstance(energy, bool) or
                               not isinstance(energy, (int, float, np.floating))
                               or not 0.0 < float(energy) <= 1.0):
        raise ValueError(f"truncate: energy={energy!r} must be a fraction in (0, 1], "
                         f"e.g. energy=0.99.")
    nodes = _lora_nodes(adapters, config)
    new_ranks, replaced, rows = {}, {}, []
    for path, node, _, _ in nodes:
        lead = tuple(np.shape(node.a)[:-2])
        r = int(np.shape(node.a)[-1])
        shape = (int(np.shape(node.a)[-2]), int(np.shape(node.b)[-1]))
        left, s, right = factor_svd(node)
        specs = [Spectrum(path, tuple(int(i) for i in idx), shape, s[idx])
                 for idx in np.ndindex(*lead)]
        if rank is not None:
            k = min(int(rank), r)
        else:
            k = max(1, max(sp.rank_for_energy(float(energy)) for sp in specs))
        rows += [dataclasses.replace(sp, rank_kept=k, error=sp.error_at(k)) for sp in specs]
        if k == r:
            continue
        new_ranks[path] = k
        replaced[path] = (node, left, s, right, k)

    new_config = config.with_ranks(new_ranks, paths=[p for p, *_ in nodes])

    def rebuild(path, node):
        if path not in replaced:
            return node
        node, left, s, right, k = replaced[path]
        new_scale = new_config.scale_for(path)
        root = np.sqrt(s[..., :k] / new_scale)
        a = left[..., :, :k] * root[..., None, :]
        b = root[..., :, None] * right[..., :k, :]
        scale = np.full(np.shape(node.scale), new_scale, np.float32)
        return LoraWeights(jnp.asarray(a, node.a.dtype), jnp.asarray(b, node.b.dtype),
                           jnp.asarray(scale))

    return Truncation(map_adapters(rebuild, adapters), new_config, Analysis(tuple(rows)))


# ----------------------------------------------------------------------------- extract


def _randomized_svd(m, key, *, k: int, oversample: int, power_iters: int):
    """Top-``k + oversample`` SVD of ``m`` (in, out) by a randomized range finder
    (Halko, Martinsson & Tropp 2011, Alg. 4.4 with QR between power steps)."""
    n_in, n_out = m.shape
    l = min(k + oversample, n_in, n_out)
    omega = jax.random.normal(key, (n_out, l), jnp.float32)
    q, _ = jnp.linalg.qr(jnp.matmul(m, omega, precision=_HI))
    for _ in range(power_iters):
        z, _ = jnp.linalg.qr(jnp.matmul(m.T, q, precision=_HI))
        q, _ = jnp.linalg.qr(jnp.matmul(m, z, precision=_HI))
    u, s, vt = jnp.linalg.svd(jnp.matmul(q.T, m, precision=_HI), full_matrices=False)
    return jnp.matmul(q, u, precision=_HI), s, vt


@partial(jax.jit, static_argnames=("n_in", "n_out", "k", "randomized", "oversample",
                                   "power_iters", "dtype"))
def _extract_leaf(w, t, key, scale, *, n_in, n_out, k, randomized, oversample,
                  power_iters, dtype):
    """Factors, singular values, errors and norms of one leaf, layer by layer
    (``lax.map`` keeps one layer's SVD workspace in memory at a time)."""
    w32 = w.astype(jnp.float32).reshape(-1, n_in, n_out)
    dw = t.astype(jnp.float32).reshape(-1, n_in, n_out) - w32
    keys = jax.random.split(key, dw.shape[0])

    def one(args):
        m, key = args
        if randomized:
            u, s, vt = _randomized_svd(m, key, k=k, oversample=oversample,
                                       power_iters=power_iters)
        else:
            u, s, vt = jnp.linalg.svd(m, full_matrices=False)
        root = jnp.sqrt(s[:k] / scale)
        a = (u[:, :k] * root).astype(dtype)
        b = (root[:, None] * vt[:k]).astype(dtype)
        approx = scale * jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32),
                                    precision=_HI)
        norm = jnp.linalg.norm(m)
        err = jnp.linalg.norm(m - approx) / jnp.where(norm > 0, norm, 1.0)
        return a, b, s, err, norm

    a, b, s, err, norm = jax.lax.map(one, (dw, keys))
    return a, b, s, err, norm, jnp.linalg.norm(w32.reshape(w32.shape[0], -1), axis=-1)


class Extraction(NamedTuple):
    """What `extract` returns: ``adapters, report = lj.extract(...)``."""

    adapters: Any
    report: Analysis


def extract(base_params, tuned_params, config: LoraConfig, *, svd: str = "auto",
            key=None, oversample: int = 10, power_iters: int = 2) -> Extraction:
    """LoRA adapters approximating a full fine-tune, by truncated SVD.

    For each leaf ``config`` targets, ``dW = tuned - base`` (float32, as an
    ``(in, out)`` matrix per stacked layer) is replaced by its best rank-r
    approximation, ``r = config.rank_for(path)``, factored as
    ``a = U sqrt(S / scale)``, ``b = sqrt(S / scale) V^T`` with
    ``scale = config.scale_for(path)``, in ``config.dtype``. So
    ``lj.merge(base_params, adapters, config)`` approximates ``tuned_params``.
    Leaves named by ``config.train`` hold their tuned values; leaves that
    changed but are neither targeted nor trained are lost, with a
    `LoraWarning` naming them.

    Args:
      base_params: the weights before fine-tuning.
      tuned_params: the fully fine-tuned weights (same structure and shapes).
      config: which leaves to factor, and at which rank and scale.
      svd: ``"exact"`` (full SVD), ``"randomized"`` (randomized range finder:
        ``rank + oversample`` random probes, ``power_iters`` power steps), or
        ``"auto"``: exact up to ``min(in, out) = 1024``, randomized above.
      key: PRNG key for the randomized SVD (keyword-only; each leaf's key is
        derived from its path); ``None`` means ``jax.random.key(0)``.
      oversample: extra probes of the randomized SVD.
      power_iters: power iterations of the randomized SVD.

    Returns:
      ``Extraction(adapters, report)``; the report (an `Analysis`) has per
      layer the singular values found (all of them for the exact SVD, the
      leading ``rank + oversample`` otherwise), ``||dW|| / ||W||``, the rank
      kept and the measured relative error ``||dW - s a b||_F / ||dW||_F``.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
      >>> base = {"w": jax.random.normal(k1, (32, 24))}
      >>> dw = jax.random.normal(k2, (32, 3)) @ jax.random.normal(k3, (3, 24))  # rank 3
      >>> tuned = {"w": base["w"] + dw}
      >>> cfg = lj.LoraConfig(rank=3, alpha=3, targets="w")
      >>> adapters, report = lj.extract(base, tuned, cfg)
      >>> report.spectra[0].error < 1e-5
      True
      >>> bool(jnp.allclose(lj.merge(base, adapters, cfg)["w"], tuned["w"], atol=1e-4))
      True
    """
    if svd not in ("auto", "exact", "randomized"):
        raise ValueError(f"extract: svd={svd!r}; use 'auto', 'exact' or 'randomized'.")
    for name, v, lo in (("oversample", oversample, 0), ("power_iters", power_iters, 0)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
            raise ValueError(f"extract: {name}={v!r} must be an int >= {lo}.")
    key = jax.random.key(0) if key is None else key
    resolved = resolve(base_params, config)
    train = set(resolved.train)

    base_items = leaves_with_paths(base_params)
    tuned_leaves = mirror(base_params, tuned_params, what="tuned_params", against="base_params",
                          fix="pass the same model's parameters before and after fine-tuning.")

    rows, nodes, untargeted = [], [], []
    for (path, w), t in zip(base_items, tuned_leaves):
        if np.shape(w) != np.shape(t):
            raise ValueError(
                f"{path}: base has shape {tuple(np.shape(w))}, tuned has "
                f"{tuple(np.shape(t))}. Fix: pass the same model's parameters before and "
                f"after fine-tuning.")
        spec = resolved.targets.get(path)
        if spec is None:
            if path in train:
                nodes.append(jnp.array(t, copy=True))
            else:
                nodes.append(None)
                if hasattr(w, "shape") and not np.array_equal(np.asarray(dense_float32(w)),
                                                              np.asarray(dense_float32(t))):
                    untargeted.append(path)
            continue
        lead, (n_in, n_out), k = spec.stacked_shape, (spec.in_size, spec.out_size), spec.rank
        randomized = svd == "randomized" or (svd == "auto" and min(n_in, n_out) > _EXACT_SVD_MAX)
        a, b, sv, err, norm, wn = _extract_leaf(
            dense_float32(w), dense_float32(t), leaf_key(key, path), jnp.float32(spec.scale), n_in=n_in, n_out=n_out, k=k,
            randomized=randomized, oversample=oversample, power_iters=power_iters,
            dtype=config.dtype)
        sv, err, norm, wn = _f64(sv), _f64(err), _f64(norm), _f64(wn)
        for i in range(sv.shape[0]):
            tail = max(norm[i] ** 2 - float(np.sum(sv[i] ** 2)), 0.0) if randomized else 0.0
            layer = tuple(int(j) for j in np.unravel_index(i, lead)) if lead else ()
            rows.append(Spectrum(path, layer, (n_in, n_out), sv[i], tail_energy=tail,
                                 base_norm=float(wn[i]), rank_kept=k, error=float(err[i])))
        a, b = a.reshape(spec.a_shape), b.reshape(spec.b_shape)
        nodes.append(LoraWeights(a, b, jnp.asarray(spec.scale, jnp.float32)))

    if untargeted:
        warnings.warn(
            f"extract: {len(untargeted)} leaves differ between base and tuned but the config "
            f"neither targets nor trains them, so the adapters drop their change: "
            f"{untargeted[:8]}{' ...' if len(untargeted) > 8 else ''}. Fix: add them to "
            f"LoraConfig.targets (matrices) or LoraConfig.train (biases, norms).",
            LoraWarning, stacklevel=2)
    return Extraction(unflatten_params(base_params, nodes), Analysis(tuple(rows)))


def spectra_summary(directory, *, step: int | None = None) -> str:
    """The per-leaf spectra table of a checkpoint's adapters (``python -m lora_jax
    inspect`` prints it): restores ``(adapters, config)`` with `lj.restore` (no base
    needed) and returns ``analyze(adapters, config).summary()``."""

    adapters, config = restore(directory, step=step)
    return "spectra of s*A@B (energy ranks at 90%/99%; erank: entropy effective rank)\n" + \
        analyze(adapters, config).summary()
