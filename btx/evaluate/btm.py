"""The Branch-Train-Merge ensembles, scored from each expert's log-probabilities.

Domain posterior: the next-token distribution is a mixture of the experts' distributions, weighted
by the posterior over domains given the context so far:
    w_j(t) ∝ prior_j · Π_{s<t} p_j(x_s | x_<s)      (uniform prior, restarted in each window)
    p(x_t | x_<t) = Σ_j w_j(t) · p_j(x_t | x_<t)
The posterior needs only each expert's log-probabilities of the observed tokens, so the experts
are run one after another (`window_logprobs`) and mixed afterwards (`btm_mixture`): one model in
memory at a time.

Top-k by tf-idf (the paper's BTM): at every position the k experts whose training data is most
similar to the context so far by tf-idf are averaged, with equal weights (`TfidfRouter`,
`btm_topk_mixture`). Terms are token ids and token-id bigrams (a bigram (a, b) is term
V + (a*V + b) mod 2^20, exact for vocabularies up to 1024); each expert's document is an evenly
spread sample of its domain's training shard; idf = ln((1 + J) / (1 + df)) + 1 over the J experts
(scikit-learn's smooth idf); similarity is the cosine, whose ranking needs only the context's term
counts against each expert's unit tf-idf vector, so it is a cumulative sum over the window. Ties go
to the expert listed first.

Shape legend: J experts, N windows, S positions in a window.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from btx.data.sampling import eval_batches
from btx.data.shards import Shard
from btx.evaluate.scores import nll, window_logprobs


def btm_mixture(lp_JNS: torch.Tensor, log_prior_J: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The BTM ensemble from its experts' token log-probabilities.

    lp_JNS: log p_j(x_t | x_<t) of J experts on N windows of S tokens. Returns (mix_NS, log_w_JNS):
    the ensemble's log-probability of every token and the log posterior weight of every expert at
    every position, computed from the tokens before it in the same window (uniform prior by default,
    so the weights at position 0 are the prior).
    """
    lp_JNS = lp_JNS.double()
    J = lp_JNS.shape[0]
    if log_prior_J is None:
        log_prior_J = torch.full((J,), -math.log(J), dtype=torch.float64)
    # Evidence for each expert from the tokens *before* t: exclusive cumulative sum.
    seen_JNS = lp_JNS.cumsum(-1) - lp_JNS
    log_w_JNS = torch.log_softmax(log_prior_J.double().view(J, 1, 1) + seen_JNS, dim=0)
    mix_NS = torch.logsumexp(log_w_JNS + lp_JNS, dim=0)
    return mix_NS, log_w_JNS


def btm_losses_from_logprobs(per_expert: Sequence[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Per-domain NLL of the BTM ensemble given each expert's `window_logprobs` per domain."""
    return {d: nll(btm_mixture(torch.stack([lp[d] for lp in per_expert]))[0]) for d in per_expert[0]}


def btm_posterior_logprobs(per_expert: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """{domain: the BTM ensemble's token log-probabilities [N, S]} from each expert's."""
    return {d: btm_mixture(torch.stack([lp[d] for lp in per_expert]))[0] for d in per_expert[0]}


def btm_losses(
    experts: list, shards: dict[str, Shard], seq_len: int, batch_size: int, max_batches: int, progress=None
) -> dict[str, float]:
    """Per-domain NLL of the BTM ensemble (domain-posterior mixture of the experts)."""
    per_expert = [
        {d: window_logprobs(m, s, seq_len, batch_size, max_batches) for d, s in shards.items()} for m in experts
    ]
    if progress is not None:  # one tick per batch and domain, as for a single model
        for _ in range(sum(-(-len(lp) // batch_size) for lp in per_expert[0].values())):
            progress()
    return btm_losses_from_logprobs(per_expert)


# ----------------------------------------------------------------------------------------------
# BTM top-k by tf-idf (the paper's BTM)
# ----------------------------------------------------------------------------------------------

BIGRAM_BUCKETS = 1 << 20
TFIDF_SAMPLES = 64  # an expert's document: this many evenly spaced stretches of its training shard


def term_ids(tokens: np.ndarray, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(unigram terms [..., S], bigram terms [..., S]) of token ids [..., S]; a position's bigram is
    (its previous token, it), and position 0 of a row has none (-1)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    bigrams = np.full(tokens.shape, -1, dtype=np.int64)
    bigrams[..., 1:] = vocab_size + (tokens[..., :-1] * vocab_size + tokens[..., 1:]) % BIGRAM_BUCKETS
    return tokens, bigrams


def shard_sample(shard: Shard, tokens: int) -> np.ndarray:
    """About `tokens` tokens of `shard` in TFIDF_SAMPLES evenly spaced stretches (all of a small shard)."""
    n = len(shard)
    if n <= tokens:
        return np.asarray(shard.tokens[:n], dtype=np.int64)
    size = tokens // TFIDF_SAMPLES
    starts = np.linspace(0, n - size, TFIDF_SAMPLES).astype(np.int64)
    return np.concatenate([np.asarray(shard.tokens[s : s + size], dtype=np.int64) for s in starts])


class TfidfRouter:
    """Scores of J experts for every context, by the tf-idf cosine of the context with each
    expert's training data (see the module docstring)."""

    def __init__(self, documents: Sequence[np.ndarray], vocab_size: int):
        self.vocab_size = vocab_size
        size = vocab_size + BIGRAM_BUCKETS
        counts = []
        for doc in documents:
            uni, bi = term_ids(doc, vocab_size)
            counts.append(np.bincount(np.concatenate([uni, bi[bi >= 0]]), minlength=size).astype(np.float64))
        counts_JT = np.stack(counts)
        df = (counts_JT > 0).sum(0)
        self.idf_T = np.log((1 + len(documents)) / (1 + df)) + 1.0
        tfidf_JT = counts_JT / counts_JT.sum(1, keepdims=True) * self.idf_T
        unit_JT = tfidf_JT / np.linalg.norm(tfidf_JT, axis=1, keepdims=True)
        # cosine(context, expert) = (counts * idf) . unit_j / |counts * idf|; the norm is the same for every expert
        self.weight_JT = (unit_JT * self.idf_T).astype(np.float32)

    def scores(self, inputs_NS: np.ndarray) -> torch.Tensor:
        """[J, N, S]: expert j's similarity (up to a positive factor per context) to inputs[n, :t+1],
        the context of the prediction at position t."""
        uni, bi = term_ids(inputs_NS, self.vocab_size)
        per_token = self.weight_JT[:, uni] + np.where(bi >= 0, self.weight_JT[:, np.maximum(bi, 0)], 0.0)
        return torch.from_numpy(per_token.astype(np.float64)).cumsum(-1)


def btm_topk_mixture(lp_JNS: torch.Tensor, scores_JNS: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mix_NS, top1_NS): the equal-weight mixture of the k best-scoring experts at every position
    (ties to the lower index), and the index of the best one."""
    order = btm_topk_order(scores_JNS, k)
    chosen = torch.gather(lp_JNS.double(), 0, order)
    return torch.logsumexp(chosen, dim=0) - math.log(order.shape[0]), order[0]


def btm_topk_order(scores_JNS: torch.Tensor, k: int) -> torch.Tensor:
    """[min(k, J), N, S]: the indices of the k best-scoring experts at every position, best first."""
    # A stable descending sort: equal scores keep the experts' order.
    return torch.sort(-scores_JNS, dim=0, stable=True).indices[: min(k, scores_JNS.shape[0])]


def window_inputs(shard: Shard, seq_len: int, batch_size: int, max_batches: int | None) -> np.ndarray:
    """The input tokens [N, S] of the evaluation windows `window_logprobs` scores."""
    return np.concatenate([inputs.numpy() for inputs, _ in eval_batches(shard, seq_len, batch_size, max_batches)])


def btm_topk_logprobs(
    per_expert: Sequence[dict[str, torch.Tensor]],
    router: TfidfRouter,
    shards: dict[str, Shard],
    seq_len: int,
    batch_size: int,
    max_batches: int | None,
    k: int,
) -> tuple[dict[str, torch.Tensor], dict[str, list[float]]]:
    """({domain: the top-k ensemble's token log-probabilities}, {domain: share of positions whose
    best expert is expert j, for every j})."""
    mixed, top1_share = {}, {}
    for d, shard in shards.items():
        scores = router.scores(window_inputs(shard, seq_len, batch_size, max_batches))
        mixed[d], top1 = btm_topk_mixture(torch.stack([lp[d] for lp in per_expert]), scores, k)
        top1_share[d] = (torch.bincount(top1.flatten(), minlength=len(per_expert)) / top1.numel()).tolist()
    return mixed, top1_share
