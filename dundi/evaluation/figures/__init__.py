"""Published figures as data: the tables of README.md and docs/results/**/README.md are rendered
from the committed raw files (report.json, *-certify.json, table1_full_test.jsonl, paper.json),
never copied by hand, so a page cannot drift from its data.

A page marks each generated table as a block::

    <!-- figures:NAME -->
    ...rendered Markdown...
    <!-- /figures -->

``python -m dundi.evaluation.figures`` rewrites every block from its raw files;
``--check`` rewrites nothing and exits 1 naming each block that differs (tests/
test_published_figures.py runs the same check). A block whose raw file is missing fails with
one line naming the file.

The package: raw.py reads the raw files and prints rates, counts and intervals; registry.py maps
block names to renderers; one page_*.py module per results page registers its blocks with
@block("NAME") (a new page adds a module); markers.py finds and fills the blocks; prose.py
checks the intervals quoted in prose; render.py is the command. Every rate is printed with its count (k/n) where an interval is, and
every interval is the 95% Wilson interval of that count.
"""

from dundi.evaluation.figures.markers import BLOCK, pages, render_text, stale_blocks
from dundi.evaluation.figures.page_paper import SIX, paper_model
from dundi.evaluation.figures.prose import interval_errors
from dundi.evaluation.figures.raw import count_of, pct, share, wilson_text
from dundi.evaluation.figures.registry import block, renderers
from dundi.evaluation.figures.render import main

__all__ = ["BLOCK", "SIX", "block", "count_of", "interval_errors", "main", "pages", "paper_model", "pct",
           "render_text", "renderers", "share", "stale_blocks", "wilson_text"]
