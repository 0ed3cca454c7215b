"""Command line: `glm-workbench` opens JupyterLab with the workbench; `python -m workbench generate` streams.

Owns argument parsing and terminal output only: generation goes through the engine, the split of thinking from
answer through the chat layer's output parser.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _default_model() -> Path:
    from workbench.models import default_model_path

    return default_model_path()


def cmd_generate(args: argparse.Namespace) -> int:
    from workbench.chat import OutputParser
    from workbench.engine import Engine

    model = Path(args.model) if args.model else _default_model()
    started = time.perf_counter()
    engine = Engine.from_pretrained(model, dtype=args.dtype, device=args.device, kernels=args.kernels)
    print(f"[loaded {engine} in {time.perf_counter() - started:.1f} s]", file=sys.stderr)
    messages = [{"role": "user", "content": args.prompt}]
    ids = engine.tokenizer.apply_chat_template(messages, enable_thinking=not args.no_think)
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


def cmd_lab(args: argparse.Namespace) -> int:
    """Open JupyterLab with the workbench (server extension + sidebar) on the quickstart notebook."""
    import os
    import subprocess

    repo_notebooks = Path(__file__).resolve().parents[1] / "notebooks"
    command = [sys.executable, "-m", "jupyter", "lab", *args.lab_args]
    if repo_notebooks.is_dir() and not any(a.endswith(".ipynb") for a in args.lab_args):
        command += [f"--ServerApp.root_dir={repo_notebooks}", str(repo_notebooks / "01_quickstart.ipynb")]
    if hasattr(os, "geteuid") and os.geteuid() == 0 and "--allow-root" not in args.lab_args:
        command.append("--allow-root")  # containers and CI machines run as root
    print("[glm-workbench] " + " ".join(command), file=sys.stderr)
    return subprocess.call(command)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m workbench", description="GLM Workbench")
    commands = parser.add_subparsers(dest="command")
    generate = commands.add_parser("generate", help="stream an answer from a local checkpoint")
    generate.add_argument("--model", help="checkpoint folder (default: the bundled model)")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--no-think", action="store_true", help="disable thinking (/nothink)")
    generate.add_argument("--max-tokens", type=int, default=256)
    generate.add_argument("--temperature", type=float, default=0.7)
    generate.add_argument("--top-p", type=float, default=0.95)
    generate.add_argument("--seed", type=int, default=None)
    generate.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                          help="auto (as the server and %%%%glm): float32 on the CPU, bfloat16 on GPUs")
    generate.add_argument("--device", default="cpu")
    generate.add_argument("--kernels", default="auto", choices=["auto", "torch", "triton"])
    generate.set_defaults(run=cmd_generate)
    lab = commands.add_parser("lab", help="open JupyterLab with the workbench (the default command)")
    lab.add_argument("lab_args", nargs=argparse.REMAINDER, help="passed on to `jupyter lab`")
    lab.set_defaults(run=cmd_lab)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("--") and argv[0] not in ("--help", "-h"):
        argv = ["lab", *argv]  # `glm-workbench` alone opens JupyterLab
    if argv[0] == "lab":  # everything after `lab` belongs to `jupyter lab`, options included
        return cmd_lab(argparse.Namespace(lab_args=argv[1:]))
    args = build_parser().parse_args(argv)
    if getattr(args, "prompt", None) is not None and not args.prompt.strip():
        print("error: --prompt is empty", file=sys.stderr)
        return 2
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, OSError) as exc:  # bad input: one clear line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
