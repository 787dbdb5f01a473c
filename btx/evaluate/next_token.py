"""Next-token distributions of one btx model or of a BTM ensemble, on batches of token sequences:
what the lm-eval models of btx/evaluate/lm.py score continuations with and generate from.

A scorer is called with
    inputs_BS     token ids, right-padded;
    targets_BS    the token after each input (inputs shifted by one; anything at padding);
    positions_BK  where the whole next-token distribution is wanted (a continuation's positions,
                  or the last one when generating);
and returns (lp_BS, dist_BKV): log p(targets[b, t] | inputs[b, :t+1]) at every position, and
log p(. | inputs[b, :positions[b, k]+1]) over the vocabulary. Each position depends only on the
tokens at and before it (causal models; the posterior's evidence and the tf-idf scores are prefix
sums), so right padding changes nothing before it.

The ensembles are btx/evaluate/btm.py's, with the sequence as one window, exactly as the loss eval
scores a validation window:
- domain posterior: the token log-probabilities are `btm_mixture`'s, and the distribution at a
  position mixes the experts' with the same posterior weights (evidence: the targets before it);
- tf-idf top-k: the token log-probabilities are `btm_topk_mixture`'s, and the distribution mixes
  the experts `btm_topk_order` picks for the context, with equal weights.
Gathering the distribution at the target gives the token log-probability (tests/test_tasks.py).
The experts are held on the device together (generation needs every expert at every step).

Shape legend: B sequences, S positions, K wanted positions, V vocabulary, J experts.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from btx.errors import BtxError
from btx.evaluate.btm import TfidfRouter, btm_mixture, btm_topk_mixture, btm_topk_order


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def _model_logprobs(model, inputs_BS: torch.Tensor, targets_BS: torch.Tensor, positions_BK: torch.Tensor):
    """One model: (target log-probs [B, S] fp32 on the CPU, log-probs over the vocabulary at the
    wanted positions [B, K, V] fp32 on the model's device)."""
    device = _device(model)
    logits = model(inputs_BS.to(device)).logits.float()
    # The target log-probs as btx.evaluate.scores.token_logprobs computes them (the loss eval's), bit for bit.
    lp_BS = -F.cross_entropy(logits.transpose(1, 2), targets_BS.to(device), reduction="none")
    lp_BSV = torch.log_softmax(logits, dim=-1)
    index = positions_BK.to(device).unsqueeze(-1).expand(-1, -1, lp_BSV.shape[-1])
    return lp_BS.cpu(), lp_BSV.gather(1, index)


class ModelScorer:
    """One btx Transformer."""

    def __init__(self, model):
        self.model = model.eval()
        self.vocab_size = model.cfg.vocab_size
        self.max_length = model.cfg.max_seq_len

    def __call__(self, inputs_BS, targets_BS, positions_BK):
        lp_BS, dist_BKV = _model_logprobs(self.model, inputs_BS, targets_BS, positions_BK)
        return lp_BS, dist_BKV.cpu()


class _Ensemble:
    def __init__(self, experts: Sequence):
        if len(experts) < 2:
            raise BtxError(f"a BTM ensemble needs at least two experts, got {len(experts)}")
        sizes = {m.cfg.vocab_size for m in experts}
        if len(sizes) != 1:
            raise BtxError(f"BTM experts with different vocabularies ({sorted(sizes)}): expected one tokenizer")
        self.experts = [m.eval() for m in experts]
        self.vocab_size = sizes.pop()
        self.max_length = min(m.cfg.max_seq_len for m in experts)

    def _experts(self, inputs_BS, targets_BS, positions_BK):
        """(lp_JBS on the CPU, dist_JBKV on the first expert's device)."""
        device = _device(self.experts[0])
        outs = [_model_logprobs(m, inputs_BS, targets_BS, positions_BK) for m in self.experts]
        return torch.stack([lp for lp, _ in outs]), torch.stack([d.to(device) for _, d in outs])

    @staticmethod
    def _mix(log_w_JBS: torch.Tensor, dist_JBKV: torch.Tensor, positions_BK: torch.Tensor) -> torch.Tensor:
        """Σ_j w_j · p_j over the vocabulary at the wanted positions, in log space (float64)."""
        index = positions_BK.unsqueeze(0).expand(log_w_JBS.shape[0], -1, -1)
        log_w_JBK = log_w_JBS.gather(2, index).to(dist_JBKV.device)
        return torch.logsumexp(log_w_JBK.unsqueeze(-1) + dist_JBKV.double(), dim=0).float().cpu()


class PosteriorScorer(_Ensemble):
    """The domain-posterior BTM ensemble (uniform prior, restarted in each sequence)."""

    def __call__(self, inputs_BS, targets_BS, positions_BK):
        lp_JBS, dist_JBKV = self._experts(inputs_BS, targets_BS, positions_BK)
        mix_BS, log_w_JBS = btm_mixture(lp_JBS)
        return mix_BS, self._mix(log_w_JBS, dist_JBKV, positions_BK)


class TopKScorer(_Ensemble):
    """The tf-idf top-k BTM ensemble: at every position, the k experts whose training data is most
    tf-idf-similar to the context so far, averaged with equal weights."""

    def __init__(self, experts: Sequence, router: TfidfRouter, k: int):
        super().__init__(experts)
        self.router, self.k = router, k

    def __call__(self, inputs_BS, targets_BS, positions_BK):
        lp_JBS, dist_JBKV = self._experts(inputs_BS, targets_BS, positions_BK)
        scores_JBS = self.router.scores(inputs_BS.cpu().numpy())
        mix_BS, _ = btm_topk_mixture(lp_JBS, scores_JBS, self.k)
        order = btm_topk_order(scores_JBS, self.k)
        log_w_JBS = torch.full(scores_JBS.shape, -math.inf, dtype=torch.float64)
        log_w_JBS.scatter_(0, order, -math.log(order.shape[0]))
        return mix_BS, self._mix(log_w_JBS, dist_JBKV, positions_BK)
