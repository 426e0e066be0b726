#!/usr/bin/env python
"""Throughput of plain vLLM vs this library's strategies in vLLM, and vs its transformers backend.

One vLLM engine (:class:`contrastive_decoding.vllm.LLM` with no default strategy) serves every row;
each ``llm.generate`` call chooses its strategy per request through ``SamplingParams.extra_args``
(``{"contrast": name, "contrast_repetition_penalty": 1.0}``; ``none`` is plain vLLM, with no extra
arguments). At each ``--concurrency`` level C, C prompts (a fixed list of 32 short English prompts,
cycled) are submitted in one ``generate`` call, which vLLM batches; greedy, ``ignore_eos=True``, so
every request generates exactly ``--tokens`` T tokens. Reported per (strategy, C): tokens/s =
C * T / wall time, ms/token = wall / T (the time per token that each request sees; it includes the
prefill, amortised over T), and the ratio of the strategy's time to plain vLLM's at the same C,
measured in this run. Each strategy is warmed up once (largest C, a few tokens) before timing;
then ``--repeats`` rounds time every (strategy, C), the strategy order rotating between rounds so a
drift in machine speed hits all rows alike; the median is reported.

Repetition penalty: every strategy runs with 1.0 (no penalty), as plain vLLM does, so rows compare
like with like; the presets' registered penalty (1.2 for DoLa) would add its own cost. ``dola`` is
static DoLa: one premature layer (``--static-layer``, request key ``contrast_dola_layers``).

DoLa-high floor: DoLa-high reads J candidate layers (SmolLM2-135M: 30 layers, tied embeddings,
layers 15, 17, ..., 29: J = 8), so each step costs at least the body plus 1 + J head products,
against the body plus one for plain decoding. The floor ratio is (t_plain + J * t_head(C)) /
t_plain, with t_plain plain vLLM's measured wall / T at that C and t_head(n) the median time of one
head product ``F.linear(h, W)``, h (n, hidden) and W (vocab, hidden) float32. The backend does the J
early exits of a step as ONE product of J * C rows, which reads W once: where the product is bound
by reading W (small C on a CPU) that costs about one C-row product, not J of them, and the ratio
can come out below the J-product floor. So a second, batched floor is printed too:
(t_plain + t_head(J * C)) / t_plain. By default (``--floor-where worker``) t_head is timed inside
vLLM's worker process (``collective_rpc`` with a function, which needs
``VLLM_ALLOW_INSECURE_SERIALIZATION=1``: this script sets it for its own engine), with the threads
and CPU binding vLLM gave its worker (on x86 vLLM reserves one core for its scheduler, so a 2-core
machine runs the model on 1 thread); ``main`` times it in this process with
``torch.get_num_threads()`` threads, which may differ. Printed per C: DoLa-high's measured ratio,
both floor ratios, and how far (%) the measured ratio is above (+) or below (-) each.

transformers comparison (``--hf``, on by default; ``--no-hf`` skips it): the same token ids, as one
left-padded batch of C rows, through ``model.generate(custom_generate=strategy_generate,
strategy=..., do_sample=False, repetition_penalty=1.0, min_new_tokens=T, max_new_tokens=T)`` on the
same fp32 checkpoint, for ``--hf-strategies`` (default ``dola`` static and ``dola-high``; ``none``
runs stock greedy ``generate``); it runs in this process while the engine is idle, with
``--hf-threads`` torch threads (default: torch's default, which may differ from vLLM's worker:
both are printed). Reported: HF tokens/s, vLLM tokens/s / HF tokens/s, and how many of the C rows
produced the same T tokens in both (a check that both backends compute the same thing; fp32
batching can flip near ties).

Default model: the embedded SmolLM2-135M-Instruct as an fp32 folder (``embedded_model_folder()``);
``--model`` takes another folder or Hub id (an architecture the vLLM backend supports). vLLM's
prefix cache is off unless ``--prefix-caching`` (the repeats reuse prompts; transformers has no such
cache). ``--json PATH`` writes every raw time.

Expected runtime on a busy 2-core CPU with SmolLM2 and the defaults (T = 64, 8 strategies,
C = 1, 8, 32, 3 repeats, HF on): engine start ~1 min, then roughly 30-60 min (most of it at
C = 32); ``--tokens 4 --repeats 1 --concurrency 1,2 --strategies none,dola-high`` takes ~1.5 min.

Examples:
    HF_HUB_OFFLINE=1 .venv-vllm/bin/python scripts/bench_vllm.py
    HF_HUB_OFFLINE=1 .venv-vllm/bin/python scripts/bench_vllm.py --concurrency 1,2 --tokens 4 \\
        --repeats 1 --strategies none,dola-high --max-model-len 256
    .venv-vllm/bin/python scripts/bench_vllm.py --model Qwen/Qwen2.5-0.5B --compile --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_STRATEGIES = "none,dola,dola-high,dola-low,sled,deco,vista,acd"

PROMPTS = (
    "Q: What happens to you if you eat watermelon seeds?\nA:",
    "Q: Where did fortune cookies originate?\nA:",
    "Q: Why do veins appear blue?\nA:",
    "Q: What is the spiciest part of a chili pepper?\nA:",
    "Q: How long should you wait before filing a missing person report?\nA:",
    "Q: Why do matadors wave red capes?\nA:",
    "Q: What percentage of the brain does a human typically use?\nA:",
    "Q: What would happen if you were struck by a penny dropped from the top of a tall building?\nA:",
    "Q: What U.S. state produces the most peaches?\nA:",
    "Q: Why do chameleons change colors?\nA:",
    "Q: On what date was the Declaration of Independence officially signed?\nA:",
    "Q: What color is the sun when viewed from space?\nA:",
    "The capital of France is",
    "Write a short story about a robot who learns to paint.",
    "The three primary colours are",
    "Explain photosynthesis to a ten-year-old in two sentences.",
    "List three tips for staying focused while studying:",
    "Translate into French: The weather is nice today.",
    "A recipe for a simple tomato soup:",
    "The main causes of the First World War were",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    "Summarise the plot of Romeo and Juliet in one sentence.",
    "Q: How many planets are there in the solar system?\nA:",
    "Q: Who wrote the novel Pride and Prejudice?\nA:",
    "Q: What is the boiling point of water at sea level in Celsius?\nA:",
    "Once upon a time, in a small village by the sea,",
    "The difference between weather and climate is",
    "Give two reasons why sleep is important for health.",
    "Q: Can you see the Great Wall of China from space with the naked eye?\nA:",
    "Q: What happens if you crack your knuckles a lot?\nA:",
    "Dear hiring manager, I am writing to apply for",
    "The most important invention of the twentieth century was",
)


def _head_time(worker: Any, rows: int, hidden: int, vocab: int, repeats: int) -> dict[str, Any]:
    """Median seconds of one head product for ``rows`` rows, in the calling process (vLLM's worker
    when sent with ``collective_rpc``: ``worker`` is then the worker object, unused)."""
    import os as _os
    import statistics as _statistics
    import time as _time

    import torch
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(vocab, hidden, generator=generator)
    h = torch.randn(rows, hidden, generator=generator)
    with torch.inference_mode():
        for _ in range(3):
            F.linear(h, weight)
        times = []
        for _ in range(repeats):
            start = _time.perf_counter()
            F.linear(h, weight)
            times.append(_time.perf_counter() - start)
    return {"seconds": _statistics.median(times), "threads": torch.get_num_threads(), "pid": _os.getpid()}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _command() -> str:
    python = Path(sys.executable)
    try:
        python = python.relative_to(Path.cwd())
    except ValueError:
        pass
    offline = "HF_HUB_OFFLINE=1 " if os.environ.get("HF_HUB_OFFLINE") else ""
    return offline + " ".join(shlex.quote(x) for x in [str(python), *sys.argv])


def _label(name: str, static_layer: int) -> str:
    return {"none": "plain vLLM", "dola": f"dola static (layer {static_layer})"}.get(name, name)


def _request_args(name: str, static_layer: int) -> dict[str, Any] | None:
    from contrastive_decoding.backends.vllm.selection import request_args

    if name == "none":
        return None
    params: dict[str, Any] = {"repetition_penalty": 1.0}
    if name == "dola":
        params["dola_layers"] = static_layer
    return request_args(name, **params)


def _hf_strategy(name: str, static_layer: int):
    from contrastive_decoding.core.registry import make_strategy

    return make_strategy("dola", dola_layers=static_layer) if name == "dola" else make_strategy(name)


def _timed_rounds(run, strategies: list[str], levels: list[int], repeats: int, tokens: int):
    """Time ``run(strategy, concurrency, tokens) -> (seconds, token ids)`` for every strategy at
    every concurrency ``repeats`` times, after one short warm-up each (strategy objects, buffers,
    the allocator). Each repeat starts the strategies one further along, so none always runs first.

    Returns:
        ``(seconds, ids)``: strategy -> concurrency -> the wall times, and the last run's ids.
    """
    for name in strategies:
        run(name, max(levels), min(tokens, 4))
    seconds: dict[str, dict[int, list[float]]] = {s: {c: [] for c in levels} for s in strategies}
    ids: dict[str, dict[int, list[list[int]]]] = {s: {} for s in strategies}
    for c in levels:
        for r in range(repeats):
            shift = r % len(strategies)
            for name in strategies[shift:] + strategies[:shift]:
                wall, out = run(name, c, tokens)
                seconds[name][c].append(wall)
                ids[name][c] = out
    return seconds, ids


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="a model folder or Hub id (default: embedded SmolLM2)")
    parser.add_argument("--strategies", default=DEFAULT_STRATEGIES, help="comma-separated; none = plain")
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated request counts")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per request (T)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds; the median is reported")
    parser.add_argument("--static-layer", type=int, default=16, help="premature layer of static `dola`")
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--memory-fraction", type=float, default=0.1, help="gpu_memory_utilization")
    parser.add_argument("--compile", action="store_true", help="enforce_eager=False (torch.compile)")
    parser.add_argument("--prefix-caching", action="store_true", help="keep vLLM's prefix cache on")
    parser.add_argument(
        "--floor-where",
        choices=("worker", "main"),
        default="worker",
        help="time the head product in vLLM's worker (default) or in this process",
    )
    parser.add_argument("--floor-repeats", type=int, default=20, help="timed head products per C")
    parser.add_argument("--hf", action=argparse.BooleanOptionalAction, default=True, help="HF comparison")
    parser.add_argument("--hf-strategies", default="dola,dola-high", help="comma-separated; none = greedy")
    parser.add_argument(
        "--hf-threads", type=int, default=None, help="torch threads for HF (default: torch's)"
    )
    parser.add_argument("--json", default=None, help="write the raw numbers to this file")
    args = parser.parse_args(argv)

    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    if "none" not in strategies:
        strategies.insert(0, "none")  # the ratios need plain vLLM
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    hf_strategies = [s.strip() for s in args.hf_strategies.split(",") if s.strip()] if args.hf else []
    if args.tokens < 1 or args.repeats < 1 or not levels or min(levels) < 1:
        raise SystemExit("--tokens, --repeats and every --concurrency level must be >= 1.")

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    if args.floor_where == "worker":
        os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc with a function

    import torch
    import vllm
    from transformers import AutoConfig, AutoTokenizer
    from vllm import SamplingParams

    from contrastive_decoding.backends.hf.loading import embedded_model_folder
    from contrastive_decoding.backends.vllm.engine import model_layout
    from contrastive_decoding.backends.vllm.llm import LLM

    folder = str(args.model or embedded_model_folder())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    prompt_ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    config = AutoConfig.from_pretrained(folder)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden, vocab = int(text_config.hidden_size), int(text_config.vocab_size)
    _, layout = model_layout(folder)
    high_layers = _hf_strategy("dola-high", args.static_layer).premature_layers(layout)

    def batch(c: int) -> list[list[int]]:
        return [prompt_ids[i % len(prompt_ids)] for i in range(c)]

    start = time.perf_counter()
    llm = LLM(
        folder,
        strategy=None,
        dtype="float32",
        max_model_len=args.max_model_len,
        gpu_memory_utilization=args.memory_fraction,
        enforce_eager=not args.compile,
        max_num_seqs=max(32, max(levels)),
        enable_prefix_caching=args.prefix_caching,
        seed=0,
    )
    engine_start = time.perf_counter() - start

    def run(name: str, c: int, tokens: int) -> tuple[float, list[list[int]]]:
        params = SamplingParams(
            temperature=0,
            max_tokens=tokens,
            ignore_eos=True,
            extra_args=_request_args(name, args.static_layer),
        )
        prompts = [{"prompt_token_ids": ids} for ids in batch(c)]
        begin = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - begin
        out = [list(o.outputs[0].token_ids) for o in outputs]
        if any(len(x) != tokens for x in out):
            raise RuntimeError(f"{name}: a request did not generate {tokens} tokens: {[len(x) for x in out]}")
        return wall, out

    times, vllm_tokens = _timed_rounds(run, strategies, levels, args.repeats, args.tokens)

    # DoLa-high floor: head products of C and of J * C rows, timed where the engine runs its model.
    J = len(high_layers)
    sizes = sorted(set(levels) | {J * c for c in levels})
    head: dict[int, dict[str, Any]] = {}
    floor_where = args.floor_where
    if floor_where == "worker":
        try:
            for n in sizes:
                head[n] = llm.collective_rpc(_head_time, args=(n, hidden, vocab, args.floor_repeats))[0]
        except Exception as exc:  # fall back, and say so
            print(f"(head product in vLLM's worker failed: {exc!r}; timing it in this process)")
            floor_where, head = "main", {}
    if floor_where == "main":
        head = {n: _head_time(None, n, hidden, vocab, args.floor_repeats) for n in sizes}

    # transformers backend on the same token ids, after vLLM (its engine idles meanwhile).
    hf_times: dict[str, dict[int, list[float]]] = {}
    hf_same: dict[str, dict[int, int]] = {}
    hf_threads = None
    if hf_strategies:
        from transformers import AutoModelForCausalLM

        from contrastive_decoding.backends.hf.generation import strategy_generate

        if args.hf_threads:
            torch.set_num_threads(args.hf_threads)
        hf_threads = torch.get_num_threads()
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        tokenizer.padding_side = "left"

        def hf_run(name: str, c: int, tokens: int) -> tuple[float, list[list[int]]]:
            ids = batch(c)
            enc = tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt")
            extra: dict[str, Any] = {}
            if name != "none":
                extra = {
                    "custom_generate": strategy_generate,
                    "strategy": _hf_strategy(name, args.static_layer),
                }
            begin = time.perf_counter()
            with torch.inference_mode():
                out = model.generate(
                    **enc,
                    do_sample=False,
                    max_new_tokens=tokens,
                    min_new_tokens=tokens,
                    repetition_penalty=1.0,
                    pad_token_id=tokenizer.pad_token_id,
                    **extra,
                )
            wall = time.perf_counter() - begin
            new = out[:, enc["input_ids"].shape[1] :].tolist()
            if any(len(x) != tokens for x in new):
                raise RuntimeError(f"HF {name}: a row did not generate {tokens} tokens.")
            return wall, new

        hf_times, hf_tokens = _timed_rounds(hf_run, hf_strategies, levels, args.repeats, args.tokens)
        hf_same = {  # rows equal to vLLM's, for the strategies both ran
            name: {
                c: sum(a == b for a, b in zip(out, vllm_tokens[name][c], strict=True))
                for c, out in by_level.items()
                if name in vllm_tokens
            }
            for name, by_level in hf_tokens.items()
        }

    # Report.
    T = args.tokens
    med = {s: {c: _median(times[s][c]) for c in levels} for s in strategies}
    worker_threads = head[sizes[0]]["threads"] if floor_where == "worker" else None
    print()
    print(f"Command: {_command()}")
    print(
        f"Device: {_cpu_model()}, {os.cpu_count()} logical CPUs; this process: {torch.get_num_threads()} "
        f"torch threads" + (f"; vLLM worker: {worker_threads} torch threads" if worker_threads else "")
    )
    print(
        f"vLLM {vllm.__version__} (enforce_eager={not args.compile}, prefix caching "
        f"{'on' if args.prefix_caching else 'off'}), torch {torch.__version__}; engine start "
        f"{engine_start:.0f} s"
    )
    mean_prompt = sum(len(x) for x in prompt_ids) / len(prompt_ids)
    print(
        f"Model: {folder} ({layout.num_layers} layers, hidden {hidden}, vocab {vocab}), float32; "
        f"T = {T} new tokens per request (ignore_eos), greedy, repetition penalty 1.0; prompts "
        f"{mean_prompt:.0f} tokens on average; median of {args.repeats}"
    )
    print()
    print("| strategy | concurrency | tokens/s | ms/token (per request) | time vs plain vLLM |")
    print("|---|---:|---:|---:|---:|")
    for name in strategies:
        for c in levels:
            wall = med[name][c]
            print(
                f"| {_label(name, args.static_layer)} | {c} | {c * T / wall:.1f} | {1000 * wall / T:.1f} "
                f"| {wall / med['none'][c]:.2f} |"
            )

    floors: dict[int, dict[str, float]] = {}
    print()
    print(
        f"DoLa-high floor: J = {J} candidate layers {list(high_layers)}; head product ({hidden} x {vocab}, "
        f"float32) timed in {'the vLLM worker' if floor_where == 'worker' else 'this process'} "
        f"({head[sizes[0]]['threads']} threads). Floor = (t_plain + J * t_head(C)) / t_plain; batched "
        "floor = (t_plain + t_head(J * C)) / t_plain (the J exits as one product, as the backend does)."
    )
    for c in levels:
        t_plain = med["none"][c] / T
        t_head, t_batched = head[c]["seconds"], head[J * c]["seconds"]
        floor = (t_plain + J * t_head) / t_plain
        batched = (t_plain + t_batched) / t_plain
        line = (
            f"  C = {c}: t_plain {1000 * t_plain:.2f} ms/step, t_head(C) {1000 * t_head:.2f} ms, "
            f"t_head(J*C) {1000 * t_batched:.2f} ms; floor {floor:.2f}, batched floor {batched:.2f}"
        )
        floors[c] = {
            "t_plain_step": t_plain,
            "t_head": t_head,
            "t_head_batched": t_batched,
            "floor_ratio": floor,
            "batched_floor_ratio": batched,
        }
        if "dola-high" in med:
            ratio = med["dola-high"][c] / med["none"][c]
            floors[c]["measured_ratio"] = ratio
            line += (
                f"; DoLa-high measured {ratio:.2f}: {100 * (ratio / floor - 1):+.0f} % vs floor, "
                f"{100 * (ratio / batched - 1):+.0f} % vs batched floor"
            )
        print(line)

    if hf_strategies:
        print()
        print(
            f"transformers backend (strategy_generate, left-padded batch of C, {hf_threads} torch threads) "
            "vs vLLM on the same token ids:"
        )
        print()
        print("| strategy | concurrency | HF tokens/s | vLLM tokens/s | vLLM / HF | same tokens rows |")
        print("|---|---:|---:|---:|---:|---:|")
        for name in hf_strategies:
            for c in levels:
                hf_tps = c * T / _median(hf_times[name][c])
                label = "HF greedy" if name == "none" else _label(name, args.static_layer)
                if name in med:
                    v_tps = c * T / med[name][c]
                    same = f"{hf_same[name][c]} of {c}"
                    print(f"| {label} | {c} | {hf_tps:.1f} | {v_tps:.1f} | {v_tps / hf_tps:.2f} | {same} |")
                else:
                    print(f"| {label} | {c} | {hf_tps:.1f} | - | - | - |")

    if args.json:
        record = {
            "command": _command(),
            "cpu": _cpu_model(),
            "cpus": os.cpu_count(),
            "main_threads": torch.get_num_threads(),
            "worker_threads": worker_threads,
            "hf_threads": hf_threads,
            "vllm": vllm.__version__,
            "torch": torch.__version__,
            "model": folder,
            "tokens": T,
            "repeats": args.repeats,
            "static_layer": args.static_layer,
            "enforce_eager": not args.compile,
            "prefix_caching": args.prefix_caching,
            "engine_start_s": engine_start,
            "vllm_seconds": {s: {str(c): v for c, v in d.items()} for s, d in times.items()},
            "hf_seconds": {s: {str(c): v for c, v in d.items()} for s, d in hf_times.items()},
            "hf_same_rows": {s: {str(c): v for c, v in d.items()} for s, d in hf_same.items()},
            "dola_high_layers": list(high_layers),
            "head_product": {str(c): h for c, h in head.items()},
            "floor_where": floor_where,
            "floor": {str(c): f for c, f in floors.items()},
        }
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
        print(f"\nWrote {args.json}")


if __name__ == "__main__":
    main()
