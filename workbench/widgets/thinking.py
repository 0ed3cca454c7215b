"""The live display of one streamed answer: a collapsible thinking block, then the answer itself.

Owns presentation only; it is fed text deltas (`reasoning`, `content`) by whoever streams (the `%%glm` magic)
and knows nothing of HTTP or models. Two renderings:

- rich (a Jupyter kernel): an HTML `<details>` block whose summary shows the elapsed time and the number of
  thinking tokens, updated in place while the model thinks and folded when the answer starts; the answer
  below it, rendered as Markdown (code answers show their fenced code) and updated in place;
- text (IPython in a terminal, scripts, tests): the thinking and the answer printed as they come.

Updates are throttled (a notebook frontend does not need more than about ten repaints a second).
"""

from __future__ import annotations

import html
import sys
import time
from typing import TextIO

from IPython.display import display

REFRESH_SECONDS = 0.1


def _summary(seconds: float, tokens: int | None, done: bool) -> str:
    counted = f" · {tokens} token{'s' if tokens != 1 else ''}" if tokens is not None else ""
    return (f"Thought for {seconds:.1f} s{counted}" if done else f"Thinking… {seconds:.1f} s{counted}")


class AnswerDisplay:
    """Shows one answer as it streams. Call `reasoning()` / `content()` with deltas, then `finish()`."""

    def __init__(self, rich: bool, out: TextIO | None = None) -> None:
        self.rich = rich
        self.out = out or sys.stdout
        self.started = time.perf_counter()
        self.thinking_text: list[str] = []
        self.answer_text: list[str] = []
        self.thinking_tokens = 0
        self.thinking_seconds: float | None = None  # set when the answer begins (or the stream ends)
        self._thinking_handle = None
        self._answer_handle = None
        self._last_paint = 0.0

    # --- feeding ------------------------------------------------------------------------------------------
    def reasoning(self, text: str, tokens: int = 1) -> None:
        if not text:
            return
        self.thinking_text.append(text)
        self.thinking_tokens += tokens
        if self.rich:
            self._paint_thinking(force=False)
        else:
            if len(self.thinking_text) == 1:
                self.out.write("[thinking] ")
            self.out.write(text)
            self.out.flush()

    def content(self, text: str) -> None:
        if not text:
            return
        if self.thinking_seconds is None:
            self._end_thinking()
        self.answer_text.append(text)
        if self.rich:
            self._paint_answer(force=False)
        else:
            self.out.write(text)
            self.out.flush()

    def finish(self) -> None:
        """Final paint: thinking folded with its totals, the whole answer shown."""
        if self.thinking_seconds is None:
            self._end_thinking()
        if self.rich:
            self._paint_answer(force=True)
        elif self.answer_text and not self.answer_text[-1].endswith("\n"):
            self.out.write("\n")
            self.out.flush()

    # --- results ------------------------------------------------------------------------------------------
    @property
    def thinking(self) -> str:
        return "".join(self.thinking_text)

    @property
    def answer(self) -> str:
        return "".join(self.answer_text)

    # --- painting -----------------------------------------------------------------------------------------
    def _end_thinking(self) -> None:
        self.thinking_seconds = time.perf_counter() - self.started
        if not self.thinking_text:
            return
        if self.rich:
            self._paint_thinking(force=True)
        else:
            self.out.write(f"\n[{_summary(self.thinking_seconds, self.thinking_tokens, done=True).lower()}]\n")
            self.out.flush()

    def _due(self, force: bool) -> bool:
        now = time.perf_counter()
        if not force and now - self._last_paint < REFRESH_SECONDS:
            return False
        self._last_paint = now
        return True

    def thinking_html(self) -> str:
        done = self.thinking_seconds is not None
        body = html.escape(self.thinking)
        return (f"<details{'' if done else ' open'} class='glm-thinking'>"
                f"<summary style='cursor:pointer;color:var(--jp-ui-font-color2, #666)'>"
                f"{self._summary_text()}</summary>"
                f"<pre style='white-space:pre-wrap;color:var(--jp-ui-font-color2, #666);margin:0.3em 0 0 1em'>"
                f"{body}</pre></details>")

    def _paint_thinking(self, force: bool) -> None:
        if not self._due(force):
            return
        self._thinking_handle = _publish(self._thinking_handle, {
            "text/html": self.thinking_html(),
            "text/plain": f"[{self._summary_text()}]\n{self.thinking}",
        })

    def _paint_answer(self, force: bool) -> None:
        if not self.answer_text or not self._due(force):
            return
        self._answer_handle = _publish(self._answer_handle, {"text/markdown": self.answer,
                                                             "text/plain": self.answer})

    def _summary_text(self) -> str:
        done = self.thinking_seconds is not None
        seconds = self.thinking_seconds if done else time.perf_counter() - self.started
        return _summary(seconds, self.thinking_tokens, done)



def _publish(handle, bundle: dict[str, str]):
    """Show a raw mime bundle, or replace what `handle` shows; returns the handle to update next time."""
    if handle is None:
        return display(bundle, raw=True, display_id=True)
    handle.update(bundle, raw=True)
    return handle
