"""The weight change of a fine-tuning run as spectra: pure numpy, no model, no I/O.

Full fine-tuning: dW = W_after - W_before for every matrix (each layer of a stacked kernel on its
own). LoRA: the merged delta scaling * a b, whose singular values are those of the small
[r, r] matrix scaling * R_a R_b^T (a = Q_a R_a, b^T = Q_b R_b; Q_a, Q_b have orthonormal columns),
exact and cheap, and rank <= r by construction. `rank_for_energy` is the number of leading singular
values holding `fraction` of the energy (sum of squares). `summarize` gives, per matrix type
(q_proj, ..., embed_tokens), the rank for 90% energy of each layer and the mean spectrum.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from jaxtune import params as params_lib

ENERGY = 0.9
KEEP = 64  # leading singular values kept per matrix type in the report
WEIGHT_LEAVES = ("kernel", "embedding")


def singular_values(matrix: np.ndarray) -> np.ndarray:
    """Singular values of a dense matrix, largest first (float64 SVD)."""
    return np.linalg.svd(np.asarray(matrix, np.float64), compute_uv=False)


def low_rank_singular_values(a_IxR: np.ndarray, b_RxO: np.ndarray, scaling: float) -> np.ndarray:
    """Singular values of scaling * a b without forming it: those of scaling * R_a R_b^T."""
    r_a = np.linalg.qr(np.asarray(a_IxR, np.float64), mode="r")
    r_b = np.linalg.qr(np.asarray(b_RxO, np.float64).T, mode="r")
    return singular_values(scaling * r_a @ r_b.T)


def rank_for_energy(values: np.ndarray, fraction: float = ENERGY) -> int:
    """Fewest leading singular values whose squares hold `fraction` of the total (0 for a zero matrix)."""
    energy = np.sort(np.asarray(values, np.float64))[::-1] ** 2
    total = energy.sum()
    if total <= 0:
        return 0
    return int(np.searchsorted(np.cumsum(energy) / total, fraction - 1e-12) + 1)


def per_layer(leaf: np.ndarray) -> list[np.ndarray]:
    """A kernel [in, out] -> [it]; a stacked kernel [L, in, out] -> its L matrices."""
    leaf = np.asarray(leaf)
    return [leaf] if leaf.ndim == 2 else list(leaf)


def full_changes(before: Mapping, after: Mapping) -> dict[str, list[np.ndarray]]:
    """matrix type -> singular values of dW per layer, for every 2-D weight (kernel / embedding) in `after`
    that changed."""
    base = params_lib.flat(before)
    out: dict[str, list[np.ndarray]] = {}
    for path, leaf in params_lib.flat(after).items():
        if path[-1] not in WEIGHT_LEAVES or np.ndim(leaf) < 2 or path not in base:
            continue
        delta = np.asarray(leaf, np.float32) - np.asarray(base[path], np.float32)
        if not np.any(delta):  # untouched (e.g. a frozen matrix): no change to describe
            continue
        out.setdefault(path[-2], []).extend(singular_values(m) for m in per_layer(delta))
    return out


def lora_changes(tuned: Mapping, scaling: float) -> dict[str, list[np.ndarray]]:
    """matrix type -> singular values of the merged delta scaling * a b per layer, for every adapter."""
    flat = params_lib.flat(tuned)
    out: dict[str, list[np.ndarray]] = {}
    for path, a in flat.items():
        if path[-1] != "lora_a":
            continue
        b = flat[path[:-1] + ("lora_b",)]
        out.setdefault(path[-2], []).extend(low_rank_singular_values(a_l, b_l, scaling)
                                            for a_l, b_l in zip(per_layer(a), per_layer(b)))
    return out


def summarize(changes: Mapping[str, list[np.ndarray]], shapes: Mapping[str, tuple[int, int]],
              keep: int = KEEP) -> dict[str, dict]:
    """Per matrix type: rank for 90% energy per layer (and median, max), the full rank min(in, out),
    and the leading singular values averaged over layers, raw and divided by each layer's largest."""
    summary = {}
    for kind, spectra in changes.items():
        ranks = [rank_for_energy(s) for s in spectra]
        width = min(keep, max(len(s) for s in spectra))
        padded = np.zeros((len(spectra), width))
        normalized = np.zeros((len(spectra), width))
        for i, s in enumerate(spectra):
            n = min(width, len(s))
            padded[i, :n] = s[:n]
            normalized[i, :n] = s[:n] / s[0] if len(s) and s[0] > 0 else 0.0
        summary[kind] = {"layers": len(spectra), "full_rank": int(min(shapes[kind])), "rank90": ranks,
                         "rank90_median": float(np.median(ranks)), "rank90_max": int(max(ranks)),
                         "singular_values_mean": padded.mean(0).tolist(),
                         "normalized_mean": normalized.mean(0).tolist()}
    return summary


def matrix_shapes(tree: Mapping) -> dict[str, tuple[int, int]]:
    """matrix type -> (in, out) of its weight (the last two axes of a kernel / embedding)."""
    return {path[-2]: tuple(int(d) for d in np.shape(leaf)[-2:]) for path, leaf in params_lib.flat(tree).items()
            if path[-1] in WEIGHT_LEAVES and np.ndim(leaf) >= 2}


def weight_change(base: Mapping, tuned: Mapping, lora_scaling: float | None) -> dict[str, dict]:
    """summarize() of a run's weight change: LoRA when lora_scaling is given, else full dW."""
    changes = lora_changes(tuned, lora_scaling) if lora_scaling is not None else full_changes(base, tuned)
    shapes = matrix_shapes(base)
    if "lm_head" in changes and "lm_head" not in shapes and "embed_tokens" in shapes:  # tied head: E^T
        shapes["lm_head"] = shapes["embed_tokens"][::-1]
    return summarize(changes, shapes)
