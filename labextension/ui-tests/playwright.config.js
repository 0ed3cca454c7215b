/**
 * Browser tests of the GLM Workbench extension: galata (JupyterLab's Playwright helpers) driving Debian's
 * chromium (no browser download) against a real `jupyter lab` that this config starts, with the real
 * workbench server extension. Two backends serve it (see jupyter_server_test_config.py): the local engine
 * on a tiny checkpoint written at start-up (real routing traces) and the remote backend pointed at
 * tests/ui/scripted_upstream.py (known thinking, code, tool calls and a long answer).
 *
 * A third server is `glm-workbench` itself, started as the README says on a fresh temporary HOME and workspace
 * (the bundled model, default settings): the first-contact tests (tagged @first-contact) use it.
 *
 * A fourth serves several providers side by side (the local engine, the scripted endpoint as a priced OpenAI-kind
 * provider, and one whose key is not set): the provider tests (tagged @providers) use it.
 *
 * Screenshots of each state go to $GLM_UI_ARTIFACTS (default: ui-tests/artifacts/).
 *
 * GLM_UI_SERVERS=upstream,providers (names of `servers` below) starts only those servers, for a run of one
 * project (`jlpm playwright test --project providers`); unset, all start.
 */
const crypto = require('crypto');
const fs = require('fs');
const os = require('os');
const path = require('path');
const baseConfig = require('@jupyterlab/galata/lib/playwright-config');

const REMOTE_PORT = Number(process.env.GLM_UI_LAB_PORT || 8895);
const LOCAL_PORT = REMOTE_PORT + 1;
// (REMOTE_PORT + 2 is the first-contact server's)
const PROVIDERS_PORT = REMOTE_PORT + 3;
const UPSTREAM_PORT = Number(process.env.GLM_UI_UPSTREAM_PORT || 8911);
const python = process.env.PYTHON || 'python';
const repo = path.resolve(__dirname, '..', '..');

// The first-contact server: a fresh HOME and workspace, made once (workers inherit the environment).
const FIRST_PORT = LOCAL_PORT + 1;
if (!process.env.GLM_FIRST_CONTACT_HOME) {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'glm-first-contact-'));
  fs.mkdirSync(path.join(root, 'home'));
  fs.mkdirSync(path.join(root, 'workspace'));
  process.env.GLM_FIRST_CONTACT_HOME = path.join(root, 'home');
  process.env.GLM_FIRST_CONTACT_WORKSPACE = path.join(root, 'workspace');
  process.env.GLM_FIRST_CONTACT_TOKEN = crypto.randomBytes(16).toString('hex');
  process.env.GLM_FIRST_CONTACT_URL = `http://127.0.0.1:${FIRST_PORT}`;
}
/** `glm-workbench` next to the Python that runs the tests (the one `pip install -e .` put there). */
const glmWorkbench = (() => {
  const script = path.join(path.dirname(python), 'glm-workbench');
  return path.isAbsolute(python) && fs.existsSync(script) ? script : 'glm-workbench';
})();

/** A `jupyter lab` whose workbench server extension uses `backend` (see jupyter_server_test_config.py). */
function lab(backend, port) {
  return {
    command: `${python} -m jupyter lab --config jupyter_server_test_config.py --port ${port} --ip 127.0.0.1`,
    url: `http://127.0.0.1:${port}/lab`,
    timeout: 180 * 1000,
    reuseExistingServer: false,
    env: {
      ...process.env,
      GLM_UI_BACKEND: backend,
      GLM_UI_UPSTREAM_URL: `http://127.0.0.1:${UPSTREAM_PORT}/v1`
    }
  };
}

const servers = {
  upstream: {
    command: `${python} ${path.join(repo, 'tests', 'ui', 'scripted_upstream.py')} --port ${UPSTREAM_PORT}`,
    url: `http://127.0.0.1:${UPSTREAM_PORT}/v1/models`,
    timeout: 30 * 1000,
    reuseExistingServer: false
  },
  remote: lab('remote', REMOTE_PORT),
  local: lab('local', LOCAL_PORT),
  'first-contact': {
    // exactly the README's command, plus the jupyter lab options a test needs (no browser, port, token)
    command:
      `${glmWorkbench} --no-browser --ip 127.0.0.1 --port ${FIRST_PORT} ` +
      `--IdentityProvider.token=${process.env.GLM_FIRST_CONTACT_TOKEN}`,
    url: `${process.env.GLM_FIRST_CONTACT_URL}/api/status?token=${process.env.GLM_FIRST_CONTACT_TOKEN}`,
    cwd: process.env.GLM_FIRST_CONTACT_WORKSPACE,
    timeout: 300 * 1000,
    reuseExistingServer: false,
    stdout: 'pipe',
    env: {
      ...process.env,
      HOME: process.env.GLM_FIRST_CONTACT_HOME,
      // a fresh user's Jupyter folders (under the fresh HOME), whatever the test runner's environment says
      JUPYTER_CONFIG_DIR: path.join(process.env.GLM_FIRST_CONTACT_HOME, '.jupyter'),
      JUPYTER_DATA_DIR: path.join(process.env.GLM_FIRST_CONTACT_HOME, '.local', 'share', 'jupyter'),
      JUPYTER_RUNTIME_DIR: path.join(process.env.GLM_FIRST_CONTACT_HOME, '.local', 'share', 'jupyter', 'runtime')
    }
  },
  providers: lab('providers', PROVIDERS_PORT)
};
const only = (process.env.GLM_UI_SERVERS || '').split(',').map(s => s.trim()).filter(Boolean);
for (const name of only) {
  if (!(name in servers)) {
    throw new Error(`GLM_UI_SERVERS names ${name}: the servers are ${Object.keys(servers).join(', ')}`);
  }
}

module.exports = {
  ...baseConfig,
  testDir: './tests',
  timeout: 120 * 1000,
  expect: { timeout: 30 * 1000 },
  retries: 0,
  workers: 1,
  reporter: [['list']],
  outputDir: './test-results',
  use: {
    ...baseConfig.use,
    trace: 'off',
    video: 'off',
    launchOptions: {
      executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
      args: [
        '--no-sandbox',
        '--disable-gpu',
        '--disable-quic',
        '--no-first-run',
        '--disable-background-networking',
        '--disable-component-update',
        '--disable-sync'
      ]
    }
  },
  projects: [
    // One backend per server: the scripted remote model for everything whose output must be known,
    // the local engine (tests tagged @local) for real routing traces.
    { name: 'remote', grepInvert: /@local|@first-contact|@providers/, use: { baseURL: `http://127.0.0.1:${REMOTE_PORT}` } },
    { name: 'local', grep: /@local/, use: { baseURL: `http://127.0.0.1:${LOCAL_PORT}` } },
    // `glm-workbench` as a newcomer starts it: galata's helpers are not there (no exposed app, a token)
    { name: 'first-contact', grep: /@first-contact/, use: { baseURL: process.env.GLM_FIRST_CONTACT_URL } },
    // several providers side by side: the local engine and the scripted endpoint as a priced remote provider
    { name: 'providers', grep: /@providers/, use: { baseURL: `http://127.0.0.1:${PROVIDERS_PORT}` } }
  ],
  webServer: Object.entries(servers)
    .filter(([name]) => !only.length || only.includes(name))
    .map(([, server]) => server)
};
