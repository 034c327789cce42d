"""The report of the analysis functions: `Spectrum` rows, `Analysis`, `factor_svd`.

A `Spectrum` holds the singular values of one update ``dW = scale * a @ b``
(one layer of one leaf) and what follows from them (norm, energy ranks,
effective rank, truncation error); an `Analysis` is a list of them whose
``str`` is a table. `factor_svd` takes the SVD of ``dW`` from the factors
alone: QR of ``a`` and of ``b.T``, then the SVD of the small ``r x r`` core,
so the ``in x out`` matrix is never formed.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from lora_jax._core.errors import error
from lora_jax._core.fmt import table
from lora_jax._core.weights import LoraWeights

__all__ = ["Spectrum", "Analysis", "factor_svd", "as_float64"]


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
            raise error("Spectrum.rank_for_energy",
                        f"energy fraction {fraction!r} must be in (0, 1]", "use e.g. 0.9 or 0.99")
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
          >>> print(lj.analyze(None, ad, lj.LoraConfig(rank=2, targets="w")).summary())
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


def as_float64(x) -> np.ndarray:
    """``x`` as a float64 numpy array."""
    return np.asarray(x).astype(np.float64)


def _scales(node: LoraWeights, lead: tuple, path: str) -> np.ndarray:
    """The scale broadcast over the leading (stacked / adapter-set) axes."""
    s = as_float64(node.scale)
    if s.ndim > len(lead) or s.shape != lead[: s.ndim]:
        raise error(path, f"scale of shape {s.shape} does not fit the leading axes {lead} "
                    f"of a and b", "give scale the shape of those leading axes, or a prefix "
                    "of it (a scalar for one adapter), as lj.init does")
    return np.broadcast_to(s.reshape(s.shape + (1,) * (len(lead) - s.ndim)), lead)


def factor_svd(node: LoraWeights, *, path: str = "LoraWeights"):
    """``(left, s, right)`` with ``scale * a @ b == left @ diag(s) @ right``, from
    QR of a and b.T and the SVD of the ``r x r`` core; float64, batched. ``path``
    names the leaf in errors."""
    a, b = as_float64(node.a), as_float64(node.b)
    lead = a.shape[:-2]
    scale = _scales(node, lead, path)
    qa, ra = np.linalg.qr(a)                               # (..., in, r), (..., r, r)
    qb, rb = np.linalg.qr(np.swapaxes(b, -1, -2))          # (..., out, r), (..., r, r)
    core = scale[..., None, None] * (ra @ np.swapaxes(rb, -1, -2))
    u, s, vt = np.linalg.svd(core)
    return qa @ u, s, vt @ np.swapaxes(qb, -1, -2)
