"""An lm-evaluation-harness model backed by a :class:`~llmshrink.evaluation.scoring.Scorer`.

Registered as ``llmshrink``, so ``lm_eval --model llmshrink --model_args
path=DIR`` evaluates a bundle as shipped (ONNX Runtime) and ``path=MODEL``
the model in torch. It mirrors lm-eval's own ``hf`` model where numbers
depend on it — tokenization (the tokenizer's defaults), the prefix token for
an empty context (BOS, else EOS), left truncation to ``max_length + 1``,
rolling windows for ``loglikelihood_rolling`` — so the same tasks give the
same numbers as ``--model hf`` on the same weights. Requests that share a
context (the choices of a multiple-choice question) are scored together: the
context is read once into the KV cache and only the continuations run after
it; in torch they run as one batch of up to ``batch_size`` (the ONNX Runtime
decoder takes batch 1 at its fastest, so a bundle runs them one by one).

Needs the ``eval`` extra (``pip install 'llmshrink[eval]'``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from llmshrink.evaluation.scoring import load_scorer
from llmshrink.progress import Progress


@register_model("llmshrink")
class LlmshrinkLM(TemplateLM):
    """lm-eval model over a bundle directory or a model name/path (see module docstring).

    Args:
        path: bundle directory or model (built-in name, directory, .gguf, hub id).
        spec: with a model, a SubnetSpec JSON to materialize instead of the original.
        max_length: longest input (default: the backend's, capped at 2048).
        threads: ONNX Runtime intra-op threads for bundles.
        batch_size: continuations of one context run together in torch (``auto``: 8).
        progress: where request counts are reported (llmshrink's CLI passes its
            progress bars); without one, lm-eval's usual tqdm bar.
    """

    def __init__(self, path: str, spec: str | None = None, max_length: int | None = None,
                 threads: int | None = None, batch_size: int | str = 8, progress: Progress | None = None,
                 **_: object) -> None:
        super().__init__()
        self.progress = progress
        batch = 8 if str(batch_size).startswith("auto") else max(1, int(batch_size))
        self.scorer = load_scorer(path, spec=spec, threads=int(threads) if threads else None, batch_size=batch)
        self.tokenizer = self.scorer.tokenizer
        self._max_length = min(int(max_length or 2048), self.scorer.max_length)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **_: object) -> list[int]:
        if add_special_tokens is None:
            return self.tokenizer.encode(string)
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    def _score(self, context_enc: list[int], continuation_enc: list[int]) -> tuple[float, bool]:
        """One request, left-truncated to ``max_length + 1`` tokens in all as lm-eval's hf model does."""
        whole = (context_enc + continuation_enc)[-(self.max_length + 1):]
        n = len(continuation_enc)
        return self.scorer.score(np.asarray(whole[:-n], dtype=np.int64), [np.asarray(whole[-n:], dtype=np.int64)])[0]

    @contextmanager
    def _counter(self, description: str, total: int, disable: bool) -> Iterator[Callable[[int], object]]:
        if self.progress is not None:
            with self.progress.task(description, total=total) as task:
                yield task.advance
        else:
            from tqdm import tqdm

            with tqdm(total=total, disable=disable, desc=description) as bar:
                yield bar.update

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **_: object) -> list[tuple[float, bool]]:
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (_, context_enc, continuation_enc) in enumerate(requests):
            fits = len(context_enc) + len(continuation_enc) <= self.max_length + 1
            groups.setdefault(tuple(context_enc) if fits else ("single", i), []).append(i)
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        with self._counter("loglikelihood requests", len(requests), disable_tqdm) as advance:
            for members in groups.values():
                context_enc = requests[members[0]][1]
                if len(members) == 1:
                    res = [self._score(context_enc, requests[members[0]][2])]
                else:
                    res = self.scorer.score(np.asarray(context_enc, dtype=np.int64),
                                            [np.asarray(requests[i][2], dtype=np.int64) for i in members])
                for i, r in zip(members, res, strict=True):
                    out[i] = r
                    if requests[i][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], r)
                advance(len(members))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for (string,) in (r.args for r in requests):
            windows = map(make_disjoint_window, get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1))
            total = sum(self._score(list(ctx), list(cont))[0] for ctx, cont in windows)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for context, gen_kwargs in (r.args for r in requests):
            kwargs = dict(gen_kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            eos = self.tok_decode([self.eot_token_id])
            if eos not in until:
                until.append(eos)
            max_new = int(kwargs.get("max_gen_toks", 256))
            ids = self.tok_encode(context)[-(self.max_length - max_new):] if max_new < self.max_length else []
            new = self.scorer.generate(np.asarray(ids, dtype=np.int64), max_new, (self.eot_token_id,)) if ids else []
            text = self.tok_decode(new)
            for stop in until:
                if stop and stop in text:
                    text = text.split(stop)[0]
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out
