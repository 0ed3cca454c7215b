"""Command line: `glm-workbench` opens JupyterLab with the workbench; `python -m workbench generate` streams;
`python -m workbench export-gguf CHECKPOINT OUT.gguf` writes a GGUF for llama.cpp.

Owns argument parsing and terminal output only: the prompt is built as the server builds it (the chat layer's
`prompt_ids`), generation goes through the engine, the split of thinking from answer through the chat layer's
output parser. What it prints never holds a secret: the command it runs is shown
with the values of token, key, secret and password options (and `token=` in URLs) replaced by `***`.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from pathlib import Path

# Options that give JupyterLab its own folder or notebook: then `glm-workbench` opens no workspace.
ROOT_DIR_OPTIONS = ("--ServerApp.root_dir", "--notebook-dir", "--ServerApp.notebook_dir")

# an option whose value is a secret: --ServerApp.token=..., --IdentityProvider.token, --api-key, --password, ...
_SECRET_OPTION = re.compile(r"^(-{1,2}[\w.\-]*(?:token|key|secret|passw(?:or)?d|credential|cookie)[\w.\-]*)(=.*)?$",
                            re.IGNORECASE)
_SECRET_QUERY = re.compile(r"((?:token|key|secret|password)=)[^&#\s]+", re.IGNORECASE)


def scrub_command(command: list[str]) -> list[str]:
    """`command` fit to print: secret option values (`--x.token=v` or `--x.token v`) and `token=` query values
    in URLs are `***`."""
    scrubbed: list[str] = []
    hide_next = False
    for arg in command:
        if hide_next and not arg.startswith("-"):
            scrubbed.append("***")
            hide_next = False
            continue
        hide_next = False
        match = _SECRET_OPTION.match(arg)
        if match:
            if match.group(2) is None:
                hide_next = True  # the value is the next argument
                scrubbed.append(arg)
            else:
                scrubbed.append(f"{match.group(1)}=***")
            continue
        scrubbed.append(_SECRET_QUERY.sub(r"\1***", arg))
    return scrubbed


def _default_model() -> Path:
    from workbench.models import default_model_path

    return default_model_path()


def cmd_generate(args: argparse.Namespace) -> int:
    from workbench.chat import OutputParser, prompt_ids
    from workbench.engine import Engine

    model = Path(args.model) if args.model else _default_model()
    started = time.perf_counter()
    engine = Engine.from_pretrained(model, dtype=args.dtype, device=args.device, kernels=args.kernels,
                                    cpu_kernels=args.cpu_kernels, quantize=args.quantize)
    # What runs, in api/status's words (the server's log has the same line).
    print(f"[loaded {engine.name} in {time.perf_counter() - started:.1f} s: {engine.describe()}]", file=sys.stderr)
    messages = [{"role": "user", "content": args.prompt}]
    _, ids = prompt_ids(engine.tokenizer, messages, enable_thinking=not args.no_think)  # the server's route
    stream = engine.stream(ids, max_new_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                           seed=args.seed)
    parser = OutputParser()
    section = None
    use_color = sys.stdout.isatty()
    dim, reset = ("\033[2m", "\033[0m") if use_color else ("", "")

    def show(deltas) -> None:
        nonlocal section
        for delta in deltas:
            kind, text = ("thinking", delta.reasoning_content) if delta.reasoning_content else ("answer", delta.content)
            if not text:
                continue
            if kind != section:
                print(f"{reset}\n--- {kind} ---\n" + (dim if kind == "thinking" else ""), end="")
                section = kind
            print(text, end="", flush=True)

    try:
        for piece in stream:
            show(parser.feed(piece.text))
    except KeyboardInterrupt:
        stream.cancel()
    result = stream.result
    show(parser.finish(truncated=result.finish_reason == "length"))
    prefill_tps = result.prompt_tokens / result.prefill_seconds if result.prefill_seconds else 0.0
    print(f"{reset}\n\n[{result.finish_reason}: {result.prompt_tokens} prompt tokens at {prefill_tps:.1f} tok/s, "
          f"{result.completion_tokens} generated at {result.decode_tokens_per_second:.1f} tok/s]")
    return 0


def cmd_export_gguf(args: argparse.Namespace) -> int:
    from workbench.chat.template import GLM45_CHAT_TEMPLATE
    from workbench.engine.gguf_export import export_gguf

    started = time.perf_counter()
    # a checkpoint without a chat template of its own (the engine's tiny ones) gets GLM-4.5's, as the engine uses
    files = export_gguf(args.checkpoint, args.out, args.gguf_type, split_max_bytes=(args.split_max_mb or 0) * 2**20,
                        fallback_chat_template=GLM45_CHAT_TEMPLATE)
    size = sum(f.stat().st_size for f in files)
    print(f"[wrote {', '.join(str(f) for f in files)}: {args.gguf_type}, {size / 2**20:.1f} MiB in "
          f"{time.perf_counter() - started:.1f} s]")
    return 0


def cmd_lab(args: argparse.Namespace) -> int:
    """Open JupyterLab with the workbench (server extension + sidebar) in the user's workspace (a folder of their
    own with a copy of the demo notebooks, see `prepare_workspace`), on the quickstart notebook."""
    import os
    import subprocess

    from workbench.server.launch import DEFAULT_WORKSPACE, prepare_workspace

    lab_args, workspace = _workspace_option(args.lab_args)
    command = [sys.executable, "-m", "jupyter", "lab", *lab_args]
    if not any(a.endswith(".ipynb") or a.startswith(ROOT_DIR_OPTIONS) for a in lab_args):
        folder = Path(workspace or DEFAULT_WORKSPACE).expanduser().absolute()
        copied = prepare_workspace(folder)
        if copied:
            print(f"[glm-workbench] your workspace {folder}: {len(copied)} demo notebooks copied there, yours to edit",
                  file=sys.stderr)
        command.append(f"--ServerApp.root_dir={folder}")
        if (folder / "01_quickstart.ipynb").exists():
            command.append(str(folder / "01_quickstart.ipynb"))
    elif workspace is not None:
        raise ValueError("--workspace and a JupyterLab folder or notebook were both given: choose one")
    if hasattr(os, "geteuid") and os.geteuid() == 0 and "--allow-root" not in lab_args:
        command.append("--allow-root")  # containers and CI machines run as root
    print("[glm-workbench] " + " ".join(scrub_command(command)), file=sys.stderr)
    return subprocess.call(command)


def _workspace_option(lab_args: list[str]) -> tuple[list[str], str | None]:
    """`--workspace DIR` or `--workspace=DIR` taken out of the arguments meant for `jupyter lab`."""
    rest, workspace = [], None
    args = iter(lab_args)
    for arg in args:
        if arg == "--workspace":
            workspace = next(args, None)
            if workspace is None or workspace.startswith("-"):
                raise ValueError("--workspace needs a folder: glm-workbench --workspace ~/glm-workbench")
        elif arg.startswith("--workspace="):
            workspace = arg.split("=", 1)[1]
            if not workspace:
                raise ValueError("--workspace needs a folder: glm-workbench --workspace ~/glm-workbench")
        else:
            rest.append(arg)
    return rest, workspace


def _whole_number(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def _number(low: float, high: float | None = None, low_included: bool = True):
    """A float in [low, high] (or (low, high] when low is excluded; no upper end when high is None)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        above = value >= low if low_included else value > low
        if not above or (high is not None and value > high) or value != value:
            span = f"{'[' if low_included else '('}{low}, {high if high is not None else 'inf'}]"
            raise argparse.ArgumentTypeError(f"must lie in {span}, got {text}")
        return value

    return parse


def _device(text: str) -> str:
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: no CUDA device is available here (use --device cpu)")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m workbench", description="GLM Workbench")
    commands = parser.add_subparsers(dest="command")
    generate = commands.add_parser("generate", help="stream an answer from a local checkpoint")
    generate.add_argument("--model", help="checkpoint folder (default: the bundled model)")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--no-think", action="store_true", help="disable thinking (/nothink)")
    generate.add_argument("--max-tokens", type=_whole_number(1), default=256)
    generate.add_argument("--temperature", type=_number(0.0), default=0.7, help="0: greedy")
    generate.add_argument("--top-p", type=_number(0.0, 1.0, low_included=False), default=0.95)
    generate.add_argument("--seed", type=_whole_number(0), default=None)
    generate.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                          help="auto (as the server and %%%%glm): float32 on the CPU, bfloat16 on GPUs")
    generate.add_argument("--device", type=_device, default="cpu", help="cpu, cuda, cuda:1, ...")
    generate.add_argument("--kernels", choices=["auto", "torch", "triton"],
                          help="triton on GPUs, torch elsewhere (auto); default: WORKBENCH_KERNELS, else auto")
    generate.add_argument("--cpu-kernels", choices=["auto", "compiled", "torch"],
                          help="on the CPU: the compiled kernels (built once per machine, about a minute) or torch; "
                               "default: WORKBENCH_CPU_KERNELS, else auto")
    generate.add_argument("--quantize", default=None, choices=["int8", "int4"],
                          help="CPU: quantize the weights as the model loads, to 8 or ~4.75 bits per weight (less "
                               "memory, fewer bytes read per token); routers, norms and embeddings stay dense")
    generate.set_defaults(run=cmd_generate)
    export = commands.add_parser("export-gguf", help="write a checkpoint folder as a GGUF file for llama.cpp / Ollama")
    export.add_argument("checkpoint", help="HF-layout checkpoint folder (config.json, safetensors, tokenizer.json)")
    export.add_argument("out", help="the .gguf file to write")
    export.add_argument("--type", dest="gguf_type", default="f16", choices=["f32", "f16", "q8_0", "q4_k"],
                        help="tensor type (norms, biases and the router stay f32): f32, f16, q8_0 or q4_k "
                             "(rows not a multiple of 256 in q5_0, as llama.cpp does)")
    export.add_argument("--split-max-mb", type=_whole_number(1), default=None,
                        help="split into files of at most this many MiB (OUT-00001-of-0000N.gguf)")
    export.set_defaults(run=cmd_export_gguf)
    lab = commands.add_parser("lab", help="open JupyterLab with the workbench (the default command) in your "
                                          "workspace (--workspace DIR, default ~/glm-workbench), which gets a copy "
                                          "of each demo notebook it lacks; nothing there is overwritten")
    lab.add_argument("lab_args", nargs=argparse.REMAINDER, help="passed on to `jupyter lab`")
    lab.set_defaults(run=cmd_lab)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("--") and argv[0] not in ("--help", "-h"):
        argv = ["lab", *argv]  # `glm-workbench` alone opens JupyterLab
    try:
        if argv[0] == "lab":  # everything after `lab` belongs to `jupyter lab`, options included (but --workspace)
            return cmd_lab(argparse.Namespace(lab_args=argv[1:]))
        args = build_parser().parse_args(argv)  # every argument is checked here, before anything loads
        if getattr(args, "prompt", None) is not None and not args.prompt.strip():
            print("error: --prompt is empty", file=sys.stderr)
            return 2
        # Warnings on the terminal as the CLI's own lines, e.g. "[compiling CPU kernels, about a minute, once per
        # machine]" before the first start's wait (no-op where logging is already set up).
        logging.basicConfig(level=logging.WARNING, format="[%(message)s]", stream=sys.stderr)
        return args.run(args)
    except (ValueError, FileNotFoundError, OSError) as exc:  # bad input: one clear line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
