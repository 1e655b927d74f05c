"""The update anatomy: what a method did to the pre-trained weights, measured on the merged model against the
base model after training (rank 0).

For every weight tensor the tuning changed:

- **where the update lands**: each tensor's share of the whole update's energy ‖ΔW‖², summed per layer and per
  projection (every changed tensor counts, norms and embeddings included);

and for every changed matrix (2-D):

- **intruder dimensions** (Shuttleworth, Andreas, Torralba & Sharma, "LoRA vs Full Fine-tuning: An Illusion of
  Equivalence", arXiv 2410.21228): for each of the top `top_k` left singular vectors of the tuned matrix W, its
  largest |cosine similarity| with any left singular vector of the base matrix W₀; a vector below ε is an intruder.
  `top_k=10` and the headline ε = 0.5 are the authors' code's defaults (`find_number_of_intruder_dimensions`:
  `k=10`, `--intruder_dimension_threshold 0.5`); the paper's figures sweep ε, so the count is kept for every ε of
  `epsilons`;
- **the update's spectrum**, from the singular values σ of ΔW = W − W₀: stable rank ‖ΔW‖²_F / σ₁², effective
  rank exp(H(p)) with p = σ / Σσ (Roy & Vetterli 2007), the share of ‖ΔW‖²_F in the top 1, 4 and 16 directions,
  ‖ΔW‖_F / ‖W₀‖_F, and the energy share of each of the top `spectrum` directions (the figure's spectra).

`svd`: `exact` decomposes W₀ and W fully (torch.linalg.svd, as the authors' code) and ΔW's values exactly;
`lowrank` takes W's top `top_k` vectors and W₀'s top `base_share` of its vectors by randomised SVD
(torch.svd_lowrank), so an intruder is judged against those base vectors only (a count can only rise), while ΔW's
values stay exact (torch.linalg.svdvals); `auto` is exact up to `exact_max_dim` on the smaller side, lowrank
above. The default is exact: docs/anatomy.md states the measured cost of each and the error of lowrank against exact
(it over-counts at high ε).
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch

PROTOCOL = ("merged tuned model vs base model, every changed tensor; intruders: top-k left singular vectors of W, "
            "max |cos| with W0's left singular vectors < epsilon (Shuttleworth et al. 2024); spectrum of W - W0")
ENERGY_TOP = (1, 4, 16)
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class Settings:
    top_k: int = 10
    epsilons: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    epsilon: float = 0.5
    svd: str = "exact"                 # exact | lowrank | auto
    exact_max_dim: int = 2048          # auto: exact while min(m, n) <= this
    base_share: float = 0.0625         # lowrank: W0's top share of its singular vectors (256 of 4096)
    oversample: int = 20               # lowrank: extra columns of the randomised range finder
    niter: int = 8                     # lowrank: its power iterations
    spectrum: int = 32                 # top directions of ΔW whose energy shares are kept
    seed: int = 0                      # lowrank: the randomised SVD's generator seed
    check: bool = False                # exact matrices: also run lowrank, and record its error against exact

    @classmethod
    def from_config(cls, node: Any) -> "Settings":
        keys = {f for f in cls.__dataclass_fields__}
        values = {k: node[k] for k in keys if k in node}
        if "epsilons" in values:
            values["epsilons"] = tuple(float(e) for e in values["epsilons"])
        return cls(**values)

    def mode(self, shape: tuple[int, ...]) -> str:
        if self.svd != "auto":
            return self.svd
        return "exact" if min(shape) <= self.exact_max_dim else "lowrank"


def where(name: str) -> tuple[int | None, str]:
    """(layer index or None outside the decoder layers, the tensor's kind: q_proj, down_proj, input_layernorm,
    embed_tokens, ...) from a parameter name."""
    m = _LAYER.search(name)
    parts = name.split(".")
    kind = parts[-2] if parts[-1] in ("weight", "bias") and len(parts) > 1 else parts[-1]
    return (int(m.group(1)) if m else None), kind


def left_vectors(w: torch.Tensor, k: int | None, mode: str, s: Settings) -> torch.Tensor:
    """Left singular vectors of w, ordered by singular value: all of them (k None) or the top k."""
    if mode == "exact":
        u = torch.linalg.svd(w, full_matrices=False)[0]
        return u if k is None else u[:, :k]
    q = min(min(w.shape), (k or min(w.shape)) + s.oversample)
    with torch.random.fork_rng(devices=[w.device] if w.device.type == "cuda" else []):
        torch.manual_seed(s.seed)
        u = torch.svd_lowrank(w, q=q, niter=s.niter)[0]
    return u[:, : (k or q)]


def max_similarity(u_tuned: torch.Tensor, u_base: torch.Tensor) -> torch.Tensor:
    """For each column of u_tuned, the largest |cosine| with any column of u_base (both orthonormal columns)."""
    return (u_tuned.T @ u_base).abs().amax(dim=1)


def spectrum_stats(sv: torch.Tensor, keep: int) -> dict[str, Any]:
    """Stable rank, effective rank, top-direction energy shares and the kept energy spectrum of singular
    values sv (descending)."""
    sv = sv.double()
    energy = float((sv ** 2).sum())
    if energy == 0.0:
        return {"stable_rank": 0.0, "effective_rank": 0.0, "top_energy": {str(r): 0.0 for r in ENERGY_TOP},
                "energy_spectrum": []}
    p = sv / sv.sum()
    p = p[p > 0]
    share = (sv ** 2) / energy
    cum = torch.cumsum(share, 0)
    return {
        "stable_rank": energy / float(sv[0] ** 2),
        "effective_rank": math.exp(float(-(p * p.log()).sum())),
        "top_energy": {str(r): float(cum[min(r, len(cum)) - 1]) for r in ENERGY_TOP},
        "energy_spectrum": [float(x) for x in share[:keep]],
    }


def similarities(w0: torch.Tensor, w: torch.Tensor, s: Settings, mode: str) -> torch.Tensor:
    """For W's top `top_k` left singular vectors, the largest |cos| with W₀'s (all of them exact; the top
    `base_share` lowrank)."""
    k = min(s.top_k, min(w.shape))
    base_k = None if mode == "exact" else max(k, math.ceil(s.base_share * min(w.shape)))
    return max_similarity(left_vectors(w, k, mode, s), left_vectors(w0, base_k, mode, s))


def matrix(w0: torch.Tensor, w: torch.Tensor, s: Settings) -> dict[str, Any]:
    """The anatomy of one changed matrix: intruder similarities and counts, and ΔW's spectrum (with `check`, on an
    exact matrix, the lowrank similarities too, and the seconds of each)."""
    w0, w = w0.float(), w.float()
    mode = s.mode(tuple(w.shape))
    t0 = time.perf_counter()
    sims = similarities(w0, w, s, mode)
    out: dict[str, Any] = {
        "shape": list(w.shape), "svd": mode,
        "similarity": [float(x) for x in sims],
        "intruders": {f"{e:g}": int((sims < e).sum()) for e in s.epsilons},
    }
    if s.check and mode == "exact":
        t1 = time.perf_counter()
        low = similarities(w0, w, s, "lowrank")
        out.update({"exact_s": t1 - t0, "lowrank_s": time.perf_counter() - t1,
                    "lowrank_similarity": [float(x) for x in low],
                    "lowrank_intruders": {f"{e:g}": int((low < e).sum()) for e in s.epsilons}})
    delta = w - w0
    out.update({"delta_norm2": float(delta.double().pow(2).sum()), "base_norm2": float(w0.double().pow(2).sum())})
    out.update(spectrum_stats(torch.linalg.svdvals(delta), s.spectrum))
    return out


@dataclass
class Anatomy:
    """Per-tensor records (`tensors`) and the run's summary (`summary()`)."""
    settings: Settings
    tensors: dict[str, dict[str, Any]] = field(default_factory=dict)
    unchanged: int = 0
    wall_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        s = self.settings
        total = sum(t["delta_norm2"] for t in self.tensors.values()) or 1.0
        base = sum(t["base_norm2"] for t in self.tensors.values()) or 1.0
        mats = {n: t for n, t in self.tensors.items() if "similarity" in t}
        by_layer: dict[str, float] = {}
        kinds: dict[str, list[dict]] = {}
        for name, t in self.tensors.items():
            layer, kind = where(name)
            key = "outside" if layer is None else str(layer)
            by_layer[key] = by_layer.get(key, 0.0) + t["delta_norm2"] / total
            kinds.setdefault(kind, []).append(t)
        eps = f"{s.epsilon:g}"
        return {
            "protocol": PROTOCOL,
            "svd": sorted({t["svd"] for t in mats.values()}),
            "top_k": s.top_k, "epsilon": s.epsilon, "epsilons": list(s.epsilons),
            "changed_tensors": len(self.tensors), "unchanged_tensors": self.unchanged, "matrices": len(mats),
            "intruders": {f"{e:g}": sum(t["intruders"][f"{e:g}"] for t in mats.values()) for e in s.epsilons},
            "matrices_with_intruders": sum(1 for t in mats.values() if t["intruders"][eps] > 0),
            "similarity_mean": _mean(x for t in mats.values() for x in t["similarity"]),
            "delta_rel_norm": math.sqrt(total / base) if self.tensors else 0.0,
            "stable_rank": _median(t["stable_rank"] for t in mats.values()),
            "effective_rank": _median(t["effective_rank"] for t in mats.values()),
            "top_energy": {str(r): _mean(t["top_energy"][str(r)] for t in mats.values()) for r in ENERGY_TOP},
            "by_projection": {kind: _group(ts, total, eps) for kind, ts in kinds.items()},
            "by_layer": dict(sorted(by_layer.items(), key=lambda kv: (kv[0] == "outside", int(kv[0])
                                                                      if kv[0] != "outside" else 0))),
            "spectrum": {kind: _mean_spectrum(ts) for kind, ts in kinds.items() if any("energy_spectrum" in t
                                                                                       for t in ts)},
            "wall_s": self.wall_s,
            **({"lowrank_check": _lowrank_check(mats, s)} if any("lowrank_similarity" in t for t in mats.values())
               else {}),
        }


def _lowrank_check(mats: dict[str, dict], s: Settings) -> dict[str, Any]:
    """lowrank against exact on the same matrices: the similarities' error, the counts of both, the seconds of
    both (the intruder part; ΔW's values are exact in both modes)."""
    both = [t for t in mats.values() if "lowrank_similarity" in t]
    errors = [abs(a - b) for t in both for a, b in zip(t["similarity"], t["lowrank_similarity"])]
    return {
        "matrices": len(both),
        "base_share": s.base_share,
        "similarity_max_error": max(errors, default=0.0),
        "similarity_mean_error": _mean(errors) or 0.0,
        "intruders_exact": {f"{e:g}": sum(t["intruders"][f"{e:g}"] for t in both) for e in s.epsilons},
        "intruders_lowrank": {f"{e:g}": sum(t["lowrank_intruders"][f"{e:g}"] for t in both) for e in s.epsilons},
        "matrices_counted_differently": sum(1 for t in both if t["intruders"] != t["lowrank_intruders"]),
        "exact_s": sum(t["exact_s"] for t in both),
        "lowrank_s": sum(t["lowrank_s"] for t in both),
    }


def _mean(xs: Iterable[float]) -> float | None:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def _median(xs: Iterable[float]) -> float | None:
    xs = sorted(xs)
    if not xs:
        return None
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


def _group(ts: list[dict], total: float, eps: str) -> dict[str, Any]:
    mats = [t for t in ts if "similarity" in t]
    out: dict[str, Any] = {"tensors": len(ts), "energy_share": sum(t["delta_norm2"] for t in ts) / total,
                           "delta_rel_norm": math.sqrt(sum(t["delta_norm2"] for t in ts)
                                                       / (sum(t["base_norm2"] for t in ts) or 1.0))}
    if mats:
        out.update({"intruders": sum(t["intruders"][eps] for t in mats),
                    "stable_rank": _median(t["stable_rank"] for t in mats),
                    "effective_rank": _median(t["effective_rank"] for t in mats)})
    return out


def _mean_spectrum(ts: list[dict]) -> list[float]:
    spectra = [t["energy_spectrum"] for t in ts if t.get("energy_spectrum")]
    n = min((len(x) for x in spectra), default=0)
    return [sum(x[i] for x in spectra) / len(spectra) for i in range(n)]


@torch.no_grad()
def analyse(base: Any, tuned: Any, settings: Settings, device: torch.device | str = "cpu") -> Anatomy:
    """The anatomy of `tuned` (a plain, merged model) against `base` (the same architecture, untuned), one tensor
    at a time on `device`. Tied tensors count once."""
    t0 = time.perf_counter()
    b = dict(base.named_parameters())
    t = dict(tuned.named_parameters())
    missing = [n for n in b if n not in t]
    if missing:
        raise ValueError(f"the tuned model lacks {len(missing)} of the base model's tensors, e.g. {missing[0]}")
    out = Anatomy(settings)
    for name in b:  # in the base model's order; a tensor no entry of which changed is only counted
        t1 = time.perf_counter()
        w0, w = b[name].detach().to(device), t[name].detach().to(device)
        if torch.equal(w0, w.to(w0.dtype)):
            out.unchanged += 1
            continue
        if w.ndim == 2:
            out.tensors[name] = matrix(w0, w, settings)
        else:
            d = (w.float() - w0.float()).double()
            out.tensors[name] = {"shape": list(w.shape), "delta_norm2": float(d.pow(2).sum()),
                                 "base_norm2": float(w0.double().pow(2).sum())}
        out.tensors[name]["seconds"] = time.perf_counter() - t1  # every number above is on the host: synchronised
    out.wall_s = time.perf_counter() - t0
    return out


def write_arrays(path: Any, found: Anatomy) -> None:
    """Every changed tensor's record (similarities, counts, spectrum statistics, energy) as one JSON beside the
    result, atomically."""
    from ..results import write_json_atomic

    write_json_atomic(path, {"protocol": PROTOCOL, "settings": {**found.settings.__dict__,
                                                                "epsilons": list(found.settings.epsilons)},
                             "tensors": found.tensors})
