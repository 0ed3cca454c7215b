/**
 * The JupyterLab plugin of GLM Workbench: registers the chat sidebar, its commands (open chat, new
 * conversation, explain / fix this error, show routing), settings and theme handling.
 *
 * Wiring only: behaviour lives in ChatModel, NotebookTools and the React views.
 */

import { ILayoutRestorer, type JupyterFrontEnd, type JupyterFrontEndPlugin } from '@jupyterlab/application';
import {
  Clipboard,
  Dialog,
  ICommandPalette,
  ISanitizer,
  IThemeManager,
  MainAreaWidget,
  Sanitizer,
  showDialog,
  showErrorMessage,
  WidgetTracker
} from '@jupyterlab/apputils';
import { IEditorLanguageRegistry } from '@jupyterlab/codemirror';
import { ICompletionProviderManager } from '@jupyterlab/completer';
import { INotebookTracker } from '@jupyterlab/notebook';
import { ISettingRegistry } from '@jupyterlab/settingregistry';
import { IFormRendererRegistry, LabIcon } from '@jupyterlab/ui-components';
import { Widget } from '@lumino/widgets';

import { WorkbenchClient } from './api';
import { ChatModel, type ChatPreferences, DEFAULT_PREFERENCES } from './chatModel';
import { errorOutput, explainErrorPrompt, NotebookTools } from './notebookTools';
import { ToolChecklist } from './components/SettingsFields';
import { ChatSidebar, RoutingPanel } from './widgets';
import { routingTitle } from './routingData';
import { checkWebUrl, webFetch, webFetchToolResult } from './webFetch';
import { DEFAULT_INLINE_SETTINGS, GlmInlineCompletionProvider, readInlineSettings } from './inlineCompletion';

const PLUGIN_ID = 'glm-workbench:plugin';

export const CommandIDs = {
  openChat: 'glm-workbench:open-chat',
  newConversation: 'glm-workbench:new-conversation',
  explainError: 'glm-workbench:explain-error',
  showRouting: 'glm-workbench:show-routing',
  connectModel: 'glm-workbench:connect-model'
} as const;

/** Browser storage: the conversation to reopen after a reload, and whether the sidebar was ever shown. */
const LAST_CONVERSATION_KEY = 'glm-workbench:last-conversation';
const OPENED_ONCE_KEY = 'glm-workbench:sidebar-opened';

/** Where notebook 5 (connecting a real GLM-4.5-Air) may be, relative to the server's root. */
const NOTEBOOK_5 = '05_real_glm45_air.ipynb';
const NOTEBOOK_5_PLACES = [NOTEBOOK_5, `notebooks/${NOTEBOOK_5}`, `glm-workbench/${NOTEBOOK_5}`];

/** The chat's width when it opens (px): room for the header's controls and a line of code. */
const SIDEBAR_WIDTH = 380;
/** What the notebook keeps at least when the chat widens (px). */
const MAIN_AREA_MIN_WIDTH = 300;

/**
 * Widen the right area to `SIDEBAR_WIDTH` when the sidebar shows narrower (JupyterLab opens side panels at about
 * 250 px and has no public API for their width; its layouts ignore a child's CSS min-width there). Uses the
 * shell's split panel when it has the expected shape, and does nothing otherwise.
 */
function widenRightArea(shell: JupyterFrontEnd.IShell, sidebar: HTMLElement): void {
  const split = (shell as unknown as { _hsplitPanel?: { node: HTMLElement; relativeSizes(): number[]; setRelativeSizes(sizes: number[]): void } })._hsplitPanel;
  const width = sidebar.getBoundingClientRect().width;
  if (!split || typeof split.setRelativeSizes !== 'function' || width === 0 || width >= SIDEBAR_WIDTH - 1) {
    return;
  }
  const total = split.node.getBoundingClientRect().width;
  const sizes = split.relativeSizes();
  const right = (sizes[2] * SIDEBAR_WIDTH) / width;
  const main = sizes[1] - (right - sizes[2]);
  if (sizes.length !== 3 || main * total < MAIN_AREA_MIN_WIDTH) {
    return; // an unexpected layout, or a window too small to give the chat more
  }
  split.setRelativeSizes([sizes[0], main, right]);
}

function storage(): Storage | null {
  try {
    return window.localStorage;
  } catch {
    return null; // storage disabled: no restore, nothing breaks
  }
}

/** The how-to shown by "Connect a real model" (the README's "bundled model" paragraph and notebook 5). */
function connectModelBody(): HTMLElement {
  const body = document.createElement('div');
  body.className = 'glm-ConnectDialog';
  const lines: Array<[string, string]> = [
    ['p', 'The bundled glm45-air-mini is a 10M-parameter demo. For real answers, start the workbench on a real GLM-4.5-Air:'],
    ['h4', 'Your own checkpoint (a GPU machine)'],
    ['pre', 'glm-workbench --GLMWorkbench.model_path=/path/to/GLM-4.5-Air --GLMWorkbench.device=cuda'],
    ['h4', 'The hosted GLM-4.5-Air, beside the local model (one variable, then restart)'],
    ['pre', 'export OPENROUTER_API_KEY=...   # z-ai/glm-4.5-air:free\n# or ZAI_API_KEY (Z.ai), ZHIPUAI_API_KEY (BigModel)\nglm-workbench'],
    ['h4', 'A vLLM / SGLang / llama-server / Ollama server, or another workbench'],
    ['p', 'Add it to c.GLMWorkbench.providers (the README\'s "Providers"); its models join the list here.'],
    ['p', 'Notebook 5 (05_real_glm45_air.ipynb) walks through both; the README says more (the paragraph on the default model).']
  ];
  for (const [tag, text] of lines) {
    const el = document.createElement(tag);
    el.textContent = text;
    body.appendChild(el);
  }
  return body;
}

const chatIcon = new LabIcon({
  name: 'glm-workbench:chat',
  svgstr:
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 24 24" width="16" height="16">' +
    '<path class="jp-icon3" fill="#616161" d="M4 3h16a2 2 0 0 1 2 2v10a2 2 0 0 1-2 2H9l-5 4v-4a2 2 0 0 1-2-2V5a2 2 0 0 1 2-2z' +
    'm3 5a1.5 1.5 0 1 0 0 3 1.5 1.5 0 0 0 0-3zm5 0a1.5 1.5 0 1 0 0 3 1.5 1.5 0 0 0 0-3zm5 0a1.5 1.5 0 1 0 0 3 1.5 1.5 0 0 0 0-3z"/>' +
    '</svg>'
});

function readPreferences(settings: ISettingRegistry.ISettings): ChatPreferences {
  const get = <K extends keyof ChatPreferences>(key: K): ChatPreferences[K] =>
    (settings.get(key).composite as ChatPreferences[K] | undefined) ?? DEFAULT_PREFERENCES[key];
  return {
    collapseThinkingOnAnswer: get('collapseThinkingOnAnswer'),
    thinkingMode: get('thinkingMode'),
    autoApproveTools: get('autoApproveTools'),
    enableTools: get('enableTools'),
    maxTokens: get('maxTokens'),
    temperature: get('temperature'),
    systemPrompt: get('systemPrompt'),
    keepRouting: get('keepRouting'),
    maxToolSteps: get('maxToolSteps')
  };
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: PLUGIN_ID,
  description: 'GLM Workbench: chat sidebar with thinking traces, notebook tools and expert routing.',
  autoStart: true,
  requires: [INotebookTracker],
  optional: [
    ISettingRegistry,
    ICommandPalette,
    ILayoutRestorer,
    IEditorLanguageRegistry,
    ISanitizer,
    IThemeManager,
    IFormRendererRegistry,
    ICompletionProviderManager
  ],
  activate: (
    app: JupyterFrontEnd,
    notebooks: INotebookTracker,
    settingRegistry: ISettingRegistry | null,
    palette: ICommandPalette | null,
    restorer: ILayoutRestorer | null,
    languages: IEditorLanguageRegistry | null,
    sanitizer: ISanitizer | null,
    themeManager: IThemeManager | null,
    formRegistry: IFormRendererRegistry | null,
    completionManager: ICompletionProviderManager | null
  ) => {
    // the settings editor's own rendering of this array has no title: a titled checklist instead
    formRegistry?.addRenderer(`${PLUGIN_ID}.autoApproveTools`, {
      fieldRenderer: ToolChecklist as unknown as NonNullable<Parameters<IFormRendererRegistry['addRenderer']>[1]['fieldRenderer']>
    });
    const client = new WorkbenchClient(app.serviceManager.serverSettings);
    const tools = new NotebookTools(notebooks, async url => webFetchToolResult(await webFetch(client, checkWebUrl(url))));
    const model = new ChatModel(client, tools);

    const routingTracker = new WidgetTracker<MainAreaWidget<RoutingPanel>>({ namespace: 'glm-workbench-routing' });
    const sidebar = new ChatSidebar(
      model,
      {
        sanitizer: sanitizer ?? new Sanitizer(),
        languages,
        codeActions: {
          insertBelow: code => runCodeAction(() => tools.insertBelow(code)),
          replaceActive: code => runCodeAction(() => tools.replaceActive(code)),
          copy: code => Clipboard.copyToSystem(code)
        }
      },
      {
        copy: text => Clipboard.copyToSystem(text),
        showRouting: completionId => void app.commands.execute(CommandIDs.showRouting, { completionId }),
        connectModel: () => void app.commands.execute(CommandIDs.connectModel)
      }
    );
    sidebar.id = 'glm-workbench-chat';
    sidebar.title.icon = chatIcon;
    sidebar.title.caption = 'GLM Chat (Alt+Shift+G)';
    app.shell.add(sidebar, 'right', { rank: 400 });
    sidebar.onShown = () => widenRightArea(app.shell, sidebar.node);
    restorer?.add(sidebar, sidebar.id);

    function runCodeAction(action: () => void): void {
      try {
        action();
        const panel = notebooks.currentWidget;
        if (panel) {
          app.shell.activateById(panel.id);
        }
      } catch (error) {
        void showErrorMessage('GLM Workbench: cannot use this code block', error as Error);
      }
    }

    app.commands.addCommand(CommandIDs.openChat, {
      label: 'Open GLM Chat',
      caption: 'Open the GLM Workbench chat sidebar',
      icon: chatIcon,
      execute: () => {
        app.shell.activateById(sidebar.id);
        sidebar.focusInput();
      }
    });

    app.commands.addCommand(CommandIDs.connectModel, {
      label: 'Connect a Real GLM Model',
      caption: 'How to point the workbench at a real GLM-4.5-Air',
      execute: async () => {
        const contents = app.serviceManager.contents;
        let notebook: string | null = null;
        for (const path of NOTEBOOK_5_PLACES) {
          try {
            await contents.get(path, { content: false });
            notebook = path;
            break;
          } catch {
            // not there: try the next place
          }
        }
        const buttons = [Dialog.okButton({ label: 'Close' })];
        if (notebook) {
          buttons.unshift(Dialog.createButton({ label: 'Open notebook 5', actions: ['open'] }));
        }
        const result = await showDialog({ title: 'Connect a real GLM model', body: new Widget({ node: connectModelBody() }), buttons });
        if (notebook && result.button.actions.includes('open')) {
          await app.commands.execute('docmanager:open', { path: notebook });
        }
      }
    });

    app.commands.addCommand(CommandIDs.newConversation, {
      label: 'New GLM Conversation',
      execute: () => {
        model.newConversation();
        app.shell.activateById(sidebar.id);
        sidebar.focusInput();
      }
    });

    app.commands.addCommand(CommandIDs.explainError, {
      label: 'Explain / Fix This Error (GLM)',
      caption: "Send the active cell and its traceback to the GLM chat",
      isEnabled: () => errorOutput(notebooks.activeCell?.model) !== null,
      isVisible: () => errorOutput(notebooks.activeCell?.model) !== null,
      execute: async () => {
        const cell = notebooks.activeCell;
        const error = errorOutput(cell?.model);
        if (!cell || !error) {
          return;
        }
        app.shell.activateById(sidebar.id);
        const prompt = explainErrorPrompt(cell.model.sharedModel.getSource(), error);
        if (model.state.busy) {
          model.stop();
        }
        await model.send(prompt.text, prompt.context);
      }
    });

    app.commands.addCommand(CommandIDs.showRouting, {
      label: 'Show Expert Routing',
      execute: args => {
        const completionId = String(args.completionId ?? '');
        if (!completionId) {
          return;
        }
        const existing = routingTracker.find(w => w.content.completionId === completionId);
        if (existing) {
          app.shell.activateById(existing.id);
          return;
        }
        const content = new RoutingPanel(client, completionId, routingTitle(model.state.conversation.messages, completionId));
        const widget = new MainAreaWidget({ content });
        widget.id = content.id;
        widget.title.label = content.title.label;
        widget.title.caption = content.title.caption;
        widget.title.closable = true;
        void routingTracker.add(widget);
        // New answers record their routing while a routing view is open (see ChatModel.routingViewOpen).
        model.routingViewOpen = true;
        widget.disposed.connect(() => {
          model.routingViewOpen = routingTracker.filter(w => w !== widget && !w.isDisposed).length > 0;
        });
        app.shell.add(widget, 'main');
        app.shell.activateById(widget.id);
      }
    });

    themeManager?.themeChanged.connect(() => routingTracker.forEach(w => w.content.themeChanged()));

    if (palette) {
      const category = 'GLM Workbench';
      for (const command of [
        CommandIDs.openChat,
        CommandIDs.newConversation,
        CommandIDs.explainError,
        CommandIDs.connectModel
      ]) {
        palette.addItem({ command, category });
      }
    }

    // Ghost text in cells from the sidebar's model (inlineCompletion.ts decides when it may run).
    let inlineSettings = DEFAULT_INLINE_SETTINGS;
    completionManager?.registerInlineProvider(
      new GlmInlineCompletionProvider(
        client,
        () => ({
          model: model.state.model,
          models: model.state.models,
          status: model.state.status,
          demo: model.isDemoModel()
        }),
        () => inlineSettings
      )
    );

    if (settingRegistry) {
      void settingRegistry
        .load(PLUGIN_ID)
        .then(settings => {
          model.setPreferences(readPreferences(settings));
          inlineSettings = readInlineSettings(key => settings.get(key).composite);
          settings.changed.connect(() => {
            inlineSettings = readInlineSettings(key => settings.get(key).composite);
          });
          settings.changed.connect(() => model.setPreferences(readPreferences(settings)));
          model.autoApproveChanged.connect((_, names) => void settings.set('autoApproveTools', names));
        })
        .catch(reason => console.error('GLM Workbench: could not load settings.', reason));
    }

    // After a reload, reopen the conversation the user was in; remember it whenever it changes.
    const store = storage();
    model.restoreConversationId = store?.getItem(LAST_CONVERSATION_KEY) ?? null;
    let remembered = model.restoreConversationId;
    model.changed.connect(() => {
      const { conversation } = model.state;
      const id = conversation.messages.length ? conversation.id : null;
      if (store && id && id !== remembered) {
        remembered = id;
        store.setItem(LAST_CONVERSATION_KEY, id);
      }
    });

    void app.restored.then(() => {
      // The first time JupyterLab runs with the workbench, show the sidebar; later the saved layout decides.
      if (store && !store.getItem(OPENED_ONCE_KEY)) {
        store.setItem(OPENED_ONCE_KEY, '1');
        app.shell.activateById(sidebar.id);
      }
      void model.refresh();
    });
  }
};

export default plugin;
