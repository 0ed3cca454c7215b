// The part of plotly.js the routing panel uses (plotly.js-dist-min ships no types of its own).
declare module 'plotly.js-dist-min' {
  export function react(
    element: HTMLElement,
    data: unknown[],
    layout?: Record<string, unknown>,
    config?: Record<string, unknown>
  ): Promise<HTMLElement>;
  export function purge(element: HTMLElement): void;
  export const Plots: { resize(element: HTMLElement): void };
}
