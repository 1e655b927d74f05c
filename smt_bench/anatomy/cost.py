"""What the update anatomy costs at a model's real shapes: `python -m smt_bench.anatomy.cost model=llama-7b-random`.

The model is built with random weights, cut to `layers` decoder layers (as smt_bench.bench does), and every matrix
of the decoder layers gets an update that changes all of it (a rank-16 Gaussian update at 1% of its norm, plus 0.1%
dense noise), so every layer matrix is analysed, as after full fine-tuning; with --all the embeddings and the head
too (only full FT, HFT and LISA with train_embeddings change them). The anatomy runs once per SVD mode (exact, lowrank) and each
matrix's seconds are recorded; the per-layer seconds times the model's depth plus the tensors outside the layers is
the whole model's cost. Random weights cost what trained ones do (an SVD's time depends on the shape), so this
measures cost only; lowrank's error is measured on trained SmolLM2 runs (`anatomy.check=true`, docs/anatomy.md).
Writes <out>/<name>.json and .md."""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from . import Settings, analyse, where


def _model(model: str, layers: int, device: torch.device):
    from hydra.utils import instantiate
    from transformers import AutoModelForCausalLM

    from ..__main__ import compose_config

    cfg = compose_config([f"model={model}"], hydra=False)
    config = instantiate(cfg.model.source).hf_config()
    depth = config.num_hidden_layers
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    with torch.device(device):
        base = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return base, depth


@torch.no_grad()
def _perturb(model, everything: bool) -> None:
    g = torch.Generator(device="cpu").manual_seed(1)
    for name, p in model.named_parameters():
        if p.ndim != 2 or not everything and where(name)[0] is None:
            continue
        a = torch.randn(p.shape[0], 16, generator=g).to(p.device)
        b = torch.randn(16, p.shape[1], generator=g).to(p.device)
        low = a @ b
        p += low * (0.01 * p.norm() / low.norm())
        noise = torch.randn(p.shape, generator=g).to(p.device)
        p += noise * (0.001 * p.norm() / noise.norm())


def measure(model: str, layers: int, modes: list[str], device: torch.device, everything: bool = False) -> dict:
    base, depth = _model(model, layers, device)
    tuned = copy.deepcopy(base)
    _perturb(tuned, everything)
    out: dict = {"model": model, "layers": layers, "depth": depth, "device": str(device), "all_tensors": everything,
                 "threads": torch.get_num_threads(), "modes": {}}
    for mode in modes:
        settings = Settings(svd=mode)
        per: dict[str, float] = {}
        t0 = time.perf_counter()
        found = analyse(base, tuned, settings, device)
        wall = time.perf_counter() - t0
        for name, t in found.tensors.items():
            per[name] = t.get("seconds", 0.0)
        layer_s = sum(s for n, s in per.items() if where(n)[0] is not None) / layers
        outside_s = sum(s for n, s in per.items() if where(n)[0] is None)
        out["modes"][mode] = {"wall_s": wall, "per_tensor_s": per, "per_layer_s": layer_s, "outside_s": outside_s,
                              "whole_model_s": layer_s * depth + outside_s,
                              "intruders": found.summary()["intruders"]}
        print(f"[anatomy cost] {model} x{layers} {mode}: {wall:.1f} s measured, {layer_s:.1f} s per layer, "
              f"{outside_s:.1f} s outside the layers -> {layer_s * depth + outside_s:.0f} s for {depth} layers",
              flush=True)
    return out


def markdown(res: dict) -> str:
    lines = [f"# Update anatomy cost: {res['model']} ({res['layers']} of {res['depth']} layers measured, "
             f"{res['device']}, {res['threads']} threads)", "",
             "| svd | per decoder layer (s) | outside the layers (s) | whole model, extrapolated (s) |",
             "| --- | --- | --- | --- |"]
    for mode, m in res["modes"].items():
        lines.append(f"| {mode} | {m['per_layer_s']:.2f} | {m['outside_s']:.2f} | {m['whole_model_s']:.0f} |")
    lines += ["", "Per matrix (s):", "", "| tensor | " + " | ".join(res["modes"]) + " |",
              "| --- |" + " --- |" * len(res["modes"])]
    names = list(next(iter(res["modes"].values()))["per_tensor_s"])
    for n in names:
        lines.append(f"| `{n}` | " + " | ".join(f"{m['per_tensor_s'][n]:.2f}" for m in res["modes"].values()) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m smt_bench.anatomy.cost", description=__doc__.split("\n")[0])
    ap.add_argument("overrides", nargs="*", help="model=<name> (default llama-7b-random)")
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--modes", default="exact,lowrank")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="outputs/anatomy-cost")
    ap.add_argument("--name", default=None)
    ap.add_argument("--all", action="store_true", help="update the embeddings and the head too")
    args = ap.parse_args(argv)
    model = next((o.split("=", 1)[1] for o in args.overrides if o.startswith("model=")), "llama-7b-random")
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in ("exact", "lowrank")]
    if bad or args.layers < 1:
        print(f"smt-bench: error: --modes takes exact and/or lowrank, --layers a count >= 1 (got {args.modes!r}, "
              f"{args.layers})", file=sys.stderr)
        return 2
    from ..provenance import meta_info

    res = measure(model, args.layers, modes, torch.device(args.device), args.all)
    res["provenance"] = meta_info(torch.device(args.device))
    res["command"] = "python -m smt_bench.anatomy.cost " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = args.name or f"{model}-{args.device.split(':')[0]}"
    (out / f"{name}.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / f"{name}.md").write_text(markdown(res))
    print(f"[anatomy cost] wrote {out / name}.json and .md", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
