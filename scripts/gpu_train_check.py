#!/usr/bin/env python
"""SMT trained with kernels=triton and with kernels=torch from the same init on the same batches: the loss
curves must agree. SmolLM2-135M's architecture with random weights on random tokens (a GPU machine need not
have SmolLM2's weights or its tokenizer), through the harness's own SMT and trainer, bf16 autocast on CUDA.

    python scripts/gpu_train_check.py --out results/gpu        # CUDA, 20 steps; writes train_check.{json,md}
    TRITON_INTERPRET=1 python scripts/gpu_train_check.py --smoke --out /tmp/x   # tiny, CPU, interpreted

Tolerance: on CUDA the two backends sum each block's dW in another order in bf16 inputs with fp32
accumulation, which moves a loss of ≈ 10.8 by ~1e-3 after 20 AdamW steps; the check allows 2e-2 (bf16's
relative precision, 2^-7 ≈ 8e-3, times a 2.5 margin). On the CPU in fp32, 1e-4.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0, max_position_embeddings=8192)
SMOKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=256)


def train_once(backend: str, arch: dict, steps: int, batch: int, seq: int, device: torch.device) -> dict:
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM

    from smt_bench.data.batches import BatchStream
    from smt_bench.loggers import NullLogger
    from smt_bench.methods.smt import SMT
    from smt_bench.models import TinyLlama, shapes_of
    from smt_bench.run import method_context
    from smt_bench.trainer import train

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(TinyLlama(**arch).hf_config(), dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    examples = [{"input_ids": ids, "labels": ids} for ids in
                torch.randint(0, arch["vocab_size"], (64, seq), generator=g).tolist()]
    method = SMT(name="smt", lr=1e-4, kernels=backend, warmup_steps=2)
    plan = method.plan(shapes_of(model), round(0.01 * sum(p.numel() for p in model.parameters())))
    tuned = method.prepare(model, plan, method_context(examples, batch, 0, 2, device))  # the harness's warm-up stream
    cfg = OmegaConf.create(dict(max_steps=steps, grad_accum=1, schedule="linear", warmup_ratio=0.1,
                                betas=[0.9, 0.999], eps=1e-8, max_grad_norm=1.0, gradient_checkpointing=False,
                                eval_every=0, log_every=1, checkpoint_every=0))
    info = train(tuned, BatchStream(examples, batch, pad_id=0, seed=3), [], cfg, device, NullLogger())
    return {"backend": tuned.backend.name, "loss_curve": info["loss_curve"], "blocks": plan.detail["blocks"],
            "block_size": plan.detail["block_size"], "median_step_time_s": info["median_step_time_s"],
            "block_map": tuned.block_map()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (Triton interpreted)")
    p.add_argument("--steps", type=int, default=None, help="default 20 (smoke 3)")
    p.add_argument("--out", default=str(REPO / "outputs" / "gpu"))
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        print("gpu_train_check: no CUDA device; pass --smoke for a tiny CPU run", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    arch, steps = (SMOLLM2, args.steps or 20) if cuda else (SMOKE, args.steps or 3)
    batch, seq = (8, 256) if cuda else (2, 16)
    runs = {b: train_once(b, arch, steps, batch, seq, device) for b in ("torch", "triton")}
    tol = 2e-2 if cuda else 1e-4
    diff = max(abs(a - b) for a, b in zip(runs["torch"]["loss_curve"], runs["triton"]["loss_curve"]))
    same_blocks = runs["torch"]["block_map"] == runs["triton"]["block_map"]
    from smt_bench import provenance

    result = {"check": "smt_triton_vs_torch_training", "device": provenance.device_info(device),
              "git": provenance.git_info(), "versions": provenance.versions(), "arch": arch, "steps": steps,
              "batch": [batch, seq], "precision": "bf16 autocast, fp32 masters" if cuda else "fp32",
              "tolerance": tol, "max_abs_loss_diff": diff, "same_block_map": same_blocks,
              "passed": diff <= tol and same_blocks, "runs": {b: {k: v for k, v in r.items() if k != "block_map"}
                                                              for b, r in runs.items()}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_check.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "train_check.md").write_text(
        f"# SMT kernels=triton vs kernels=torch, {steps} steps on {device.type} ({result['precision']})\n\n"
        f"{'SmolLM2-135M architecture' if cuda else 'a tiny LLaMA (smoke run)'}, random weights and tokens, "
        f"batch {batch}×{seq}, "
        f"{runs['torch']['blocks']} blocks of {runs['torch']['block_size']}². Max |Δloss| = {diff:.3g} "
        f"(tolerance {tol:g}); same block map: {same_blocks}; passed: {result['passed']}. "
        f"Median step: torch {runs['torch']['median_step_time_s']:.4f} s, triton "
        f"{runs['triton']['median_step_time_s']:.4f} s.\n")
    print((out / "train_check.md").read_text())
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
