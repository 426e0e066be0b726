"""Word-aware token classes: punctuation, function word or concept, for any tokenizer, offline.

LayerCake suppresses attention to tokens by class. Classes belong to words, not sub-word pieces:
every piece of a word gets the word's class. A piece starts a new word when it carries a word-start
marker (``Ġ``/``▁``/leading whitespace) or follows punctuation. Punctuation: pieces that are only
punctuation, whitespace or a newline, special tokens (BOS, EOS, padding) and the first token of a
sequence (the attention sink, BOS or not). A word is a function word when it is in
:data:`FUNCTION_WORDS` (determiners, prepositions, conjunctions, modals, pronouns, wh-words, forms
of "be" and a few particles: the closed classes a POS tagger would tag IN/DT/TO/MD/CC/W*/PRP),
otherwise a concept (nouns, verbs, adjectives, numbers, other content words). No NLTK data is needed.

Classes are causal: a query at position ``q`` sees the classes computed from tokens ``0..q`` only,
so the last word's pieces take the class of the word as far as it is known at ``q`` (``"the"``
is a function word until ``"ory"`` follows). That is what makes cached generation, uncached
recomputation and teacher-forced scoring agree.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

__all__ = [
    "CONCEPT",
    "FUNCTION",
    "FUNCTION_WORDS",
    "NO_CLASS",
    "PUNCTUATION",
    "TOKEN_CLASSES",
    "TokenClassifier",
    "class_index",
    "make_classifier",
]

TOKEN_CLASSES = ("punctuation", "function", "concept")
PUNCTUATION, FUNCTION, CONCEPT = 0, 1, 2
#: Label of padding positions: never suppressed.
NO_CLASS = -1

FUNCTION_WORDS = frozenset(
    """
    a an the this that these those some any each every no all both either neither another such
    of in on at by for with about against between into through during before after above below to
    from up down out off over under again further than as like near onto upon within without
    across along among around behind beside besides beyond despite except inside outside since
    toward towards until unto via per
    and or but nor so yet if because while although though whereas unless whether
    can could may might must shall should will would ought
    i me my mine myself you your yours yourself yourselves he him his himself she her hers herself
    it its itself we us our ours ourselves they them their theirs themselves one
    who whom whose which what when where why how whoever whatever whichever wherever whenever
    be am is are was were been being 's 're 'm
    not n't no also very just too then there here only even ever never
    """.split()
)

_WORD_START_MARKERS = ("Ġ", "▁", "Ċ", " ")


def class_index(name: str | int, argument: str = "classes") -> int:
    """The index of a token class given by name (``"punctuation"``, ...) or index (0, 1, 2).

    Raises:
        ValueError: an unknown class, naming ``argument`` and the valid names.
    """
    if isinstance(name, str) and name in TOKEN_CLASSES:
        return TOKEN_CLASSES.index(name)
    if isinstance(name, int) and not isinstance(name, bool) and 0 <= name < len(TOKEN_CLASSES):
        return name
    raise ValueError(f"`{argument}` has an unknown token class {name!r}; valid classes are {TOKEN_CLASSES}.")


def _is_punctuation_text(text: str) -> bool:
    """Empty, whitespace or only punctuation/symbol characters (Unicode categories P* and S*)."""
    stripped = text.strip()
    if not stripped or "\n" in text:
        return True
    return all(unicodedata.category(ch)[0] in "PS" for ch in stripped)


def _strip_punctuation(word: str) -> str:
    """Word text without surrounding punctuation, lower-cased (``"Paris,"`` -> ``"paris"``)."""
    lo, hi = 0, len(word)
    while lo < hi and unicodedata.category(word[lo])[0] in "PS" and word[lo] != "'":
        lo += 1
    while hi > lo and unicodedata.category(word[hi - 1])[0] in "PS":
        hi -= 1
    return word[lo:hi].lower()


class TokenClassifier:
    """The built-in heuristic classifier for one tokenizer.

    Calling it on a list of token ids gives one class name per token, for the sequence as a whole.
    :meth:`start`/:meth:`push`/:meth:`snapshot` classify incrementally (what decoding uses).

    Args:
        tokenizer: the model's tokenizer (any ``transformers`` tokenizer).
        function_words: the function-word list (lower-case words); default :data:`FUNCTION_WORDS`.
        first_token_is_sink: label the first token of every sequence punctuation, whatever its
            text. It is the attention sink that LayerCake groups with punctuation: BOS where the
            tokenizer adds one, otherwise the first word (SmolLM2 adds no BOS).

    Example:
        >>> from transformers import AutoTokenizer  # doctest: +SKIP
        >>> classify = TokenClassifier(AutoTokenizer.from_pretrained("gpt2"))  # doctest: +SKIP
        >>> classify(classify.tokenizer("The Eiffel Tower is in Paris.")["input_ids"])  # doctest: +SKIP
        ['function', 'concept', 'concept', 'concept', 'function', 'function', 'concept', 'punctuation']
    """

    def __init__(
        self, tokenizer, function_words: Sequence[str] | None = None, first_token_is_sink: bool = True
    ) -> None:
        self.tokenizer = tokenizer
        self.first_token_is_sink = first_token_is_sink
        self.function_words = frozenset(w.lower() for w in (function_words or FUNCTION_WORDS))
        self._special = set(getattr(tokenizer, "all_special_ids", []) or [])
        self._pieces: dict[int, tuple[bool, bool, str]] = {}

    def piece(self, token_id: int) -> tuple[bool, bool, str]:
        """``(is_punctuation, starts_word, text)`` of one token, cached."""
        info = self._pieces.get(token_id)
        if info is None:
            info = self._piece(token_id)
            self._pieces[token_id] = info
        return info

    def _piece(self, token_id: int) -> tuple[bool, bool, str]:
        if token_id in self._special:
            return True, True, ""
        try:
            raw = self.tokenizer.convert_ids_to_tokens(token_id) or ""
            text = self.tokenizer.decode([token_id])
        except (IndexError, KeyError, OverflowError, TypeError, ValueError):
            return True, True, ""  # an id the tokenizer does not know (padded vocabularies)
        raw = str(raw)
        if raw.startswith("<0x") and raw.endswith(">"):  # SentencePiece byte fallback
            raw = text
        starts_word = raw.startswith(_WORD_START_MARKERS) or text[:1].isspace()
        return _is_punctuation_text(text), starts_word, text

    def word_class(self, word: str) -> int:
        """Class of a whole word's text."""
        core = _strip_punctuation(word.strip())
        if not core:
            return PUNCTUATION
        return FUNCTION if core in self.function_words else CONCEPT

    def __call__(self, token_ids: Sequence[int]) -> list[str]:
        state = self.start()
        for token_id in token_ids:
            self.push(state, int(token_id))
        return [TOKEN_CLASSES[c] for c in self.snapshot(state)]

    # Incremental interface shared with user callables: ``start`` a sequence, ``push`` tokens one
    # by one, ``snapshot`` the classes of all tokens so far as seen from the last one.
    def start(self) -> _WordState:
        return _WordState()

    def push(self, state: _WordState, token_id: int) -> None:
        is_punct, starts_word, text = self.piece(token_id)
        labels = state.labels
        if is_punct or (not labels and self.first_token_is_sink):
            state.start, state.word = None, ""
            labels.append(PUNCTUATION)
            return
        if state.start is None or starts_word:
            state.start, state.word = len(labels), text
        else:
            state.word += text
        cls = self.word_class(state.word)
        labels.append(cls)
        for k in range(state.start, len(labels) - 1):
            labels[k] = cls

    def snapshot(self, state: _WordState) -> list[int]:
        return list(state.labels)


@dataclass
class _WordState:
    labels: list[int] = field(default_factory=list)
    start: int | None = None  # position of the current word's first piece
    word: str = ""


class _CallableClassifier:
    """A user's ``classifier(token_ids) -> labels`` made causal by calling it on each prefix."""

    def __init__(self, fn: Callable[[list[int]], Sequence[str | int]]) -> None:
        self.fn = fn

    def start(self) -> list[int]:
        return []

    def push(self, state: list[int], token_id: int) -> None:
        state.append(token_id)

    def snapshot(self, state: list[int]) -> list[int]:
        out = self.fn(list(state))
        try:
            out = list(out)
        except TypeError:
            raise ValueError(
                f"`classifier` must return one class per token (a sequence), got {type(out).__name__}."
            ) from None
        if len(out) != len(state):
            raise ValueError(
                f"`classifier` returned {len(out)} classes for {len(state)} tokens; it must return "
                f"exactly one of {TOKEN_CLASSES} (or 0..2) per token."
            )
        return [class_index(c, argument="classifier") for c in out]


def make_classifier(classifier) -> TokenClassifier | _CallableClassifier:
    """Accept a :class:`TokenClassifier`, a tokenizer (wrapped in one) or a plain callable.

    A callable gets a list of token ids (padding removed) and must return one class per id: a name
    from :data:`TOKEN_CLASSES` or its index. It is probed once here so a wrong shape fails early.

    Raises:
        ValueError: ``classifier`` is none of these, or a callable returns the wrong shape/labels.
    """
    if isinstance(classifier, TokenClassifier):
        return classifier
    if hasattr(classifier, "convert_ids_to_tokens") and hasattr(classifier, "decode"):
        return TokenClassifier(classifier)
    if callable(classifier):
        wrapped = _CallableClassifier(classifier)
        wrapped.snapshot([1, 2, 3])  # validates shape and labels before anything is attached
        return wrapped
    raise ValueError(
        "`classifier` must be the model's tokenizer, a TokenClassifier, or a callable mapping a list "
        f"of token ids to one class per id; got {type(classifier).__name__}."
    )
