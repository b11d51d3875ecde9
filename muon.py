"""Muon: MomentUm Orthogonalized by Newton-Schulz.

Muon keeps SGD momentum for each hidden weight matrix and, instead of stepping
along the momentum M, steps along the nearest semi-orthogonal matrix UV^T
(where M = USV^T): every singular direction of the update moves by the same
amount, so rare but important directions are not drowned out by the few
dominant ones that plain momentum follows. UV^T is approximated by five steps
of a quintic Newton-Schulz iteration whose coefficients (3.4445, -4.7750,
2.0315) maximise the slope at zero: it converges fast and lands the singular
values in roughly [0.7, 1.2] instead of exactly 1, which does not hurt. The
iteration is stable in bf16, so it runs in bf16 where bf16 matmuls are fast (GPUs,
CPUs with AVX512-BF16, AMX or Arm's BF16) and in fp32 elsewhere: on a CPU without
native bf16 (AVX2 only) torch emulates bf16 matmuls, many times slower than fp32.

Only for 2D hidden weights (conv weights are viewed as out x in*kh*kw);
embeddings, norms and biases belong to AdamW.

`Muon` is a drop-in for torch.optim.Muon (same arguments, same update for 2D
parameters) that also batches same-shaped matrices into one Newton-Schulz call
and, under torch.distributed, splits that work across ranks.

References: K. Jordan et al., "Muon: An optimizer for hidden layers in neural
networks" (2024); J. Liu et al., "Muon is Scalable for LLM Training" (2025),
for the `match_rms_adamw` learning-rate adjustment.
"""
import functools
import math
import os
import re

import torch
import torch.distributed as dist


def zeropower_via_newtonschulz5(G, steps=5, coefficients=(3.4445, -4.7750, 2.0315), eps=1e-7, dtype=None):
    """Approximately orthogonalise G [..., A, B], batched over leading dims, in
    `dtype` (None: ns_dtype(G.device), bf16 where it is fast)."""
    a, b, c = coefficients
    X = G.reshape(-1, *G.shape[-2:]).to(dtype or ns_dtype(G.device))  # [k, A, B]: baddbmm wants one batch dim
    # Frobenius norm >= spectral norm, so this puts every singular value in [0, 1]
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    # The iterate's two buffers, written in turn: a CPU pays page faults for every fresh
    # temporary this large (a GPU's caching allocator does not), ~5x the cost of writing it
    Y = torch.empty_like(X)
    wide = X.size(-2) <= X.size(-1)
    for _ in range(steps):
        # the Gram matrix of the short side, so that A and B are the small [k, min, min] ones; a
        # tall X is multiplied on the right (B is symmetric): no transposed copies in or out
        A = X @ X.mT if wide else X.mT @ X
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b*A + c*A@A
        if wide:
            torch.baddbmm(X, B, X, beta=a, out=Y)  # a*X + B@X
        else:
            torch.baddbmm(X, X, B, beta=a, out=Y)  # a*X + X@B
        X, Y = Y, X
    return X.reshape(G.shape)


def ns_dtype(device):
    """Newton-Schulz's default dtype on `device`: bf16 on GPUs and on CPUs with
    native bf16 matmuls, fp32 on other CPUs."""
    device = torch.device(device)
    return torch.bfloat16 if device.type != 'cpu' or cpu_has_fast_bf16() else torch.float32


@functools.cache
def cpu_has_fast_bf16():
    """AVX512-BF16 or AMX (x86) or BF16 (Arm) in /proc/cpuinfo, unless
    ONEDNN_MAX_CPU_ISA keeps oneDNN, which runs torch's bf16 matmuls, below them."""
    isa = os.environ.get('ONEDNN_MAX_CPU_ISA', 'ALL').upper()
    if isa not in ('ALL', 'DEFAULT') and 'BF16' not in isa and 'AMX' not in isa:
        return False
    try:
        with open('/proc/cpuinfo') as f:
            cpuinfo = f.read()
    except OSError:  # not Linux: fp32 is always correct, at worst slower
        return False
    return re.search(r'\b(avx512_bf16|amx_bf16|bf16)\b', cpuinfo) is not None


def adjusted_lr(lr, adjust_lr_fn, shape):
    """Scale lr by the matrix shape: 'original' (Jordan) keeps the update's RMS
    independent of aspect ratio; 'match_rms_adamw' (Liu et al.) gives it AdamW's
    typical RMS of 0.2, so AdamW's lr and weight decay carry over."""
    A, B = shape
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1.0, A / B))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(A, B))
    raise ValueError(f"adjust_lr_fn must be None, 'original' or 'match_rms_adamw', got {adjust_lr_fn!r}")


class Muon(torch.optim.Optimizer):
    """torch.optim.Muon's constructor and update, plus: conv weights (as 2D),
    same-shaped matrices orthogonalised together (one batched Newton-Schulz call
    per shape), the orthogonalisation split across ranks under torch.distributed
    (all ranks must hold identical gradients, as after DDP's all-reduce),
    `momentum_dtype` (e.g. torch.bfloat16 halves the optimizer state) and
    `ns_dtype`, Newton-Schulz's dtype (None: ns_dtype(device), bf16 where bf16
    matmuls are fast, as torch's always is; fp32 elsewhere)."""

    def __init__(self, params, lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
                 ns_coefficients=(3.4445, -4.775, 2.0315), eps=1e-7, ns_steps=5,
                 adjust_lr_fn=None, momentum_dtype=None, ns_dtype=None):
        if lr < 0 or weight_decay < 0 or momentum < 0:
            raise ValueError(f"Muon: lr, weight_decay and momentum must be >= 0, got {lr}, {weight_decay}, {momentum}")
        adjusted_lr(1.0, adjust_lr_fn, (1, 1))  # validates the name
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_coefficients=ns_coefficients, eps=eps, ns_steps=ns_steps,
                        adjust_lr_fn=adjust_lr_fn)
        super().__init__(params, defaults)
        self.momentum_dtype, self.ns_dtype = momentum_dtype, ns_dtype
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim < 2:
                    raise ValueError(f"Muon takes matrices and conv weights, got a parameter of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            by_shape = {}  # the parameters with a gradient, by matrix shape
            for p in group["params"]:
                if p.grad is not None:
                    by_shape.setdefault(p.flatten(1).shape, []).append(p)
            for shape, params in by_shape.items():
                dtype = self.ns_dtype or ns_dtype(params[0].device)
                # each matrix cast before stacking: no fp32 stack to cast again (in bf16, twice the bytes)
                U = torch.stack([self._momentum_update(p, group).flatten(1).to(dtype) for p in params])  # [k, A, B]
                O = self._orthogonalize(U, group)
                lr = adjusted_lr(group["lr"], group["adjust_lr_fn"], shape)
                for p, o in zip(params, O):
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                    p.add_(o.view_as(p), alpha=-lr)  # o is bf16 or fp32, added in p's dtype
        return loss

    def _momentum_update(self, p, group):
        """SGD momentum on p's gradient; returns the step to orthogonalise (Nesterov's look-ahead or the momentum)."""
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p, dtype=self.momentum_dtype or p.dtype)
        buf = state["momentum_buffer"]
        g = p.grad.to(buf.dtype)
        buf.lerp_(g, 1 - group["momentum"])
        return g.lerp(buf, group["momentum"]) if group["nesterov"] else buf

    def _orthogonalize(self, U, group):
        """Newton-Schulz on the stack U [k, A, B]; under torch.distributed each rank
        takes a contiguous 1/world of the k matrices and all-gathers the rest."""
        args = group["ns_steps"], group["ns_coefficients"], group["eps"]
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return zeropower_via_newtonschulz5(U, *args, dtype=U.dtype)
        rank, world, k = dist.get_rank(), dist.get_world_size(), U.size(0)
        per_rank = math.ceil(k / world)
        U = torch.cat([U, U.new_zeros(per_rank * world - k, *U.shape[1:])])  # pad to a multiple of world
        mine = zeropower_via_newtonschulz5(U[rank * per_rank:(rank + 1) * per_rank], *args, dtype=U.dtype)
        if U.device.type == "cpu":  # gloo has no bf16 all_gather
            mine = mine.float()
        parts = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(parts, mine.contiguous())
        return torch.cat(parts)[:k]
