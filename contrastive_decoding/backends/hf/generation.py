"""Custom generate loops: ``model.generate(custom_generate=dola_generate, ...)``.

``generate`` does all its usual preparation (generation config, attention mask, cache, logits
processors, stopping criteria) and then hands over to the loop here, which runs greedy search or
sampling with the strategy's contrast applied to the raw mature logits BEFORE the configured
logits processors, so ``repetition_penalty=1.2`` acts on the contrasted scores, as in DoLa.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig, GenerationMixin, LogitsProcessorList, StoppingCriteriaList
from transformers.generation.utils import GenerateDecoderOnlyOutput

from contrastive_decoding.backends.hf.cache_names import cache_field, cache_from
from contrastive_decoding.backends.hf.sources import ContrastSources
from contrastive_decoding.core.contract import ContrastStrategy
from contrastive_decoding.strategies import as_strategy

__all__ = ["contrast_generate", "strategy_generate"]


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
    if getattr(generation_config, "prompt_lookup_num_tokens", None):
        raise ValueError(
            f"{loop_name} does not support prompt lookup decoding (`prompt_lookup_num_tokens`): it "
            "decodes one token per forward."
        )


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
    strategy = as_strategy(strategy)
    if input_ids.shape[-1] == 0:
        raise ValueError("`input_ids` is empty: give a prompt of at least one token (e.g. the BOS token).")
    if tokenizer is None:
        tokenizer = model_kwargs.pop("tokenizer", None)
    source = _loop_sources(model, strategy, generation_config, model_kwargs, tokenizer, classifier)
    layer_ids = torch.tensor(source.layers, dtype=torch.long, device=input_ids.device)

    pad_token_id = generation_config._pad_token_tensor
    has_eos_stopping_criteria = any(hasattr(c, "eos_token_id") for c in stopping_criteria)
    return_dict = generation_config.return_dict_in_generate
    scores = () if (return_dict and generation_config.output_scores) else None
    raw_logits = () if (return_dict and generation_config.output_logits) else None
    chosen_history: list[torch.Tensor] = []

    unfinished_sequences = torch.ones(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    this_peer_finished = False
    forward = _Forward(model, generation_config, input_ids, model_kwargs)

    with source:
        while model._has_unfinished_sequences(this_peer_finished, synced_gpus, device=input_ids.device):
            outputs = forward(input_ids)
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

            next_tokens = _next_tokens(next_token_scores, generation_config.do_sample)
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
        **{cache_field(GenerateDecoderOnlyOutput): cache_from(forward.model_kwargs)},
    )
    if chosen_history:
        output["premature_layers"] = torch.stack(chosen_history, dim=1)
    return output


def _loop_sources(model, strategy, generation_config, model_kwargs, tokenizer, classifier) -> ContrastSources:
    """The strategy's sources for a generate loop, after refusing the options the loop cannot honour."""
    loop_name = f"the {type(strategy).__name__} generate loop"
    _check_loop_options(generation_config, loop_name)
    source = ContrastSources(model, strategy, tokenizer, classifier)
    if source.streams is not None or source.amateur is not None:
        cache = cache_from(model_kwargs)
        if cache is not None and cache.get_seq_length() > 0:
            raise ValueError(
                f"{loop_name} keeps a cache row per stream; "
                "do not pass a filled KV cache (`cache` or `past_key_values`)."
            )
    return source


def _next_tokens(scores: torch.Tensor, do_sample: bool) -> torch.Tensor:
    if do_sample:
        probs = nn.functional.softmax(scores, dim=-1)
        return torch.multinomial(probs, num_samples=1).squeeze(1)
    return torch.argmax(scores, dim=-1)


class _Forward:
    """One model forward per decoding step, with ``generate``'s own input preparation and cache
    bookkeeping (``model_kwargs`` is updated after each call)."""

    def __init__(
        self, model: nn.Module, generation_config: GenerationConfig, input_ids: torch.Tensor, model_kwargs
    ) -> None:
        self.model = model
        self.generation_config = generation_config
        # transformers >= 5.4 slices the new tokens with `next_sequence_length`; older releases track
        # `cache_position` in model_kwargs. Feeding the wrong one re-feeds the whole sequence.
        # Read the base class: some models (Phi-3) override the method with a **kwargs signature.
        prepare = inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
        self.new_api = "next_sequence_length" in prepare
        if not self.new_api:
            length, device = input_ids.shape[1], input_ids.device
            model_kwargs = model._get_initial_cache_position(length, device, model_kwargs)
        self.model_kwargs = model_kwargs
        self.first_step = True

    def __call__(self, input_ids: torch.Tensor):
        model, kwargs, first = self.model, self.model_kwargs, self.first_step
        if self.new_api and first and hasattr(model, "_prefill"):
            outputs = model._prefill(input_ids, self.generation_config, kwargs)
        elif self.new_api:
            next_len = 1 if (kwargs.get("use_cache", True) and not first) else None
            model_inputs = model.prepare_inputs_for_generation(
                input_ids, next_sequence_length=next_len, is_first_iteration=first, **kwargs
            )
            outputs = model(**model_inputs, return_dict=True)
        else:
            model_inputs = model.prepare_inputs_for_generation(input_ids, **kwargs)
            outputs = model(**model_inputs, return_dict=True)
        self.first_step = False
        self.model_kwargs = model._update_model_kwargs_for_generation(
            outputs, kwargs, is_encoder_decoder=False
        )
        return outputs


def strategy_generate(
    model: nn.Module,
    input_ids: torch.LongTensor,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config: GenerationConfig,
    synced_gpus: bool = False,
    streamer: Any = None,
    strategy: ContrastStrategy | str | None = None,
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
            "strategy_generate needs `strategy=`: a ContrastStrategy such as DoLa('high'), or a "
            "registered name such as 'dola-high'."
        )
    return contrast_generate(
        model,
        as_strategy(strategy),
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
