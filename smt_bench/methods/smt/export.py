"""The trained SMT delta as safetensors: the selected blocks' values and where they go.

Values are stored (not differences) so applying them to a fresh base reproduces the tuned
weights bit for bit.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def save_delta(layers: dict, block_size: int, path: str | Path, base_model: str) -> None:
    """`layers`: matrix name -> SMTLinear (the tuned model's, see SMTTuned.layers)."""
    tensors, layout = {}, {}
    for name, layer in layers.items():
        tensors[f"{name}.rows"] = layer.rows.cpu().contiguous()
        tensors[f"{name}.cols"] = layer.cols.cpu().contiguous()
        B = layer.block_size
        w = layer.weight.detach().unflatten(0, (-1, B)).unflatten(2, (-1, B))
        tensors[f"{name}.values"] = w[layer.rows, :, layer.cols, :].cpu().contiguous()  # in the weight's dtype
        layout[name] = [layer.out_features, layer.in_features]
    meta = {"format": "smt-bench-delta/1", "block_size": str(block_size), "base_model": base_model,
            "layers": json.dumps(layout)}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)


def apply_delta(model: torch.nn.Module, path: str | Path) -> torch.nn.Module:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    B = int(meta["block_size"])
    tensors = load_file(str(path))
    with torch.no_grad():
        for name in json.loads(meta["layers"]):
            w = model.get_submodule(name).weight
            view = w.unflatten(0, (-1, B)).unflatten(2, (-1, B))
            rows, cols = tensors[f"{name}.rows"].to(w.device), tensors[f"{name}.cols"].to(w.device)
            view[rows, :, cols, :] = tensors[f"{name}.values"].to(device=w.device, dtype=w.dtype)
    return model
