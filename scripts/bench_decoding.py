#!/usr/bin/env python
"""Per-token decode time and peak memory of greedy search vs DoLa, on one model in one run.

Rows (each at every ``--batch-sizes`` value; batches > 1 are left padded):

* ``greedy``: stock ``model.generate``;
* ``processor high`` / ``processor static``: :class:`~contrastive_decoding.DoLaLogitsProcessor` in
  stock ``generate`` with ``dola_layers="high"`` / one premature layer (``--static-layer``);
* ``custom high`` / ``custom static``: ``model.generate(custom_generate=dola_generate, ...)`` with
  the same two settings.

Per-token time is ``(time(N new tokens) - time(1 new token)) / (N - 1)``: generating one token is
the prefill alone, so the difference is N - 1 decoding steps. ``min_new_tokens = max_new_tokens``
so EOS never stops a run early. Each row has a warm-up run of both lengths, then ``--repeats``
timed pairs; the reported figure is the median of the per-pair estimates, and its ratio to the
greedy row of the same batch size.

Peak memory: by default every (row, batch) runs in a fresh subprocess (the model is loaded there,
from a pickled copy in a temporary folder when the source is a GGUF file or ``--tiny``). After the
load, the process's resident-set high-water mark is reset (``echo 5 > /proc/self/clear_refs``,
Linux >= 4.0), so ``peak MiB`` is the highest RSS reached while the row ran (warm-up and timed
runs) and ``delta MiB`` is that peak minus the RSS just before the row, i.e. the memory the
decoding itself needed on top of the loaded model. Where the high-water mark cannot be reset,
``ru_maxrss`` is used and includes the model load. On CUDA the figures are
``torch.cuda.max_memory_allocated`` (after ``reset_peak_memory_stats``) and its excess over
``memory_allocated`` before the row. ``--in-process`` runs every row in this process instead
(faster; on CPU the allocator may then reuse memory freed by earlier rows, so deltas are lower
bounds).

Examples:
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_decoding.py                 # SmolLM2-135M, CPU
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_decoding.py --tiny --new-tokens 8
    .venv/bin/python scripts/bench_decoding.py --model Qwen/Qwen2.5-0.5B --device cuda --json out.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ROWS = ("greedy", "processor high", "processor static", "custom high", "custom static")

PROMPTS = (
    "Question: What is the capital of France and why is it famous?\nAnswer:",
    "Write a short story about a robot who learns to paint.",
    "The three primary colours are",
    "Explain photosynthesis to a ten-year-old in two sentences, using a simple everyday analogy.",
    "Q: Who wrote Pride and Prejudice?\nA:",
    "List five fruits that are red:",
    "Translate to French: The weather is lovely today and we are going to the beach.",
    "def fibonacci(n):",
)


# ----------------------------------------------------------------------------- model and inputs


def _tiny_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=1024,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def _tiny_model():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(_tiny_config()).eval()


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise SystemExit(f"--dtype {name!r} is not a torch dtype (e.g. float32, bfloat16).")
    return dtype


def _load_for_row(source: str, dtype: torch.dtype, device: str):
    """Load the model in a row's process: ``source`` is this run's pickled copy or what --model names."""
    if source.endswith(".pickle"):
        # Written by _prepare in this run's temporary folder (GGUF-loaded models cannot be
        # `save_pretrained`), so unpickling it is safe.
        return torch.load(source, weights_only=False).to(device).eval()
    from contrastive_decoding import load_model

    model, _ = load_model(source, dtype=dtype, device=device)
    return model


def _build_inputs(tokenizer, batch_sizes: list[int], vocab_size: int) -> dict[int, dict[str, Any]]:
    """Left-padded prompts per batch size; batch 1 is the first prompt."""
    inputs: dict[int, dict[str, Any]] = {}
    for b in batch_sizes:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(b)]
        if tokenizer is not None:
            pad_id = tokenizer.pad_token_id
            if pad_id is None:
                pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
                tokenizer.pad_token_id = pad_id
            enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
            ids, mask = enc["input_ids"], enc["attention_mask"]
        else:
            gen = torch.Generator().manual_seed(1234)
            lengths = [max(4, len(p) // 4) for p in prompts]
            width = max(lengths)
            pad_id = 0
            ids = torch.full((b, width), pad_id, dtype=torch.long)
            mask = torch.zeros((b, width), dtype=torch.long)
            for row, n in enumerate(lengths):
                ids[row, width - n :] = torch.randint(3, vocab_size, (n,), generator=gen)
                mask[row, width - n :] = 1
        inputs[b] = {"input_ids": ids, "attention_mask": mask, "pad_token_id": int(pad_id)}
    return inputs


# ----------------------------------------------------------------------------- memory


def _rss_mib(field: str) -> float | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def _reset_cpu_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory of the code run between ``start()`` and ``stop()`` (see the module docstring)."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.method = ""
        self.before = 0.0

    def start(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated() / 2**20
            self.method = "torch.cuda.max_memory_allocated"
        elif _reset_cpu_peak() and _rss_mib("VmHWM") is not None:
            self.before = _rss_mib("VmRSS") or 0.0
            self.method = "VmHWM after clear_refs reset"
        else:
            self.before = _maxrss_mib()
            self.method = "ru_maxrss (not resettable; includes the model load)"

    def stop(self) -> tuple[float, float]:
        """Return ``(peak MiB, peak minus the level at start() in MiB)``."""
        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / 2**20
        elif self.method.startswith("VmHWM"):
            peak = _rss_mib("VmHWM") or 0.0
        else:
            peak = _maxrss_mib()
        return peak, peak - self.before


def _maxrss_mib() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024.0


# ----------------------------------------------------------------------------- one row


def _static_layer(num_layers: int, requested: int | None) -> int:
    if requested is not None:
        return requested
    return min(num_layers // 2 + 1, num_layers - 1)


def _row_call(model, row: str, inputs: dict[str, Any], static_layer: int | None, rep_penalty: float | None):
    """A function ``f(n)`` that generates ``n`` new tokens the way ``row`` says, and the layers used."""
    from transformers import LogitsProcessorList

    from contrastive_decoding import DoLaLogitsProcessor, LayerReadout, dola_candidate_layers, dola_generate

    readout = LayerReadout.from_model(model)
    device = model.device
    ids = inputs["input_ids"].to(device)
    mask = inputs["attention_mask"].to(device)
    common: dict[str, Any] = {"do_sample": False, "pad_token_id": inputs["pad_token_id"]}
    if rep_penalty is not None:
        common["repetition_penalty"] = rep_penalty
    kind = row.split()[0]
    static = _static_layer(readout.num_layers, static_layer)
    dola_layers: Any = None if kind == "greedy" else ("high" if row.endswith("high") else static)
    layers = (
        []
        if dola_layers is None
        else dola_candidate_layers(dola_layers, readout.num_layers, readout.tied_embeddings)
    )

    def run(n: int) -> torch.Tensor:
        kw = dict(common, max_new_tokens=n, min_new_tokens=n)
        if kind == "greedy":
            return model.generate(input_ids=ids, attention_mask=mask, **kw)
        if kind == "processor":
            with DoLaLogitsProcessor(model, dola_layers=dola_layers) as proc:
                return model.generate(
                    input_ids=ids, attention_mask=mask, logits_processor=LogitsProcessorList([proc]), **kw
                )
        return model.generate(
            input_ids=ids, attention_mask=mask, custom_generate=dola_generate, dola_layers=dola_layers, **kw
        )

    return run, layers


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_row(model, row: str, inputs: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Warm up, time ``repeats`` (N, 1)-token pairs and record the peak memory of one row."""
    device = str(model.device)
    n = args.new_tokens
    run, layers = _row_call(model, row, inputs, args.static_layer, args.repetition_penalty)
    memory = PeakMemory(device)
    memory.start()
    with torch.inference_mode():
        for length in (n, 1):  # warm-up
            out = run(length)
            if out.shape[1] != inputs["input_ids"].shape[1] + length:
                raise RuntimeError(f"{row}: expected {length} new tokens, got {out.shape}.")
        per_token, t_n, t_1 = [], [], []
        for _ in range(args.repeats):
            times = {}
            for length in (n, 1):
                _sync(device)
                start = time.perf_counter()
                run(length)
                _sync(device)
                times[length] = time.perf_counter() - start
            t_n.append(times[n])
            t_1.append(times[1])
            per_token.append((times[n] - times[1]) / (n - 1))
    peak, delta = memory.stop()
    return {
        "row": row,
        "batch": int(inputs["input_ids"].shape[0]),
        "prompt_tokens": int(inputs["input_ids"].shape[1]),
        "layers": layers,
        "ms_per_token": 1e3 * statistics.median(per_token),
        "ms_per_token_runs": [1e3 * t for t in per_token],
        "ms_generate_n": 1e3 * statistics.median(t_n),
        "ms_prefill": 1e3 * statistics.median(t_1),
        "peak_mib": peak,
        "delta_mib": delta,
        "memory_method": memory.method,
    }


# ----------------------------------------------------------------------------- driver


def _child(args: argparse.Namespace) -> None:
    """Run one (row, batch) in this fresh process and print its result as the last line."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = _load_for_row(args.child_source, _dtype(args.dtype), args.device)
    inputs = torch.load(args.child_inputs)[args.child_batch]
    result = run_row(model, args.child_row, inputs, args)
    print("RESULT " + json.dumps(result))


def _prepare(args: argparse.Namespace, workdir: Path) -> tuple[str, Any, Path]:
    """Model source for the rows, the model (in-process mode only) and the saved inputs file."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    dtype = _dtype(args.dtype)
    tokenizer = None
    model = None
    if args.tiny:
        model = _tiny_model().to(dtype)
        vocab = model.config.vocab_size
        source = str(workdir / "model.pickle")
    else:
        from contrastive_decoding import DEFAULT_MODEL, load_model

        name = args.model
        needs_copy = name == DEFAULT_MODEL or name.endswith(".gguf")
        if needs_copy or args.in_process:
            model, tokenizer = load_model(name, dtype=dtype, device="cpu" if needs_copy else args.device)
        else:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(name)
        vocab = len(tokenizer)
        source = str(workdir / "model.pickle") if needs_copy else name
    if model is not None and source.endswith(".pickle") and not args.in_process:
        torch.save(model, source)
        model = None
        gc.collect()
    elif model is not None:
        model = model.to(args.device)
    inputs_path = workdir / "inputs.pt"
    torch.save(_build_inputs(tokenizer, args.batch_sizes, vocab), inputs_path)
    return source, model, inputs_path


def _run_subprocess(args, row: str, batch: int, source: str, inputs_path: Path) -> dict[str, Any]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child-row",
        row,
        "--child-batch",
        str(batch),
        "--child-source",
        source,
        "--child-inputs",
        str(inputs_path),
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--new-tokens",
        str(args.new_tokens),
        "--repeats",
        str(args.repeats),
    ]
    if args.static_layer is not None:
        cmd += ["--static-layer", str(args.static_layer)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.repetition_penalty is not None:
        cmd += ["--repetition-penalty", str(args.repetition_penalty)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise RuntimeError(f"row {row!r} batch {batch} failed (exit {proc.returncode}).")
    return json.loads(lines[-1][len("RESULT ") :])


def _table(results: list[dict[str, Any]]) -> str:
    greedy = {r["batch"]: r["ms_per_token"] for r in results if r["row"] == "greedy"}
    lines = [
        "| row | batch | ms/token | x greedy | peak MiB | delta MiB | layers |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        base = greedy.get(r["batch"])
        ratio = f"{r['ms_per_token'] / base:.3f}" if base else "-"
        layers = ",".join(map(str, r["layers"])) if r["layers"] else "-"
        lines.append(
            f"| {r['row']} | {r['batch']} | {r['ms_per_token']:.2f} | {ratio} | "
            f"{r['peak_mib']:.0f} | {r['delta_mib']:.1f} | {layers} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default="smollm2", help="'smollm2' (embedded), a Hub id, a folder or a .gguf"
    )
    parser.add_argument("--tiny", action="store_true", help="a tiny random 8-layer llama (fast smoke test)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--new-tokens", type=int, default=32, help="N, tokens per timed run (>= 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed (N, 1)-token pairs per row")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS), metavar="ROW")
    parser.add_argument(
        "--static-layer",
        type=int,
        default=None,
        help="static DoLa layer (default N//2 + 1, 16 for 30 layers)",
    )
    parser.add_argument("--repetition-penalty", type=float, default=None, help="applied to every row")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--in-process", action="store_true", help="run all rows here (no subprocesses)")
    parser.add_argument("--json", type=Path, default=None, help="also save the results as JSON here")
    for hidden in ("--child-row", "--child-source", "--child-inputs"):
        parser.add_argument(hidden, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-batch", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (the prefill is subtracted).")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1.")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda given but CUDA is not available.")
    if "greedy" not in args.rows:
        args.rows = ["greedy", *args.rows]

    if args.child_row is not None:
        _child(args)
        return
    if args.threads:
        torch.set_num_threads(args.threads)

    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    if load_start is not None and not args.device.startswith("cuda") and load_start > 0.5:
        print(
            f"# warning: 1-minute load average is {load_start:.2f} before starting; other processes "
            "compete for the CPU and the timings will be noisy.",
            file=sys.stderr,
        )
    started = time.perf_counter()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench_decoding_") as tmp:
        source, model, inputs_path = _prepare(args, Path(tmp))
        inputs = torch.load(inputs_path)
        for batch in args.batch_sizes:
            for row in args.rows:
                if args.in_process:
                    result = run_row(model, row, inputs[batch], args)
                else:
                    result = _run_subprocess(args, row, batch, source, inputs_path)
                results.append(result)
                print(
                    f"# {row:16s} batch {batch}: {result['ms_per_token']:8.2f} ms/token "
                    f"(runs {', '.join(f'{t:.1f}' for t in result['ms_per_token_runs'])}), "
                    f"peak {result['peak_mib']:.0f} MiB",
                    file=sys.stderr,
                    flush=True,
                )

    import transformers

    meta = {
        "model": "tiny-random-llama" if args.tiny else args.model,
        "device": args.device,
        "device_name": (
            torch.cuda.get_device_name(args.device)
            if args.device.startswith("cuda")
            else platform.processor() or platform.machine()
        ),
        "dtype": args.dtype,
        "torch_threads": args.threads or torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_start": load_start,
        "load_average_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "isolation": "in-process" if args.in_process else "one subprocess per row",
        "memory_method": results[0]["memory_method"] if results else None,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "wall_s": time.perf_counter() - started,
    }
    print(
        f"Model {meta['model']} ({args.dtype}) on {args.device}, {meta['torch_threads']} torch threads; "
        f"{args.new_tokens} new tokens, median of {args.repeats}; "
        f"ms/token = (t(N) - t(1)) / (N - 1); memory: {meta['memory_method']}, {meta['isolation']}."
    )
    print()
    print(_table(results))
    if args.json is not None:
        args.json.write_text(json.dumps({"meta": meta, "rows": results}, indent=2))
        print(f"\nSaved {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
