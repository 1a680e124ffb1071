"""Coefficient initialisers of MixtureGrowth's new tiles: a table from `--init` to a small
function (existing vectors (e, t), sources (n, t), generator) -> (new vectors (n, t), note).

Owns `INITS` and its rows. Imports mgrow.mixing (random_orthogonal).
"""

from __future__ import annotations

from typing import Callable

import torch

from ..mixing import random_orthogonal

Vectors = torch.Tensor  # (n, t) float64


def _scale(existing: Vectors) -> float:
    """Return the mean norm of the existing vectors that are not zero (a regrown net's
    `--init zero` tiles are), 1.0 when there are none."""
    norms = existing.norm(dim=1)
    norms = norms[norms > 1e-12 * float(norms.max())] if len(norms) else norms
    return float(norms.mean()) if len(norms) else 1.0


def _span(existing: Vectors, t: int) -> torch.Tensor:
    """Return an orthonormal basis (t, rank) of the existing vectors' span: by SVD with a
    rank tolerance, as the vectors may be fewer, more than t, repeated or zero."""
    if not len(existing):
        return torch.zeros(t, 0, dtype=torch.float64)
    u, s, _ = torch.linalg.svd(existing.T.double(), full_matrices=False)
    return u[:, s > 1e-9 * t * float(s[0])]  # none when every vector is zero


def init_orthogonal(existing: Vectors, sources: Vectors, gen: torch.Generator
                    ) -> tuple[Vectors, str | None]:
    """New vectors orthonormal to each other and to the existing ones, at the existing norm.

    When more vectors are needed than the t - rank(existing) free directions, the rest are
    rows of fresh random orthogonal matrices (mutually orthogonal in chunks of t, not to
    the existing vectors), and a note says so.
    """
    n, t = sources.shape
    basis = _span(existing, t)
    a = torch.randn(t, t, dtype=torch.float64, generator=gen)
    a = a - basis @ (basis.T @ a)
    q, r = torch.linalg.qr(a)
    free = [q[:, k] for k in range(t) if abs(r[k, k]) > 1e-9 * t][: t - basis.shape[1]]
    vecs = free[:n]
    note = None
    while len(vecs) < n:
        note = (f"{n} new vectors but only {len(free)} free directions in R^{t}: "
                f"{n - len(free)} drawn as random orthogonal rows")
        vecs += list(random_orthogonal(t, gen))[: n - len(vecs)]
    return torch.stack(vecs) * _scale(existing), note


def init_random(existing: Vectors, sources: Vectors, gen: torch.Generator
                ) -> tuple[Vectors, str | None]:
    """Standard normal vectors, scaled so their expected norm is the existing vectors'."""
    n, t = sources.shape
    return torch.randn(n, t, dtype=torch.float64, generator=gen) * _scale(existing) / t**0.5, None


def init_copy(existing: Vectors, sources: Vectors, gen: torch.Generator, noise: float = 0.0
              ) -> tuple[Vectors, str | None]:
    """The owner's own coefficients at that layer, plus `noise` x norm x standard normal."""
    jitter = torch.randn(sources.shape, dtype=torch.float64, generator=gen)
    return sources + noise * _scale(existing) / sources.shape[1] ** 0.5 * jitter, None


def init_zero(existing: Vectors, sources: Vectors, gen: torch.Generator
              ) -> tuple[Vectors, str | None]:
    """All zero: the grown network computes the mean of the members."""
    return torch.zeros_like(sources), None


INITS: dict[str, Callable[..., tuple[Vectors, str | None]]] = {
    "orthogonal": init_orthogonal, "random": init_random, "copy": init_copy, "zero": init_zero,
}
