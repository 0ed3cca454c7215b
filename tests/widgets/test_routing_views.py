"""Every routing view builds from a real trace of the engine (a tiny random GLM checkpoint) with the right axes."""

from __future__ import annotations

import html
import json
import re

import numpy as np
import plotly.graph_objects as go
import pytest
import torch

from workbench import analysis, widgets
from workbench.engine import Engine, RoutingTrace
from workbench.engine.testing import write_tiny_checkpoint

PROMPT = "def fizzbuzz(n):\n    for i in range(1, n + 1):"


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    torch.manual_seed(0)
    folder = write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model", "tiny", seed=0)
    return Engine.from_pretrained(folder, dtype="float32", device="cpu", kernels="torch")


@pytest.fixture(scope="module")
def generated(engine):
    ids = engine.tokenizer.encode(PROMPT)
    result = engine.generate(ids, max_new_tokens=12, temperature=0.0, routing=True)
    assert isinstance(result.routing, RoutingTrace)
    return ids, result


@pytest.fixture(scope="module")
def trace(generated) -> RoutingTrace:
    return generated[1].routing


def heatmaps(fig: go.Figure) -> list[go.Heatmap]:
    return [t for t in fig.data if isinstance(t, go.Heatmap)]


def test_the_engine_trace_has_the_tiny_model_shape(engine, trace):
    config = engine.config
    assert trace.layer_ids == config.moe_layer_ids == [1, 2]
    assert trace.num_experts == config.n_routed_experts and trace.top_k == config.num_experts_per_tok


def test_token_grid_axes_and_hover(engine, trace):
    fig = widgets.token_grid(trace, engine.tokenizer)
    (grid,) = heatmaps(fig)
    z = np.asarray(grid.z, dtype=float)
    assert z.shape == (trace.num_layers, trace.num_tokens)
    assert list(grid.y) == ["L1", "L2"]
    assert list(grid.x) == list(range(trace.num_tokens))
    # Colour = the first-choice expert of each (layer, token), on a categorical scale: each id its own flat band
    # of a qualitative palette (ids are categories: no continuous ramp), its id written in the cell.
    np.testing.assert_array_equal(z, trace.expert_ids[:, :, 0].numpy())
    assert (grid.zmin, grid.zmax) == (-0.5, trace.num_experts - 0.5)
    assert grid.texttemplate == "%{z:d}"
    assert list(grid.colorbar.tickvals) == list(range(trace.num_experts))
    assert fig.layout.xaxis.title.text == "token" and fig.layout.yaxis.title.text == "layer"
    # Tick labels are the tokens' own text; the hover names the top-K with weights and the shared expert.
    texts = widgets.token_texts(trace, engine.tokenizer)
    assert list(fig.layout.xaxis.ticktext) == texts
    assert "".join(texts).replace("·", " ").replace("⏎", "\n").startswith(PROMPT)
    hover = grid.text[1][3]
    first, second = trace.expert_ids[1, 3].tolist()
    assert f"e{first} " in hover and f"e{second} " in hover and "layer 2" in hover
    assert "shared expert" in hover and "shared expert" in fig.layout.title.text.split("<br>")[1]
    # The prompt / generated boundary is drawn, its labels above the plot area (they covered cells before).
    assert any(shape.x0 == trace.prompt_len - 0.5 for shape in fig.layout.shapes)
    labels = {a.text.strip(): a for a in fig.layout.annotations}
    assert set(labels) == {"← prompt", "generated →"}
    assert all(a.yref == "paper" and a.y == 1 and a.yanchor == "bottom" for a in labels.values())
    assert labels["generated →"].xanchor == "left" and labels["← prompt"].xanchor == "right"


def test_expert_colours_are_categorical():
    scale = widgets.figures.expert_colorscale(16)
    # Two stops per expert: a flat band [e/16, (e+1)/16] of one colour; neighbours differ.
    assert len(scale) == 32 and scale[0][0] == 0 and scale[-1][0] == 1
    colours = [scale[2 * e][1] for e in range(16)]
    assert all(scale[2 * e + 1][1] == colours[e] for e in range(16))
    assert len(set(colours)) == 16, "16 experts, 16 distinct colours"
    many = widgets.figures.expert_colorscale(128)
    assert {c for _, c in many} == set(widgets.figures.EXPERT_PALETTE)  # beyond the palette, colours repeat
    with pytest.raises(ValueError, match="num_experts"):
        widgets.figures.expert_colorscale(0)


def test_long_grids_leave_the_ids_to_the_hover():
    trace = analysis.random_trace(2, 100, 8, 2)
    (grid,) = heatmaps(widgets.token_grid(trace, max_tokens=100))
    assert grid.texttemplate is None  # 100 columns: cells too narrow for text
    (grid,) = heatmaps(widgets.token_grid(trace, max_tokens=40))
    assert grid.texttemplate == "%{z:d}"


def test_token_grid_expert_filter_layers_and_window(trace):
    expert = int(trace.expert_ids[0, 0, 0])
    fig = widgets.token_grid(trace, layers=[2], expert=expert, start=2, max_tokens=5)
    (grid,) = heatmaps(fig)
    z = np.asarray(grid.z, dtype=float)
    assert z.shape == (1, 5) and list(grid.y) == ["L2"] and list(grid.x) == [2, 3, 4, 5, 6]
    chosen = (trace.expert_ids[1, 2:7] == expert).any(-1).numpy()
    assert (~np.isnan(z[0]) == chosen).all()
    # Without a tokenizer, tokens show as their ids.
    assert list(fig.layout.xaxis.ticktext) == [f"#{i}" for i in trace.token_ids[2:7].tolist()]
    with pytest.raises(ValueError, match="experts 0..7"):
        widgets.token_grid(trace, expert=8)
    with pytest.raises(ValueError, match="not a MoE layer"):
        widgets.token_grid(trace, layers=[0])


def test_load_heatmap_axes_and_imbalance(trace):
    fig = widgets.load_heatmap(trace)
    (heat,) = heatmaps(fig)
    z = np.asarray(heat.z, dtype=float)
    assert z.shape == (trace.num_layers, trace.num_experts)
    np.testing.assert_allclose(z, analysis.relative_load(trace))
    np.testing.assert_allclose(z.mean(axis=1), 1.0)
    assert list(heat.x) == list(range(trace.num_experts)) and list(heat.y) == ["L1", "L2"]
    beside = {t.name: t for t in fig.data if isinstance(t, go.Scatter)}
    assert set(beside) == {"cv", "max violation", "entropy"}
    np.testing.assert_allclose(beside["entropy"].x, analysis.imbalance(trace).entropy)
    assert fig.layout.xaxis.title.text == "expert" and fig.layout.yaxis.title.text == "layer"
    # a ratio scale from 0 with white at 1 (zmid=1 with zmin=0 made plotly label the bar with negative loads), its
    # colour bar right of both panels
    assert heat.zmin == 0 and heat.zmid is None and heat.zmax >= max(2, z.max())
    assert heat.colorscale[1][0] == pytest.approx(1 / heat.zmax) and heat.colorbar.x >= 1


def test_coactivation_heatmap(trace):
    fig = widgets.coactivation_heatmap(trace, layer=2)
    (heat,) = heatmaps(fig)
    lift = np.asarray(heat.z, dtype=float)
    assert lift.shape == (trace.num_experts, trace.num_experts)
    assert np.isnan(np.diag(lift)).all()
    expected = analysis.coactivation(trace, 2).lift
    off = ~np.eye(trace.num_experts, dtype=bool)
    np.testing.assert_array_equal(np.isnan(lift[off]), np.isnan(expected[off]))
    np.testing.assert_allclose(lift[off][~np.isnan(lift[off])], expected[off][~np.isnan(expected[off])])
    assert "layer 2" in fig.layout.title.text
    assert fig.layout.xaxis.title.text == "expert j" and fig.layout.yaxis.title.text == "expert i"


def test_locality_chart_against_baselines(trace):
    fig = widgets.locality_chart(trace)
    loc = analysis.locality(trace)
    lines = {t.name: t for t in fig.data}
    assert len(fig.data) == 6  # three metrics, each with its dashed random baseline
    np.testing.assert_allclose(lines["r1: same first choice"].y, loc.r1)
    assert lines[f"random ({loc.r_any_random:.3f})"].line.dash == "dash"
    assert list(lines["r1: same first choice"].x) == ["L1", "L2"]


def test_expert_card_lists_the_routed_tokens(engine, trace):
    layer_row, expert = 0, int(trace.expert_ids[0, 0, 0])
    fig = widgets.expert_card(trace, layer=1, expert=expert, tokenizer=engine.tokenizer)
    table = next(t for t in fig.data if isinstance(t, go.Table))
    routed = np.nonzero((trace.expert_ids[layer_row] == expert).any(-1).numpy())[0]
    assert list(table.cells.values[0]) == routed.tolist()[:40]
    assert f"expert {expert}: {len(routed)} of {trace.num_tokens} tokens" in fig.layout.title.text
    bar = next(t for t in fig.data if isinstance(t, go.Bar))
    assert sum(bar.y) == len(routed) or len(bar.x) == 20
    # Laid out in pixels: the table's domain holds its rows (no blank area under them), and the gap between the
    # bars and the table's title leaves room for the bars' tick labels (no axis title to collide with it).
    assert fig.layout.xaxis.title.text is None
    plot_px = fig.layout.height - fig.layout.margin.t - fig.layout.margin.b
    bars_bottom = fig.layout.yaxis.domain[0] * plot_px
    table_top = table.domain.y[1] * plot_px
    assert bars_bottom - table_top >= 90
    rows_px = 26 + 22 * min(len(routed), 14)
    assert rows_px <= table_top <= rows_px + 20
    with pytest.raises(ValueError, match="not a MoE layer"):
        widgets.expert_card(trace, layer=7, expert=0)


def test_expert_card_height_follows_its_rows():
    few = widgets.expert_card(analysis.random_trace(1, 3, 8, 2), layer=1, expert=0)
    many = widgets.expert_card(analysis.random_trace(1, 200, 8, 2), layer=1, expert=0)
    assert few.layout.height < many.layout.height <= 800  # long tables scroll inside


def test_comparison_of_prefill_and_decode(engine, generated):
    prompt_ids, result = generated
    decoded = result.routing
    # Re-run prompt + answer as one prefill: greedy decode and prefill of the same tokens should route alike.
    prefill = engine.generate(prompt_ids + result.token_ids, max_new_tokens=1, temperature=0.0,
                              routing=True).routing.slice_tokens(0, decoded.num_tokens)
    fig = widgets.comparison_chart(decoded, prefill, labels=("decode", "prefill"))
    bar = next(t for t in fig.data if isinstance(t, go.Bar))
    np.testing.assert_allclose(bar.y, analysis.agreement(decoded, prefill))
    assert list(bar.x) == ["L1", "L2"]
    (heat,) = heatmaps(fig)
    assert np.asarray(heat.z).shape == (decoded.num_layers, decoded.num_tokens)
    assert min(bar.y) > 0.9, "prefill and decode of the same tokens should pick (almost) the same experts"


def test_routing_view_tabs_and_controls(engine, trace):
    view = widgets.routing_view(trace, engine.tokenizer, compare=trace)
    assert view.tab_names == ["tokens", "load", "coactivation", "locality", "expert", "compare"]
    assert set(view.figures) == {"tokens"}  # other tabs are drawn when opened
    for index, name in enumerate(view.tab_names):
        view.tabs.selected_index = index
        assert name in view.figures
        bundle = view.outputs[name].outputs[0]["data"]
        assert "application/vnd.plotly.v1+json" in bundle
        # the same figure for the extension's renderer that follows JupyterLab's theme
        assert bundle[widgets.figures.THEMED_MIME] == bundle["application/vnd.plotly.v1+json"]
    # Controls redraw their figure.
    view.expert_filter.value = 3
    assert "expert 3" in view.figures["tokens"].layout.title.text
    view.layer_range.value = (2, 2)
    assert list(heatmaps(view.figures["tokens"])[0].y) == ["L2"]
    view.co_layer.value = 1
    assert "layer 1" in view.figures["coactivation"].layout.title.text
    view.card_expert.value = 5
    assert "expert 5" in view.figures["expert"].layout.title.text


def test_views_need_no_cdn(trace, tmp_path):
    view = widgets.routing_view(trace)
    bundle = json.dumps(view.outputs["tokens"].outputs[0]["data"])
    assert "cdn" not in bundle.lower()
    path = widgets.save_html([widgets.load_heatmap(trace), widgets.locality_chart(trace)], tmp_path / "r.html")
    page = path.read_text(encoding="utf-8")
    assert '<script src="http' not in page and "<script src='http" not in page
    assert page.count("Plotly.newPlot") == 2 and len(page) > 1_000_000  # plotly.js is inlined once


def test_one_token_trace_shows_why_locality_is_missing(trace):
    view = widgets.routing_view(trace.slice_tokens(0, 1))
    view.redraw("locality")
    assert "locality" not in view.figures
    assert "at least 2 token" in view.outputs["locality"].outputs[0]["data"]["text/plain"]


def test_show_and_bad_input(trace, capsys):
    assert trace.show() is None  # displays (prints the widget repr outside a kernel) and returns nothing
    with pytest.raises(TypeError, match="RoutingTrace"):
        widgets.show_routing({"expert_ids": []})
    with pytest.raises(TypeError, match="decode"):
        widgets.token_grid(trace, tokenizer=object())
    with pytest.raises(ValueError, match="same model"):
        widgets.routing_view(trace, compare=analysis.random_trace(2, trace.num_tokens, 9, 2))


def test_views_of_a_server_trace_round_trip(trace):
    # The server sends traces as JSON (RoutingTrace.to_dict); the views read them back the same.
    again = RoutingTrace.from_dict(json.loads(json.dumps(trace.to_dict())))
    np.testing.assert_array_equal(heatmaps(widgets.token_grid(again))[0].z, heatmaps(widgets.token_grid(trace))[0].z)


def test_figures_offer_the_themed_mime_in_a_notebook(trace, monkeypatch):
    import plotly.io as pio

    monkeypatch.setattr(pio.renderers, "default", "plotly_mimetype")
    for fig in (widgets.token_grid(trace), widgets.load_heatmap(trace), widgets.coactivation_heatmap(trace, 1),
                widgets.locality_chart(trace), widgets.expert_card(trace, 1, 0),
                widgets.comparison_chart(trace, trace)):
        bundle = fig._repr_mimebundle_()
        assert bundle[widgets.figures.THEMED_MIME] == bundle["application/vnd.plotly.v1+json"], fig.layout.title.text
        # nothing that vanishes on a dark background: no black or white set by hand
        spec = json.dumps(fig.to_plotly_json()["layout"].get("shapes", []))
        assert '"black"' not in spec and '"white"' not in spec
    assert widgets.figures.with_themed_mime({"text/plain": "x"}) == {"text/plain": "x"}


def test_a_figure_displayed_in_a_kernel_carries_the_themed_mime(trace, monkeypatch):
    import plotly.io as pio
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.display import display
    from IPython.utils.capture import capture_output

    InteractiveShell.instance()
    monkeypatch.setattr(pio.renderers, "default", "plotly_mimetype")
    with capture_output() as captured:
        display(widgets.load_heatmap(trace))  # what a cell ending in a figure does
    (output,) = captured.outputs
    assert widgets.figures.THEMED_MIME in output.data and "application/vnd.plotly.v1+json" in output.data


def test_titles_fit_a_narrow_notebook(trace):
    # Short titles at the left, details in the subtitle: a centred 90-character title was cut off at both sides.
    for fig in (widgets.token_grid(trace), widgets.token_grid(trace, expert=0), widgets.load_heatmap(trace),
                widgets.coactivation_heatmap(trace, 1), widgets.locality_chart(trace),
                widgets.expert_card(trace, 1, 0), widgets.comparison_chart(trace, trace)):
        title = fig.layout.title
        first_line, *details = title.text.split("<br>")
        assert len(first_line) <= 60 and title.xanchor == "left" and title.x == 0, title.text
        # the details line too: 90 characters ran past a notebook narrowed by the chat sidebar (~600 px)
        assert all(len(html.unescape(re.sub("<[^>]+>", "", line))) <= 72 for line in details), title.text
        assert fig.layout.margin.t >= 90
