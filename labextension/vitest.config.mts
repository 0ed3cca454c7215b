import { defineConfig } from 'vitest/config';

// Unit tests of the frontend logic (pure modules: no DOM, no JupyterLab). Browser tests live in ui-tests/.
export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    environment: 'node'
  }
});
