"""Triton kernel for blockwise absmax quantisation (``int8``/``int4``) with error feedback.

One program quantises ``ROWS`` blocks: it loads each block as even/odd element pairs (so int4
pairs are packed in registers), adds the error-feedback residual, finds the block's absmax, writes
the bfloat16 scale bits, the int8 values or packed int4 bytes, and, for error feedback, the new
residual ``target - decoded``. Bytes are identical to ``dept_comm.codecs._absmax`` (see that module
for the format): every float operation is the CPU codec's, in the same order, with IEEE rounding:

* divisions go through ``tl.math.div_rn`` (round to nearest, never the approximate divide);
* launched with ``enable_fp_fusion=False``, so ``x * inv`` is never contracted with the following
  add into an FMA (which would round once instead of twice);
* round half to even is ``(y + 1.5 * 2**23) - 1.5 * 2**23``, exact for ``|y| < 2**22`` (here
  ``|y| <= qmax * (1 + 2**-7)``), so no libdevice call is needed and the Triton interpreter
  (``TRITON_INTERPRET=1``) runs the same arithmetic on CPU.

Import this module only where ``triton`` is importable; ``dept_comm.codecs.gpu`` does that.
"""

from __future__ import annotations

import torch
import triton  # type: ignore[import-not-found,import-untyped,unused-ignore]
import triton.language as tl  # type: ignore[import-not-found,import-untyped,unused-ignore]

# Globals a kernel reads must be constexpr.
_MIN_SCALE = tl.constexpr(2.0**-126)
_NAN_BITS = tl.constexpr(0x7FC00000)
_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23
_EXP_MASK = tl.constexpr(0x7F800000)  # all exponent bits set: Inf or NaN
_TILE = 4096  # elements per program (ROWS blocks of the block size)


@triton.jit  # type: ignore[untyped-decorator,misc,unused-ignore]
def _absmax_encode_kernel(  # type: ignore[no-untyped-def,unused-ignore]
    x_ptr,
    r_ptr,
    scale_ptr,
    values_ptr,
    newr_ptr,
    n,
    nblocks,
    blk,
    QMAX: tl.constexpr,  # noqa: N803 (Triton's constexpr convention)
    HALF: tl.constexpr,  # noqa: N803 (Triton's constexpr convention)
    ROWS: tl.constexpr,  # noqa: N803 (Triton's constexpr convention)
    BITS: tl.constexpr,  # noqa: N803 (Triton's constexpr convention)
    HAS_R: tl.constexpr,  # noqa: N803 (Triton's constexpr convention)
    WRITE_R: tl.constexpr,  # noqa: N803 (Triton's constexpr convention)
):
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, HALF)
    row_ok = rows < nblocks
    e = rows.to(tl.int64)[:, None] * blk + 2 * cols[None, :]
    o = e + 1
    in_blk = row_ok[:, None] & ((2 * cols[None, :]) < blk)
    me = in_blk & (e < n)
    mo = in_blk & (o < n)
    xe = tl.load(x_ptr + e, mask=me, other=0.0)
    xo = tl.load(x_ptr + o, mask=mo, other=0.0)
    if HAS_R:
        xe = xe + tl.load(r_ptr + e, mask=me, other=0.0)
        xo = xo + tl.load(r_ptr + o, mask=mo, other=0.0)
    bad_e = (xe.to(tl.int32, bitcast=True) & _EXP_MASK) == _EXP_MASK
    bad_o = (xo.to(tl.int32, bitcast=True) & _EXP_MASK) == _EXP_MASK
    nonfinite = tl.max((bad_e | bad_o).to(tl.int32), axis=1) > 0
    absmax = tl.maximum(tl.max(tl.abs(xe), axis=1), tl.max(tl.abs(xo), axis=1))
    absmax = tl.where(nonfinite, 0.0, absmax)
    s = tl.math.div_rn(absmax, tl.full(absmax.shape, QMAX, tl.float32))
    bits = s.to(tl.int32, bitcast=True)
    bits = (bits + 0xFFFF) & -65536
    scale = tl.maximum(bits.to(tl.float32, bitcast=True), _MIN_SCALE)
    inv = tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)
    inv = tl.where(nonfinite, 0.0, inv)
    sbits = tl.where(nonfinite, _NAN_BITS, scale.to(tl.int32, bitcast=True))
    tl.store(scale_ptr + rows, (sbits >> 16).to(tl.int16), mask=row_ok)
    scale = sbits.to(tl.float32, bitcast=True)

    qe = (xe * inv[:, None] + _MAGIC) - _MAGIC
    qo = (xo * inv[:, None] + _MAGIC) - _MAGIC
    qe = tl.where(nonfinite[:, None], 0.0, qe)
    qo = tl.where(nonfinite[:, None], 0.0, qo)
    qe_i = qe.to(tl.int32)
    qo_i = qo.to(tl.int32)
    if BITS == 8:
        tl.store(values_ptr + e, qe_i.to(tl.int8), mask=me)
        tl.store(values_ptr + o, qo_i.to(tl.int8), mask=mo)
    else:
        packed = (qe_i & 15) | ((qo_i & 15) << 4)
        tl.store(values_ptr + e // 2, packed.to(tl.uint8), mask=me)
    if WRITE_R:
        tl.store(newr_ptr + e, xe - qe * scale[:, None], mask=me)
        tl.store(newr_ptr + o, xo - qo * scale[:, None], mask=mo)


def encode_triton(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    new_residual: torch.Tensor | None,
    scales: torch.Tensor,
    values: torch.Tensor,
    *,
    block: int,
    qmax: int,
    bits: int,
) -> None:
    """Quantise flat float32 ``x`` (+ ``residual``) into ``scales`` (int16, one per block) and
    ``values`` (uint8 value bytes); write ``x + residual - decoded`` into ``new_residual`` if given.

    ``new_residual`` may be ``residual`` itself (each element is read before it is written).
    """
    n = x.numel()
    nblocks = scales.numel()
    half = triton.next_power_of_2(block // 2)
    rows = max(1, _TILE // (2 * half))
    grid = (triton.cdiv(nblocks, rows),)
    _absmax_encode_kernel[grid](
        x,
        residual if residual is not None else x,
        scales,
        values,
        new_residual if new_residual is not None else x,
        n,
        nblocks,
        block,
        QMAX=float(qmax),
        HALF=half,
        ROWS=rows,
        BITS=bits,
        HAS_R=residual is not None,
        WRITE_R=new_residual is not None,
        enable_fp_fusion=False,
        num_warps=4,
    )
