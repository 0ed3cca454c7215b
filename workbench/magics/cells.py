"""The cell plumbing of `%%glm`: `{name}` interpolation from the kernel, the source and output of earlier cells
(`--cells`), the code block of an answer, and the input transformer that lets an empty `%%glm` cell reach the
magic.
"""

from __future__ import annotations

import contextlib
import re
import string
import sys
from typing import Any

from workbench.magics.connection import GLMError

CELL_OUTPUT_CHARS = 2000  # of each cell's output sent with --cells
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


# --- prompt building ----------------------------------------------------------------------------------

def interpolate(template: str, namespace: dict[str, Any]) -> str:
    """`{name}`, `{In[3]}`, `{Out[3]}`, `{obj.attr}`, `{x:.2f}` from the kernel; `{{` and `}}` are braces."""
    formatter = string.Formatter()
    try:
        fields = [name for _, name, _, _ in formatter.parse(template) if name is not None]
    except ValueError as exc:
        raise GLMError(f"the prompt has an unmatched brace ({exc}): write {{{{ and }}}} for literal braces") \
            from None
    for name in fields:
        root = re.split(r"[.\[]", name, maxsplit=1)[0]
        if not root or root.isdigit():
            raise GLMError(f"{{{name}}} in the prompt names no variable: write {{{{{name}}}}} for literal braces")
        if root not in namespace:
            raise GLMError(f"unknown name {{{root}}} in the prompt: no variable {root!r} in this kernel; define "
                           f"it first, or write {{{{{name}}}}} for literal braces")
    try:
        return template.format_map(namespace)
    except (KeyError, IndexError) as exc:
        raise GLMError(f"could not fill in the prompt: {type(exc).__name__} {exc} (for {{Out[n]}}, cell n must "
                       "have returned a value; for {In[n]}, cell n must exist)") from None
    except (AttributeError, ValueError, TypeError) as exc:
        raise GLMError(f"could not fill in the prompt: {exc}") from None


class _Tee:
    """A stand-in for sys.stdout / sys.stderr during a cell: passes everything on, and hands written text to `keep`."""

    def __init__(self, stream, keep) -> None:
        self._stream, self._keep = stream, keep

    def write(self, text):
        self._keep(text)
        return self._stream.write(text)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


class CellOutputLog:
    """What each cell printed (stdout and stderr) and the error it ended with, by execution count, for `--cells`.

    IPython keeps cells' sources and results (In, Out), but printed text goes straight to the frontend. While the
    extension is loaded, sys.stdout and sys.stderr are teed during each cell: the text goes out unchanged, and the
    last CELL_OUTPUT_CHARS of it are kept, for the last MAX_CELLS cells."""

    MAX_CELLS = 100

    def __init__(self, shell) -> None:
        self.shell = shell
        self.printed: dict[int, str] = {}
        self.errors: dict[int, str] = {}
        self._text = ""  # what the running cell printed so far (its tail, past 2 * CELL_OUTPUT_CHARS)
        self._saved: tuple[Any, Any] | None = None

    def register(self) -> None:
        self.shell.events.register("pre_run_cell", self.pre_run_cell)
        self.shell.events.register("post_run_cell", self.post_run_cell)

    def unregister(self) -> None:
        self._restore()
        for event, callback in (("pre_run_cell", self.pre_run_cell), ("post_run_cell", self.post_run_cell)):
            with contextlib.suppress(ValueError):
                self.shell.events.unregister(event, callback)

    def pre_run_cell(self, info=None) -> None:
        self._restore()
        self._text = ""
        self._saved = (sys.stdout, sys.stderr)
        sys.stdout, sys.stderr = _Tee(sys.stdout, self._keep), _Tee(sys.stderr, self._keep)

    def post_run_cell(self, result) -> None:
        self._restore()
        number = getattr(result, "execution_count", None)
        if number is None:  # a cell run without history has no In[n] to attach its output to
            return
        text = self._text
        if result.result is not None:  # a terminal shell's displayhook prints "Out[n]: ..." too: Out has it already
            marker = text.rfind(f"Out[{number}]:")
            text = text if marker < 0 else text[:marker]
        text = ANSI_ESCAPE.sub("", text)[-CELL_OUTPUT_CHARS:]  # colours are for eyes, not for the model
        if text.strip():
            self.printed[number] = text
        error = result.error_before_exec or result.error_in_exec
        if error is not None:
            self.errors[number] = f"{type(error).__name__}: {error}"
        for kept in (self.printed, self.errors):
            for old in sorted(kept)[:-self.MAX_CELLS]:
                del kept[old]

    def _keep(self, text) -> None:
        if isinstance(text, str):
            self._text += text
            if len(self._text) > 2 * CELL_OUTPUT_CHARS:  # keep memory bounded for cells that print a lot
                self._text = self._text[-CELL_OUTPUT_CHARS:]

    def _restore(self) -> None:
        # Put the streams back only where they are still ours: a cell may have replaced them on purpose.
        if self._saved is not None:
            if isinstance(sys.stdout, _Tee):
                sys.stdout = self._saved[0]
            if isinstance(sys.stderr, _Tee):
                sys.stderr = self._saved[1]
            self._saved = None


def cells_context(shell, count: int, log: CellOutputLog | None = None) -> str:
    """The source, printed text, result and error of the last `count` cells before this one, as Markdown."""
    history = shell.user_ns.get("In", [])
    outputs = shell.user_ns.get("Out", {})
    current = len(history) - 1  # In[-1] is the cell running now
    parts = []
    for number in range(max(1, current - count), current):
        source = history[number].strip()
        if not source:
            continue
        block = f"In [{number}]:\n```python\n{source}\n```"
        if log is not None and number in log.printed:
            block += f"\nprinted:\n```\n{log.printed[number].rstrip()}\n```"
        if number in outputs:
            text = repr(outputs[number])
            if len(text) > CELL_OUTPUT_CHARS:
                text = text[:CELL_OUTPUT_CHARS] + " ..."
            block += f"\nOut[{number}]:\n```\n{text}\n```"
        if log is not None and number in log.errors:
            block += f"\nerror: {log.errors[number]}"
        parts.append(block)
    if not parts:
        return ""
    return "The last cells of my notebook:\n\n" + "\n\n".join(parts) + "\n\n"


FENCE = re.compile(r"^(`{3,}|~{3,})[ \t]*([\w+#.-]*)[^\n]*\n(.*?)(?:^\1[ \t]*$|\Z)", re.S | re.M)
PYTHON_LANGS = ("", "python", "py", "python3", "ipython", "ipython3")


def extract_code(answer: str) -> str:
    """The fenced code of an answer (Python blocks when there are any, joined), or the whole answer."""
    blocks = [(lang.lower(), body.rstrip("\n")) for _, lang, body in FENCE.findall(answer)]
    python = [body for lang, body in blocks if lang in PYTHON_LANGS]
    chosen = python or [body for _, body in blocks]
    return "\n\n".join(chosen).strip("\n") if chosen else answer.strip("\n")


_GLM_CELL_MAGIC = re.compile(r"^\s*%%glm(?P<line>(\s.*)?)$")


def empty_glm_cell(lines: list[str]) -> list[str]:
    """An input transformer for `%%glm` cells with nothing below the magic line (`%%glm --help`, say).

    IPython refuses any cell magic with an empty body before the magic runs ("the cell body is empty"), which
    would hide `%%glm --help` and the magic's own message; such a cell calls the magic directly instead.
    """
    match = _GLM_CELL_MAGIC.match(lines[0].rstrip("\n")) if lines else None
    if match is None or any(line.strip() for line in lines[1:]):
        return lines
    return [f"get_ipython().find_cell_magic('glm')({match['line'].strip()!r}, '')\n"]



