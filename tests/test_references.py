"""Each part of the MAE against a reference written here, independently of
train_mae.py: the decoder's unshuffle, the schedule the loop applies, the
crops, LAMB over several steps, a loss that a broken model cannot reach,
compiled against eager, and a preemption that reaches one rank of two."""
import math
import os
import signal
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import train_mae as T
from conftest import TINY, read_log, run, start, wait_for_step, worker_pids


def cfg(*argv):
    return SimpleNamespace(**T.configure(list(TINY) + list(argv), T.CONFIG))


# --- the decoder -------------------------------------------------------------

def test_decoder_puts_each_token_at_its_patch_with_its_position():
    torch.manual_seed(0)
    m = T.MAE(img_size=32, patch_size=8, enc_dim=64, enc_depth=1, enc_heads=2, dec_dim=32, dec_depth=2,
              dec_heads=4, mask_ratio=0.6).eval()
    N, L, keep = 3, 16, int(16 * 0.4)
    imgs, noise = torch.randn(N, 3, 32, 32), torch.rand(N, L)
    with torch.no_grad():
        latent, ids_restore, ids_masked = m.forward_encoder(imgs, noise)
        # the reference: the patches with the smallest noise are visible, in that order
        order = noise.argsort(dim=1)
        visible, masked = order[:, :keep], order[:, keep:]
        assert torch.equal(ids_masked.sort(1).values, masked.sort(1).values)
        x = torch.empty(N, L, 32)
        emb = latent @ m.decoder_embed.weight.T + m.decoder_embed.bias  # [N, keep, 32]
        for n in range(N):
            x[n, visible[n]] = emb[n]  # visible token j is patch visible[n, j]
            x[n, masked[n]] = m.mask_token[0, 0]
        # the position of patch (row, col) in the 4 x 4 grid: 2D sin-cos (MAE), x then y
        omega = 1.0 / 10000 ** (torch.arange(8, dtype=torch.float64) / 8)
        rows, cols = torch.arange(L) // 4, torch.arange(L) % 4
        pos = torch.cat([f(c[:, None].double() * omega) for c in (cols, rows) for f in (torch.sin, torch.cos)], 1)
        x = x + pos.float()
        for blk in m.decoder_blocks:
            x = blk(x)
        reference = m.decoder_norm(x)
        torch.testing.assert_close(m.forward_decoder(latent, ids_restore), reference, rtol=1e-5, atol=1e-5)
        # and the pixel head reads the masked patches the loss compares with
        loss, pred, ids = m(imgs, noise)
        want = torch.stack([m.decoder_pred(reference[n, ids[n]]) for n in range(N)])
        torch.testing.assert_close(pred, want, rtol=1e-5, atol=1e-5)


# --- the schedule as the loop runs it -----------------------------------------

def reference_lr(step, total, warmup, peak, schedule, cooldown_frac):
    """The lr of 0-based optimizer step `step`: linear warmup to the peak at step
    warmup - 1, then cosine to 0 at the last step, or (wsd) constant, then a
    linear cooldown over the last cooldown_frac of the run that reaches 0 at the last step."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule == 'cosine':
        return peak * (1 + math.cos(math.pi * (step - warmup) / (total - warmup))) / 2
    cooldown = round(cooldown_frac * total)
    start_cooldown = total - cooldown
    return peak if step < start_cooldown else peak * (total - 1 - step) / (cooldown - 1)


@pytest.mark.parametrize('length,schedule,total,warmup', [
    # 64 images // 8 = 8 steps per epoch: 3 epochs, 1 of warmup
    (['--epochs=3', '--warmup_epochs=1'], 'cosine', 24, 8),
    # max_iters: warmup is warmup_epochs / epochs of the run, whatever an epoch is
    (['--max_iters=30', '--epochs=10', '--warmup_epochs=2'], 'wsd', 30, 6),
])
def test_lr_applied_at_each_step_follows_the_schedule(tmp_path, monkeypatch, length, schedule, total, warmup):
    applied = []  # the lr of every param group of every optimizer, as each step() runs

    def hooked(*args, **kwargs):
        optimizers = build_optimizers(*args, **kwargs)
        for opt in optimizers:
            opt.register_step_pre_hook(lambda o, a, k: applied.append((o, [g['lr'] for g in o.param_groups])))
        return optimizers

    build_optimizers = T.build_optimizers
    monkeypatch.setattr(T, 'build_optimizers', hooked)
    peak = 2e-3
    T.main(TINY + [f'--out_dir={tmp_path}', '--synthetic_size=(64,8)', '--batch_size=8', '--micro_batch_size=8',
                   '--enc_depth=1', '--eval_interval=1000', '--log_interval=1', f'--lr={peak}', f'--schedule={schedule}',
                   '--cooldown_frac=0.3', '--max_iters=0'] + length)
    want = [reference_lr(s, total, warmup, peak, schedule, 0.3) for s in range(total)]
    logged = [r for r in read_log(tmp_path) if 'lr' in r]
    assert [r['step'] for r in logged] == list(range(1, total + 1))
    np.testing.assert_allclose([r['lr'] for r in logged], want, rtol=1e-9, atol=1e-12)
    n_opt = len({id(o) for o, _ in applied})
    assert len(applied) == n_opt * total
    for s in range(total):  # every group of every optimizer ran step s at the lr of step s
        lrs = [lr for _, group_lrs in applied[s * n_opt:(s + 1) * n_opt] for lr in group_lrs]
        np.testing.assert_allclose(lrs, want[s], rtol=1e-9, atol=1e-12, err_msg=f'step {s}')
    assert want[warmup - 1] == pytest.approx(peak) and (want[-1] == 0) == (schedule == 'wsd')
