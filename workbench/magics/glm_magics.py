"""`%%glm` and `%glm` themselves: option parsing, one handler per subcommand, and asking the model.

Owns the magics' surface (options, `{name}` interpolation, conversation memory, where the model runs) and
nothing of prompts or models: requests are OpenAI-shaped chat completions handed to the chat layer, either
through the Jupyter server that started this kernel (its `glm/` API, so every notebook shares one engine) or
in-process (`workbench.chat` backends) when there is no such server or when asked.

    %%glm [-f code|markdown|text|html] [--think | --no-think] [-m MODEL] [-t TEMP] [--max-tokens N]
          [--replace] [--run] [--cells N] [--web URL ...] [--trace] [--no-stream]
    prompt lines, with {variables}, {In[3]} and {Out[3]} from the kernel; {{ and }} for literal braces

    %glm status | models | history | reset | use MODEL_ID | use local [PATH [--quantize int8|int4]]
         | use remote URL MODEL | use server URL [TOKEN] | config [key=value ...] | help

`%glm --help`, `%glm help` and `%%glm --help` (with or without a body) print the usage and every option.

Mistakes (unknown options, an empty prompt, an unknown `{name}`, a server that is down) end the cell with a
one-line `UsageError`; the kernel keeps working.
"""


from __future__ import annotations

import contextlib
import shlex
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from workbench.magics.cells import CellOutputLog, cells_context, empty_glm_cell, extract_code, interpolate
from workbench.magics.connection import Connection, GLMError, ServerInfo
from workbench.magics.session import Session, Turn
from workbench.magics.web import html_cell, html_page, web_context

FORMATS = ("code", "markdown", "text", "html")
SYSTEM_PROMPTS = {
    "code": ("You are a coding assistant inside a Jupyter notebook. Answer with Python code for the next cell, "
             "in one fenced ```python block; explain only in code comments."),
    "markdown": "You are an assistant inside a Jupyter notebook. Answer in Markdown.",
    "text": "You are an assistant inside a Jupyter notebook. Answer in plain text, without Markdown.",
    "html": ("You are a front-end assistant inside a Jupyter notebook. Answer with one complete, self-contained "
             "HTML page (CSS and JavaScript inline, no external files) in one fenced ```html block."),
}
DEFAULT_CONTEXT_LIMIT = 8192  # memory budget when the backend does not say its context length
DEFAULT_ANSWER_RESERVE = 1024  # tokens kept free for the answer when --max-tokens is not given


# --- the magics ---------------------------------------------------------------------------------------

SUBCOMMANDS = ("status", "models", "history", "reset", "use", "config", "help")
USAGE = """\
%%glm [-f code|markdown|text|html] [--think | --no-think] [-m MODEL] [-t TEMP] [--max-tokens N]
      [--replace] [--run] [--cells N] [--web URL ...] [--trace] [--no-stream]
prompt lines; {name}, {In[3]}, {Out[3]} come from the kernel, {{ and }} are literal braces
-f html: the answer's page goes into a new cell that shows it in a sandboxed frame (scripts run; no access
to the notebook, its cookies or the token); --web URL (repeatable): the page's text goes into the prompt

%glm status                   where the model runs, how it is doing, and what this session's answers cost
%glm models                   every model, by provider, with capabilities and prices
%glm history | reset          the conversation memory of this kernel
%glm use MODEL_ID             ask this model from now on, e.g. %glm use zai/glm-4.5-air (ids: %glm models)
%glm use local                the local engine (the Jupyter server's, else loaded in this kernel)
%glm use local PATH [--quantize int8|int4]
                              the checkpoint at PATH, loaded in this kernel (int8/int4: quantized as it loads)
%glm use remote URL MODEL     an OpenAI-compatible GLM endpoint, called from this kernel
%glm use server URL [TOKEN]   the GLM API of a given Jupyter server
%glm config [key=value ...]   show or change settings (%glm config lists them)
%glm help | --help            this text (so does %%glm --help)"""
HELP_FLAGS = ("-h", "--help")


@magics_class
class GLMMagics(Magics):
    """`%%glm` asks the model; `%glm` manages the session (see the module docstring)."""

    def __init__(self, shell) -> None:
        super().__init__(shell)
        self.session = Session()
        self.output_log = CellOutputLog(shell)  # registered by load_ipython_extension

    @magic_arguments()
    @argument("-f", "--format", choices=FORMATS, default="code",
              help="code (default: the answer's code goes into a new cell below), markdown, text, or html (the "
                   "answer's page goes into a new cell that shows it in a sandboxed iframe)")
    @argument("--think", action="store_true", help="ask the model to think first")
    @argument("--no-think", action="store_true", help="ask the model to answer without thinking")
    @argument("-m", "--model", help="model id, e.g. local/glm45-air-mini or zai/glm-4.5-air (default: %%glm use, "
                                    "else the first model %%glm models lists)")
    @argument("-t", "--temperature", type=float, help="sampling temperature (0 = greedy)")
    @argument("--max-tokens", type=int, help="longest answer, in tokens")
    @argument("--replace", action="store_true", help="put the code into this cell instead of a new one")
    @argument("--run", action="store_true", help="also run the generated cell (formats code and html)")
    @argument("--cells", type=int, default=0, metavar="N",
              help="send the source and output of the last N cells along")
    @argument("--web", action="append", metavar="URL",
              help="read the web page at URL (public addresses) and send its text along; repeatable")
    @argument("--trace", action="store_true", help="show which experts the answer's tokens went to")
    @argument("--no-stream", action="store_true", help="wait for the whole answer instead of streaming")
    @line_cell_magic
    def glm(self, line: str, cell: str | None = None) -> None:
        """Ask the GLM model (`%%glm` + prompt), or manage the session (`%glm status`, ...)."""
        try:
            if cell is None:
                self._line(line)
            else:
                self._cell(line, cell)
        except GLMError as exc:
            raise UsageError(f"{'%glm' if cell is None else '%%glm'}: {exc}") from None

    def help_text(self) -> str:
        """The usage (`USAGE`) and every `%%glm` option with its meaning, from the option parser itself."""
        options = self.glm.parser.format_help().split("options:", 1)[-1].rstrip("\n")
        return f"{USAGE}\n\n%%glm options:{options}"

    # --- %glm subcommands ---------------------------------------------------------------------------------
    def _line(self, line: str) -> None:
        try:
            words = shlex.split(line)
        except ValueError as exc:
            raise GLMError(f"cannot read {line!r}: {exc}") from None
        if not words or words[0] == "help" or words[0] in HELP_FLAGS:
            print(self.help_text())
            return
        command, rest = words[0], words[1:]
        handler = getattr(self, f"_handle_{command}", None) if command in SUBCOMMANDS else None
        if handler is None:
            raise GLMError(f"unknown subcommand {command!r}: %glm {' | '.join(SUBCOMMANDS)}; to ask the model, "
                           "put %%glm on the first line of a cell and the prompt below it")
        handler(rest)

    def _handle_models(self, words: list[str]) -> None:
        cards = self.session.connection().model_cards()
        if not any(isinstance(card.get("workbench"), dict) for card in cards):
            for card in cards:  # a backend without providers: just the ids
                print(card["id"])
            return
        current = self.session.settings.model
        groups: dict[str, list[dict[str, Any]]] = {}
        for card in cards:
            groups.setdefault((card.get("workbench") or {}).get("provider") or card.get("owned_by") or "?",
                              []).append(card)
        width = max(len(card["id"]) for card in cards)
        for provider, members in groups.items():
            fields = members[0].get("workbench") or {}
            kind = fields.get("provider_kind") or "?"
            dialect = f" {fields['dialect']}" if fields.get("dialect") else ""
            print(f"{provider} ({kind}{dialect})")
            for card in members:
                print(f"  {'*' if card['id'] == current else ' '} {card['id']:<{width}}  {_model_facts(card)}")

    def _handle_history(self, words: list[str]) -> None:
        session = self.session
        if not session.turns:
            print("no conversation yet (memory is " + ("on)" if session.settings.memory else "off)"))
        for number, turn in enumerate(session.turns, 1):
            print(f"[{number}] you: {_shorten(turn.user)}")
            print(f"[{number}] glm: {_shorten(turn.assistant)}")

    def _handle_reset(self, words: list[str]) -> None:
        dropped = len(self.session.turns)
        self.session.turns.clear()
        print(f"conversation memory cleared ({dropped} turn{'s' if dropped != 1 else ''} forgotten)")

    def _handle_use(self, words: list[str]) -> None:
        session = self.session
        if len(words) == 1 and words[0] not in ("local", "remote", "server"):
            connection = session.connection()
            model = connection.resolve_model(words[0])
            session.settings.model = model
            card = next((c for c in connection.model_cards() if c["id"] == model), {"id": model})
            facts = f" ({_model_facts(card)})" if isinstance(card.get("workbench"), dict) else ""
            print(f"using {model}{facts} through {connection.describe()}")
            return
        if words == ["local"]:
            session.retarget(("local",))
            print("using the local engine: " + session.connection().describe())
        elif words and words[0] == "local":
            path, quantize = _local_model_words(words[1:])
            session.settings.model_path = path
            session.settings.quantize = quantize
            session.retarget(("local", "kernel"))  # this model in this kernel, not the server's engine
            print("using the local engine: " + session.connection().describe())
        elif len(words) == 3 and words[0] == "remote":
            session.retarget(("remote", words[1], words[2]))
            print("using " + session.connection().describe())
        elif len(words) in (2, 3) and words[0] == "server":
            url = words[1] if words[1].endswith("/") else words[1] + "/"
            session.retarget(("server", ServerInfo(url=url, token=words[2] if len(words) == 3 else "",
                                                   source="%glm use server")))
            print("using " + session.connection().describe())
        else:
            raise GLMError("usage: %glm use MODEL_ID | use local [PATH [--quantize int8|int4]] | "
                           "use remote URL MODEL | use server URL [TOKEN]")

    def _handle_config(self, words: list[str]) -> None:
        settings = self.session.settings
        if not words:
            print("\n".join(settings.lines()))
            return
        changed_target = False
        for word in words:
            key, sep, value = word.partition("=")
            if not sep:
                raise GLMError(f"config takes key=value pairs, got {word!r}; `%glm config` lists the settings")
            settings.set(key.strip(), value.strip())
            changed_target |= key.strip() in ("server", "model_path", "device", "dtype", "kernels", "quantize",
                                              "api_key_env", "timeout")
            print(f"{key.strip()} = {getattr(settings, key.strip())!r}")
        if changed_target:
            self.session.disconnect()  # the next request connects with the new settings

    def _handle_status(self, words: list[str]) -> None:
        session = self.session
        connection = session.connection()
        print("GLM Workbench: " + connection.describe())
        info = connection.status()
        facts = [f"{key} {info[key]}" for key in ("backend", "model", "state", "device", "dtype", "kernels")
                 if info.get(key)]
        weights = info.get("weights") or {}
        if weights.get("format") and weights["format"] != info.get("dtype"):
            facts.append(f"weights {weights['format']} ({weights['bits_per_weight']:.2f} bits, "
                         f"{weights['bytes_per_token'] / 2**20:.2f} MiB read per token)")
        if info.get("context_limit"):
            facts.append(f"context {info['context_limit']} tokens")
        facts.append(f"{info.get('active_requests', 0)} active, {info.get('queued_requests', 0)} queued")
        if info.get("recent_tokens_per_second") is not None:
            facts.append(f"{float(info['recent_tokens_per_second']):.1f} tok/s")
        print(" · ".join(facts))
        if info.get("message"):
            print(info["message"])
        providers = info.get("providers") or []
        if len(providers) > 1 or any(p.get("state") != "ready" for p in providers):
            print("providers: " + " · ".join(
                f"{p.get('name')} {str(p.get('state')).replace('_', ' ')}"
                + (f" (set {p['key_env']})" if p.get("state") == "key_missing" and p.get("key_env") else "")
                for p in providers))
        if session.settings.model:
            print(f"model: {session.settings.model}")
        memory = "on" if session.settings.memory else "off"
        print(f"memory: {len(session.turns)} turn{'s' if len(session.turns) != 1 else ''} ({memory})")
        print("cost this session: " + _session_cost(session))

    # --- %%glm -------------------------------------------------------------------------------------------
    def _cell(self, line: str, cell: str) -> None:
        try:
            asks_help = any(word in HELP_FLAGS for word in shlex.split(line))
        except ValueError:
            asks_help = False  # unbalanced quotes: argparse says what is wrong just below
        if asks_help:  # the usage, whatever else the line or the body holds: nothing is sent
            print(self.help_text())
            return
        args = parse_argstring(self.glm, line)  # unknown options: argparse's one-line UsageError
        settings = self.session.settings
        if args.think and args.no_think:
            raise GLMError("--think and --no-think contradict each other: give one (or neither: the model decides)")
        if args.run and args.format not in ("code", "html"):
            raise GLMError(f"--run runs code, but --format is {args.format}: drop --run or use --format code")
        if args.replace and args.format not in ("code", "html"):
            raise GLMError(f"--replace puts code into this cell, but --format is {args.format}")
        if args.cells < 0:
            raise GLMError(f"--cells {args.cells}: give how many earlier cells to send (0 or more)")
        if args.max_tokens is not None and args.max_tokens < 1:
            raise GLMError(f"--max-tokens {args.max_tokens}: must be at least 1")
        prompt = interpolate(cell, self.shell.user_ns).strip()
        if not prompt:
            raise GLMError("the prompt is empty: write it on the lines below %%glm (%glm --help shows the usage)")
        user_text = (cells_context(self.shell, args.cells, self.output_log) if args.cells else "") + prompt

        connection = self.session.connection()
        if args.web:  # read before asking: a page that cannot be read stops the cell here
            user_text = web_context(connection, args.web) + user_text
        model = args.model or settings.model
        model = connection.resolve_model(model) if model else self._default_model(connection)
        trace = args.trace
        if trace and not connection.supports_routing_for(model):
            print(f"note: --trace shows routing only for the local engine (models with the routing capability); "
                  f"{model} runs at a remote endpoint, which does not report its experts")
            trace = False
        body: dict[str, Any] = {"model": model, "stream": not args.no_stream}
        if body["stream"]:
            body["stream_options"] = {"include_usage": True}
        if args.think or args.no_think:
            body["thinking"] = {"type": "enabled" if args.think else "disabled"}
        temperature = args.temperature if args.temperature is not None else settings.temperature
        if temperature is not None:
            body["temperature"] = temperature
        max_tokens = args.max_tokens or settings.max_tokens
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        if trace:
            body["routing"] = True

        result = self._ask(connection, body, args.format, user_text, max_tokens)
        if result is None:
            return
        answer, finish_reason, completion_id = result
        if settings.memory:
            self.session.turns.append(Turn(user=user_text, assistant=answer))
        if finish_reason == "length":
            print(f"note: the answer was cut off at {max_tokens or 'the default'} tokens (--max-tokens)")
        if args.format == "code":
            self._place_code(answer, replace=args.replace, run=args.run)
        elif args.format == "html":
            self._place_html(answer, replace=args.replace, run=args.run)
        if trace and completion_id:
            self._show_trace(connection, completion_id)

    def _default_model(self, connection: Connection) -> str:
        models = connection.models()
        if not models:
            raise GLMError(connection.describe() + " lists no model (GET v1/models is empty)")
        return models[0]

    def _messages(self, connection: Connection, answer_format: str, user_text: str,
                  max_tokens: int | None, skip_turns: int) -> tuple[list[dict[str, str]], int]:
        """System prompt, the remembered turns that fit the context (oldest dropped first), the new prompt;
        and how many remembered turns went in."""
        settings = self.session.settings
        system = [{"role": "system", "content": SYSTEM_PROMPTS[answer_format]}] if settings.system_prompt else []
        turns = self.session.turns[skip_turns:] if settings.memory else []
        limit = settings.context_limit or connection.context_limit() or DEFAULT_CONTEXT_LIMIT
        budget = limit - (max_tokens or DEFAULT_ANSWER_RESERVE) - connection.count_tokens(user_text)
        budget -= sum(connection.count_tokens(m["content"]) for m in system)
        kept: list[Turn] = []
        for turn in reversed(turns):  # newest first: what is dropped is the oldest
            cost = connection.count_tokens(turn.user) + connection.count_tokens(turn.assistant) + 8
            if cost > budget:
                break
            budget -= cost
            kept.append(turn)
        history = []
        for turn in reversed(kept):
            history += [{"role": "user", "content": turn.user}, {"role": "assistant", "content": turn.assistant}]
        return system + history + [{"role": "user", "content": user_text}], len(kept)

    def _ask(self, connection: Connection, body: dict[str, Any], answer_format: str, user_text: str,
             max_tokens: int | None) -> tuple[str, str | None, str | None] | None:
        """Send the request and show the answer as it comes; returns (answer, finish_reason, completion id)."""
        from workbench.chat.fold import MessageFold  # the chat layer: imported once the first answer is asked for
        from workbench.widgets.thinking import AnswerDisplay

        settings = self.session.settings
        rich = settings.display == "rich" or (settings.display == "auto"
                                               and getattr(self.shell, "kernel", None) is not None)
        skip = 0
        while True:
            body["messages"], remembered = self._messages(connection, answer_format, user_text, max_tokens, skip)
            view = AnswerDisplay(rich=rich)
            fold = MessageFold()
            completion_id = None
            # Closed on the way out, interrupted or not: an interrupt that lands between two chunks leaves the stream
            # suspended, and it must hang up now (the endpoint stops generating), not whenever the GC finds it.
            stream = contextlib.closing(connection.chat(body))
            try:
                with stream as chunks:
                    for chunk in chunks:
                        completion_id = chunk.get("id") or completion_id
                        if isinstance(chunk.get("usage"), dict):
                            self.session.add_cost(chunk["usage"].get("cost"))
                        for choice in chunk.get("choices") or []:
                            delta = choice.get("delta") or choice.get("message") or {}
                            fold.add_delta(delta, choice.get("finish_reason"))
                            view.reasoning(delta.get("reasoning_content") or "")
                            view.content(delta.get("content") or "")
            except GLMError as exc:
                # Our token estimate was too low: drop the oldest remembered turn that was sent, and retry.
                if exc.code == "context_length_exceeded" and remembered > 0 and not fold.content:
                    skip = len(self.session.turns) - remembered + 1
                    continue
                raise
            except KeyboardInterrupt:
                view.finish()
                print("\ninterrupted: the generation was cancelled (nothing was remembered)")
                return None
            view.finish()
            return fold.content or "", fold.finish_reason, completion_id

    def _place_code(self, answer: str, replace: bool, run: bool) -> None:
        code = extract_code(answer)
        if not code.strip():
            print("the model gave no code: nothing was put into a cell")
            return
        self.shell.set_next_input(code, replace=replace)
        lines = code.count("\n") + 1
        where = "into this cell, replacing the prompt" if replace else "into a new cell below"
        print(f"↳ {lines} line{'s' if lines != 1 else ''} of code put {where}" + (" and run here:" if run else ""))
        if run:
            self.shell.run_cell(code, store_history=False)

    def _place_html(self, answer: str, replace: bool, run: bool) -> None:
        page = html_page(answer)
        if not page.strip():
            print("the model gave no HTML: nothing was put into a cell")
            return
        self.shell.set_next_input(html_cell(page), replace=replace)
        where = "this cell, replacing the prompt" if replace else "a new cell below"
        print(f"↳ the page ({len(page):,} characters) put into {where}, shown in a sandboxed frame when run"
              + (" (running it here):" if run else ""))
        if run:
            self.shell.run_cell(html_cell(page), store_history=False)

    def _show_trace(self, connection: Connection, completion_id: str) -> None:
        data = connection.routing(completion_id)
        if data is None:
            print(f"note: no routing trace was kept for {completion_id}")
            return
        from workbench.engine.routing import RoutingTrace
        from workbench.widgets import show_routing

        show_routing(RoutingTrace.from_dict(data))


def _local_model_words(words: list[str]) -> tuple[str, str]:
    """PATH [--quantize FORMAT] (or --quantize=FORMAT) of `%glm use local`."""
    from workbench.magics.session import Settings

    usage = "usage: %glm use local PATH [--quantize int8|int4]"
    path, quantize = None, ""
    rest = iter(words)
    for word in rest:
        if word == "--quantize" or word.startswith("--quantize="):
            quantize = word.partition("=")[2] if "=" in word else next(rest, "")
            if quantize not in Settings.CHOICES["quantize"] or not quantize:
                raise GLMError(f"--quantize {quantize!r}: choose int8 or int4 ({usage})")
        elif word.startswith("-") or path is not None:
            raise GLMError(f"unexpected {word!r}: {usage}")
        else:
            path = word
    if path is None:
        raise GLMError(f"no checkpoint folder given: {usage}")
    return path, quantize


_CURRENCY_SIGNS = {"USD": "$", "CNY": "¥", "EUR": "€"}


def _money(amount: float, currency: str) -> str:
    sign = _CURRENCY_SIGNS.get(currency)
    number = f"{amount:.8f}".rstrip("0").rstrip(".") if amount else "0"
    return f"{sign}{number}" if sign else f"{number} {currency}"


def _model_facts(card: dict[str, Any]) -> str:
    """One model's line in `%glm models`: capabilities, context, price (or "free"), and a state that is not ready."""
    fields = card.get("workbench") or {}
    facts = [", ".join(fields.get("capabilities") or []) or "chat"]
    if fields.get("context_length"):
        facts.append(f"context {fields['context_length']:,}")
    prices = fields.get("prices")
    if fields.get("free"):
        facts.append("free")
    elif isinstance(prices, dict):
        per = prices.get("per_tokens", 1_000_000)
        unit = "million" if per == 1_000_000 else f"{per:,}"
        currency = prices.get("currency", "USD")
        facts.append(f"{_money(prices['input'], currency)} in / {_money(prices['output'], currency)} out per "
                     f"{unit} tokens")
    elif fields.get("provider_kind") == "local":
        facts.append("this server's engine (tokens and time, no price)")
    else:
        facts.append("price unknown")
    state = fields.get("state")
    if state and state != "ready":
        facts.append(state.replace("_", " "))
    return " · ".join(facts)


def _session_cost(session: Session) -> str:
    if not session.priced_answers:
        return "nothing priced yet (engines show tokens and time instead)"
    answers = f"{session.priced_answers} priced answer{'s' if session.priced_answers != 1 else ''}"
    if not any(session.costs.values()):
        return f"free ({answers})"
    return " + ".join(_money(total, currency) for currency, total in session.costs.items()) + f" ({answers})"


def _shorten(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"



def load_ipython_extension(ipython) -> None:
    """`%load_ext workbench` (or `%load_ext workbench.magics`): registers `%%glm` and `%glm`."""
    previous = ipython.magics_manager.registry.get("GLMMagics")
    if previous is not None:
        previous.output_log.unregister()
    magics = GLMMagics(ipython)
    magics.output_log.register()
    ipython.register_magics(magics)
    if empty_glm_cell not in ipython.input_transformers_cleanup:
        ipython.input_transformers_cleanup.append(empty_glm_cell)


def unload_ipython_extension(ipython) -> None:
    magics = ipython.magics_manager.registry.get("GLMMagics")
    if magics is not None:
        magics.session.disconnect()
        magics.output_log.unregister()
    if empty_glm_cell in ipython.input_transformers_cleanup:
        ipython.input_transformers_cleanup.remove(empty_glm_cell)
