"""Run by test_muon under torchrun: distributed Muon on identical gradients, saves the result per rank."""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from muon import Muon  # noqa: E402


def make_params():
    torch.manual_seed(0)  # the same matrices and gradients on every rank, as after DDP's all-reduce
    shapes = [(32, 16)] * 3 + [(16, 48)] * 2 + [(24, 24), (8, 4, 3, 3)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(3)]
    return params, grads


def train(params, grads):
    opt = Muon(params, lr=0.02, weight_decay=0.1, adjust_lr_fn='match_rms_adamw')
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g
        opt.step()
    return [p.detach() for p in params]


if __name__ == '__main__':
    dist.init_process_group('gloo')
    params = train(*make_params())
    torch.save(params, os.path.join(sys.argv[1], f'rank{dist.get_rank()}.pt'))
    dist.barrier()  # no rank tears gloo down while another still talks to it
    dist.destroy_process_group()
