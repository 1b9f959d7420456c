"""The @triton.jit masked SGD kernel (imported on first use by sgd.py, so that importing
ong_kernels needs no triton; a module-level kernel is also what the AOT report compiles)."""

import triton
import triton.language as tl


# flags is a runtime value: specialised (Triton marks an int argument divisible by 16, e.g.
# 0), the first step (flags 2) and the next ones (0) would compile two variants.
@triton.jit(do_not_specialize=["flags"])
def masked_sgd_kernel(
    table,  # int64 [n x 5]: param, grad, buf, mask, numel
    chunks,  # int64 [programs x 2]: tensor index, first element
    hyper,  # float64 [5]: lr, momentum, 1 - dampening, weight_decay, sign
    grad_scale,  # float32 [1] (read when has_scale)
    found_inf,  # float32 [1] (read when has_scale)
    flags,  # int32: 2 first step, 4 nesterov, 8 GradScaler (buffers: the row's address != 0)
    DTYPE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(chunks + 2 * pid)
    start = tl.load(chunks + 2 * pid + 1)
    row = table + t * 5
    p_ptr = tl.load(row).to(tl.pointer_type(DTYPE), bitcast=True)
    g_ptr = tl.load(row + 1).to(tl.pointer_type(DTYPE), bitcast=True)
    b_addr = tl.load(row + 2)
    b_ptr = b_addr.to(tl.pointer_type(DTYPE), bitcast=True)
    m_addr = tl.load(row + 3)
    m_ptr = m_addr.to(tl.pointer_type(tl.uint8), bitcast=True)
    numel = tl.load(row + 4)
    sign = tl.load(hyper + 4).to(ACC)
    if (flags & 8) != 0:
        # GradScaler: an inf anywhere empties every tensor (nothing is loaded or stored);
        # the gradient is unscaled by float32(1 / double(scale)), as GradScaler does.
        numel = tl.where(tl.load(found_inf) != 0, 0, numel)
        sign = sign * (1.0 / tl.load(grad_scale).to(tl.float64)).to(tl.float32).to(ACC)
    offs = start + tl.arange(0, BLOCK)
    inb = offs < numel
    lr = tl.load(hyper).to(ACC)
    mom = tl.load(hyper + 1).to(ACC)
    damp = tl.load(hyper + 2).to(ACC)
    wd = tl.load(hyper + 3).to(ACC)
    if m_addr != 0:
        byte = tl.load(m_ptr + (offs >> 3), mask=inb, other=0).to(tl.int32)
        keep = ((byte >> (offs & 7).to(tl.int32)) & 1) != 0
    else:
        keep = inb
    keep = keep & inb
    # The gradient load does not wait for the mask; p and buf are read only where kept.
    g = tl.load(g_ptr + offs, mask=inb, other=0).to(ACC)
    w = tl.load(p_ptr + offs, mask=keep, other=0).to(ACC)
    g = tl.where(keep, sign * g, 0.0)  # select, never multiply: NaN at pruned stays out
    g = g + wd * w
    if b_addr != 0:  # momentum buffers: keyed on the buffer, as the CUDA kernel and reference
        if (flags & 2) != 0:
            b = g
        else:
            b = mom * tl.load(b_ptr + offs, mask=keep, other=0).to(ACC) + damp * g
        b = tl.where(keep, b, 0.0)
        tl.store(b_ptr + offs, b.to(DTYPE), mask=inb)
        if (flags & 4) != 0:
            g = g + mom * b
        else:
            g = b
    w = tl.where(keep, w - lr * g, 0.0)
    tl.store(p_ptr + offs, w.to(DTYPE), mask=inb)
