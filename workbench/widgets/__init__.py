"""Notebook views of routing traces: plotly figures (`figures`) and the tabbed view with controls (`view`).

`show_routing(trace, tokenizer=None)` is the one-call entry (`RoutingTrace.show()` calls it); the figure
functions return plain plotly figures for scripts, papers and `save_html`.
"""

from workbench.widgets.figures import (
    coactivation_heatmap,
    comparison_chart,
    expert_card,
    load_heatmap,
    locality_chart,
    save_html,
    token_grid,
    token_texts,
)
from workbench.widgets.view import RoutingView, figure_bundle, routing_view, show_routing

__all__ = [
    "RoutingView",
    "coactivation_heatmap",
    "comparison_chart",
    "expert_card",
    "figure_bundle",
    "load_heatmap",
    "locality_chart",
    "routing_view",
    "save_html",
    "show_routing",
    "token_grid",
    "token_texts",
]
