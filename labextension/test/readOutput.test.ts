import { describe, expect, it } from 'vitest';

import { MAX_READ_OUTPUT_CHARS, readOutputText } from '../src/readOutput';

describe('read_output', () => {
  it('gives streams, results, images as a note, and an error with its traceback stripped of ANSI codes', () => {
    const text = readOutputText(
      2,
      [
        { output_type: 'stream', name: 'stdout', text: ['hello\n'] },
        { output_type: 'execute_result', execution_count: 4, data: { 'text/plain': '42', 'text/html': '<b>42</b>' }, metadata: {} },
        { output_type: 'display_data', data: { 'image/png': 'iVBOR', 'text/plain': '<Figure>' }, metadata: { 'image/png': { width: 640, height: 480 } } },
        {
          output_type: 'error',
          ename: 'NameError',
          evalue: "name 'value' is not defined",
          traceback: ['\u001b[0;31mNameError\u001b[0m Traceback', "\u001b[1;32m----> 1\u001b[0m print(value)"]
        }
      ],
      4
    );
    expect(text).toMatch(/^Cell 2 ran as \[4\] and raised an error\. Outputs:/);
    expect(text).toContain('[stdout]\nhello');
    expect(text).toContain('42');
    expect(text).not.toContain('<b>');
    expect(text).toContain('[an image (image/png 640x480) is shown here');
    expect(text).not.toContain('iVBOR');
    expect(text).toContain("Error: NameError: name 'value' is not defined");
    expect(text).toContain('----> 1 print(value)');
    expect(text).not.toContain('\u001b');
  });

  it('says when a cell has no output or never ran', () => {
    expect(readOutputText(0, [], null)).toBe('Cell 0 has not run in this session and has no output.');
    expect(readOutputText(1, [], 3)).toBe('Cell 1 ran as [3] and has no output.');
  });

  it('names rich outputs without text, and keeps the end of a huge output', () => {
    expect(readOutputText(0, [{ output_type: 'display_data', data: { 'application/json': {} }, metadata: {} }], 1)).toContain(
      '[output of type application/json]'
    );
    const huge = readOutputText(0, [{ output_type: 'stream', name: 'stdout', text: 'a'.repeat(10_000) + 'THE END' }], 1);
    expect(huge).toContain('THE END');
    expect(huge).toMatch(/characters left out/);
    expect(huge.length).toBeLessThan(MAX_READ_OUTPUT_CHARS + 200);
  });
});
