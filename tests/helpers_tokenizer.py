"""A tiny offline tokenizer for tests: byte-level BPE trained in memory, no hub access.

Reuse it from any test: ``from helpers_tokenizer import make_tiny_tokenizer`` (pytest puts
``tests/`` on ``sys.path``) or ``from tests.helpers_tokenizer import make_tiny_tokenizer``.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

BOS = "<s>"
EOS = "</s>"
UNK = "<unk>"

_TRAINING_TEXT = (
    "The quick brown fox jumps over the lazy dog.",
    "A sparse model keeps only some of its weights; the rest are zero.",
    "Perplexity is the exponential of the mean negative log likelihood.",
    "Calibration samples are random windows of tokens from long documents.",
    "WikiText and C4 are the usual texts for evaluation and calibration.",
    "the of and to in is that for it as with was on be by at this",
)


def make_tiny_tokenizer(add_bos: bool = True) -> PreTrainedTokenizerFast:
    """Return a byte-level BPE tokenizer (vocab ~ 300) trained on a few sentences.

    Any text tokenizes (byte fallback through the 256-symbol alphabet). Special tokens:
    ``<s>`` (bos, id 0), ``</s>`` (eos, id 1), ``<unk>`` (id 2). With ``add_bos`` the default call
    ``tokenizer(text)`` prepends exactly one ``<s>``, like Llama tokenizers; without it, nothing is
    added, like GPT-2. Deterministic: the same call gives the same vocabulary.
    """
    core = Tokenizer(models.BPE(unk_token=None))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        min_frequency=1,
        special_tokens=[BOS, EOS, UNK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(list(_TRAINING_TEXT), trainer=trainer)
    bos_id = core.token_to_id(BOS)
    if add_bos:
        core.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
        )
    else:
        core.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=EOS, unk_token=UNK, model_max_length=64
    )
