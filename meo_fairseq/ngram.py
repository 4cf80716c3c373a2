"""A correct, vectorised ``--no-repeat-ngram-size`` for fairseq-generate.

fairseq blocks repeated n-grams with ``fairseq.ngram_repeat_block.NGramRepeatBlock``. Without its
compiled CUDA extension (ve-fairseq ships none, and it never exists on the CPU) fairseq falls back
to ``NGramRepeatBlock._no_repeat_ngram``, which compares the last n-1 entries of the whole
``[bsz * beam, max_len + 2]`` token buffer, i.e. padding, with the hypotheses and so never blocks
anything (fairseq issues #5206 and #4709). Importing ``meo_fairseq`` (``--user-dir meo_fairseq``)
replaces that fallback with :func:`block_repeated_ngrams`, which looks only at the
``step + 1`` tokens decoded so far, in a few tensor ops and without a host synchronisation. The
compiled extension, where it is built and usable, is still preferred by fairseq.
"""

import math

import torch


def block_repeated_ngrams(tokens: torch.Tensor, lprobs: torch.Tensor, step: int, n: int) -> torch.Tensor:
    """Set to -inf the log-probability of every token that would complete an n-gram already present.

    Args:
        tokens: [B, L] decoded tokens; columns ``0 .. step`` are valid (column 0 is BOS/EOS), the
            rest is padding.
        lprobs: [B, V] log-probabilities of the token at position ``step + 1``; changed in place.
        step: the decoding step (the index of the last valid column of ``tokens``).
        n: the n-gram size (>= 1).

    Returns:
        ``lprobs`` ([B, V]), with the banned entries at -inf.
    """
    length = step + 1  # valid columns
    windows = length - n + 1  # n-grams already in the hypothesis
    if n < 1 or windows <= 0:
        return lprobs
    prefix = tokens[:, :length]  # [B, length]
    ngrams = prefix.unfold(1, n, 1)  # [B, windows, n]
    if n == 1:
        match = torch.ones(ngrams.shape[:2], dtype=torch.bool, device=tokens.device)  # [B, windows]
    else:
        last = prefix[:, length - n + 1 :]  # [B, n-1], the context of the next token
        match = (ngrams[:, :, :-1] == last.unsqueeze(1)).all(dim=-1)  # [B, windows]
    banned = ngrams[:, :, -1]  # [B, windows], the token that would repeat each matching n-gram
    # adding -inf where an n-gram matches and 0 elsewhere: duplicates are harmless, no host sync
    penalty = torch.zeros(match.shape, dtype=lprobs.dtype, device=lprobs.device)
    penalty.masked_fill_(match, -math.inf)
    lprobs.scatter_add_(1, banned.to(lprobs.device), penalty)
    return lprobs


def _no_repeat_ngram(self, tokens, lprobs, bsz: int, beam_size: int, step: int):
    """Replacement of ``NGramRepeatBlock._no_repeat_ngram`` (same signature)."""
    return block_repeated_ngrams(tokens, lprobs, step, self.no_repeat_ngram_size)


_no_repeat_ngram.meo_fairseq = True


def install() -> None:
    """Make fairseq's n-gram blocking correct in this process (idempotent)."""
    try:
        from fairseq.ngram_repeat_block import NGramRepeatBlock
    except ImportError:  # fairseq not installed: nothing to fix
        return
    if not getattr(NGramRepeatBlock._no_repeat_ngram, "meo_fairseq", False):
        NGramRepeatBlock.fairseq_no_repeat_ngram = NGramRepeatBlock._no_repeat_ngram  # kept for the benchmark
    NGramRepeatBlock._no_repeat_ngram = _no_repeat_ngram
