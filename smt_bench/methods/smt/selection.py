"""Which blocks train: top-k of the warm-up scores, globally or within pools."""
from __future__ import annotations

import torch

SELECTIONS = ("global", "per_matrix", "attn_mlp")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def _topk(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores; ties go to the lower index (a stable, reproducible order)."""
    order = torch.sort(flat.cpu(), descending=True, stable=True).indices
    return order[:k]


def _apportion(k: int, sizes: list[int]) -> list[int]:
    """Split k in proportion to sizes (largest remainder), never above a pool's size."""
    total = sum(sizes)
    raw = [k * s / total for s in sizes]
    out = [min(int(r), s) for r, s in zip(raw, sizes)]
    rest = sorted(range(len(sizes)), key=lambda i: -(raw[i] - int(raw[i])))
    while sum(out) < k:
        for i in rest:
            if sum(out) < k and out[i] < sizes[i]:
                out[i] += 1
    return out


def select(scores: dict[str, torch.Tensor], k: int, mode: str = "global",
           attn_share: float | None = None) -> dict[str, torch.Tensor]:
    """Returns {matrix name: LongTensor (n, 2) of (row_block, col_block)}, each sorted."""
    names = list(scores)
    if mode == "global":
        pools = [names]
    elif mode == "per_matrix":
        pools = [[n] for n in names]
    elif mode == "attn_mlp":
        attn = [n for n in names if n.rsplit(".", 1)[-1] in ATTENTION]
        pools = [p for p in (attn, [n for n in names if n not in attn]) if p]
    else:
        raise ValueError(f"unknown selection {mode!r}; choose one of {SELECTIONS}")
    sizes = [sum(scores[n].numel() for n in p) for p in pools]
    if mode == "attn_mlp" and attn_share is not None and len(pools) == 2:
        ka = min(round(k * attn_share), sizes[0])
        quotas = [ka, k - ka]
    else:
        quotas = _apportion(k, sizes)
    out = {}
    for pool, quota in zip(pools, quotas):
        flat = torch.cat([scores[n].flatten() for n in pool])
        chosen = _topk(flat, quota)
        offset = 0
        for n in pool:
            m = scores[n].numel()
            mine = chosen[(chosen >= offset) & (chosen < offset + m)] - offset
            mine = torch.sort(mine).values
            nc = scores[n].shape[1]
            out[n] = torch.stack([mine // nc, mine % nc], dim=1)
            offset += m
    return out
