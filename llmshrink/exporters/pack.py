"""Byte layouts the ONNX kernels expect, from the codes of :mod:`llmshrink.compressor.quant`.

MatMulNBits (com.microsoft), checked against onnxruntime 1.32 on CPU:
``B`` is uint8 ``[N, n_blocks, block_size * bits / 8]`` with the first code of
each byte in its lowest bits; ``scales`` is float ``[N * n_blocks]``; without
``zero_points`` the zero point is 2^(bits-1); ``zero_points`` are packed the
same way per row of N, each row padded to whole bytes.
"""

from __future__ import annotations

import numpy as np

from llmshrink.compressor.quant import QuantizedWeight


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned codes ``[..., L]`` (``L * bits`` divisible by 8) into uint8, low bits first."""
    per = 8 // bits
    v = codes.astype(np.uint16).reshape(*codes.shape[:-1], -1, per)
    out = np.zeros(v.shape[:-1], np.uint16)
    for j in range(per):
        out |= v[..., j] << (j * bits)
    return out.astype(np.uint8)


def matmul_nbits_arrays(q: QuantizedWeight) -> dict[str, np.ndarray]:
    """``B``, ``scales`` and (asymmetric only) ``zero_points`` for MatMulNBits."""
    bits, g = q.fmt.weight_bits, q.fmt.group_size
    n, k = q.codes.shape
    n_blocks = k // g
    codes = q.codes.numpy().astype(np.int32)
    if q.zeros is None:
        codes = codes + (1 << (bits - 1))  # symmetric codes are signed; the kernel's default zero point re-centres them
    out = {"B": pack_codes(codes.reshape(n, n_blocks, g), bits),
           "scales": q.scales.numpy().astype(np.float32).reshape(-1)}
    if q.zeros is not None:
        per = 8 // bits
        padded = -(-n_blocks // per) * per
        z = np.zeros((n, padded), np.int32)
        z[:, :n_blocks] = q.zeros.numpy()
        out["zero_points"] = pack_codes(z, bits).reshape(-1)
    return out
