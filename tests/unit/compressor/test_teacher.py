import pytest
import torch

from llmshrink.compressor.search import kd_loss
from llmshrink.compressor.teacher import TeacherTargets


def test_targets_are_the_teachers_log_probs_and_kd_reads_them_like_logits(tiny_hf):
    ids = torch.randint(3, 300, (5, 12), generator=torch.Generator().manual_seed(2))
    t = TeacherTargets(tiny_hf, ids, batch_size=2)
    with torch.no_grad():
        logits = tiny_hf(input_ids=ids, use_cache=False).logits.float()
    ref = torch.log_softmax(logits, -1)
    rows = torch.tensor([4, 0, 2])
    got = t[rows]
    assert got.dtype == torch.float32 and got.shape == ref[rows].shape
    torch.testing.assert_close(got, ref[rows], rtol=2e-3, atol=2e-3)  # float16 storage
    student = torch.randn_like(logits[rows])
    for temp in (1.0, 2.0):
        torch.testing.assert_close(kd_loss(student, got, temp), kd_loss(student, logits[rows], temp), rtol=1e-3, atol=1e-4)
    half = t.take(slice(1, None, 2))
    assert torch.equal(half.calib, ids[1::2]) and torch.equal(half[torch.tensor([1])], t[torch.tensor([3])])


def test_targets_are_reused_only_for_the_sequences_they_were_computed_for(tiny_hf):
    ids = torch.randint(3, 300, (4, 8), generator=torch.Generator().manual_seed(3))
    t = TeacherTargets(tiny_hf, ids, batch_size=2)
    assert TeacherTargets.reuse(t, tiny_hf, ids) is t
    with pytest.raises(ValueError, match="other sequences"):
        TeacherTargets.reuse(t, tiny_hf, ids[:, :6])
    fresh = TeacherTargets.reuse(None, tiny_hf, ids[:2])
    assert torch.equal(fresh.calib, ids[:2]) and torch.equal(fresh[torch.tensor([1])], t[torch.tensor([1])])
