/**
 * The notebook's routing figures in JupyterLab's theme: a mime renderer for THEMED_MIME, the type under which
 * workbench/widgets (figures.py, view.py) offer each figure beside plotly's own. Plotly's lab renderer draws
 * figures with the template they carry (white, whatever the theme); this one draws the same figure with the
 * theme's template and redraws it when the user switches theme. Front ends without this extension fall back
 * to plotly's type.
 *
 * Registered as the package's mimeExtension (package.json), ranked ahead of plotly's renderer (rank 2).
 */

import type { IRenderMime } from '@jupyterlab/rendermime-interfaces';
import { Widget } from '@lumino/widgets';

import { loadPlotly, readTheme, themedLayout, watchTheme } from './plotlyTheme';

export const THEMED_MIME = 'application/vnd.glm-workbench.plotly+json';

interface FigureSpec {
  data?: unknown[];
  layout?: Record<string, unknown>;
  config?: Record<string, unknown>;
}

export class RoutingFigureRenderer extends Widget implements IRenderMime.IRenderer {
  private spec: FigureSpec | null = null;
  private readonly plot: HTMLDivElement;
  private readonly stopWatching: () => void;

  constructor() {
    super();
    this.addClass('glm-RoutingFigure');
    this.plot = document.createElement('div');
    this.node.appendChild(this.plot);
    this.stopWatching = watchTheme(() => requestAnimationFrame(() => void this.draw()));
  }

  async renderModel(model: IRenderMime.IMimeModel): Promise<void> {
    this.spec = model.data[THEMED_MIME] as FigureSpec;
    await this.draw();
  }

  private async draw(): Promise<void> {
    const spec = this.spec;
    if (!spec || this.isDisposed) {
      return;
    }
    try {
      const Plotly = await loadPlotly();
      const layout = themedLayout({ height: 360, ...(spec.layout ?? {}) }, readTheme(this.node));
      await Plotly.react(this.plot, (spec.data ?? []) as never, layout as never, {
        responsive: true,
        displaylogo: false,
        ...(spec.config ?? {})
      });
    } catch (error) {
      this.plot.textContent = `Could not draw the routing figure: ${(error as Error).message}`;
    }
  }

  protected onResize(): void {
    if (this.spec && this.plot.querySelector('.plot-container')) {
      void loadPlotly().then(Plotly => Plotly.Plots.resize(this.plot));
    }
  }

  dispose(): void {
    if (this.isDisposed) {
      return;
    }
    this.stopWatching();
    void loadPlotly().then(Plotly => Plotly.purge(this.plot));
    super.dispose();
  }
}

export const rendererFactory: IRenderMime.IRendererFactory = {
  safe: true,
  mimeTypes: [THEMED_MIME],
  defaultRank: 1,
  createRenderer: () => new RoutingFigureRenderer()
};

const extension: IRenderMime.IExtension = {
  id: 'glm-workbench:routing-figures',
  description: 'Routing figures of GLM Workbench in the JupyterLab theme.',
  rendererFactory,
  rank: 1,
  dataType: 'json'
};

export default extension;
