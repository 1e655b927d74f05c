"""SMT's part of the analysis report (smt_bench.analysis finds it through its registry).

columns: blocks per projection group, read from method_info; blocks: the share and rate tables and the
block-map figure; stability: how much two selections that differ in one factor overlap; paper: the
paper's figures and tables by name. Imports no torch.
"""
from smt_bench.analysis.registry import Contribution, Figure
from smt_bench.analysis.stats import finite_mean

from . import blocks, columns, paper, stability

CONTRIBUTION = Contribution(
    method="smt",
    run_columns=columns.run_columns,
    cell_columns={c: finite_mean for c in columns.CELL_COLUMNS},
    check=columns.check,
    # block_size is the largest size allowed; what ran is the largest kernel size <= it dividing the model
    resolved={"block_size": columns.resolved_block_size},
    sections=(blocks.share_section, stability.section, *paper.SECTIONS),
    figures=(Figure("smt_blocks", blocks.TITLE, blocks.CAPTION, blocks.block_map_figure),
             Figure("smt_blocks_variants", blocks.VARIANTS_TITLE, blocks.VARIANTS_CAPTION,
                    blocks.variant_block_map_figure),
             Figure("smt_stability", stability.TITLE, "", stability.report_figure, listed=False),
             *paper.FIGURES),
    color="#2ca02c",
    order=1,  # the method under study: after the baselines
)
