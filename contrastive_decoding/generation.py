"""Custom generate loops: ``model.generate(custom_generate=dola_generate, ...)``.

``generate`` does all its usual preparation (generation config, attention mask, cache, logits
processors, stopping criteria) and then hands over to the loop here, which runs greedy search or
sampling with the strategy's contrast applied to the raw mature logits BEFORE the configured
logits processors, so ``repetition_penalty=1.2`` acts on the contrasted scores, as in DoLa.
"""

from __future__ import annotations

import inspect
from typing import Any, Literal

import torch
from torch import nn
from transformers import GenerationConfig, GenerationMixin, LogitsProcessorList, StoppingCriteriaList
from transformers.generation.utils import GenerateDecoderOnlyOutput

from .cache_names import cache_field, cache_from
from .sources import ContrastSources
from .strategies.base import ContrastStrategy
from .strategies.dola import DoLa, DoLaLayers

__all__ = ["contrast_generate", "dola_generate", "strategy_generate"]


def _check_loop_options(generation_config: GenerationConfig, loop_name: str) -> None:
    if getattr(generation_config, "num_beams", 1) not in (None, 1):
        raise ValueError(
            f"`num_beams={generation_config.num_beams}` is not supported by {loop_name}, which does "
            "greedy search and sampling; for beam search with a strategy of early exits only (DoLa, "
            "SLED, ...), pass its LogitsProcessor (e.g. DoLaLogitsProcessor) in `logits_processor=` "
            "of stock `generate` "
            "(strategies with degraded streams or an amateur support no beam search)."
        )
    for flag in ("output_attentions", "output_hidden_states"):
        if generation_config.return_dict_in_generate and getattr(generation_config, flag, False):
            raise ValueError(
                f"`{flag}=True` is not supported by {loop_name} (it keeps only the layers it needs); "
                "use the strategy's LogitsProcessor with stock `generate` to get them."
            )
    if getattr(generation_config, "assistant_model", None) is not None:
        raise ValueError(f"{loop_name} does not support assisted decoding (`assistant_model`).")


def contrast_generate(
    model: nn.Module,
    strategy: ContrastStrategy,
    input_ids: torch.LongTensor,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config: GenerationConfig,
    synced_gpus: bool = False,
    streamer: Any = None,
    classifier: Any = None,
    tokenizer: Any = None,
    **model_kwargs: Any,
) -> GenerateDecoderOnlyOutput | torch.LongTensor:
    """Greedy search / sampling where each step's mature logits are contrasted by ``strategy``.

    The arguments after ``strategy`` are the ones ``generate`` passes to a ``custom_generate``
    callable; ``classifier`` (the tokenizer, a TokenClassifier or a callable) is needed by
    strategies with degraded streams, such as LayerCake, and ``tokenizer`` by an amateur whose
    prefix is text (either one may be the tokenizer). With ``return_dict_in_generate=True`` the
    output also carries ``premature_layers``, the layer used at each step for each row,
    ``(batch, steps)``, for strategies that choose layers.
    """
    loop_name = f"the {type(strategy).__name__} generate loop"
    _check_loop_options(generation_config, loop_name)
    if tokenizer is None:
        tokenizer = model_kwargs.pop("tokenizer", None)
    source = ContrastSources(model, strategy, tokenizer, classifier)
    if source.streams is not None or source.amateur is not None:
        cache = cache_from(model_kwargs)
        if cache is not None and cache.get_seq_length() > 0:
            raise ValueError(
                f"{loop_name} keeps a cache row per stream; "
                "do not pass a filled KV cache (`cache` or `past_key_values`)."
            )
    layer_ids = torch.tensor(source.layers, dtype=torch.long, device=input_ids.device)

    pad_token_id = generation_config._pad_token_tensor
    has_eos_stopping_criteria = any(hasattr(c, "eos_token_id") for c in stopping_criteria)
    do_sample = generation_config.do_sample
    return_dict = generation_config.return_dict_in_generate
    scores = () if (return_dict and generation_config.output_scores) else None
    raw_logits = () if (return_dict and generation_config.output_logits) else None
    chosen_history: list[torch.Tensor] = []

    batch_size, cur_len = input_ids.shape[:2]
    unfinished_sequences = torch.ones(batch_size, dtype=torch.long, device=input_ids.device)
    this_peer_finished = False
    # transformers >= 5.4 slices the new tokens with `next_sequence_length`; older releases track
    # `cache_position` in model_kwargs. Feeding the wrong one re-feeds the whole sequence.
    # Read the base class: some models (Phi-3) override the method with a **kwargs signature.
    new_api = (
        "next_sequence_length" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    )
    if not new_api:
        model_kwargs = model._get_initial_cache_position(cur_len, input_ids.device, model_kwargs)

    with source:
        first_step = True
        while model._has_unfinished_sequences(this_peer_finished, synced_gpus, device=input_ids.device):
            if new_api and first_step and hasattr(model, "_prefill"):
                outputs = model._prefill(input_ids, generation_config, model_kwargs)
            elif new_api:
                next_len = 1 if (model_kwargs.get("use_cache", True) and not first_step) else None
                model_inputs = model.prepare_inputs_for_generation(
                    input_ids, next_sequence_length=next_len, is_first_iteration=first_step, **model_kwargs
                )
                outputs = model(**model_inputs, return_dict=True)
            else:
                model_inputs = model.prepare_inputs_for_generation(input_ids, **model_kwargs)
                outputs = model(**model_inputs, return_dict=True)
            first_step = False
            model_kwargs = model._update_model_kwargs_for_generation(
                outputs, model_kwargs, is_encoder_decoder=False
            )
            if synced_gpus and this_peer_finished:
                continue

            final_logits = outputs.logits[:, -1, :].to(
                copy=True, dtype=torch.float32, device=input_ids.device
            )
            contrast = strategy.step(source.step_inputs(final_logits, input_ids))
            if contrast.chosen is not None:
                chosen_history.append(layer_ids[contrast.chosen.to(layer_ids.device)])
            next_token_scores = logits_processor(input_ids, contrast.scores)

            if scores is not None:
                scores += (next_token_scores,)
            if raw_logits is not None:
                raw_logits += (final_logits,)

            if do_sample:
                probs = nn.functional.softmax(next_token_scores, dim=-1)
                next_tokens = torch.multinomial(probs, num_samples=1).squeeze(1)
            else:
                next_tokens = torch.argmax(next_token_scores, dim=-1)
            if has_eos_stopping_criteria:
                next_tokens = next_tokens * unfinished_sequences + pad_token_id * (1 - unfinished_sequences)

            input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
            if streamer is not None:
                streamer.put(next_tokens.cpu())
            unfinished_sequences = unfinished_sequences & ~stopping_criteria(input_ids, scores)
            this_peer_finished = bool(unfinished_sequences.max() == 0)
            del outputs

    if streamer is not None:
        streamer.end()
    if not return_dict:
        return input_ids
    output = GenerateDecoderOnlyOutput(
        sequences=input_ids,
        scores=scores,
        logits=raw_logits,
        **{cache_field(GenerateDecoderOnlyOutput): cache_from(model_kwargs)},
    )
    if chosen_history:
        output["premature_layers"] = torch.stack(chosen_history, dim=1)
    return output


def strategy_generate(
    model: nn.Module,
    input_ids: torch.LongTensor,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config: GenerationConfig,
    synced_gpus: bool = False,
    streamer: Any = None,
    strategy: ContrastStrategy | None = None,
    strategy_tokenizer: Any = None,
    classifier: Any = None,
    **model_kwargs: Any,
) -> GenerateDecoderOnlyOutput | torch.LongTensor:
    """Any strategy as a ``custom_generate`` callable: ``generate(custom_generate=strategy_generate,
    strategy=...)``.

    Strategies with degraded streams or an amateur whose instruction is text need the tokenizer:
    pass it as ``strategy_tokenizer=`` (``generate`` keeps its own ``tokenizer=`` argument for stop
    strings and does not hand it to custom loops). ``classifier=`` gives degraded streams other token
    classes (a TokenClassifier or a callable).

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from contrastive_decoding import VistaLogits, strategy_generate
        >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
        ...     num_hidden_layers=4, num_attention_heads=2, pad_token_id=0)).eval()
        >>> out = model.generate(torch.tensor([[1, 5, 9]]), custom_generate=strategy_generate,
        ...     strategy=VistaLogits(), max_new_tokens=4, do_sample=False)
        >>> out.shape
        torch.Size([1, 7])
    """
    if strategy is None:
        raise ValueError(
            "strategy_generate needs `strategy=`, e.g. DoLa('high') or a ContrastStrategy subclass."
        )
    return contrast_generate(
        model,
        strategy,
        input_ids,
        logits_processor,
        stopping_criteria,
        generation_config,
        synced_gpus=synced_gpus,
        streamer=streamer,
        classifier=classifier,
        tokenizer=strategy_tokenizer
        if strategy_tokenizer is not None
        else model_kwargs.pop("tokenizer", None),
        **model_kwargs,
    )


def dola_generate(
    model: nn.Module,
    input_ids: torch.LongTensor,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config: GenerationConfig,
    synced_gpus: bool = False,
    streamer: Any = None,
    dola_layers: DoLaLayers = "high",
    relative_top: float = 0.1,
    final_norm: bool = False,
    layer_choice: Literal["per_row", "batch_mean"] = "per_row",
    divergence: Literal["reference", "jsd"] = "reference",
    **model_kwargs: Any,
) -> GenerateDecoderOnlyOutput | torch.LongTensor:
    """DoLa decoding as a ``custom_generate`` callable; an offline drop-in for the Hub repo
    ``transformers-community/dola`` (same ``dola_layers`` argument and bucket rules).

    Arguments ``generate`` forwards: ``dola_layers`` (``"low"``, ``"high"``, an int or a list of
    ints), ``relative_top``, ``final_norm``, ``layer_choice`` and ``divergence`` (see
    :class:`~contrastive_decoding.DoLa`). Pass ``repetition_penalty=1.2`` as DoLa's authors do; it is
    applied to the contrasted scores. At batch 1 with greedy search the output is token-identical
    to transformers 4.55's built-in ``generate(dola_layers=...)``.

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from contrastive_decoding import dola_generate
        >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
        ...     num_hidden_layers=4, num_attention_heads=2, pad_token_id=0)).eval()
        >>> out = model.generate(torch.tensor([[1, 5, 9]]), custom_generate=dola_generate,
        ...     dola_layers="high", repetition_penalty=1.2, max_new_tokens=4, do_sample=False)
        >>> out.shape
        torch.Size([1, 7])
    """
    strategy = DoLa(
        dola_layers=dola_layers,
        relative_top=relative_top,
        final_norm=final_norm,
        layer_choice=layer_choice,
        divergence=divergence,
    )
    return contrast_generate(
        model,
        strategy,
        input_ids,
        logits_processor,
        stopping_criteria,
        generation_config,
        synced_gpus=synced_gpus,
        streamer=streamer,
        **model_kwargs,
    )
