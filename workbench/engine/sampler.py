"""Token sampling: greedy, temperature, top-k, top-p, min-p, repetition penalty, seeded.

The chain follows llama.cpp's default order: repetition penalty, top-k, top-p, min-p, temperature,
then a draw. Top-p and min-p look at the distribution before temperature, as llama.cpp's do.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from workbench.errors import UserError


@dataclass(frozen=True)
class SamplerConfig:
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 40  # 0 = off
    top_p: float = 0.95  # 1 = off
    min_p: float = 0.05  # 0 = off
    repeat_penalty: float = 1.0  # 1 = off
    repeat_last_n: int = 64  # how many recent tokens the penalty looks at
    seed: int | None = None  # None = fresh entropy

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "min_p", "repeat_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise UserError("user.bad_sampler", f"{name} must be a finite number")
        checks = [
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.repeat_penalty > 0, f"repeat_penalty must be > 0, got {self.repeat_penalty}"),
            (self.repeat_last_n >= 0, f"repeat_last_n must be >= 0, got {self.repeat_last_n}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError("user.bad_sampler", message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    def __init__(self, config: SamplerConfig) -> None:
        self.config = config
        self.rng = np.random.default_rng(config.seed)

    def __call__(self, logits: np.ndarray, history: Sequence[int] = ()) -> int:
        """Pick the next token id from logits (vocab,) given the ids generated so far."""
        c = self.config
        logits = np.asarray(logits, dtype=np.float32)
        if c.repeat_penalty != 1.0 and c.repeat_last_n and len(history):
            logits = apply_repeat_penalty(logits, history[-c.repeat_last_n :], c.repeat_penalty)
        if c.greedy:
            return int(np.argmax(logits))
        ids = candidate_ids(logits, c.top_k, c.top_p, c.min_p)
        z = logits[ids].astype(np.float64) / c.temperature
        p = np.exp(z - z.max())
        p /= p.sum()
        return int(ids[self.rng.choice(len(ids), p=p)])


def apply_repeat_penalty(logits: np.ndarray, recent: Sequence[int], penalty: float) -> np.ndarray:
    """Divide positive logits of recently seen tokens by the penalty, multiply negative ones."""
    out = logits.copy()
    ids = np.unique(np.asarray(recent, dtype=np.int64))
    vals = out[ids]
    out[ids] = np.where(vals > 0, vals / penalty, vals * penalty)
    return out


def candidate_ids(logits: np.ndarray, top_k: int, top_p: float, min_p: float) -> np.ndarray:
    """Token ids that survive top-k, top-p and min-p, most probable first."""
    n = logits.shape[0]
    k = n if top_k == 0 else min(top_k, n)
    if k < n:
        ids = np.argpartition(-logits, k - 1)[:k]
    else:
        ids = np.arange(n)
    ids = ids[np.argsort(-logits[ids], kind="stable")]
    z = logits[ids].astype(np.float64)
    p = np.exp(z - z[0])
    p /= p.sum()
    if top_p < 1.0:
        # Keep the smallest prefix whose mass reaches top_p (at least one token).
        keep = int(np.searchsorted(np.cumsum(p), top_p) + 1)
        ids, p = ids[:keep], p[:keep]
    if min_p > 0.0:
        keep = max(1, int(np.count_nonzero(p >= min_p * p[0])))
        ids = ids[:keep]
    return ids


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """(vocab,) float32 logits -> float64 log-probabilities."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max()
    return z - np.log(np.exp(z).sum())
