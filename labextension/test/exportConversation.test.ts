import { describe, expect, it } from 'vitest';

import { type Message, newAssistantMessage } from '../src/chatState';
import { exportFileName, splitFences, toMarkdown, toNotebook } from '../src/exportConversation';

const answer = (content: string): Message => ({ ...newAssistantMessage('a', 0, { model: 'glm-4.5-air' }), content, status: 'done' });
const messages: Message[] = [
  { kind: 'user', id: 'u', text: 'Plot a sine\nplease', context: [] },
  answer('Here it is:\n\n```python\nimport numpy as np\nprint(np.sin(1))\n```\n\nRun it with:\n\n```bash\npip install numpy\n```\nDone.')
];

describe('export', () => {
  it('splits prose and fenced code, an unclosed fence running to the end', () => {
    expect(splitFences('a\n```py\nx = 1\n```\nb\n~~~\ny')).toEqual([
      { kind: 'prose', text: 'a' },
      { kind: 'code', language: 'py', code: 'x = 1' },
      { kind: 'prose', text: 'b' },
      { kind: 'code', language: '', code: 'y' }
    ]);
  });

  it('makes questions Markdown, Python blocks code cells and other code fenced Markdown', () => {
    const nb = toNotebook({ title: 'Sines', messages, model: 'glm-4.5-air' });
    expect(nb.nbformat).toBe(4);
    expect(nb.cells.map(c => c.cell_type)).toEqual(['markdown', 'markdown', 'markdown', 'code', 'markdown', 'markdown', 'markdown']);
    expect(nb.cells[0].source).toBe('# Sines');
    expect(new Set(nb.cells.map(c => c.id)).size).toBe(nb.cells.length);
    expect(nb.cells[1].source).toBe('**You:**\n\n> Plot a sine\n> please');
    expect(nb.cells[2].source).toBe('**glm-4.5-air:**\n\nHere it is:');
    expect(nb.cells[3]).toMatchObject({ source: 'import numpy as np\nprint(np.sin(1))', outputs: [], execution_count: null });
    expect(nb.cells[5].source).toBe('```bash\npip install numpy\n```');
    expect(nb.cells[6].source).toBe('Done.');
  });

  it('writes Markdown with the answers as they were', () => {
    const md = toMarkdown({ title: 'Sines', messages });
    expect(md.startsWith('# Sines\n\n## You\n\nPlot a sine\nplease\n\n## glm-4.5-air\n\nHere it is:')).toBe(true);
    expect(md).toContain('```bash\npip install numpy\n```');
  });

  it('names files after the title without path characters', () => {
    expect(exportFileName('What is ../../etc/passwd?', 'ipynb')).toBe('What is etc passwd.ipynb');
    expect(exportFileName('', 'md')).toBe('GLM conversation.md');
  });
});
