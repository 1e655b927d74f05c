"""The update anatomy (smt_bench/anatomy): intruder dimensions, ΔW's spectrum and where the update lands, checked
against values worked out by hand on constructed matrices and a tiny model, and inside a run."""
import json
import math

import pytest
import torch

from smt_bench.anatomy import Settings, analyse, matrix, where

EXACT = Settings(svd="exact", top_k=3)


def orthogonal(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def mixing_block(size: int) -> torch.Tensor:
    """An orthogonal size × size matrix whose first column is (1, …, 1)/√size."""
    a = torch.eye(size, dtype=torch.float64)
    a[:, 0] = 1.0
    q, r = torch.linalg.qr(a)
    return q * torch.sign(torch.diagonal(r))


def base_and_intruder(mix: int, n: int = 16, decay: float | None = None):
    """W₀ = U₀ S₀ V₀ᵀ with distinct singular values; W puts the largest singular value on a vector that is an
    equal mix of W₀'s `mix` weakest left singular vectors, so its largest |cos| with any of them is 1/√mix;
    W's next singular vectors are W₀'s strongest two, unchanged."""
    u0, v0 = orthogonal(n, 1), orthogonal(n, 2)
    s0 = (torch.linspace(20, 1, n, dtype=torch.float64) if decay is None
          else 20 * decay ** torch.arange(n, dtype=torch.float64))
    w0 = u0 @ torch.diag(s0) @ v0.T
    q = torch.eye(n, dtype=torch.float64)
    q[n - mix:, n - mix:] = mixing_block(mix)
    u1 = u0 @ q
    s1 = s0.clone()
    s1[n - mix] = 100.0       # the mixed vector leads
    s1[n - mix + 1:] = s0[-1] * torch.linspace(0.9, 0.5, mix - 1, dtype=torch.float64)  # the block's rest: last
    w = u1 @ torch.diag(s1) @ v0.T
    return w0.float(), w.float()


@pytest.mark.parametrize("mix, similarity", [(5, 1 / math.sqrt(5)), (3, 1 / math.sqrt(3)), (1, 1.0)])
def test_intruder_similarity_and_counts_by_hand(mix, similarity):
    w0, w = base_and_intruder(mix)
    a = matrix(w0, w, EXACT)
    # top 3 of W: the mixed vector (1/√mix), then W₀'s own strongest two (cos 1)
    assert a["similarity"] == pytest.approx([similarity, 1.0, 1.0], abs=1e-5)
    expected = {f"{e:g}": int(similarity < e) for e in EXACT.epsilons}
    assert a["intruders"] == expected
    if mix == 5:   # 0.447: an intruder at ε = 0.5 and above, not at 0.4
        assert a["intruders"]["0.4"] == 0 and a["intruders"]["0.5"] == 1


def test_a_known_rank_3_update_has_the_spectrum_worked_out_by_hand():
    """ΔW = 3·x₁y₁ᵀ + 2·x₂y₂ᵀ + 1·x₃y₃ᵀ with orthonormal x, y: σ = (3, 2, 1), ‖ΔW‖² = 14."""
    m, n = 12, 9
    x, y = orthogonal(m, 3)[:, :3], orthogonal(n, 4)[:, :3]
    delta = (x * torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)) @ y.T
    w0 = torch.randn(m, n, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    a = matrix(w0.float(), (w0 + delta).float(), EXACT)
    assert a["stable_rank"] == pytest.approx(14 / 9, rel=1e-4)
    p = [3 / 6, 2 / 6, 1 / 6]
    assert a["effective_rank"] == pytest.approx(math.exp(-sum(q * math.log(q) for q in p)), rel=1e-3)
    assert a["top_energy"]["1"] == pytest.approx(9 / 14, rel=1e-4)
    assert a["top_energy"]["4"] == pytest.approx(1.0, rel=1e-4) and a["top_energy"]["16"] == pytest.approx(1.0, rel=1e-4)
    assert a["energy_spectrum"][:3] == pytest.approx([9 / 14, 4 / 14, 1 / 14], abs=1e-5)
    assert max(a["energy_spectrum"][3:]) < 1e-8
    assert a["delta_norm2"] == pytest.approx(14.0, rel=1e-4)


def test_a_known_sparse_update_by_hand():
    """Two entries, 4 at (0, 0) and 3 at (5, 7): σ(ΔW) = (4, 3); one entry alone: rank 1."""
    w0 = torch.randn(8, 10, generator=torch.Generator().manual_seed(6))
    w = w0.clone()
    w[0, 0] += 4.0
    w[5, 7] += 3.0
    a = matrix(w0, w, EXACT)
    assert a["stable_rank"] == pytest.approx(25 / 16, rel=1e-4)
    assert a["effective_rank"] == pytest.approx(math.exp(-(4 / 7 * math.log(4 / 7) + 3 / 7 * math.log(3 / 7))),
                                                rel=1e-4)
    assert a["top_energy"]["1"] == pytest.approx(16 / 25, rel=1e-4)
    one = w0.clone()
    one[2, 3] += 0.5
    b = matrix(w0, one, EXACT)
    assert b["stable_rank"] == pytest.approx(1.0, rel=1e-4) and b["effective_rank"] == pytest.approx(1.0, rel=1e-4)


def test_lowrank_agrees_with_exact_on_a_clear_intruder():
    """Randomised SVD finds the same top vectors where the spectrum decays (here geometrically, 0.9 per index);
    on a flat spectrum its vectors blur, which docs/anatomy.md measures on SmolLM2."""
    w0, w = base_and_intruder(5, n=64, decay=0.9)
    exact = matrix(w0, w, EXACT)
    low = matrix(w0, w, Settings(svd="lowrank", top_k=3, base_share=1.0))
    assert low["svd"] == "lowrank" and low["similarity"] == pytest.approx(exact["similarity"], abs=1e-3)
    assert low["intruders"] == exact["intruders"] and low["stable_rank"] == pytest.approx(exact["stable_rank"])


def test_auto_is_exact_up_to_its_size():
    s = Settings(svd="auto", exact_max_dim=8)
    assert s.mode((8, 100)) == "exact" and s.mode((9, 9)) == "lowrank"
    assert Settings(svd="lowrank").mode((2, 2)) == "lowrank"


def test_where_names_layer_and_kind():
    assert where("model.layers.3.self_attn.q_proj.weight") == (3, "q_proj")
    assert where("model.layers.11.post_attention_layernorm.weight") == (11, "post_attention_layernorm")
    assert where("model.embed_tokens.weight") == (None, "embed_tokens")
    assert where("model.norm.weight") == (None, "norm")


def test_tiny_model_shares_and_counts_by_hand(tiny_llama):
    """On the tiny LLaMA: a strong rank-1 update e₀·e₂ᵀ of one q_proj and a change to one norm. The anatomy finds
    exactly these two tensors and their energy shares by layer and kind; the q_proj's update is rank 1, and W's
    new top singular vector is e₀, whose largest |cos| with W₀'s left singular vectors is the largest entry of
    W₀'s U in row 0: about 0.4 for a random 64-dim basis, so one intruder at ε = 0.5. A nudge 1000 times smaller
    leaves the top vectors where they were."""
    import copy

    base, _ = tiny_llama
    tuned = copy.deepcopy(base)
    q = tuned.model.layers[1].self_attn.q_proj.weight
    norm = tuned.model.layers[0].input_layernorm.weight
    w0 = q.detach().clone()
    with torch.no_grad():
        q[0, 2] += 3.0
        norm[:4] += 0.1                    # ‖Δ‖² = 4 · 0.01
    found = analyse(base, tuned, EXACT)
    assert set(found.tensors) == {"model.layers.1.self_attn.q_proj.weight", "model.layers.0.input_layernorm.weight"}
    s = found.summary()
    dq = found.tensors["model.layers.1.self_attn.q_proj.weight"]["delta_norm2"]
    dn = found.tensors["model.layers.0.input_layernorm.weight"]["delta_norm2"]
    assert dq == pytest.approx(9.0, rel=1e-4) and dn == pytest.approx(0.04, rel=1e-4)
    assert s["changed_tensors"] == 2 and s["matrices"] == 1
    assert s["unchanged_tensors"] == len(dict(base.named_parameters())) - 2
    assert s["by_layer"] == pytest.approx({"0": dn / (dq + dn), "1": dq / (dq + dn)})
    assert s["by_projection"]["q_proj"]["energy_share"] == pytest.approx(dq / (dq + dn))
    assert "stable_rank" not in s["by_projection"]["input_layernorm"]
    assert s["stable_rank"] == pytest.approx(1.0, rel=1e-4) and s["spectrum"]["q_proj"][0] == pytest.approx(1.0)
    u0 = torch.linalg.svd(w0.double())[0]
    by_hand = float(u0[0].abs().max())
    sims = found.tensors["model.layers.1.self_attn.q_proj.weight"]["similarity"]
    assert sims[0] == pytest.approx(by_hand, abs=0.02) and by_hand < 0.5
    assert s["intruders"]["0.5"] == 1 and s["intruders"][f"{by_hand + 0.03:.1f}"] == 0 or by_hand > 0.37
    nudged = copy.deepcopy(base)
    with torch.no_grad():
        nudged.model.layers[1].self_attn.q_proj.weight[0, 2] += 3e-3
    assert analyse(base, nudged, EXACT).summary()["intruders"]["0.5"] == 0


def test_untouched_model_has_nothing_changed(tiny_llama):
    base, _ = tiny_llama
    found = analyse(base, __import__("copy").deepcopy(base), EXACT)
    s = found.summary()
    assert s["changed_tensors"] == 0 and s["matrices"] == 0 and s["intruders"]["0.5"] == 0
    assert s["delta_rel_norm"] == 0.0 and s["stable_rank"] is None


TINY = ["model=tiny-llama", "device=cpu", "budget.fraction=0.002", "train.max_steps=2", "train.batch_size=2",
        "train.max_len=128", "train.val_batches=1", "data.n_train_per_task=4", "data.n_val_per_task=1",
        "data.n_test_per_task=1", "eval.max_new_tokens=2", "eval.forgetting.max_tokens=32"]


def test_a_run_records_its_anatomy_of_exactly_what_trained(compose, tmp_path, smollm2_path):
    """An SMT run: the changed matrices are exactly the projections its plan selected blocks in, the summary's
    count is the headline one, the per-matrix file goes beside the result when asked; the run id is the same
    with the anatomy off (it changes nothing the run trains or scores)."""
    from smt_bench.result import RunResult
    from smt_bench.run import Prepared, execute

    cfg = compose(*TINY, "method=smt", f"results.dir={tmp_path}", "anatomy.arrays=true")
    prep = Prepared(cfg)
    r = execute(cfg, prep)
    obj = json.loads(prep.path.read_text())
    a = obj["anatomy"]
    assert RunResult.from_json(obj).anatomy is not None
    blocks = r.method_info["block_map"]
    selected = {(layer, proj) for layer, proj, _, _ in blocks}
    arrays = json.loads(prep.path.with_name(a["arrays_file"]).read_text())["tensors"]
    assert {(where(n)[0], where(n)[1]) for n in arrays} == selected
    assert a["changed_tensors"] == a["matrices"] == len(selected)
    assert obj["summary"]["intruders"] == a["intruders"]["0.5"] and a["svd"] == ["exact"]
    assert sum(a["by_layer"].values()) == pytest.approx(1.0) and a["wall_s"] > 0
    off = compose(*TINY, "method=smt", f"results.dir={tmp_path / 'off'}", "anatomy.enabled=false")
    assert Prepared(off).run_id == prep.run_id


def test_bad_anatomy_input_is_refused(compose):
    from smt_bench.errors import UserError
    from smt_bench.run import Prepared

    with pytest.raises(UserError, match="anatomy.epsilon"):
        Prepared(compose(*TINY, "method=lora", "anatomy.epsilon=0.55"))
    with pytest.raises(UserError, match="anatomy.svd"):
        Prepared(compose(*TINY, "method=lora", "anatomy.svd=fast"))


def test_check_records_lowrank_against_exact():
    """With W₀'s whole basis, lowrank agrees with exact. With its top half only, the intruder (a mix of W₀'s five
    weakest vectors) is judged against vectors it does not touch: its similarity falls from 1/√5 to 0 and it is
    counted at ε = 0.4 too, where exact does not count it (a truncated base can only raise a count)."""
    w0, w = base_and_intruder(5, n=64, decay=0.9)
    c = analyse_pair(w0, w, Settings(svd="exact", top_k=3, base_share=1.0, check=True)).summary()["lowrank_check"]
    assert c["matrices"] == 1 and c["similarity_max_error"] < 1e-3 and c["matrices_counted_differently"] == 0
    assert c["intruders_exact"] == c["intruders_lowrank"] and c["intruders_exact"]["0.5"] == 1
    assert c["exact_s"] > 0 and c["lowrank_s"] > 0
    half = analyse_pair(w0, w, Settings(svd="exact", top_k=3, base_share=0.5, check=True)).summary()["lowrank_check"]
    assert half["similarity_max_error"] == pytest.approx(1 / math.sqrt(5), abs=1e-3)
    assert half["intruders_exact"]["0.4"] == 0 and half["intruders_lowrank"]["0.4"] == 1
    assert half["matrices_counted_differently"] == 1


def analyse_pair(w0, w, s):
    """analyse() over two one-matrix modules."""
    base, tuned = torch.nn.Linear(w0.shape[1], w0.shape[0], bias=False), torch.nn.Linear(w.shape[1], w.shape[0],
                                                                                          bias=False)
    with torch.no_grad():
        base.weight.copy_(w0)
        tuned.weight.copy_(w)
    return analyse(base, tuned, s)


def test_cost_cli_writes_its_tables_and_refuses_bad_input(tmp_path):
    from smt_bench.anatomy.cost import main

    assert main(["model=tiny-llama", "--layers", "1", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "tiny-llama-cpu.json").read_text())
    assert set(res["modes"]) == {"exact", "lowrank"} and res["depth"] == 2 and res["layers"] == 1
    for m in res["modes"].values():  # the layer's 7 matrices changed, each timed; whole model = depth x layer
        assert len(m["per_tensor_s"]) == 7 and m["outside_s"] == 0
        assert m["whole_model_s"] == pytest.approx(2 * m["per_layer_s"])
    assert main(["model=tiny-llama", "--layers", "1", "--all", "--out", str(tmp_path), "--name", "all"]) == 0
    every = json.loads((tmp_path / "all.json").read_text())["modes"]["exact"]
    assert len(every["per_tensor_s"]) == 8 and every["outside_s"] > 0  # the tied embedding too
    assert "| exact |" in (tmp_path / "tiny-llama-cpu.md").read_text()
    assert main(["--modes", "fast", "--out", str(tmp_path)]) == 2


def test_the_spectra_figure_takes_the_budget_most_swept_methods_share():
    """The spectra figure's budget: counted over the methods measured at two budgets or more (full FT's, HFT's
    and a one-budget LISA's own budgets do not outvote a sweep); ties go to the smaller budget; no sweep, none."""
    import pandas as pd

    from smt_bench.analysis.anatomy import spectrum_budget

    def runs(*pairs):
        return pd.DataFrame([{"method": m, "budget_fraction": b} for m, b in pairs])

    swept = [("lora", 0.01), ("lora", 0.05), ("smt", 0.01), ("smt", 0.05)]
    assert spectrum_budget(runs(*swept, ("full_ft", 1.0), ("hft", 0.5), ("lisa", 0.05))) == 0.01
    assert spectrum_budget(runs(*swept, ("dora", 0.05), ("dora", 0.02))) == 0.05
    assert spectrum_budget(runs(("full_ft", 1.0), ("lisa", 0.05))) is None
