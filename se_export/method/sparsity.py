"""Parsing of sparsity specifications: an unstructured fraction (``0.5``, ``70%``) or ``N:M``."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import SEError


@dataclass(frozen=True)
class SparsitySpec:
    """Target sparsity of every expert: a fraction of zeros, or N zeros in every M weights.

    ``N:M`` follows NVIDIA's convention: at most N non-zeros in every M consecutive inputs.
    """

    fraction: float
    keep_n: int = 0
    group_m: int = 0

    @property
    def structured(self) -> bool:
        return self.group_m > 0

    @property
    def prune_n(self) -> int:
        """Zeros per group of M (SparseGPT's ``prunen``)."""
        return self.group_m - self.keep_n

    def __str__(self) -> str:
        return f"{self.keep_n}:{self.group_m}" if self.structured else f"{self.fraction:g}"


_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_sparsity(text: str | float) -> SparsitySpec:
    """Parse ``0.5``, ``50%`` or ``2:4``; raise SEError with the accepted forms otherwise."""
    if isinstance(text, (int, float)):
        text = str(text)
    raw = text.strip()
    match = _NM.match(raw)
    if match:
        n, m = int(match.group(1)), int(match.group(2))
        if not (0 < n < m):
            raise SEError(f"bad sparsity '{text}': N:M needs 0 < N < M (kept N of every M), e.g. 2:4")
        return SparsitySpec(fraction=(m - n) / m, keep_n=n, group_m=m)
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise SEError(
            f"bad sparsity '{text}': use a fraction of zeros like 0.5, a percentage like 70%, or N:M like 2:4"
        ) from None
    if not (0.0 <= value < 1.0):
        raise SEError(f"bad sparsity '{text}': the fraction of zeros must be in [0, 1), e.g. 0.5")
    return SparsitySpec(fraction=value)
