"""Word-aware token classes against hand-labelled sentences, on three tokenizer styles."""

from __future__ import annotations

import pytest
from conftest import char_tokenizer
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from contrastive_decoding import TOKEN_CLASSES, TokenClassifier
from contrastive_decoding.core.token_classes import make_classifier

P, F, C = "punctuation", "function", "concept"

# Hand-labelled words: (word, class). Spaces between words are punctuation-class tokens if a
# tokenizer makes them separate tokens.
SENTENCE = [
    ("The", F), ("theory", C), ("of", F), ("relativity", C), (",", P), ("by", F), ("Einstein", C),
    (",", P), ("is", F), ("100", C), ("years", C), ("old", C), (".", P), ("\n", P), ("Who", F),
    ("wrote", C), ("it", F), ("?", P),
]  # fmt: skip
GLUE = {",", ".", "?", "\n"}  # no space before these; a space follows every word except before glue


def _text_and_spans():
    text, spans = "", []
    for i, (word, cls) in enumerate(SENTENCE):
        if i and word not in GLUE and SENTENCE[i - 1][0] != "\n":
            text += " "
        spans.append((len(text), len(text) + len(word), cls))
        text += word
    return text, spans


CORPUS = [
    "The theory of relativity was written by Einstein many years ago.",
    "Who wrote the theory? It is old, and it is famous.",
    "Paris is the capital of France; Rome is in Italy.",
] * 20


def _bpe(pre_tokenizer, decoder, alphabet) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoder
    trainer = trainers.BpeTrainer(
        vocab_size=120, special_tokens=["<pad>", "<s>", "</s>", "<unk>"], initial_alphabet=alphabet
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def _byte_level():
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    return _bpe(pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel(), alphabet)


def _metaspace():
    alphabet = sorted(set("".join(CORPUS)) | set("0123456789\n?▁"))
    return _bpe(pre_tokenizers.Metaspace(), decoders.Metaspace(), alphabet)


TOKENIZERS = {"char": char_tokenizer, "byte_level_bpe": _byte_level, "metaspace_bpe": _metaspace}


@pytest.fixture(params=list(TOKENIZERS), scope="module")
def tokenizer(request):
    return TOKENIZERS[request.param]()


def _expected(tokenizer, text, spans):
    """Each token's class from the hand labels: the class of the word its characters fall in."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = []
    for start, end in enc["offset_mapping"]:
        inside = [cls for lo, hi, cls in spans if start < hi and end > lo]
        labels.append(inside[0] if inside else P)  # whitespace-only tokens
    return enc["input_ids"], labels


def test_sentence_matches_hand_labels(tokenizer):
    text, spans = _text_and_spans()
    ids, expected = _expected(tokenizer, text, spans)
    assert len(ids) > len(SENTENCE) // 2
    assert TokenClassifier(tokenizer, first_token_is_sink=False)(ids) == expected
    # By default the first token is the attention sink, grouped with punctuation.
    assert TokenClassifier(tokenizer)(ids) == [P] + expected[1:]


def test_words_split_into_pieces_share_one_class():
    tok = _byte_level()
    ids = tok("relativity", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1, "the tiny BPE should split this word"
    assert TokenClassifier(tok, first_token_is_sink=False)(ids) == [C] * len(ids)


def test_special_tokens_are_punctuation():
    tok = char_tokenizer()
    ids = [tok.bos_token_id] + tok("cat", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert TokenClassifier(tok)(ids) == [P, C, C, C, P]


def test_classes_are_causal_the_last_word_is_what_is_known_so_far():
    tok = char_tokenizer()
    classify = TokenClassifier(tok)
    ids = tok(" the", add_special_tokens=False)["input_ids"]
    assert classify(ids) == [P, F, F, F]
    longer = tok(" theory", add_special_tokens=False)["input_ids"]
    assert classify(longer) == [P] + [C] * 6
    # The incremental interface gives, after each token, the labels of the prefix.
    state = classify.start()
    for n, token_id in enumerate(longer, start=1):
        classify.push(state, token_id)
        assert [TOKEN_CLASSES[c] for c in classify.snapshot(state)] == classify(longer[:n])


def test_user_callable_is_accepted_and_checked():
    wrapped = make_classifier(lambda ids: ["concept"] * len(ids))
    assert wrapped.snapshot([5, 6]) == [2, 2]
    with pytest.raises(ValueError, match="returned 1 classes for 3 tokens"):
        make_classifier(lambda ids: ["concept"])
    with pytest.raises(ValueError, match="unknown token class 'noun'"):
        make_classifier(lambda ids: ["noun"] * len(ids))
    with pytest.raises(ValueError, match="`classifier` must be"):
        make_classifier(42)


def test_custom_function_words():
    tok = char_tokenizer()
    ids = tok(" cat the", add_special_tokens=False)["input_ids"]
    labels = TokenClassifier(tok, function_words=["cat"])(ids)
    assert labels == [P, F, F, F, P, C, C, C]
