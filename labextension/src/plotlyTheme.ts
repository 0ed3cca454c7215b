/**
 * plotly.js in JupyterLab's theme, for the routing panel and for the notebook's routing figures: the theme's
 * colours read from its CSS variables, turned into a plotly template (backgrounds, fonts, grid lines, tables,
 * hover labels), and the categorical palette of expert ids (the same colours as workbench/widgets/figures.py).
 *
 * plotly.js is bundled with the extension (no CDN) and loaded on first use. The pure parts (template,
 * colourscale) take the colours as arguments, so they are unit-tested without a DOM.
 */

type PlotlyModule = typeof import('plotly.js-dist-min');

let plotlyPromise: Promise<PlotlyModule> | null = null;

/** plotly.js, loaded once on first use (its own chunk: the sidebar does not pay for it). */
export function loadPlotly(): Promise<PlotlyModule> {
  plotlyPromise ??= import('plotly.js-dist-min').then(
    m => ((m as { default?: PlotlyModule }).default ?? m) as PlotlyModule
  );
  return plotlyPromise;
}

export interface ThemeColors {
  /** Text. */
  font: string;
  /** Secondary text: tick labels, subtitles. */
  fontMuted: string;
  /** Behind the figure. */
  background: string;
  /** Behind the plot area and table cells: a step away from the background. */
  panel: string;
  /** Grid and axis lines, table borders. */
  grid: string;
  fontFamily: string;
}

/** The current JupyterLab theme's colours (fallbacks: the light theme's). */
export function readTheme(element: Element = document.body): ThemeColors {
  const style = getComputedStyle(element);
  const read = (name: string, fallback: string) => style.getPropertyValue(name).trim() || fallback;
  return {
    font: read('--jp-ui-font-color1', '#212121'),
    fontMuted: read('--jp-ui-font-color2', '#616161'),
    background: read('--jp-layout-color1', '#ffffff'),
    panel: read('--jp-layout-color2', '#eeeeee'),
    grid: read('--jp-border-color2', '#e0e0e0'),
    fontFamily: read('--jp-ui-font-family', 'sans-serif')
  };
}

/** Whether JupyterLab shows a light theme (it marks <body data-jp-theme-light="true|false">). */
export function isLightTheme(): boolean {
  return document.body.dataset.jpThemeLight !== 'false';
}

/**
 * A plotly template in the theme's colours. It replaces whatever template the figure brought (plotly.py's
 * default is a light one), while what the figure sets itself (colourscales, sizes, titles) still wins.
 */
export function themeTemplate(colors: ThemeColors): Record<string, unknown> {
  const axis = {
    gridcolor: colors.grid,
    linecolor: colors.grid,
    zerolinecolor: colors.grid,
    tickcolor: colors.grid,
    tickfont: { color: colors.fontMuted },
    title: { font: { color: colors.font } },
    automargin: true
  };
  return {
    layout: {
      paper_bgcolor: colors.background,
      plot_bgcolor: colors.background,
      font: { color: colors.font, family: colors.fontFamily },
      title: { font: { color: colors.font } },
      xaxis: axis,
      yaxis: axis,
      legend: { font: { color: colors.font }, bgcolor: 'rgba(0,0,0,0)' },
      hoverlabel: { bgcolor: colors.panel, bordercolor: colors.grid, font: { color: colors.font } },
      colorway: ['#1f77b4', '#ff7f0e', '#2ca02c', '#d62728', '#9467bd', '#8c564b', '#e377c2', '#17becf'],
      annotationdefaults: { font: { color: colors.font } }
    },
    data: {
      heatmap: [{ colorbar: { outlinewidth: 0, tickfont: { color: colors.fontMuted } } }],
      table: [
        {
          header: {
            fill: { color: colors.panel },
            line: { color: colors.grid },
            font: { color: colors.font }
          },
          cells: {
            fill: { color: colors.background },
            line: { color: colors.grid },
            font: { color: colors.font }
          }
        }
      ]
    }
  };
}

/**
 * A figure's layout in the theme: the theme's template, and the figure's own explicit choices kept.
 * Annotations (subplot titles, labels) without a colour of their own take the theme's font colour.
 */
export function themedLayout(layout: Record<string, unknown>, colors: ThemeColors): Record<string, unknown> {
  const annotations = Array.isArray(layout.annotations)
    ? (layout.annotations as Array<Record<string, unknown>>).map(a => ({
        ...a,
        font: { color: colors.font, ...((a.font as Record<string, unknown>) ?? {}) }
      }))
    : undefined;
  return { ...layout, ...(annotations ? { annotations } : {}), template: themeTemplate(colors) };
}

/**
 * Kelly's colours of maximum contrast, without white, black and the darkest olive (each shows on light and
 * dark backgrounds). Expert ids are categories, so they get distinct colours rather than a ramp; beyond 19
 * experts the colours repeat and the id is written in the cell. Keep in step with EXPERT_PALETTE in
 * workbench/widgets/figures.py.
 */
export const EXPERT_PALETTE = [
  '#F3C300',
  '#875692',
  '#F38400',
  '#A1CAF1',
  '#BE0032',
  '#C2B280',
  '#848482',
  '#008856',
  '#E68FAC',
  '#0067A5',
  '#F99379',
  '#604E97',
  '#F6A600',
  '#B3446C',
  '#DCD300',
  '#882D17',
  '#8DB600',
  '#654522',
  '#E25822'
];

/** A stepped colourscale: expert e gets the flat band of EXPERT_PALETTE[e % 19] (zmin -0.5, zmax E - 0.5). */
export function expertColorscale(numExperts: number): Array<[number, string]> {
  if (!Number.isInteger(numExperts) || numExperts < 1) {
    throw new Error(`The routing trace says it has ${numExperts} experts; it needs at least one.`);
  }
  const scale: Array<[number, string]> = [];
  for (let e = 0; e < numExperts; e++) {
    const colour = EXPERT_PALETTE[e % EXPERT_PALETTE.length];
    scale.push([e / numExperts, colour], [(e + 1) / numExperts, colour]);
  }
  return scale;
}

/** Call `onChange` whenever JupyterLab switches theme (its <body> data attributes change); returns a stop. */
export function watchTheme(onChange: () => void): () => void {
  const observer = new MutationObserver(() => onChange());
  observer.observe(document.body, { attributes: true, attributeFilter: ['data-jp-theme-light', 'data-jp-theme-name'] });
  return () => observer.disconnect();
}
