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
