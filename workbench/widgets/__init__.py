"""Notebook views of routing traces: plotly figures (`figures`) and the tabbed view with controls (`view`).

`show_routing(trace, tokenizer=None)` is the one-call entry; importing this package also gives every
`RoutingTrace` a `.show(tokenizer=None)` that calls it (the engine's trace is data only and imports no view). The
figure functions return plain plotly figures for scripts, papers and `save_html`.
"""

from workbench.engine.routing import RoutingTrace
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

RoutingTrace.show = show_routing  # trace.show(tokenizer) once the views are imported

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
