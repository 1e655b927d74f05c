"""SMT training with kernels=triton (interpreted on CPU) matches kernels=torch on tiny-llama."""
import copy

import torch

from smt_bench.methods.smt import SMT
from smt_bench.models import TinyLlama, shapes_of
from smt_bench.methods.base import Context


def _run(model, kernels, batches):
    m = SMT(name="smt", lr=5e-3, block_size=16, warmup_steps=2, kernels=kernels, projections=["q", "k", "v", "down"])
    warm = Context(batches=lambda n: iter(batches[:n]), loss=lambda mod, b: mod(**b).loss, device=torch.device("cpu"))
    tuned = m.prepare(model, m.plan(shapes_of(model), 24 * 256), warm)
    model = tuned.model
    opt = tuned.build_optimizer()
    losses = []
    for b in batches[:1] * 4:  # one batch, so the loss must fall
        loss = model(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return tuned.report()["kernels_backend"], losses, tuned.merged()


def test_triton_interpreted_training_matches_torch():
    base, _ = TinyLlama(vocab_size=256).load()
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):
        ids = torch.randint(0, 256, (2, 19), generator=g)  # 38 tokens: not a multiple of any tile
        batches.append({"input_ids": ids, "labels": ids})
    name_t, loss_t, model_t = _run(copy.deepcopy(base), "triton", batches)
    name_p, loss_p, model_p = _run(copy.deepcopy(base), "torch", batches)
    assert (name_t, name_p) == ("triton", "torch")
    assert loss_t[-1] < loss_t[0]
    # fp32 throughout; differences come only from summation order in the block dW kernel
    torch.testing.assert_close(torch.tensor(loss_t), torch.tensor(loss_p), rtol=1e-5, atol=1e-5)
    for (n, a), (_, b) in zip(model_t.named_parameters(), model_p.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)
