"""The one-call routing view: the figures of `workbench.widgets.figures` in tabs, with ipywidgets controls.

Owns layout and interaction only: which figure shows where, and redrawing it when a control changes. Tabs
are drawn when first opened, so a long trace costs only what is looked at. `show_routing(trace)` is what
`RoutingTrace.show()` calls.
"""

from __future__ import annotations

import html

import ipywidgets as widgets
import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
from IPython.display import display

from workbench import analysis
from workbench.engine.routing import RoutingTrace
from workbench.widgets import figures

TABS = ("tokens", "load", "coactivation", "locality", "expert", "compare")
TAB_TITLES = {"tokens": "Tokens x layers", "load": "Load", "coactivation": "Co-activation",
              "locality": "Locality", "expert": "Expert card", "compare": "Compare"}


class RoutingView(widgets.VBox):
    """Tabs of routing views for one trace (and optionally a second one to compare against).

    `view.figures[name]` holds the figure each tab currently shows (names in `TABS`), so a script or a test
    can read what a person would see.
    """

    def __init__(self, trace: RoutingTrace, tokenizer=None, *, compare: RoutingTrace | None = None,
                 labels: tuple[str, str] = ("this trace", "other trace"), max_tokens: int = 256,
                 layer: int | None = None, expert: int = 0) -> None:
        if not isinstance(trace, RoutingTrace):
            raise TypeError(f"show_routing needs a RoutingTrace, got {type(trace).__name__}; generate with "
                            "routing=True, or RoutingTrace.from_dict(...) on the server's api/routing answer")
        if trace.num_tokens == 0:
            raise ValueError("this trace holds no tokens: there is no routing to show")
        if compare is not None:
            analysis.agreement(trace, compare)  # fails early, with its message, when the traces don't match
        self.trace, self.tokenizer, self.compare, self.labels = trace, tokenizer, compare, labels
        self.figures: dict[str, go.Figure] = {}
        layer_ids = list(trace.layer_ids)
        middle = layer_ids[len(layer_ids) // 2]
        first_layer = middle if layer is None else layer
        analysis.layer_row(trace, first_layer)  # an unknown layer fails here, not inside a callback

        # --- controls ---------------------------------------------------------------------------------
        self.layer_range = widgets.SelectionRangeSlider(
            options=[(f"L{x}", x) for x in layer_ids], index=(0, len(layer_ids) - 1), description="layers",
            continuous_update=False, layout=widgets.Layout(width="420px", min_width="300px"))
        self.expert_filter = widgets.Dropdown(
            options=[("all (colour = first choice)", -1)]
            + [(f"expert {e}", e) for e in range(trace.num_experts)],
            value=-1, description="experts")
        self.window_start = widgets.IntSlider(
            value=0, min=0, max=max(0, trace.num_tokens - 1), step=max_tokens, description="from token",
            continuous_update=False, disabled=trace.num_tokens <= max_tokens,
            layout=widgets.Layout(min_width="300px"))
        self.max_tokens = max_tokens
        self.co_layer = widgets.Dropdown(options=[(f"L{x}", x) for x in layer_ids], value=first_layer,
                                         description="layer")
        self.card_layer = widgets.Dropdown(options=[(f"L{x}", x) for x in layer_ids], value=first_layer,
                                           description="layer")
        self.card_expert = widgets.BoundedIntText(value=expert, min=0, max=trace.num_experts - 1,
                                                  description="expert")

        # --- tabs -------------------------------------------------------------------------------------
        self.tab_names = [name for name in TABS if name != "compare" or compare is not None]
        self.outputs = {name: widgets.Output() for name in self.tab_names}
        controls = {
            # wrapped onto a second row in a narrow notebook, instead of squeezing the sliders to nothing
            "tokens": widgets.HBox([self.layer_range, self.expert_filter, self.window_start],
                                   layout=widgets.Layout(flex_flow="row wrap")),
            "coactivation": widgets.HBox([self.co_layer]),
            "expert": widgets.HBox([self.card_layer, self.card_expert]),
        }
        pages = [widgets.VBox(([controls[name]] if name in controls else []) + [self.outputs[name]])
                 for name in self.tab_names]
        self.tabs = widgets.Tab(children=pages, titles=[TAB_TITLES[n] for n in self.tab_names])
        super().__init__([widgets.HTML(self._summary()), self.tabs])

        for control in (self.layer_range, self.expert_filter, self.window_start):
            control.observe(lambda _change: self.redraw("tokens"), names="value")
        self.co_layer.observe(lambda _change: self.redraw("coactivation"), names="value")
        for control in (self.card_layer, self.card_expert):
            control.observe(lambda _change: self.redraw("expert"), names="value")
        self.tabs.observe(self._on_tab, names="selected_index")
        self.redraw("tokens")

    # --- drawing --------------------------------------------------------------------------------------
    def build(self, name: str) -> go.Figure:
        """The figure of tab `name` for the controls' current values."""
        trace = self.trace
        if name == "tokens":
            low, high = self.layer_range.value
            layers = [x for x in trace.layer_ids if low <= x <= high]
            expert = None if self.expert_filter.value < 0 else self.expert_filter.value
            return figures.token_grid(trace, self.tokenizer, layers=layers, expert=expert,
                                      start=self.window_start.value, max_tokens=self.max_tokens)
        if name == "load":
            return figures.load_heatmap(trace)
        if name == "coactivation":
            return figures.coactivation_heatmap(trace, self.co_layer.value)
        if name == "locality":
            return figures.locality_chart(trace)
        if name == "expert":
            return figures.expert_card(trace, self.card_layer.value, self.card_expert.value, self.tokenizer)
        if name == "compare" and self.compare is not None:
            return figures.comparison_chart(trace, self.compare, self.labels)
        raise ValueError(f"unknown view {name!r}; views: {', '.join(self.tab_names)}")

    def redraw(self, name: str) -> go.Figure | None:
        """Rebuild tab `name` and show it; a metric that cannot be computed shows its reason instead."""
        try:
            figure = self.build(name)
        except ValueError as exc:  # e.g. locality of a one-token trace: say why, keep the other tabs working
            self.figures.pop(name, None)
            self.outputs[name].outputs = (_display_data({"text/html": f"<i>{html.escape(str(exc))}</i>",
                                                         "text/plain": str(exc)}),)
            return None
        self.figures[name] = figure
        # The Output widget is filled with the figure's mime bundle directly (not through `display`), so it
        # works the same in a kernel, in a test and in a script, and never prints a figure's JSON to stdout.
        self.outputs[name].outputs = (_display_data(figure_bundle(figure)),)
        return figure

    def _on_tab(self, change) -> None:
        name = self.tab_names[change["new"]] if change["new"] is not None else None
        if name is not None and name not in self.figures:
            self.redraw(name)

    def _summary(self) -> str:
        trace = self.trace
        shared = int(trace.meta.get("n_shared_experts", 1))
        parts = [f"<b>{trace.num_tokens}</b> tokens ({trace.prompt_len} prompt)",
                 f"<b>{trace.num_layers}</b> MoE layers (L{trace.layer_ids[0]}-L{trace.layer_ids[-1]})",
                 f"top-<b>{trace.top_k}</b> of <b>{trace.num_experts}</b> routed experts"
                 + (f" + {shared} shared" if shared else "")]
        imb = analysis.imbalance(trace)
        parts.append(f"mean load entropy {float(np.mean(imb.entropy)):.3f}, "
                     f"dead experts {int(imb.num_dead.sum())}")
        model = trace.meta.get("model")
        if model:
            parts.insert(0, html.escape(str(model)))
        return "<div>" + " · ".join(parts) + "</div>"


def figure_bundle(figure: go.Figure) -> dict:
    """The Jupyter mime bundle of a figure: plotly's own JSON mime type, which JupyterLab, Notebook 7 and
    VS Code render with their bundled plotly.js (offline, no CDN), the same figure under
    `figures.THEMED_MIME` (drawn in JupyterLab's theme by the glm-workbench extension), and a one-line text
    fallback."""
    bundle = figures.with_themed_mime(dict(pio.renderers["plotly_mimetype"].to_mimebundle(figure.to_dict())))
    title = figure.layout.title.text or "routing figure"
    bundle["text/plain"] = f"<plotly figure: {title}>"
    return bundle


def _display_data(data: dict) -> dict:
    return {"output_type": "display_data", "data": data, "metadata": {}}


def routing_view(trace: RoutingTrace, tokenizer=None, **kwargs) -> RoutingView:
    """Build (without displaying) the tabbed routing view; `kwargs` as for `RoutingView`."""
    return RoutingView(trace, tokenizer, **kwargs)


def show_routing(trace: RoutingTrace, tokenizer=None, **kwargs) -> None:
    """Display the routing view of `trace` in the notebook (what `RoutingTrace.show()` calls).

    Keywords: `compare=other_trace` (adds the comparison tab), `labels=(a, b)`, `max_tokens` (token columns
    per grid page), `layer` (first layer of the per-layer tabs), `expert` (first expert card).
    """
    display(routing_view(trace, tokenizer, **kwargs))
