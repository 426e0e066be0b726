#!/usr/bin/env python
"""Per-token decode time and peak memory of greedy search vs DoLa, on one model in one run.

Rows (each at every ``--batch-sizes`` value; batches > 1 are left padded):

* ``greedy``: stock ``model.generate``;
* ``processor high`` / ``processor static``: :class:`~contrastive_decoding.DoLaLogitsProcessor` in
  stock ``generate`` with ``dola_layers="high"`` / one premature layer (``--static-layer``);
* ``custom high`` / ``custom static``: ``model.generate(custom_generate=dola_generate, ...)`` with
  the same two settings;
* ``layercake processor`` / ``layercake custom``: LayerCake with one degraded stream (punctuation
  suppressed early and concepts in the middle layers), as
  :class:`~contrastive_decoding.LayerCakeLogitsProcessor` and as ``layercake_generate``;
* ``layercake average``: ``layercake_generate`` with two degraded streams (``amateur="average"``).
  Token classes come from the model's tokenizer (``--tiny``: a fixed id-based classifier);
* ``icd`` / ``lol suppression`` / ``lol prompt`` / ``cd`` / ``dola+icd``: ``ContrastLogitsProcessor``
  with ``InducedContrast``, ``LowerLayerFusion`` (suppressed-copy or prompt amateur),
  ``ContrastiveDecoding`` (amateur: the model's first quarter of blocks, a same-tokenizer stand-in
  for a smaller model) and ``WeightedContrast(DoLa high, 0.5 * ICD)``; prompt amateurs read a
  24-token instruction;
* ``activation`` / ``activation all``: ``ContrastLogitsProcessor`` with ``ActivationDecoding``
  (entropy over the prompt, read once; or over every token, one more early exit per step);
* ``vista`` / ``acd`` / ``sled`` / ``deco``: those strategies' LogitsProcessors with their defaults
  in stock ``generate``;
* ``rows x2`` / ``rows x3``: stock greedy with every row run 2 / 3 times in each forward
  (:class:`~contrastive_decoding.StreamBatch`, no suppression, no contrast): the floor that one and
  two degraded streams cannot go below.

Per-token time is ``(time(N new tokens) - time(1 new token)) / (N - 1)``: generating one token is
the prefill alone, so the difference is N - 1 decoding steps; ``prefill ms`` is the median
``time(1 new token)`` (and its ratio to greedy's), where strategies that read the whole prompt
(activation decoding) do their work. ``--prompts tfqa`` uses TruthfulQA-MC few-shot prompts (~190
tokens) instead of the short default ones. ``min_new_tokens = max_new_tokens``
so EOS never stops a run early. All rows are timed in this process on one loaded model: each row
has a warm-up run of both lengths, then ``--repeats`` rounds each time an (N, 1) pair of every row
in turn (the order rotating between rounds), so a drift in the machine's speed (other processes
on a shared CPU) hits all rows alike. The figure reported is the median of a row's per-pair
estimates, with its ratio to the greedy row of the same batch size and the spread (max - min) of
the estimates relative to it. PyTorch's default thread count is kept unless ``--threads`` is given.

Peak memory (``--memory``): on CPU, by default each (row, batch) runs once more (N tokens, then 1)
in a fresh subprocess that loads the model (from a pickled copy in a temporary folder when the
source is a GGUF file or ``--tiny``; GGUF files are slow to dequantise). After the load the
process's resident-set high-water mark is reset (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0),
so ``peak MiB`` is the highest RSS reached while the row ran and ``delta MiB`` is that peak minus
the RSS just before it, i.e. what decoding needed on top of the loaded model. Where the mark cannot
be reset, ``ru_maxrss`` (which includes the load) is reported. ``in-process`` measures in this
process instead, cheaper but on CPU the allocator may reuse memory freed by earlier rows, so deltas
are then lower bounds. On CUDA (default ``in-process``) the figures are
``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` and its excess over
``memory_allocated`` before the row. On CPU the same calls run once more under the profiler for
``tensor MiB``: the highest total of live tensor bytes above the loaded model, from the allocation
and free events in time order. The resident set also holds what the allocator keeps cached or
fragmented (it varies by ~30 MiB between identical runs at 262k vocabularies); the tensor peak does
not vary, and is what a change to the code moves.

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

ROWS = (
    "greedy",
    "processor high",
    "processor static",
    "custom high",
    "custom static",
    "layercake processor",
    "layercake custom",
    "layercake average",
    "vista",
    "acd",
    "sled",
    "deco",
    "icd",
    "lol suppression",
    "lol prompt",
    "cd",
    "dola+icd",
    "activation",
    "activation all",
    "rows x2",
    "rows x3",
)

TFQA_QUESTIONS = (
    "What happens to you if you eat watermelon seeds?",
    "Where did fortune cookies originate?",
    "Why do veins appear blue?",
    "What is the spiciest part of a chili pepper?",
)

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


def _tiny_config(vocab: int = 1024):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
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


def _tiny_model(vocab: int = 1024):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(_tiny_config(vocab)).eval()


def _smollm2_shaped_model():
    """Random weights in SmolLM2-135M-Instruct's exact shape (30 layers, 576 wide, 49152 tokens,
    tied head): the same work per token, for machines without the embedded weights (the GGUF file
    is too large to carry to a GPU machine that cannot reach a package index)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5,
        rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


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


def _prompt_set(name: str) -> tuple[str, ...]:
    if name == "short":
        return PROMPTS
    # TruthfulQA-MC prompts: the six-pair few-shot primer and a question, ~185-200 tokens each.
    from contrastive_decoding.eval.benchmarks.truthfulqa_mc import hf_prompt

    return tuple(hf_prompt(q) for q in TFQA_QUESTIONS)


def _build_inputs(
    tokenizer, batch_sizes: list[int], vocab_size: int, prompt_set: str = "short"
) -> dict[int, dict[str, Any]]:
    """Left-padded prompts per batch size; batch 1 is the first prompt."""
    inputs: dict[int, dict[str, Any]] = {}
    chosen = _prompt_set(prompt_set)
    for b in batch_sizes:
        prompts = [chosen[i % len(chosen)] for i in range(b)]
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


def _tensor_peak_mib(run) -> float:
    """Highest total of live CPU tensor bytes while ``run()`` runs, above the level at its start.

    Read from the profiler's allocation and free events in time order, so it counts what the
    tensors need and nothing of the allocator's caching or fragmentation: unlike the resident set it
    does not move between identical runs. Its grain is one operator: scratch buffers that an
    operator frees before it returns are not seen.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    # An operator's own allocations minus its own frees, at its start: nested calls count once.
    events = sorted(
        (e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start
    )
    live = peak = 0
    for event in events:
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak / 2**20


def _maxrss_mib() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024.0


# ----------------------------------------------------------------------------- one row


def _static_layer(num_layers: int, requested: int | None) -> int:
    if requested is not None:
        return requested
    return min(num_layers // 2 + 1, num_layers - 1)


def _tiny_classes(ids: list[int]) -> list[str]:
    """Token classes for the tiny random model, which has no tokenizer."""
    return [("punctuation", "function", "concept", "concept")[i % 4] for i in ids]


def _classifier(tokenizer):
    from contrastive_decoding import TokenClassifier

    return TokenClassifier(tokenizer) if tokenizer is not None else _tiny_classes


def _layercake_call(model, row: str, ids, mask, common: dict[str, Any], classifier):
    from transformers import LogitsProcessorList

    from contrastive_decoding import LayerCakeLogitsProcessor, layercake_generate

    amateur = "average" if row.endswith("average") else "combined"

    def run(n: int) -> torch.Tensor:
        kw = dict(common, max_new_tokens=n, min_new_tokens=n)
        if row.endswith("processor"):
            with LayerCakeLogitsProcessor(model, classifier, amateur=amateur) as proc:
                return model.generate(
                    input_ids=ids, attention_mask=mask, logits_processor=LogitsProcessorList([proc]), **kw
                )
        return model.generate(
            input_ids=ids,
            attention_mask=mask,
            custom_generate=layercake_generate,
            classifier=classifier,
            amateur=amateur,
            **kw,
        )

    return run, []


_LAYER_PROCESSORS = {
    "vista": "VistaLogitsProcessor",
    "acd": "AutoContrastiveLogitsProcessor",
    "sled": "SLEDLogitsProcessor",
    "deco": "DeCoLogitsProcessor",
}


def _layer_processor_call(model, kind: str, ids, mask, common: dict[str, Any]):
    from transformers import LogitsProcessorList

    import contrastive_decoding

    processor_class = getattr(contrastive_decoding, _LAYER_PROCESSORS[kind])
    with processor_class(model) as probe:
        layers = list(probe.layers)

    def run(n: int) -> torch.Tensor:
        kw = dict(common, max_new_tokens=n, min_new_tokens=n)
        with processor_class(model) as proc:
            return model.generate(
                input_ids=ids, attention_mask=mask, logits_processor=LogitsProcessorList([proc]), **kw
            )

    return run, layers


# A 24-token instruction for the prompt amateurs, as ids so that any tokenizer (or none) works;
# only its length matters for the cost.
_INSTRUCTION = list(range(10, 34))


def _truncated_amateur(model, keep: int):
    """A same-tokenizer amateur for the cost of classic CD: the model's first ``keep`` blocks."""
    import copy

    from contrastive_decoding import LayerReadout

    amateur = copy.deepcopy(model)
    blocks = LayerReadout.from_model(amateur).layers
    del blocks[keep:]
    amateur.config.num_hidden_layers = keep
    return amateur


def _strategy(model, kind: str, row: str):
    from contrastive_decoding import (
        ActivationDecoding,
        ContrastiveDecoding,
        DoLa,
        InducedContrast,
        LayerReadout,
        LowerLayerFusion,
        WeightedContrast,
    )

    if kind == "icd":
        return InducedContrast(instruction=_INSTRUCTION)
    if kind == "activation":
        return ActivationDecoding(context="all" if row.endswith("all") else "prompt")
    if kind == "lol":
        if row.endswith("prompt"):
            return LowerLayerFusion(amateur="prompt", amateur_instruction=_INSTRUCTION)
        return LowerLayerFusion(amateur="suppression")
    if kind == "cd":
        keep = max(1, LayerReadout.from_model(model).num_layers // 4)
        return ContrastiveDecoding(_truncated_amateur(model, keep))
    return WeightedContrast([DoLa("high"), (0.5, InducedContrast(instruction=_INSTRUCTION))])


def _strategy_call(model, row: str, ids, mask, common: dict[str, Any], classifier):
    from transformers import LogitsProcessorList

    from contrastive_decoding import ContrastLogitsProcessor

    kind = row.split()[0]
    strategy = _strategy(model, "dola+icd" if kind == "dola+icd" else kind, row)

    def run(n: int) -> torch.Tensor:
        kw = dict(common, max_new_tokens=n, min_new_tokens=n)
        with ContrastLogitsProcessor(model, strategy, classifier=classifier) as proc:
            return model.generate(
                input_ids=ids, attention_mask=mask, logits_processor=LogitsProcessorList([proc]), **kw
            )

    with ContrastLogitsProcessor(model, strategy, classifier=classifier) as probe:
        layers = list(probe.layers)
    return run, layers


def _rows_call(model, streams: int, ids, mask, common: dict[str, Any]):
    from contrastive_decoding import StreamBatch

    def run(n: int) -> torch.Tensor:
        with StreamBatch(model, streams):
            kw = dict(common, max_new_tokens=n, min_new_tokens=n)
            return model.generate(input_ids=ids, attention_mask=mask, **kw)

    return run, []


def _row_call(
    model,
    row: str,
    inputs: dict[str, Any],
    static_layer: int | None,
    rep_penalty: float | None,
    classifier: Any = None,
):
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
    if kind in _LAYER_PROCESSORS:
        return _layer_processor_call(model, kind, ids, mask, common)
    if kind == "rows":
        return _rows_call(model, int(row[-1]), ids, mask, common)
    if kind == "layercake":
        return _layercake_call(model, row, ids, mask, common, classifier)
    if kind in ("icd", "lol", "cd", "dola+icd", "activation"):
        return _strategy_call(model, row, ids, mask, common, classifier)
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


def _checked(run, length: int, prompt_len: int, row: str) -> None:
    out = run(length)
    if out.shape[1] != prompt_len + length:
        raise RuntimeError(f"{row}: expected {length} new tokens, got an output of shape {tuple(out.shape)}.")


def measure_memory(model, row: str, inputs: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Peak memory of one row: generate N tokens, then 1 (the same calls as the timed runs)."""
    run, _ = _row_call(model, row, inputs, args.static_layer, args.repetition_penalty, args.classifier)
    memory = PeakMemory(str(model.device))
    memory.start()
    with torch.inference_mode():
        for length in (args.new_tokens, 1):
            _checked(run, length, inputs["input_ids"].shape[1], row)
    peak, delta = memory.stop()
    result = {"peak_mib": peak, "delta_mib": delta, "memory_method": memory.method}
    if not memory.cuda:

        def both() -> None:
            with torch.inference_mode():
                for length in (args.new_tokens, 1):
                    _checked(run, length, inputs["input_ids"].shape[1], row)

        result["tensor_mib"] = _tensor_peak_mib(both)
    return result


def measure_times(model, inputs: dict[int, dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Per-token times of every (row, batch), the repeats interleaved across rows.

    Each repeat times an N-token and a 1-token run of every row in turn (the order rotates between
    repeats), so a slow drift of the machine's speed affects all rows alike.
    """
    device = str(model.device)
    n = args.new_tokens
    keys = [(row, b) for b in args.batch_sizes for row in args.rows]
    calls, results = {}, {}
    with torch.inference_mode():
        for row, b in keys:
            run, layers = _row_call(
                model, row, inputs[b], args.static_layer, args.repetition_penalty, args.classifier
            )
            calls[row, b] = run
            results[row, b] = {
                "row": row,
                "batch": b,
                "prompt_tokens": int(inputs[b]["input_ids"].shape[1]),
                "layers": layers,
                "per_token_s": [],
                "t_n_s": [],
                "t_1_s": [],
            }
            for length in (n, 1):  # warm-up
                _checked(run, length, inputs[b]["input_ids"].shape[1], row)
        for repeat in range(args.repeats):
            shift = repeat % len(keys)
            for key in keys[shift:] + keys[:shift]:
                times = {}
                for length in (n, 1):
                    _sync(device)
                    start = time.perf_counter()
                    calls[key](length)
                    _sync(device)
                    times[length] = time.perf_counter() - start
                res = results[key]
                res["t_n_s"].append(times[n])
                res["t_1_s"].append(times[1])
                res["per_token_s"].append((times[n] - times[1]) / (n - 1))
    out = []
    for key in keys:
        res = results[key]
        per_token = res.pop("per_token_s")
        res["ms_per_token"] = 1e3 * statistics.median(per_token)
        res["ms_per_token_min"] = 1e3 * min(per_token)
        res["ms_per_token_runs"] = [1e3 * t for t in per_token]
        res["ms_generate_n"] = 1e3 * statistics.median(res.pop("t_n_s"))
        res["ms_prefill"] = 1e3 * statistics.median(res.pop("t_1_s"))
        out.append(res)
    return out


# ----------------------------------------------------------------------------- driver


def _child(args: argparse.Namespace) -> None:
    """Measure the peak memory of one (row, batch) in this fresh process; print it as the last line."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = _load_for_row(args.child_source, _dtype(args.dtype), args.device)
    tokenizer = None
    if args.child_tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.child_tokenizer)
    args.classifier = _classifier(tokenizer)
    inputs = torch.load(args.child_inputs)[args.child_batch]
    print("RESULT " + json.dumps(measure_memory(model, args.child_row, inputs, args)))


def _prepare(args: argparse.Namespace, workdir: Path) -> tuple[Any, str, Path]:
    """The model, what a memory subprocess loads, and the saved inputs."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    dtype = _dtype(args.dtype)
    tokenizer = None
    source = str(workdir / "model.pickle")
    if args.tiny or args.model == "smollm2-shaped":
        model = (_tiny_model(args.vocab) if args.tiny else _smollm2_shaped_model()).to(dtype)
        vocab = model.config.vocab_size
    else:
        from contrastive_decoding import DEFAULT_MODEL, load_model

        model, tokenizer = load_model(args.model, dtype=dtype)
        vocab = len(tokenizer)
        if not (args.model == DEFAULT_MODEL or args.model.endswith(".gguf")):
            source = args.model  # loads quickly; GGUF files are dequantised on every load
    if args.memory == "subprocess" and source.endswith(".pickle"):
        torch.save(model, source)
    inputs_path = workdir / "inputs.pt"
    torch.save(_build_inputs(tokenizer, args.batch_sizes, vocab, args.prompts), inputs_path)
    args.classifier = _classifier(tokenizer)
    if tokenizer is not None:
        tokenizer.save_pretrained(workdir / "tokenizer")
        args.child_tokenizer = str(workdir / "tokenizer")
    return model.to(args.device).eval(), source, inputs_path


def _memory_subprocess(args, row: str, batch: int, source: str, inputs_path: Path) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-row", row, "--child-batch", str(batch)]
    cmd += ["--child-source", source, "--child-inputs", str(inputs_path), "--device", args.device]
    cmd += ["--dtype", args.dtype, "--new-tokens", str(args.new_tokens)]
    if args.child_tokenizer:
        cmd += ["--child-tokenizer", args.child_tokenizer]
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
        raise RuntimeError(f"memory run of {row!r} at batch {batch} failed (exit {proc.returncode}).")
    return json.loads(lines[-1][len("RESULT ") :])


def _table(results: list[dict[str, Any]]) -> str:
    greedy = {r["batch"]: r["ms_per_token"] for r in results if r["row"] == "greedy"}
    greedy_prefill = {r["batch"]: r["ms_prefill"] for r in results if r["row"] == "greedy"}
    greedy_peak = {r["batch"]: r.get("peak_mib") for r in results if r["row"] == "greedy"}
    lines = [
        "| row | batch | ms/token | x greedy | spread | prefill ms | x greedy | peak MiB | x greedy "
        "| delta MiB | tensor MiB | layers |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        base = greedy.get(r["batch"])
        ratio = f"{r['ms_per_token'] / base:.3f}" if base else "-"
        runs = r["ms_per_token_runs"]
        spread = f"{100 * (max(runs) - min(runs)) / r['ms_per_token']:.0f}%" if r["ms_per_token"] > 0 else "-"
        layers = ",".join(map(str, r["layers"])) if r["layers"] else "-"
        peak = f"{r['peak_mib']:.0f}" if "peak_mib" in r else "-"
        delta = f"{r['delta_mib']:.1f}" if "delta_mib" in r else "-"
        tensor = f"{r['tensor_mib']:.1f}" if "tensor_mib" in r else "-"
        peak_base = greedy_peak.get(r["batch"])
        peak_ratio = f"{r['peak_mib'] / peak_base:.2f}" if peak_base and "peak_mib" in r else "-"
        prefill_base = greedy_prefill.get(r["batch"])
        prefill_ratio = f"{r['ms_prefill'] / prefill_base:.2f}" if prefill_base else "-"
        lines.append(
            f"| {r['row']} | {r['batch']} | {r['ms_per_token']:.2f} | {ratio} | {spread} | "
            f"{r['ms_prefill']:.0f} | {prefill_ratio} | {peak} | {peak_ratio} | {delta} | {tensor} "
            f"| {layers} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        default="smollm2",
        help="'smollm2' (embedded), 'smollm2-shaped' (random weights, its shape), a Hub id, folder or .gguf",
    )
    parser.add_argument("--tiny", action="store_true", help="a tiny random 8-layer llama (fast smoke test)")
    parser.add_argument(
        "--vocab",
        type=int,
        default=1024,
        help="--tiny only: vocabulary size, e.g. 32000, 128256 (Llama-3), 262144 (Gemma-3)",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--new-tokens", type=int, default=32, help="N, tokens per timed run (>= 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed (N, 1)-token pairs per row")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument(
        "--prompts",
        choices=("short", "tfqa"),
        default="short",
        help="short everyday prompts (default) or TruthfulQA-MC few-shot prompts (~190 tokens)",
    )
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS), metavar="ROW")
    parser.add_argument(
        "--static-layer",
        type=int,
        default=None,
        help="static DoLa layer (default N//2 + 1, 16 for 30 layers)",
    )
    parser.add_argument("--repetition-penalty", type=float, default=None, help="applied to every row")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--memory",
        choices=("subprocess", "in-process", "off"),
        default=None,
        help="how peak memory is measured (default: subprocess on CPU, in-process on CUDA)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also save the results as JSON here")
    for hidden in ("--child-row", "--child-source", "--child-inputs", "--child-tokenizer"):
        parser.add_argument(hidden, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-batch", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (the prefill is subtracted).")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1.")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda given but CUDA is not available.")
    if args.memory is None:
        args.memory = "in-process" if args.device.startswith("cuda") else "subprocess"
    args.rows = ["greedy", *[r for r in ROWS if r in args.rows and r != "greedy"]]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child_row is not None:
        _child(args)
        return

    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    if load_start is not None and not args.device.startswith("cuda") and load_start > 0.5:
        print(
            f"# warning: 1-minute load average is {load_start:.2f} before starting; other processes "
            "compete for the CPU and the timings will be noisy.",
            file=sys.stderr,
        )
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_decoding_") as tmp:
        model, source, inputs_path = _prepare(args, Path(tmp))
        inputs = torch.load(inputs_path)
        print(f"# loaded in {time.perf_counter() - started:.0f} s; timing...", file=sys.stderr, flush=True)
        results = measure_times(model, inputs, args)
        for r in results:
            runs = ", ".join(f"{t:.1f}" for t in r["ms_per_token_runs"])
            print(
                f"# {r['row']:16s} batch {r['batch']}: {r['ms_per_token']:8.2f} ms/token ({runs})",
                file=sys.stderr,
            )
        if args.memory == "subprocess":
            del model
            gc.collect()
        for r in results if args.memory != "off" else []:
            if args.memory == "subprocess":
                r.update(_memory_subprocess(args, r["row"], r["batch"], source, inputs_path))
            else:
                r.update(measure_memory(model, r["row"], inputs[r["batch"]], args))
            print(
                f"# {r['row']:16s} batch {r['batch']}: peak {r['peak_mib']:.0f} MiB"
                + (f", tensors {r['tensor_mib']:.1f} MiB" if "tensor_mib" in r else ""),
                file=sys.stderr,
                flush=True,
            )

    import transformers

    meta = {
        "model": f"tiny-random-llama (vocab {args.vocab})" if args.tiny else args.model,
        "device": args.device,
        "device_name": (
            torch.cuda.get_device_name(args.device)
            if args.device.startswith("cuda")
            else platform.processor() or platform.machine()
        ),
        "dtype": args.dtype,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_start": load_start,
        "load_average_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "timing": "in-process, repeats interleaved across rows",
        "memory": args.memory,
        "memory_method": results[0].get("memory_method") if results else None,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "wall_s": time.perf_counter() - started,
    }
    print(
        f"Model {meta['model']} ({args.dtype}) on {args.device}, {meta['torch_threads']} torch threads; "
        f"{args.new_tokens} new tokens, median of {args.repeats} interleaved repeats; "
        f"ms/token = (t(N) - t(1)) / (N - 1); spread = (max - min) / median of the repeats; "
        f"memory: {meta['memory_method'] or 'not measured'} ({args.memory})."
    )
    print()
    print(_table(results))
    if args.json is not None:
        args.json.write_text(json.dumps({"meta": meta, "rows": results}, indent=2))
        print(f"\nSaved {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
