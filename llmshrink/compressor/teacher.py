"""KD targets: the original model's next-token log-probabilities on the calibration set, computed once.

The search reads targets for the same fixed calibration sequences again and
again (two half-batches per step), and recovery reads them again. On
SmolLM2-135M the teacher's forward was a fifth of a search step; computing it
once per sequence removes that cost from every step after the first pass.

Targets are stored as float16 log-probabilities, ``N * T * V * 2`` bytes
(128 sequences x 128 tokens x 49,152 vocab: 1.6 GB). float16's rounding is
at most ``|log p| * 2**-11`` (5e-4 at log p = -1), far below the KD
differences the search acts on; :func:`~llmshrink.compressor.search.kd_loss`
re-normalizes them, so tempered KD (``T != 1``) sees exactly the teacher's
tempered distribution up to that rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmshrink.progress import NULL_PROGRESS, Progress


class TeacherTargets:
    """``targets[rows]`` -> float32 log-probabilities ``[len(rows), T, V]`` of ``calib[rows]`` under the teacher,
    on the host (the caller moves them to its device).

    Args:
        teacher: the original HF model (only its forward is used, without cache).
        calib: token ids ``[N, T]``.
    """

    def __init__(self, teacher, calib: torch.Tensor, *, batch_size: int = 4,
                 progress: Progress = NULL_PROGRESS) -> None:
        from llmshrink.device import device_of

        self.calib = calib
        n, t = calib.shape
        vocab = int(teacher.config.vocab_size)
        # on the host whatever device the teacher runs on: N*T*V (1.6 GB for 135M, 4 GB at a 128k vocabulary)
        # would crowd a GPU that holds the teacher and the supernet; readers move the rows they take
        self.logp = torch.empty(n, t, vocab, dtype=torch.float16, device="cpu")
        teacher.eval()
        dev = device_of(teacher)
        with progress.task("Teacher targets for KD", total=n) as task, torch.no_grad():
            for i in range(0, n, batch_size):
                ids = calib[i:i + batch_size]
                logits = teacher(input_ids=ids.to(dev), use_cache=False).logits[..., :vocab].float()
                self.logp[i:i + len(ids)] = F.log_softmax(logits, -1).half().cpu()
                task.advance(len(ids))

    @classmethod
    def reuse(cls, targets: TeacherTargets | None, teacher, calib: torch.Tensor, *, batch_size: int = 4,
              progress: Progress = NULL_PROGRESS) -> TeacherTargets:
        """``targets`` if given (they must be for exactly ``calib``), else computed now for ``calib``.

        Raises:
            ValueError: ``targets`` were computed for other sequences.
        """
        if targets is None:
            return cls(teacher, calib, batch_size=batch_size, progress=progress)
        if not torch.equal(targets.calib, calib):
            raise ValueError("targets were computed for other sequences than calib[:, :seq_len]")
        return targets

    def __len__(self) -> int:
        return len(self.calib)

    def __getitem__(self, rows) -> torch.Tensor:
        return self.logp[rows].float()

    def take(self, rows) -> TeacherTargets:
        """A view on a subset of the sequences (no copy of the targets beyond what indexing makes)."""
        sub = object.__new__(TeacherTargets)
        sub.calib, sub.logp = self.calib[rows], self.logp[rows]
        return sub
