/**
 * Additions to JupyterLab's extension build (merged into @jupyterlab/builder's webpack config).
 *
 * plotly.js arrives already minified (4.6 MB): give it a chunk of its own, loaded only when a routing panel
 * opens, and keep it out of Terser, which otherwise spends minutes re-minifying it in production builds.
 */
const TerserPlugin = require('terser-webpack-plugin');

module.exports = {
  optimization: {
    splitChunks: {
      cacheGroups: {
        plotly: {
          test: /[\\/]node_modules[\\/]plotly\.js-dist-min[\\/]/,
          name: 'glm-plotly',
          chunks: 'async',
          enforce: true
        }
      }
    },
    minimizer: [new TerserPlugin({ exclude: /glm-plotly/ })]
  }
};
