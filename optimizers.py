"""The papers' optimizers for the whole model, beside Muon + AdamW (muon.py):
LAMB for large batches (You et al. 2020) and the memory-efficient Adafactor of
Scaling Vision Transformers (Zhai et al. 2022). train_mae.py picks one with
`optimizer='lamb'` or `'adafactor'`. Both take parameter groups as
torch.optim.AdamW does; a group with trust=False (LAMB) or factored=False
(Adafactor) takes the plain per-element rule (1D tensors: norms, biases).
"""
import torch


class Lamb(torch.optim.Optimizer):
    """LAMB: the AdamW step (bias-corrected moments, decoupled weight decay),
    rescaled per tensor by the trust ratio ||w|| / ||step|| so every layer moves by
    the same relative amount whatever the batch size. Groups with trust=False
    (1D: norms, biases) take the plain AdamW step, as in practice.
    `momentum_dtype=torch.bfloat16` keeps the first moment in bf16."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, momentum_dtype=None):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, trust=True))
        self.momentum_dtype = momentum_dtype

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta1, beta2 = group['betas']
            for p in group['params']:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state['step'] = 0
                    state['exp_avg'] = torch.zeros_like(p, dtype=self.momentum_dtype or p.dtype)
                    state['exp_avg_sq'] = torch.zeros_like(p)
                state['step'] += 1
                m, v = state['exp_avg'], state['exp_avg_sq']
                m.lerp_(p.grad.to(m.dtype), 1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                m_hat = m.to(p.dtype) / (1 - beta1 ** state['step'])
                v_hat = v / (1 - beta2 ** state['step'])
                update = m_hat / (v_hat.sqrt() + group['eps']) + group['weight_decay'] * p
                ratio = 1.0
                if group['trust']:
                    w_norm, u_norm = p.norm(), update.norm()
                    ratio = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, 1.0)
                p.sub_(group['lr'] * ratio * update)


class Adafactor(torch.optim.Optimizer):
    """Zhai et al.'s Adafactor (Scaling ViT, section 3.4): Shazeer & Stern's
    factored second moment (for a matrix, one row and one column average of g^2:
    O(rows + cols) memory instead of O(rows * cols); conv weights as out x in*kh*kw)
    with three changes: a first moment (beta1), kept in bf16; no scaling of the lr
    by the parameter's RMS (lr is the step size, as in Adam); the second-moment
    decay 1 - t^-0.8 capped at beta2_cap = 0.999. Decoupled weight decay; no update
    clipping. State: 2 bytes per parameter plus the factors, about half of the
    4 bytes of the fp32 parameters themselves (Adam: 8)."""

    def __init__(self, params, lr=1e-3, beta1=0.9, beta2_cap=0.999, decay_rate=0.8, eps=1e-30, weight_decay=0.0,
                 momentum_dtype=torch.bfloat16):
        super().__init__(params, dict(lr=lr, beta1=beta1, beta2_cap=beta2_cap, decay_rate=decay_rate, eps=eps,
                                      weight_decay=weight_decay, factored=True))
        self.momentum_dtype = momentum_dtype

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group['params']:
                if p.grad is None:
                    continue
                state = self.state[p]
                g = p.grad.to(torch.promote_types(p.grad.dtype, torch.float32))  # bf16 grads in fp32
                g = g.view(p.size(0), -1) if p.ndim >= 2 else g
                factored = group['factored'] and p.ndim >= 2
                if not state:
                    state['step'] = 0
                    state['exp_avg'] = torch.zeros_like(p, dtype=self.momentum_dtype)
                    if factored:  # row and column means of g^2
                        state['exp_avg_sq_row'] = g.new_zeros(g.size(0))
                        state['exp_avg_sq_col'] = g.new_zeros(g.size(1))
                    else:
                        state['exp_avg_sq'] = torch.zeros_like(g)
                state['step'] += 1
                beta2 = min(1 - state['step'] ** -group['decay_rate'], group['beta2_cap'])
                g2 = g * g + group['eps']
                if factored:
                    row, col = state['exp_avg_sq_row'], state['exp_avg_sq_col']
                    row.lerp_(g2.mean(dim=1), 1 - beta2)
                    col.lerp_(g2.mean(dim=0), 1 - beta2)
                    v = torch.outer(row / row.mean(), col)  # the rank-1 estimate of E[g^2]
                else:
                    v = state['exp_avg_sq'].lerp_(g2, 1 - beta2)
                m = state['exp_avg']
                m.lerp_((g / v.sqrt()).view_as(p).to(m.dtype), 1 - group['beta1'])
                p.mul_(1 - group['lr'] * group['weight_decay'])
                p.sub_(group['lr'] * m.to(p.dtype))
