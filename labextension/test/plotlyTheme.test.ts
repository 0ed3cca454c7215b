import { describe, expect, it } from 'vitest';
import { EXPERT_PALETTE, expertColorscale, themedLayout, themeTemplate, type ThemeColors } from '../src/plotlyTheme';

const dark: ThemeColors = {
  font: 'rgba(255, 255, 255, 1)',
  fontMuted: 'rgba(255, 255, 255, 0.7)',
  background: '#111111',
  panel: '#212121',
  grid: '#424242',
  fontFamily: 'system-ui'
};

describe('expert colours', () => {
  it('give each expert id its own flat band of a categorical palette', () => {
    const scale = expertColorscale(16);
    expect(scale).toHaveLength(32);
    expect(scale[0][0]).toBe(0);
    expect(scale[31][0]).toBe(1);
    const colours = Array.from({ length: 16 }, (_, e) => scale[2 * e][1]);
    colours.forEach((c, e) => expect(scale[2 * e + 1][1]).toBe(c));
    expect(new Set(colours).size).toBe(16);
  });

  it('repeat the palette beyond its length and refuse a trace without experts', () => {
    expect(new Set(expertColorscale(128).map(([, c]) => c))).toEqual(new Set(EXPERT_PALETTE));
    expect(() => expertColorscale(0)).toThrow(/at least one/);
  });
});

describe('plotly in the JupyterLab theme', () => {
  it('builds a template of the theme colours for the page, axes, tables and hover', () => {
    const template = themeTemplate(dark) as any;
    expect(template.layout.paper_bgcolor).toBe('#111111');
    expect(template.layout.plot_bgcolor).toBe('#111111');
    expect(template.layout.font.color).toBe(dark.font);
    expect(template.layout.xaxis.gridcolor).toBe('#424242');
    expect(template.layout.yaxis.tickfont.color).toBe(dark.fontMuted);
    expect(template.data.table[0].cells.fill.color).toBe('#111111');
    expect(template.data.table[0].header.font.color).toBe(dark.font);
    expect(template.layout.hoverlabel.bgcolor).toBe('#212121');
  });

  it('replaces the figure template, keeps its own choices and colours its annotations', () => {
    const layout = {
      template: { layout: { paper_bgcolor: 'white' } },
      height: 500,
      annotations: [{ text: 'generated →' }, { text: 'red', font: { color: 'red', size: 9 } }]
    };
    const themed = themedLayout(layout, dark) as any;
    expect(themed.template.layout.paper_bgcolor).toBe('#111111');
    expect(themed.height).toBe(500);
    expect(themed.annotations[0].font.color).toBe(dark.font);
    expect(themed.annotations[1].font).toEqual({ color: 'red', size: 9 });
    expect(layout.template.layout.paper_bgcolor).toBe('white'); // the figure itself is not changed
  });
});
