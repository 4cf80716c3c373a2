"""Every tuned constant of the blocked CPU path, and its cost model, in one place.

Only ``impl="blocked"`` reads this file (the reference path has no tuned constant). How the
constants were calibrated is in docs/layer-library.md.

MEO with linear experts may run in two ways that compute the same function:

* merge-then-compute: ``merged_weight = sum_i gates_i W_i`` per routing group, then one matmul;
* compute-then-mix: run the selected experts on every token of the group and mix by the gates.

:func:`choose_merge` picks the cheaper one per call from the shapes (``--moe-merge-min-tokens``
overrides it). When it picks compute-then-mix for a MEO layer the layer *mixes instead of
merging*: the output is the same up to floating-point rounding, only the cost differs.
"""

# ---- cost model (multiply-adds per weight element) ----------------------------------------------
# Cost of streaming one weight element from memory.
STREAM_COST = 4.0
# Extra cost per weight element of a separate matmul per group rather than one over all tokens
# (each group's merged weight is packed and read on its own).
GROUP_COST = 70.0
# Fixed cost of one expert's calls in compute-then-mix (gathers, matmuls, scatter, forward and
# backward), spread over the weight's elements: it matters for small layers only.
CALL_COST = 8e6

# ---- tiles of the blocked merge (merge.py reads these through its own module names) -------------
# Groups per chunk: at most this many bytes' worth of whole merged weights (the experts are read
# once per chunk).
MERGE_CHUNK_BYTES = 256 * 2**20
# Bytes of merged rows alive at once (and, in backward, as many weight-gradient rows).
MERGE_BLOCK_BYTES = 16 * 2**20
# Fewest output rows per block (narrower matmuls lose more than the cache gains).
MERGE_MIN_ROWS = 128
# On a GPU small layers pay per kernel launch, not per cache miss: larger blocks, fewer calls.
MERGE_BLOCK_BYTES_CUDA = 64 * 2**20


def choose_merge(
    experts: int,
    full_experts: int,
    weight_numel: int,
    groups: int,
    tokens_per_group: float,
    cached: bool,
    merge_min_tokens=None,
) -> bool:
    """True: merge-then-compute; False: compute-then-mix (the same function for linear experts).

    Args:
        experts: N; full_experts: the k experts that run as full experts
        weight_numel: elements of one expert's weight (out * in)
        groups: routing groups of the call; tokens_per_group: their tokens
        cached: the merged weights are cached (decoding): merging only reads them
        merge_min_tokens: the user's override (``--moe-merge-min-tokens``), or None

    Costs, in multiply-adds per weight element: mixing runs k experts over every token, streams
    the distinct experts used and pays CALL_COST per expert; merging streams all N experts once,
    writes and reads a merged matrix per group (only reads it when cached), then one matmul per
    token and GROUP_COST per group.
    """
    if merge_min_tokens is not None:
        return tokens_per_group >= merge_min_tokens
    n, k = experts, full_experts
    tokens = groups * tokens_per_group
    used = min(n, groups * k)
    mix = tokens * k + (STREAM_COST + CALL_COST / weight_numel) * used
    if cached:
        merge = tokens + STREAM_COST * groups
    else:
        merge = tokens + groups * n + STREAM_COST * (n + 2 * groups) + GROUP_COST * groups
    return merge <= mix
