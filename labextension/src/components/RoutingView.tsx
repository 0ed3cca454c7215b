/**
 * The routing panel of one answer from the local engine: a layer x expert load heatmap, the token x layer
 * grid of top experts, and, for the token the user clicks (in the grid or the token strip), its experts
 * and weights in every layer.
 *
 * plotly.js is bundled with the extension (no CDN) and loaded on first use, so the sidebar does not pay
 * for it. Colours come from the JupyterLab theme (plotlyTheme.ts), so the plots follow light and dark themes;
 * expert ids, being categories, get the categorical palette there rather than a colour ramp.
 */

import React, { useEffect, useMemo, useRef, useState } from 'react';

import type { RoutingData } from '../protocol';
import {
  checkRouting,
  expertLoad,
  tokenExperts,
  tokenIndices,
  tokenLabels,
  type TokenRange,
  topExpertGrid
} from '../routingData';
import { expertColorscale, loadPlotly, readTheme, themedLayout } from '../plotlyTheme';

function Plot({
  data,
  layout,
  label,
  onClick,
  themeVersion
}: {
  data: Record<string, unknown>[];
  layout: Record<string, unknown>;
  label: string;
  onClick?: (point: { x: unknown; y: unknown; pointIndex: unknown }) => void;
  themeVersion: number;
}): JSX.Element {
  const ref = useRef<HTMLDivElement>(null);
  const [error, setError] = useState<string | null>(null);
  useEffect(() => {
    let cancelled = false;
    const el = ref.current;
    if (!el) {
      return;
    }
    loadPlotly()
      .then(Plotly => {
        if (cancelled) {
          return;
        }
        const themed = themedLayout({ font: { size: 11 }, margin: { l: 60, r: 20, t: 40, b: 50 }, ...layout }, readTheme());
        return Plotly.react(el, data as never, themed as never, { responsive: true, displaylogo: false }).then(() => {
          if (onClick) {
            const plot = el as unknown as { removeAllListeners?: (e: string) => void; on: Function };
            plot.removeAllListeners?.('plotly_click');
            plot.on('plotly_click', (event: { points: Array<{ x: unknown; y: unknown; pointIndex: unknown }> }) =>
              onClick(event.points[0])
            );
          }
        });
      })
      .catch(e => setError(`Could not draw the plot: ${(e as Error).message}`));
    return () => {
      cancelled = true;
    };
  }, [data, layout, onClick, themeVersion]);
  useEffect(() => {
    const el = ref.current;
    return () => {
      if (el) {
        void loadPlotly().then(Plotly => Plotly.purge(el));
      }
    };
  }, []);
  return (
    <div className="glm-Plot" role="img" aria-label={label}>
      {error && <div className="glm-Note glm-mod-error">{error}</div>}
      <div ref={ref} className="glm-Plot-canvas" />
    </div>
  );
}

export function RoutingView({
  data,
  completionId,
  themeVersion
}: {
  data: RoutingData;
  completionId: string;
  themeVersion: number;
}): JSX.Element {
  const problem = useMemo(() => {
    try {
      checkRouting(data);
      return null;
    } catch (e) {
      return (e as Error).message;
    }
  }, [data]);
  const hasGenerated = data.token_ids.length > data.prompt_len;
  const [range, setRange] = useState<TokenRange>(hasGenerated ? 'generated' : 'all');
  const labels = useMemo(() => tokenLabels(data), [data]);
  const tokens = useMemo(() => tokenIndices(data, range), [data, range]);
  const [selected, setSelected] = useState<number | null>(null);

  const loadPlot = useMemo(() => {
    if (problem) {
      return null;
    }
    return {
      data: [
        {
          type: 'heatmap',
          z: expertLoad(data, range),
          x: Array.from({ length: data.num_experts }, (_, e) => e),
          y: data.layer_ids.map(l => `L${l}`),
          colorscale: 'Viridis',
          colorbar: { title: { text: 'share' } },
          hovertemplate: 'layer %{y}, expert %{x}<br>share of tokens %{z:.3f}<extra></extra>'
        }
      ],
      layout: {
        title: { text: 'Expert load per layer' },
        xaxis: { title: { text: 'expert' } },
        yaxis: { title: { text: 'layer' }, autorange: 'reversed' },
        height: Math.max(220, 40 + 22 * data.layer_ids.length)
      }
    };
  }, [data, range, problem]);

  const gridPlot = useMemo(() => {
    if (problem) {
      return null;
    }
    const z = topExpertGrid(data, tokens);
    const hover = data.expert_ids.map((layer, l) =>
      tokens.map(t =>
        layer[t].map((e, k) => `e${e} (${(data.weights[l]?.[t]?.[k] ?? 0).toFixed(2)})`).join(', ')
      )
    );
    return {
      data: [
        {
          type: 'heatmap',
          z,
          x: tokens,
          y: data.layer_ids.map(l => `L${l}`),
          text: hover,
          customdata: data.layer_ids.map(() => tokens.map(t => labels[t])),
          // expert ids are categories: one flat colour band per id, the id written in the cell while it fits
          colorscale: expertColorscale(data.num_experts),
          zmin: -0.5,
          zmax: data.num_experts - 0.5,
          xgap: 1,
          ygap: 1,
          ...(tokens.length <= 48 ? { texttemplate: '%{z:d}', textfont: { size: 9 } } : {}),
          colorbar: {
            title: { text: 'top expert' },
            ...(data.num_experts <= 32
              ? { tickvals: [...Array(data.num_experts).keys()], ticktext: [...Array(data.num_experts).keys()].map(e => `e${e}`) }
              : {})
          },
          hovertemplate: 'token %{x} “%{customdata}”, layer %{y}<br>experts: %{text}<extra></extra>'
        }
      ],
      layout: {
        title: { text: 'Top expert per token and layer' },
        xaxis: {
          title: { text: 'token' },
          // token texts as ticks only while they stay legible; hover and the strip above always name them
          tickvals: tokens.length <= 40 ? tokens : undefined,
          ticktext: tokens.length <= 40 ? tokens.map(t => labels[t]) : undefined
        },
        yaxis: { title: { text: 'layer' }, autorange: 'reversed' },
        // tall enough for a row per layer and, while the colour bar names every expert, a legible tick each
        height: 130 + Math.max(24 * data.layer_ids.length, data.num_experts <= 32 ? 14 * data.num_experts : 0)
      }
    };
  }, [data, tokens, labels, problem]);

  const onGridClick = useMemo(() => (point: { x: unknown }) => setSelected(Number(point.x)), []);

  if (problem) {
    return (
      <div className="glm-Routing">
        <div className="glm-Note glm-mod-error" role="alert">
          {problem}
        </div>
      </div>
    );
  }
  return (
    <div className="glm-Routing" aria-label={`Expert routing of ${completionId}`}>
      <div className="glm-Routing-summary">
        {data.layer_ids.length} MoE layers · {data.token_ids.length} tokens ({data.prompt_len} prompt) ·{' '}
        {data.num_experts} experts · top-{data.top_k}
        {typeof data.meta?.model === 'string' ? ` · ${data.meta.model}` : ''}
        <label className="glm-Routing-range">
          Tokens:{' '}
          <select className="glm-Select" value={range} onChange={e => setRange(e.target.value as TokenRange)}>
            <option value="generated" disabled={!hasGenerated}>
              generated
            </option>
            <option value="prompt">prompt</option>
            <option value="all">all</option>
          </select>
        </label>
      </div>
      {loadPlot && (
        <Plot
          data={loadPlot.data}
          layout={loadPlot.layout}
          label="Heatmap of expert load per layer"
          themeVersion={themeVersion}
        />
      )}
      <div className="glm-TokenStrip" role="listbox" aria-label="Tokens: choose one to see its experts">
        {tokens.map(t => (
          <button
            key={t}
            role="option"
            aria-selected={selected === t}
            className={`glm-Token${selected === t ? ' glm-mod-selected' : ''}${t < data.prompt_len ? ' glm-mod-prompt' : ''}`}
            title={`token ${t} (id ${data.token_ids[t]})`}
            onClick={() => setSelected(t)}
          >
            {labels[t]}
          </button>
        ))}
      </div>
      {gridPlot && (
        <Plot
          data={gridPlot.data}
          layout={gridPlot.layout}
          label="Grid of the top expert of each token in each layer; click a cell to see that token's experts"
          onClick={onGridClick}
          themeVersion={themeVersion}
        />
      )}
      {selected !== null && selected < data.token_ids.length && (
        <div className="glm-TokenDetail" role="region" aria-label={`Experts of token ${selected}`}>
          <h3>
            Token {selected} “{labels[selected]}” (id {data.token_ids[selected]})
          </h3>
          <table className="glm-TokenDetail-table">
            <thead>
              <tr>
                <th>layer</th>
                <th>experts (weight)</th>
              </tr>
            </thead>
            <tbody>
              {tokenExperts(data, selected).map(row => (
                <tr key={row.layer}>
                  <td>L{row.layer}</td>
                  <td>
                    {row.experts.map(e => (
                      <span key={e.id} className="glm-ExpertChip" style={{ ['--glm-weight' as string]: e.weight }}>
                        e{e.id} <small>{e.weight.toFixed(2)}</small>
                      </span>
                    ))}
                  </td>
                </tr>
              ))}
            </tbody>
          </table>
        </div>
      )}
    </div>
  );
}
