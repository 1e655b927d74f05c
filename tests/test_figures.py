"""The figures are readable, checked mechanically: drawn from synthetic run results (and from the committed
embedded sweep), no text leaves the canvas, no two texts overlap, legends sit beside the axes and are no larger
than them, every axis with tick labels has a label; the main comparison shows one series per method; a
regenerated figure is byte-identical."""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from smt_bench.analysis import figures as F  # noqa: E402
from smt_bench.analysis.report import Options, analyze  # noqa: E402

from test_analysis import CS8, run_doc, smt_map, write_run  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SWEEP = REPO / "results" / "embedded-sweep"
BUDGETS = (0.005, 0.01, 0.02, 0.05)
# generic methods: more than the palette has colours, one with a long name
OTHERS = ("pissa", "vera", "boft", "ia3", "adalora", "loha", "lokr", "oft", "a_method_with_a_rather_long_name")
SMT_VARIANTS = ({"projections": ["v"]}, {"projections": ["q"]}, {"projections": ["gate", "up", "down"]},
                {"projections": ["q", "k", "v", "o", "gate", "up", "down"]},
                {"projections": ["q", "k", "v"], "signal": "activation"})
QKV = {"projections": ["q", "k", "v"]}
ELIGIBLE = {"q_proj": 8, "k_proj": 4, "v_proj": 10, "o_proj": 8}


def _smt(budget, seed, acc, extra):
    d = run_doc("smt", budget, seed, acc, method_extra=extra, block_map=smt_map(3 + seed),
                tokens_per_s=1200.0 + 10 * seed, peak=3e8 + 1e9 * budget)
    d["method_info"]["eligible_blocks"] = ELIGIBLE
    return d


def make_rich_results(root: Path) -> Path:
    """Twelve methods, SMT with a main series over four budgets and six variants (one of them over every
    budget, the rest at 1%), LoRA with a variant: what made the old figures unreadable."""
    res = root / "results"
    for seed in range(2):
        noise = 0.4 * (seed - 0.5)
        write_run(res, run_doc("full_ft", 1.0, seed, 60.0 + noise, tokens_per_s=800.0, peak=5e8))
        for b in BUDGETS:
            acc = 50 + 2 * math.log2(b / 0.005)
            write_run(res, _smt(b, seed, acc + noise, QKV))
            write_run(res, _smt(b, seed, acc - 1 + noise, {**QKV, "score_accumulation": "grad_sum"}))
            write_run(res, run_doc("lora", b, seed, acc - 3 + noise, method_extra={"r": 8}, tokens_per_s=900.0,
                                   peak=3.2e8 + 1e9 * b))
            write_run(res, run_doc("dora", b, seed, acc - 2 + 3 * noise, tokens_per_s=700.0, peak=3.4e8 + 1e9 * b))
        for k, extra in enumerate(SMT_VARIANTS):
            write_run(res, _smt(0.01, seed, 48.0 + k + noise, extra))
        for b in (0.01, 0.02):
            write_run(res, run_doc("lora", b, seed, 47.0 + noise, method_extra={"r": 16}, peak=3.3e8 + 1e9 * b))
        for k, m in enumerate(OTHERS):
            for b in (0.01, 0.05):
                write_run(res, run_doc(m, b, seed, 40.0 + k + 10 * b + 2 * noise, tokens_per_s=600.0 + 50 * k,
                                       peak=2.5e8 + 2e7 * k + 1e9 * b))
    return res


@pytest.fixture(scope="module")
def drawn():
    """Analyse a result set, checking every figure with layout_problems instead of saving it (rendering the
    PNG and PDF is most of an analysis' time; test_analysis checks the files)."""

    def run(inputs, out, **opts):
        found = {}
        save = F.save

        def checked(fig, out_dir, stem):
            found[f"{out_dir.name}/{stem}"] = F.layout_problems(fig)
            plt.close(fig)
            return []

        F.save = checked
        try:
            analyze([str(i) for i in inputs], out, Options(n_boot=10, **opts))
        finally:
            F.save = save
        return found

    return run


@pytest.fixture(scope="module")
def rich(tmp_path_factory, drawn):
    root = tmp_path_factory.mktemp("figs")
    res = make_rich_results(root)
    return root, drawn([res], root / "out")


# --- the checker ----------------------------------------------------------------------------------
def test_the_checker_catches_overlapping_labels_a_big_legend_and_text_off_the_canvas():
    with F.styled():
        fig, ax = plt.subplots(figsize=(4, 3))
        for i in range(30):
            ax.plot([0, 1], [i, i + 1], label=f"a rather long series label number {i}")
        ax.set_xticks(range(12), [f"label {i}" for i in range(12)])  # crowded tick labels
        ax.legend(loc="upper left")  # 30 entries, inside: taller than the axes and over the data
        ax.set_xlabel("x (units)")
        ax.set_title("a title far too long to fit across a figure only four inches wide, on one line")
        problems = F.layout_problems(fig)
        plt.close(fig)
    assert any("texts 'label 0' and 'label 1' overlap" in p for p in problems), problems
    assert any("is larger than its axes" in p for p in problems), problems
    assert any("a legend covers the data area" in p for p in problems), problems
    assert any(p.startswith("text 'a title far too long") and "runs off the figure" in p for p in problems), problems
    assert any("the y axis" in p and "has no label" in p for p in problems), problems


def test_the_checker_passes_a_tidy_figure_and_ignores_what_is_not_drawn():
    with F.styled():
        fig, axes = F.figure(6, 3.5)
        ax = axes[0, 0]
        ax.plot([1, 2, 3], [1, 4, 9], label="one series")
        ax.set_xlim(1, 3)  # the locator's ticks outside the view are not drawn
        ax.set_xlabel("x (units)")
        ax.set_ylabel("y (units)")
        ax.set_title("a short title")
        F.legend(ax)
        hidden = fig.add_axes((0.1, 0.1, 0.2, 0.2))
        hidden.set_title("under the other axes")
        hidden.set_visible(False)
        problems = F.layout_problems(fig)
        plt.close(fig)
    assert problems == []


def test_labels_wrap_between_config_items():
    assert F.wrap("projections=q,k,v,o,gate,up,down", 20) == "projections=q,k,v,o,\ngate,up,down"
    assert F.wrap("a b\nc", 80) == "a b\nc"
    assert max(map(len, F.short("smt (" + "x=1, " * 30 + ")", 28).split("\n"))) <= 28


# --- synthetic result sets ------------------------------------------------------------------------
@pytest.mark.slow
def test_every_figure_of_a_crowded_setting_is_readable(rich):
    _, found = rich
    stems = {k.split("/", 1)[1] for k in found}
    assert {"accuracy_vs_params", "memory", "throughput", "pareto", "variants", "smt_blocks",
            "smt_blocks_variants", "smt_stability", "paper_qkv", "paper_attn_mlp", "paper_selection",
            "paper_qkv_share", "published_overlay"} <= stems, stems
    assert {k: v for k, v in found.items() if v} == {}


def _setting(res: Path):
    """The one setting of a result set, as the figures see it."""
    from smt_bench.analysis.load import load
    from smt_bench.analysis.report import _palette, _settings
    from smt_bench.analysis.stats import cells, select_runs

    loaded = load([res])
    kept, _ = select_runs(loaded.runs)
    c = cells(kept)
    return _settings(loaded, kept, c, _palette(loaded, kept, c), Options(n_boot=10))[0]


def _legend_texts(fig) -> list[str]:
    return [t.get_text() for lg in [*fig.legends, *(ax.get_legend() for ax in fig.axes)] if lg is not None
            for t in lg.get_texts()]


@pytest.mark.slow
def test_the_main_comparison_shows_one_series_per_method_and_variants_get_their_own_panels(rich):
    root, _ = rich
    s = _setting(root / "results")
    methods = set(s.cells["method"]) - {"full_ft"}
    with F.styled():
        fig = F.accuracy_vs_params(s.cells, s.plateaus, s.palette, s.label)
        labels = _legend_texts(fig)
        plt.close(fig)
        assert {lbl for lbl in labels if "(" not in lbl and lbl != "plateau start"} == \
            {F.short(m) for m in methods}, labels
        assert not any("projections" in lbl or "r=16" in lbl for lbl in labels)
        fig = F.variants(s.cells, s.palette, s.label)
        titles = [ax.get_title() for ax in fig.axes if ax.get_visible() and ax.get_title()]
        plt.close(fig)
    n_variants = s.cells[~s.cells["main"]]["series"].nunique()
    assert len(titles) == n_variants == 7  # SMT: five at 1% and one over every budget; LoRA: r=16
    assert any(t.startswith("lora:") for t in titles) and any("signal=activation" in t for t in titles)
    # SMT's block map: one heat map per budget of its main series, titled by the budget only
    from smt_bench.methods.smt.analysis.blocks import block_map_figure

    with F.styled():
        fig = block_map_figure(s)
        heat = [ax.get_title() for ax in fig.axes if ax.get_ylabel() == "layer"]
        plt.close(fig)
    assert heat == ["0.5% · 2 runs", "1% · 2 runs", "2% · 2 runs", "5% · 2 runs"]


@pytest.mark.slow
def test_the_figures_are_byte_identical_when_regenerated_and_checked_as_saved(rich, tmp_path):
    """The figures whose layout is computed (constrained layout, labels placed around points) included; the
    second time each is checked first, which must not move anything (the layout is laid out once)."""
    from smt_bench.methods.smt.analysis.blocks import block_map_figure

    root, _ = rich
    s = _setting(root / "results")
    files = []
    for out in (tmp_path / "a", tmp_path / "b"):
        with F.styled():
            figs = {"pareto": F.pareto(s.cells, s.palette, s.label),
                    "variants": F.variants(s.cells, s.palette, s.label), "smt_blocks": block_map_figure(s)}
            files = []
            for stem, fig in figs.items():
                if out.name == "b":
                    assert F.layout_problems(fig) == []
                files += F.save(fig, out, stem)
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


@pytest.mark.slow
def test_without_a_main_column_every_series_is_drawn(rich):
    """Cells from before the main/variant columns: every series counts as main, and nothing overlaps."""
    root, _ = rich
    s = _setting(root / "results")
    old = s.cells.drop(columns=["main", "variant"])
    with F.styled():
        for draw in (lambda: F.accuracy_vs_params(old, s.plateaus, s.palette, s.label),
                     lambda: F.memory(old, s.palette, s.label), lambda: F.throughput(old, s.palette, s.label),
                     lambda: F.pareto(old, s.palette, s.label)):
            fig = draw()
            assert F.layout_problems(fig) == []
            plt.close(fig)
        fig = F.accuracy_vs_params(old, s.plateaus, s.palette, s.label)
        assert sum("smt" in t for t in _legend_texts(fig)) == old[old["method"] == "smt"]["series"].nunique()
        plt.close(fig)
        assert F.variants(old, s.palette, s.label) is None
        from smt_bench.methods.smt.analysis.blocks import block_map_figure, variant_block_map_figure

        fig = block_map_figure(replace(s, cells=old))  # a heat map per SMT series and budget
        assert sum(ax.get_ylabel() == "layer" for ax in fig.axes) == 13  # 2 series x 4 budgets + 5 at 1%
        assert F.layout_problems(fig) == []
        plt.close(fig)
        assert variant_block_map_figure(replace(s, cells=old)) is None


def _paper_results(root: Path) -> Path:
    """The paper presets' runs (as tests/test_paper.py writes them, without importing its torch): SMT on
    each projection set at 1%, activation selection, a LoRA run."""
    res = root / "results"
    sets = {"q": ["q"], "k": ["k"], "v": ["v"], "qkv": ["q", "k", "v"], "mlp": ["gate", "up", "down"],
            "all": ["q", "k", "v", "o", "gate", "up", "down"]}
    for seed, noise in enumerate((-0.5, 0.0, 0.5)):
        for k, (key, projections) in enumerate(sets.items()):
            write_run(res, run_doc("smt", 0.01, seed, 45.0 + 2 * k + noise, method_extra={"projections": projections},
                                   block_map=smt_map(5) if key == "qkv" else None))
        write_run(res, run_doc("smt", 0.01, seed, 53.0 + noise,
                               method_extra={"projections": sets["qkv"], "signal": "activation"}))
        write_run(res, run_doc("lora", 0.01, seed, 40.0, method_extra={"r": 4}))
    return res


@pytest.mark.slow
def test_the_paper_results_the_published_overlay_and_a_setting_without_full_ft_are_readable(tmp_path, drawn):
    res = _paper_results(tmp_path)
    for seed in range(2):  # another setting: no full FT, no evaluation
        d = run_doc("lora", 0.01, seed, 40.0, max_steps=50)
        d["eval"] = None
        write_run(res, d)
    for b, acc in ((0.005, 70.0), (0.01, 75.0)):  # one the published numbers are drawn beside
        write_run(res, run_doc("smt", b, 0, acc, model="llama-7b", data="local", tasks=CS8))
    found = drawn([res], tmp_path / "out")
    assert len(found) >= 10 and {k: v for k, v in found.items() if v} == {}


# --- the committed runs ---------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(not (SWEEP / "runs").is_dir(), reason="no committed embedded sweep")
def test_every_figure_of_the_committed_sweep_is_readable(tmp_path, drawn):
    found = drawn([SWEEP], tmp_path / "out")
    assert len(found) >= 13
    assert {k: v for k, v in found.items() if v} == {}
