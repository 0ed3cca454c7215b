"""Plotly figures of a routing trace: one function per view, each returning a `plotly.graph_objects.Figure`.

Owns the drawing only; the numbers come from `workbench.analysis`. The figures carry their data in the figure
JSON and need no CDN: in JupyterLab they render through plotly's own bundled lab extension, and
`save_html` writes files with plotly.js inlined. Controls (sliders, dropdowns) live in
`workbench.widgets.view`.

Each figure is a `RoutingFigure`: a plain plotly figure that, displayed in a notebook, also offers itself under
`THEMED_MIME`. The glm-workbench JupyterLab extension renders that type with JupyterLab's theme colours (dark
figures in the dark theme, redrawn when the theme changes); every other front end uses plotly's own type. So
no colour here may assume a light background.

Axes follow one convention: y = the model's layer index (`trace.layer_ids`), x = token position or expert id.
A "tokenizer" is anything with `decode(list[int]) -> str`; without one, tokens show as `#id` (or the texts in
`trace.token_texts`, which the server sends).
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from workbench import analysis
from workbench.engine.routing import RoutingTrace

# Expert ids are categories, not quantities: neighbouring ids are no more alike than distant ones, so a
# continuous scale would invent an order. Kelly's colours of maximum contrast (white, black and the darkest
# olive left out so that every colour shows on light and dark backgrounds); beyond 19 experts colours repeat,
# and the cells carry the id as text (hover names it too).
EXPERT_PALETTE = (
    "#F3C300", "#875692", "#F38400", "#A1CAF1", "#BE0032", "#C2B280", "#848482", "#008856", "#E68FAC", "#0067A5",
    "#F99379", "#604E97", "#F6A600", "#B3446C", "#DCD300", "#882D17", "#8DB600", "#654522", "#E25822",
)
# Cells wider than this many token columns are too narrow for their expert id as text.
MAX_LABELLED_COLUMNS = 64
# Ratios to a baseline (relative load, lift): blue under 1, white at 1, red over. plotly's zmid with zmin=0
# stretches the scale to a symmetric range and labels the colour bar with impossible negative values, so the
# white stop is placed at 1 on a [0, top] scale instead (see `_around_one`).
RATIO_BLUE, RATIO_WHITE, RATIO_RED = "#2166ac", "#f7f7f7", "#b2182b"
BOUNDARY_COLOUR = "rgba(128, 128, 128, 0.9)"  # the prompt / generated line: visible on light and dark themes
# The mime type the glm-workbench JupyterLab extension renders in JupyterLab's theme (labextension/src/
# routingFigure.ts); the payload is plotly's own ({data, layout, config}).
THEMED_MIME = "application/vnd.glm-workbench.plotly+json"
PLOTLY_MIME = "application/vnd.plotly.v1+json"


class RoutingFigure(go.Figure):
    """A plotly figure whose notebook display also offers `THEMED_MIME` (see the module docstring)."""

    def _repr_mimebundle_(self, include=None, exclude=None, validate=True, **kwargs):
        bundle = super()._repr_mimebundle_(include, exclude, validate, **kwargs)
        return with_themed_mime(bundle)

    def _ipython_display_(self) -> None:
        # IPython asks _ipython_display_ before _repr_mimebundle_, and plotly's goes through pio.show, which
        # never sees the themed type; renderers that are not mime types (a browser tab, say) keep plotly's way.
        import plotly.io as pio
        from IPython.display import display

        bundle = self._repr_mimebundle_() if pio.renderers.render_on_display and pio.renderers.default else {}
        if THEMED_MIME in bundle:
            display(bundle, raw=True)
        else:
            super()._ipython_display_()


def with_themed_mime(bundle: dict) -> dict:
    """`bundle` plus the themed copy of its plotly figure (unchanged when it holds none)."""
    if isinstance(bundle, dict) and PLOTLY_MIME in bundle:
        bundle = {THEMED_MIME: bundle[PLOTLY_MIME], **bundle}
    return bundle


def expert_colorscale(num_experts: int) -> list[list]:
    """A stepped colourscale giving expert e the flat band [e - 0.5, e + 0.5] of `EXPERT_PALETTE[e % 19]`
    (use with zmin=-0.5, zmax=num_experts - 0.5)."""
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    scale: list[list] = []
    for e in range(num_experts):
        colour = EXPERT_PALETTE[e % len(EXPERT_PALETTE)]
        scale += [[e / num_experts, colour], [(e + 1) / num_experts, colour]]
    return scale


# --- token text ---------------------------------------------------------------------------------------

def _printable(text: str) -> str:
    """A token's text made visible: spaces, newlines and tabs shown rather than swallowed."""
    return text.replace("\n", "⏎").replace("\t", "⇥").replace(" ", "·") or "∅"


def token_texts(trace: RoutingTrace, tokenizer=None) -> list[str]:
    """The text of each token column of `trace` (visible whitespace), for labels and hovers."""
    ids = trace.token_ids.tolist()
    if tokenizer is not None:
        if not callable(getattr(tokenizer, "decode", None)):
            raise TypeError("tokenizer must have a decode(list[int]) -> str method; got "
                            f"{type(tokenizer).__name__}")
        return [_printable(tokenizer.decode([i])) for i in ids]
    given = trace.token_texts
    if given is not None and len(given) == len(ids):
        return [_printable(str(t)) for t in given]
    return [f"#{i}" for i in ids]


def _shared_experts(trace: RoutingTrace) -> int:
    # GLM-4.5 family models all carry one shared expert; a trace can say otherwise in its meta.
    return int(trace.meta.get("n_shared_experts", 1))


def _layer_labels(trace: RoutingTrace) -> list[str]:
    return [f"L{layer}" for layer in trace.layer_ids]


def _height_for_rows(rows: int, per_row: int = 18, base: int = 160, minimum: int = 320) -> int:
    return max(minimum, base + per_row * rows)


def _around_one(values: np.ndarray) -> dict:
    """Heatmap colour settings for ratios to a baseline: 0 blue, 1 white, the top (at least 2) red."""
    finite = values[np.isfinite(values)]
    top = max(2.0, float(np.ceil(finite.max()))) if finite.size else 2.0
    return dict(zmin=0.0, zmax=top, colorscale=[[0.0, RATIO_BLUE], [1.0 / top, RATIO_WHITE], [1.0, RATIO_RED]])


def _title(text: str, subtitle: str = "") -> dict:
    """A title that fits a narrow notebook: a short line, the details on a smaller second line, both at the left
    (a centred long title ran off both edges). The second line is part of the text, not plotly's `subtitle`,
    which plotly.js misplaces onto the title when a figure is redrawn in another theme."""
    if subtitle:
        text += f"<br><span style='font-size:11px'>{html.escape(subtitle)}</span>"
    # At the figure's top, inside the top margin (t >= 90 in every figure here), which leaves room between it
    # and the plot area for the labels drawn just above the plot ("generated →", subplot titles). plotly.js
    # raises a two-line title by about a line, so the pad brings its first line back inside the figure.
    return dict(text=text, x=0, xref="paper", xanchor="left", y=1, yref="container", yanchor="top",
                pad=dict(t=28 if subtitle else 10), font=dict(size=15))


# --- token x layer grid -------------------------------------------------------------------------------

def token_grid(trace: RoutingTrace, tokenizer=None, *, layers: Sequence[int] | None = None,
               expert: int | None = None, start: int = 0, max_tokens: int = 256) -> go.Figure:
    """Token x layer grid: each cell coloured by the token's first-choice expert in that layer.

    Hover: the token text and its top-K experts with weights (and the always-on shared expert).
    `layers` picks model layers (default all), `expert` shows only the cells whose top-K holds that expert
    (coloured by its weight), and `start`/`max_tokens` choose the window of token columns drawn.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if not 0 <= start < max(trace.num_tokens, 1):
        raise ValueError(f"start={start} is outside the trace's {trace.num_tokens} tokens")
    if expert is not None and not 0 <= expert < trace.num_experts:
        raise ValueError(f"expert {expert} does not exist: this model has experts 0..{trace.num_experts - 1}")
    stop = min(trace.num_tokens, start + max_tokens)
    rows = [analysis.layer_row(trace, layer) for layer in (layers if layers is not None else trace.layer_ids)]
    layer_ids = [trace.layer_ids[r] for r in rows]
    ids = trace.expert_ids[rows, start:stop].numpy().astype(np.int64)  # [L', T', K]
    weights = trace.weights[rows, start:stop].float().numpy()
    texts = token_texts(trace, tokenizer)[start:stop]
    shared = _shared_experts(trace)
    shared_note = f"<br>+ {shared} shared expert{'s' if shared > 1 else ''} (every token)" if shared else ""

    hover = np.empty(ids.shape[:2], dtype=object)
    for r, layer in enumerate(layer_ids):
        for t in range(ids.shape[1]):
            position = start + t
            part = "prompt" if position < trace.prompt_len else "generated"
            choices = ", ".join(f"e{e} {w:.2f}" for e, w in zip(ids[r, t], weights[r, t], strict=True))
            hover[r, t] = (f"<b>{html.escape(texts[t])}</b> (token {position}, {part})<br>layer {layer}"
                           f"<br>top-{trace.top_k}: {choices}{shared_note}")
    positions = list(range(start, stop))
    if expert is None:
        z = ids[..., 0].astype(float)
        experts = trace.num_experts
        # A categorical legend: one tick per expert id while they fit, else the cells' text and hover name it.
        ticks = dict(tickvals=list(range(experts)), ticktext=[f"e{e}" for e in range(experts)]) \
            if experts <= 32 else {}
        colour = dict(colorscale=expert_colorscale(experts), zmin=-0.5, zmax=experts - 0.5,
                      colorbar=dict(title="expert", **ticks))
        if len(positions) <= MAX_LABELLED_COLUMNS:
            colour.update(texttemplate="%{z:d}", textfont=dict(size=9))
        title = "First-choice expert per token and layer"
        colorbar_px = 14 * experts if ticks else 0  # a legible tick per expert on the colour bar
        subtitle = f"top-{trace.top_k} of {trace.num_experts} routed experts"  # the title says the cell's is the first
    else:
        hit = ids == expert
        z = np.where(hit.any(-1), (weights * hit).sum(-1), np.nan)
        colour = dict(colorscale="Viridis", zmin=0, zmax=1, colorbar=dict(title="weight"))
        title = f"Tokens routed to expert {expert}"
        colorbar_px = 0
        subtitle = "colour = its weight; blank = not in the token's top-K"
    if shared:
        subtitle += f"; + {shared} shared expert{'s' if shared > 1 else ''}"
    fig = RoutingFigure(go.Heatmap(z=z, x=positions, y=[f"L{x}" for x in layer_ids],
                                   text=hover, hovertemplate="%{text}<extra></extra>", xgap=1, ygap=1, **colour))
    if start < trace.prompt_len < stop:
        # The boundary's labels sit above the plot area (not over the cells), on either side of the line.
        boundary = trace.prompt_len - 0.5
        fig.add_vline(x=boundary, line=dict(color=BOUNDARY_COLOUR, dash="dash", width=2))
        for text, anchor in (("← prompt ", "right"), (" generated →", "left")):
            fig.add_annotation(x=boundary, y=1, xref="x", yref="paper", yanchor="bottom", xanchor=anchor,
                               text=text, showarrow=False, font=dict(size=11))
    fig.update_layout(
        title=_title(title, subtitle),
        height=max(_height_for_rows(len(layer_ids)) + 40, 180 + colorbar_px), margin=dict(l=60, r=20, t=100, b=80),
        xaxis=dict(title="token", tickmode="array", tickvals=positions, ticktext=texts, tickangle=-60,
                   showgrid=False),
        yaxis=dict(title="layer", autorange="reversed", type="category"),
    )
    return fig


# --- load and imbalance -------------------------------------------------------------------------------

def load_heatmap(trace: RoutingTrace) -> go.Figure:
    """Layer x expert heatmap of relative load (1 = fair share), with each layer's imbalance beside it."""
    relative = analysis.relative_load(trace)
    imb = analysis.imbalance(trace)
    labels = _layer_labels(trace)
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, column_widths=[0.78, 0.22],
                        horizontal_spacing=0.03, figure=RoutingFigure(),
                        subplot_titles=("relative load (E x share; 1 = balanced)", "imbalance per layer"))
    counts = (analysis.load(trace) * trace.num_tokens * trace.top_k).round().astype(int)
    fig.add_trace(go.Heatmap(
        z=relative, x=list(range(trace.num_experts)), y=labels, customdata=counts,
        colorbar=dict(title="load", x=1.0, xanchor="left"), **_around_one(relative),
        hovertemplate=("layer %{y}, expert %{x}<br>relative load %{z:.2f}<br>%{customdata} tokens"
                       "<extra></extra>"),
    ), row=1, col=1)
    dead = imb.num_dead
    for name, values in (("cv", imb.cv), ("max violation", imb.max_violation), ("entropy", imb.entropy)):
        fig.add_trace(go.Scatter(
            x=values, y=labels, name=name, mode="lines+markers", customdata=dead,
            hovertemplate=f"%{{y}}: {name} %{{x:.3f}}<br>dead experts: %{{customdata}}<extra></extra>",
        ), row=1, col=2)
    fig.update_yaxes(title_text="layer", autorange="reversed", type="category", row=1, col=1)
    fig.update_xaxes(title_text="expert", row=1, col=1)
    fig.update_xaxes(title_text="value", row=1, col=2)
    # the colour bar right of both panels (it sat on the imbalance panel), the legend at the figure's bottom edge
    # (it covered the expert axis title)
    fig.update_layout(height=_height_for_rows(trace.num_layers) + 90,
                      legend=dict(orientation="h", yref="container", y=0, yanchor="bottom", x=1, xanchor="right"),
                      margin=dict(t=110, b=110, r=90),
                      title=_title(f"Expert load over {trace.num_tokens} tokens",
                                   f"mean entropy {float(np.mean(imb.entropy)):.3f}, dead experts {int(dead.sum())}"))
    return fig


# --- co-activation ------------------------------------------------------------------------------------

def coactivation_heatmap(trace: RoutingTrace, layer: int) -> go.Figure:
    """Expert x expert lift of co-activation at one model layer (1 = as often as random pairs)."""
    co = analysis.coactivation(trace, layer)
    lift = co.lift.copy()
    np.fill_diagonal(lift, np.nan)  # an expert with itself is not a pair
    custom = np.stack([co.conditional, co.counts.astype(float)], axis=-1)
    experts = list(range(trace.num_experts))
    fig = RoutingFigure(go.Heatmap(
        z=lift, x=experts, y=experts, customdata=custom, **_around_one(lift),
        colorbar=dict(title="lift"),
        hovertemplate=("experts %{y} and %{x}<br>P(%{x} | %{y}) = %{customdata[0]:.3f}<br>"
                       "together on %{customdata[1]} tokens<br>lift %{z:.2f}<extra></extra>"),
    ))
    expected = (trace.top_k - 1) / max(trace.num_experts - 1, 1)
    fig.update_layout(
        title=_title(f"Co-activation at layer {layer}", f"lift = P(j | i) / {expected:.3f} (random pairs)"),
        margin=dict(t=90),
        xaxis=dict(title="expert j", constrain="domain"),
        yaxis=dict(title="expert i", autorange="reversed", scaleanchor="x"),
        height=max(420, min(900, 8 * trace.num_experts + 200)),
    )
    return fig


# --- locality -----------------------------------------------------------------------------------------

def locality_chart(trace: RoutingTrace) -> go.Figure:
    """Per layer, how often consecutive tokens reuse experts, each against its random baseline (dashed)."""
    loc = analysis.locality(trace)
    labels = _layer_labels(trace)
    fig = RoutingFigure()
    series = (("r1: same first choice", loc.r1, loc.r1_random, "#1f77b4"),
              ("r_any: top-K sets meet", loc.r_any, loc.r_any_random, "#d62728"),
              ("overlap: |S_t n S_t+1| / K", loc.overlap, loc.overlap_random, "#2ca02c"))
    for name, values, baseline, colour in series:
        fig.add_trace(go.Scatter(
            x=labels, y=values, name=name, mode="lines+markers", line=dict(color=colour),
            hovertemplate=f"%{{x}}: %{{y:.3f}} (random {baseline:.3f})<extra>{name}</extra>"))
        fig.add_trace(go.Scatter(x=labels, y=[baseline] * len(labels), name=f"random ({baseline:.3f})",
                                 mode="lines", line=dict(color=colour, dash="dash"), hoverinfo="skip"))
    fig.update_layout(title=_title("Routing locality per layer", "against independent random routing (dashed)"),
                      margin=dict(t=90),
                      xaxis=dict(title="layer", type="category"), yaxis=dict(title="share", range=[0, 1.02]),
                      height=420)
    return fig


# --- expert card --------------------------------------------------------------------------------------

def expert_card(trace: RoutingTrace, layer: int, expert: int, tokenizer=None, *, context: int = 4,
                max_rows: int = 40) -> go.Figure:
    """The tokens routed to one (layer, expert): its most frequent tokens and the contexts it saw them in."""
    row = analysis.layer_row(trace, layer)
    if not 0 <= expert < trace.num_experts:
        raise ValueError(f"expert {expert} does not exist: this model has experts 0..{trace.num_experts - 1}")
    ids = trace.expert_ids[row].numpy().astype(np.int64)  # [T, K]
    weights = trace.weights[row].float().numpy()
    texts = token_texts(trace, tokenizer)
    hit_positions, hit_ranks = np.nonzero(ids == expert)
    share = len(hit_positions) / max(trace.num_tokens, 1)

    by_text: dict[str, int] = {}
    for t in hit_positions:
        by_text[texts[t]] = by_text.get(texts[t], 0) + 1
    top = sorted(by_text.items(), key=lambda kv: -kv[1])[:20]

    shown = list(zip(hit_positions[:max_rows], hit_ranks[:max_rows], strict=True))
    # Sized in pixels, so that the table is as tall as its rows (no blank area under a short one) and the bars'
    # tick labels have their own gap above the table's title (they ran into it before).
    bar_px, gap_px, header_px, row_px = 200, 100, 26, 22
    table_px = header_px + row_px * min(max(len(shown), 1), 14) + 8  # longer tables scroll inside the figure
    plot_px = bar_px + gap_px + table_px
    fig = make_subplots(rows=2, cols=1, row_heights=[bar_px, table_px], vertical_spacing=gap_px / plot_px,
                        specs=[[{"type": "xy"}], [{"type": "table"}]], figure=RoutingFigure(),
                        subplot_titles=("most frequent tokens (times routed here)",
                                        "contexts (the routed token in [brackets])"))
    fig.add_trace(go.Bar(x=[t for t, _ in top], y=[n for _, n in top], name="tokens",
                         hovertemplate="%{x}: %{y} times<extra></extra>"), row=1, col=1)
    contexts = [
        "".join(texts[max(0, t - context):t]) + f"[{texts[t]}]" + "".join(texts[t + 1:t + 1 + context])
        for t, _ in shown
    ]
    fig.add_trace(go.Table(
        columnwidth=[60, 50, 60, 400],
        header=dict(values=["token", "rank", "weight", "context"], align="left", height=header_px),
        cells=dict(values=[[int(t) for t, _ in shown], [int(k) + 1 for _, k in shown],
                           [f"{weights[t, k]:.3f}" for t, k in shown], contexts], align="left", height=row_px),
    ), row=2, col=1)
    fig.update_xaxes(tickangle=-45, automargin=False, row=1, col=1)
    fig.update_yaxes(title_text="times", row=1, col=1)
    more = f"; first {max_rows} shown" if len(hit_positions) > max_rows else ""
    top_px, bottom_px = 100, 20
    fig.update_layout(
        title=_title(f"Layer {layer}, expert {expert}: {len(hit_positions)} of {trace.num_tokens} tokens",
                     f"{share:.1%} of the tokens; a fair share is {trace.top_k / trace.num_experts:.1%}{more}"),
        height=plot_px + top_px + bottom_px, margin=dict(t=top_px, b=bottom_px), showlegend=False,
    )
    return fig


# --- comparing two traces -----------------------------------------------------------------------------

def comparison_chart(trace_a: RoutingTrace, trace_b: RoutingTrace,
                     labels: tuple[str, str] = ("a", "b")) -> go.Figure:
    """Agreement of two traces of the same tokens: per layer, and per token and layer."""
    per_layer = analysis.agreement(trace_a, trace_b)
    a = trace_a.expert_ids.numpy().astype(np.int64)
    b = trace_b.expert_ids.numpy().astype(np.int64)
    per_token = (a[..., :, None] == b[..., None, :]).sum(axis=(-1, -2)) / trace_a.top_k  # [L, T]
    layer_labels = _layer_labels(trace_a)
    baseline = trace_a.top_k / trace_a.num_experts
    fig = make_subplots(rows=2, cols=1, row_heights=[0.4, 0.6], vertical_spacing=0.12,
                        figure=RoutingFigure(),
                        subplot_titles=("agreement per layer: mean |S_a n S_b| / K",
                                        "agreement per token and layer"))
    fig.add_trace(go.Bar(x=layer_labels, y=per_layer, name="agreement",
                         hovertemplate="%{x}: %{y:.3f}<extra></extra>"), row=1, col=1)
    fig.add_trace(go.Scatter(x=layer_labels, y=[baseline] * len(layer_labels), mode="lines",
                             name=f"random ({baseline:.3f})", line=dict(dash="dash", color=BOUNDARY_COLOUR)),
                  row=1, col=1)
    fig.add_trace(go.Heatmap(z=per_token, x=list(range(trace_a.num_tokens)), y=layer_labels, zmin=0, zmax=1,
                             colorscale="Viridis", colorbar=dict(title="agree", y=0.3, len=0.6),
                             hovertemplate="%{y}, token %{x}: %{z:.2f}<extra></extra>"), row=2, col=1)
    fig.update_yaxes(title_text="agreement", range=[0, 1.02], row=1, col=1)
    fig.update_xaxes(type="category", title_text="layer", row=1, col=1)
    fig.update_yaxes(title_text="layer", autorange="reversed", type="category", row=2, col=1)
    fig.update_xaxes(title_text="token", row=2, col=1)
    mean = float(per_layer.mean())
    fig.update_layout(title=_title(f"Routing agreement: {labels[0]} vs {labels[1]}", f"mean {mean:.3f}"),
                      margin=dict(t=90),
                      height=_height_for_rows(trace_a.num_layers, minimum=520, base=360), showlegend=True)
    return fig


# --- export -------------------------------------------------------------------------------------------

def save_html(figures: go.Figure | Sequence[go.Figure], path: str | Path) -> Path:
    """Write figures into one standalone HTML file with plotly.js inlined once (opens offline)."""
    figures = [figures] if isinstance(figures, go.Figure) else list(figures)
    if not figures:
        raise ValueError("save_html needs at least one figure")
    parts = [fig.to_html(full_html=False, include_plotlyjs=(i == 0)) for i, fig in enumerate(figures)]
    path = Path(path)
    path.write_text("<!DOCTYPE html><html><head><meta charset='utf-8'><title>GLM Workbench routing</title>"
                    "</head><body>" + "\n".join(parts) + "</body></html>", encoding="utf-8")
    return path
