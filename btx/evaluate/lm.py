"""btx models and BTM ensembles as lm-evaluation-harness models (`lm_eval.api.model.TemplateLM`).

`ScorerLM` wraps any scorer of btx/evaluate/next_token.py (one model, or an ensemble) and a
Hugging Face tokenizer (the checkpoint's own, through transformers' AutoTokenizer), and answers
lm-eval's three requests the way lm-eval's own `hf` model does, so that a checkpoint scores the
same through either:
- tokenization: lm-eval's (`TemplateLM._encode_pair`; the tokenizer's defaults for special
  tokens; an empty context is the BOS token, else EOS);
- loglikelihood: context + continuation cut to the last max_length + 1 tokens; the continuation's
  log-probability is the sum of its tokens'; it is greedy when every token is the argmax of the
  next-token distribution;
- loglikelihood_rolling: lm-eval's disjoint rolling windows, summed;
- generate_until: greedy (do_sample true is refused), the context cut to max_length - max_gen_toks,
  stopping at EOS, a stop string or max_gen_toks; the text cut at the first stop string.
Each generated token runs the whole sequence again (btx's Transformer keeps no KV cache): fine for
short answers, slow for long generations of big models.

This module imports lm_eval at the top: btx.evaluate.tasks imports it only once lm_eval is known
to be installed (the `eval` extra).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

from btx.errors import BtxError, first_line

DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's hf model's


def hf_tokenizer(checkpoint: Path):
    """The checkpoint's tokenizer through transformers' AutoTokenizer (as lm-eval's hf model loads it)."""
    if not (checkpoint / "tokenizer.json").is_file() and not (checkpoint / "tokenizer_config.json").is_file():
        raise BtxError(f"{checkpoint}: no tokenizer.json; downstream tasks need the model's tokenizer")
    from transformers import AutoTokenizer  # heavy; lm_eval depends on it, so the eval extra has it

    try:
        return AutoTokenizer.from_pretrained(str(checkpoint))
    except (OSError, ValueError) as exc:
        raise BtxError(f"{checkpoint}: transformers could not load its tokenizer ({first_line(exc)})") from None


class ScorerLM(TemplateLM):
    """An lm-eval model over a btx scorer (`scorer(inputs, targets, positions)`, next_token.py)."""

    def __init__(
        self,
        scorer,
        tokenizer,
        *,
        batch_size: int = 8,
        name: str = "btx",
        progress: Callable[[int], None] | None = None,
    ):
        super().__init__()
        self.scorer, self.tokenizer, self.name = scorer, tokenizer, name
        self.batch_size = batch_size
        self.max_length = scorer.max_length
        self.progress = progress or (lambda n: None)

    # -- tokens -----------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        special = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return self.tokenizer.encode(string, **special)

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def get_model_info(self) -> dict:
        return {"model": self.name}

    # -- scoring ----------------------------------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return super().loglikelihood(requests, disable_tqdm=True)  # btx shows its own progress

    def _batches(self, items: list, length: Callable) -> list[list[int]]:
        """Indices of `items` in batches of batch_size, longest first (less padding)."""
        order = sorted(range(len(items)), key=lambda i: -length(items[i]))
        return [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        windows = []
        for _, context, continuation in requests:
            if not continuation:
                raise BtxError("lm-eval asked for the loglikelihood of an empty continuation")
            sequence = (list(context) + list(continuation))[-(self.max_length + 1) :]
            windows.append((sequence, min(len(continuation), len(sequence) - 1)))
        results: list[tuple[float, bool] | None] = [None] * len(windows)
        for batch in self._batches(windows, lambda w: len(w[0])):
            width = max(len(windows[i][0]) for i in batch) - 1
            k = max(windows[i][1] for i in batch)
            inputs = torch.zeros(len(batch), width, dtype=torch.long)
            targets = torch.zeros(len(batch), width, dtype=torch.long)
            positions = torch.zeros(len(batch), k, dtype=torch.long)
            for row, i in enumerate(batch):
                sequence, n = windows[i]
                length = len(sequence) - 1
                inputs[row, :length] = torch.tensor(sequence[:-1])
                targets[row, :length] = torch.tensor(sequence[1:])
                positions[row, :n] = torch.arange(length - n, length)
            lp_BS, dist_BKV = self.scorer(inputs, targets, positions)
            greedy_BK = dist_BKV.argmax(-1)
            for row, i in enumerate(batch):
                sequence, n = windows[i]
                length = len(sequence) - 1
                logprob = float(lp_BS[row, length - n : length].double().sum())
                is_greedy = bool((greedy_BK[row, :n] == targets[row, length - n : length]).all())
                results[i] = (logprob, is_greedy)
            self.progress(len(batch))
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for context, continuation in map(
                lm_utils.make_disjoint_window,
                lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, context, continuation))
                owners.append(i)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows)):
            totals[owner] += logprob
        return totals

    # -- generation -------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        out: list[str | None] = [None] * len(requests)
        # Requests with the same generation settings are generated together.
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items(), key=str)), []).append(i)
        for members in groups.values():
            kwargs = normalize_gen_kwargs(requests[members[0]].args[1], DEFAULT_MAX_GEN_TOKS)
            if kwargs.get("do_sample"):
                raise BtxError(
                    f"lm-eval asked {self.name} to sample (do_sample: true); btx generates greedily only: "
                    "set do_sample: false in the task's generation_kwargs"
                )
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen = kwargs.pop("max_gen_toks")
            if max_gen >= self.max_length:
                raise BtxError(
                    f"a task asks for up to {max_gen} generated tokens, but {self.name} takes at most "
                    f"{self.max_length}: set max_gen_toks lower in the task's generation_kwargs"
                )
            contexts = [self.tok_encode(requests[i].args[0])[-(self.max_length - max_gen) :] for i in members]
            for batch in self._batches(contexts, len):
                texts = self._greedy([contexts[j] for j in batch], until, max_gen)
                for j, text in zip(batch, texts):
                    out[members[j]] = text
                self.progress(len(batch))
        return out  # type: ignore[return-value]

    def _greedy(self, contexts: list[list[int]], until: list[str], max_gen: int) -> list[str]:
        rows = [list(c) for c in contexts]
        generated: list[list[int]] = [[] for _ in rows]
        live = list(range(len(rows)))
        for _ in range(max_gen):
            if not live:
                break
            width = max(len(rows[i]) for i in live)
            inputs = torch.zeros(len(live), width, dtype=torch.long)
            targets = torch.zeros(len(live), width, dtype=torch.long)
            positions = torch.zeros(len(live), 1, dtype=torch.long)
            for r, i in enumerate(live):
                inputs[r, : len(rows[i])] = torch.tensor(rows[i])
                targets[r, : len(rows[i]) - 1] = inputs[r, 1 : len(rows[i])]
                positions[r, 0] = len(rows[i]) - 1
            _, dist_BKV = self.scorer(inputs, targets, positions)
            next_tokens = dist_BKV[:, 0].argmax(-1).tolist()
            still = []
            for i, token in zip(live, next_tokens):
                rows[i].append(token)
                generated[i].append(token)
                text = self.tok_decode(generated[i])
                if token != self.eot_token_id and not any(stop in text for stop in until):
                    still.append(i)
            live = still
        return [postprocess_generated_text(self.tok_decode(g), until, None) for g in generated]
