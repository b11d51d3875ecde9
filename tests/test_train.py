"""train_mae.py end to end: config, data, optimizers, schedules, compile, DDP, resume."""
import math
import os
import sys
import types
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import data
import harness
import train_mae as T
from conftest import TINY, read_log, run
from optimizers import Lamb


def cfg(*argv):
    return SimpleNamespace(**harness.configure(list(TINY) + list(argv), T.CONFIG))


# --- config ------------------------------------------------------------------

def test_overrides_types_and_config_files(tmp_path):
    f = tmp_path / 'c.py'
    f.write_text("import math\nlr = 1e-3\nbetas = [0.9, 0.99]\n")
    c = harness.configure([str(f), '--epochs=3'], T.CONFIG)
    assert c['lr'] == 1e-3 and c['betas'] == (0.9, 0.99) and c['epochs'] == 3
    assert harness.configure(['--betas=(0.8,0.9)', '--out_dir=123', '--lr=1'], T.CONFIG)['betas'] == (0.8, 0.9)
    assert harness.configure(['--out_dir=123', '--lr=1'], T.CONFIG)['out_dir'] == '123'
    assert isinstance(harness.configure(['--lr=1'], T.CONFIG)['lr'], float)


@pytest.mark.parametrize('args,names', [
    (['--nope=1'], "'nope'"), (['--epochs=1.5'], '--epochs'), (['--swiglu=1'], '--swiglu'),
    (['--betas=0.9'], '--betas'), (['--norm=batchnorm'], '--norm'), (['--img_size=30'], '--img_size=30'),
    (['--enc_heads=5'], '--enc_heads=5'), (['--mask_ratio=1.0'], '--mask_ratio'), (['--mask_ratio=0.0'], 'no masked'),
    (['--dec_dim=30', '--dec_heads=3'], '--dec_dim=30'),
    (['--batch_size=12'], '--batch_size=12'), (['--optimizer=sgd'], '--optimizer'), (['--lr'], '--lr'),
    (['missing_config.py'], 'missing_config.py'), (['--init_from=resume'], 'ckpt.pt'),
    (['--data_dir=/no/such/dir'], '/no/such/dir'), (['--stem=conv', '--patch_size=6', '--img_size=36'], '--patch_size'),
])
def test_bad_settings_fail_with_one_line_naming_the_key(tmp_path, args, names):
    with pytest.raises(SystemExit) as e:
        T.main(TINY + [f'--out_dir={tmp_path}'] + args)
    msg = str(e.value.code)
    assert e.value.code != 0 and msg.startswith('error:') and '\n' not in msg and names in msg, msg
    assert not os.path.exists(tmp_path / 'log.jsonl')  # failed before any work


def test_bad_setting_on_the_command_line_is_one_line_on_stderr(tmp_path):
    p = run(TINY + [f'--out_dir={tmp_path}', '--enc_dim=65'], check=False, timeout=60)
    assert p.returncode != 0 and p.stderr.strip().splitlines() == [
        'error: --enc_heads=2 does not divide --enc_dim=65'], p.stderr


# --- data --------------------------------------------------------------------

def test_synthetic_is_deterministic_labelled_and_structured():
    s = T.Synthetic(100, 48, 'train', seed=0)
    a, la = s.open(7)
    b, lb = s.open(7)
    assert np.array_equal(np.asarray(a), np.asarray(b)) and la == lb and a.size == (48, 48)
    assert not np.array_equal(np.asarray(a), np.asarray(T.Synthetic(100, 48, 'val').open(7)[0]))
    assert sorted({s.open(i)[1] for i in range(100)}) == list(range(10))


def test_samples_depend_only_on_seed_epoch_and_index():
    c = cfg()
    train, _ = T.build_datasets(c, 16)
    x1, y1, n1, _, _ = train[(3, 5)]
    x2, y2, n2, _, _ = train[(3, 5)]
    assert torch.equal(x1, x2) and torch.equal(n1, n2) and y1 == y2 and x1.dtype == torch.uint8
    assert not torch.equal(train[(4, 5)][2], n1)  # a new mask each epoch
    loaders = [list(data.make_loader(train, data.TrainBatches(256, 16, 8, 0, 1, 0, 0, 3), w, False)) for w in (0, 2)]
    for a, b in zip(*loaders):
        assert all(torch.equal(u, v) for u, v in zip(a, b))  # worker processes change nothing


def test_train_batches_split_global_batches_across_ranks_and_resume():
    one = [sum(b, []) for b in zip(*[iter(data.TrainBatches(100, 16, 4, 0, 1, 0, 0, 12))] * 4)]
    two = [list(data.TrainBatches(100, 16, 4, r, 2, 0, 0, 12)) for r in range(2)]
    for s in range(12):  # step s: rank 0's two micro-batches, then rank 1's, make the one-process batch
        assert two[0][2 * s] + two[0][2 * s + 1] + two[1][2 * s] + two[1][2 * s + 1] == one[s]
    per_epoch = [i for b in one[:6] for _, i in b]
    assert len(set(per_epoch)) == len(per_epoch) == 96  # an epoch: no duplicates, 100 // 16 batches
    assert {e for b in one[6:] for e, _ in b} == {1} and one[6] != one[0]  # reshuffled
    resumed = list(data.TrainBatches(100, 16, 4, 0, 1, 0, 7, 12))
    assert resumed == [b for s in one[7:] for b in (s[0:4], s[4:8], s[8:12], s[12:16])]


def write_image_folder(root, n=3, size=(50, 40)):
    rng = np.random.default_rng(0)
    for split in ('train', 'val'):
        for cls in ('cat', 'dog'):
            os.makedirs(root / split / cls)
            for i in range(n):
                arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / split / cls / f'{i}.{"JPEG" if i % 2 else "png"}')
    return root


def test_image_folder_reads_jpeg_png_and_odd_modes(tmp_path):
    write_image_folder(tmp_path)
    folder = tmp_path / 'train' / 'dog'
    Image.new('L', (30, 20), 100).save(folder / 'gray.jpg')
    Image.new('CMYK', (30, 20), (255, 0, 0, 0)).save(folder / 'cmyk.jpg')
    Image.new('RGBA', (30, 20), (10, 20, 30, 0)).save(folder / 'alpha.png')
    Image.fromarray(np.full((20, 30), 40000, dtype=np.uint16)).save(folder / 'deep.png')
    Image.new('P', (30, 20)).save(folder / 'palette.png')
    (folder / 'notes.txt').write_text('not an image')
    c = cfg(f'--data_dir={tmp_path}', '--img_size=32')
    train, val = T.build_datasets(c, 16)
    assert train.source.classes == ['cat', 'dog'] and len(train) == 11 and len(val) == 6
    labels = [train[(0, i)][1] for i in range(len(train))]
    assert labels == [0] * 3 + [1] * 8
    for i in range(len(train)):
        x, _, noise, skipped, _ = train[(0, i)]
        assert x.shape == (32, 32, 3) and x.dtype == torch.uint8 and noise.shape == (16,) and skipped == 0
    x = data.to_rgb(Image.open(folder / 'deep.png'))
    assert x.mode == 'RGB' and abs(int(np.asarray(x)[0, 0, 0]) - 40000 // 256) <= 1  # 16 bit: scaled, not clipped
    assert np.asarray(data.to_rgb(Image.open(folder / 'cmyk.jpg')))[0, 0].tolist() == [0, 255, 255]  # cyan ink
    assert np.asarray(data.to_rgb(Image.open(folder / 'gray.jpg')))[0, 0].tolist() == [100, 100, 100]


def test_val_transform_is_a_centre_crop(tmp_path):
    os.makedirs(tmp_path / 'train' / 'a')
    os.makedirs(tmp_path / 'val' / 'a')
    arr = np.zeros((256, 512, 3), dtype=np.uint8)
    arr[:, 256 - 112:256 + 112] = 255  # a white centre square band the crop must cover exactly
    Image.fromarray(arr).save(tmp_path / 'val' / 'a' / 'x.png')
    Image.fromarray(arr).save(tmp_path / 'train' / 'a' / 'x.png')
    _, val = T.build_datasets(cfg(f'--data_dir={tmp_path}', '--img_size=224'), 0)
    x = val[(0, 0)][0].numpy()
    assert x.shape == (224, 224, 3) and x[:, 2:-2].min() > 250


def test_empty_class_folder_and_no_class_folders_are_clear_errors(tmp_path):
    root = write_image_folder(tmp_path / 'd')
    os.makedirs(root / 'train' / 'empty')
    with pytest.raises(SystemExit, match='empty has no images'):
        T.build_datasets(cfg(f'--data_dir={root}'), 0)
    os.makedirs(tmp_path / 'flat' / 'train')
    Image.new('RGB', (8, 8)).save(tmp_path / 'flat' / 'train' / 'x.jpg')
    with pytest.raises(SystemExit, match='no class folders'):
        T.build_datasets(cfg(f'--data_dir={tmp_path / "flat"}'), 0)


# --- optimizers and schedules ----------------------------------------------

def test_param_split_follows_the_rule():
    c = cfg('--optimizer=muon', '--stem=conv', '--muon_conv=True')
    m = T.build_model(c)
    groups = {k: dict(v) for k, v in T.param_groups(m, c).items()}
    linear = {f'{n}.weight' for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)}
    conv = {f'{n}.weight' for n, mod in m.named_modules() if isinstance(mod, torch.nn.Conv2d)}
    assert set(groups['muon']) == linear | conv
    assert 'mask_token' in groups['no_decay'] and all(p.ndim == 1 for n, p in groups['no_decay'].items() if n != 'mask_token')
    assert sum(len(g) for g in groups.values()) == len(list(m.parameters()))
    c = cfg('--optimizer=muon')
    groups = {k: dict(v) for k, v in T.param_groups(T.build_model(c), c).items()}
    assert set(groups['decay']) == {'patch_embed.proj.weight'}
    c = cfg('--optimizer=adamw')
    groups = {k: dict(v) for k, v in T.param_groups(T.build_model(c), c).items()}
    assert not groups['muon'] and set(groups['decay']) == linear | {'patch_embed.proj.weight'}


def test_fractional_warmup_epochs():
    """warmup_epochs may be a fraction: of an epoch's steps, or of a max_iters run as warmup_epochs / epochs."""
    c = cfg('--epochs=10', '--warmup_epochs=0.5', '--max_iters=0', '--batch_size=16')
    assert T.run_length(c, 256) == (160, 8)
    c = cfg('--epochs=10', '--warmup_epochs=2.5', '--max_iters=300')
    assert T.run_length(c, 256) == (300, 75)


@pytest.mark.parametrize('schedule', ['cosine', 'wsd', 'rsqrt'])
def test_schedules(schedule):
    f = [T.lr_factor(s, 100, 10, schedule, 0.2, 0.25) for s in range(100)]
    assert f[0] == 0.25 and f[5] == pytest.approx(0.625) and f[10] == 1.0  # linear warmup from 1/4 to the peak
    assert f[-1] < 1e-3 and all(0 <= x <= 1 for x in f)
    assert all(b <= a + 1e-12 for a, b in zip(f[10:], f[11:]))  # never rises after warmup
    if schedule == 'cosine':
        assert f[10 + 45] == pytest.approx(0.5, abs=0.02)
    if schedule == 'wsd':
        assert f[10:80] == [1.0] * 70 and f[90] == pytest.approx(9 / 19)
    if schedule == 'rsqrt':
        assert f[40] == pytest.approx(math.sqrt(10 / 40)) and f[79] == pytest.approx(math.sqrt(10 / 79))
        # before the cooldown the schedule does not depend on the run's length: cool down from any checkpoint
        assert [T.lr_factor(s, 1000, 10, schedule, 0.2, 0.25) for s in range(80)] == f[:80]


def test_lamb_step_matches_a_direct_computation():
    torch.manual_seed(0)
    f64 = dict(dtype=torch.float64)  # so the two computations agree to float64 rounding on any CPU
    w, b = torch.randn(6, 4, **f64, requires_grad=True), torch.randn(4, **f64, requires_grad=True)
    gw, gb = torch.randn(6, 4, **f64), torch.randn(4, **f64)
    w0, b0 = w.detach().clone(), b.detach().clone()
    opt = Lamb([dict(params=[w], weight_decay=0.1), dict(params=[b], weight_decay=0.0, trust=False)],
                 lr=0.01, betas=(0.9, 0.99), eps=1e-6)
    for _ in range(2):
        w.grad, b.grad = gw.clone(), gb.clone()
        opt.step()
    # direct: two steps of the same gradient; m_hat = g, v_hat = g^2 after bias correction
    ww, bb = w0.clone(), b0.clone()
    for t in (1, 2):
        u = gw / (gw.abs() + 1e-6 * 0 + 1e-6) + 0.1 * ww
        ww = ww - 0.01 * ww.norm() / u.norm() * u
        bb = bb - 0.01 * gb / (gb.abs() + 1e-6)
    torch.testing.assert_close(w.detach(), ww, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b.detach(), bb, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('optimizer', ['muon', 'lamb'])
def test_bf16_optimizer_state(optimizer):
    c = cfg(f'--optimizer={optimizer}', '--state_dtype=bfloat16')
    m = T.build_model(c)
    opts = T.build_optimizers(m, c, 'cpu', log=lambda *a: None)
    loss, _, _ = m(torch.randn(2, 3, 32, 32), torch.rand(2, 16))
    loss.backward()
    for o in opts:
        o.step()
    custom = opts[-1]  # Muon, or LAMB
    dtypes = {s.get('momentum_buffer', s.get('exp_avg')).dtype for s in custom.state.values()}
    assert dtypes == {torch.bfloat16}


# --- whole runs ----------------------------------------------------------------

def test_training_run_writes_log_checkpoint_and_reconstructions(tmp_path):
    out = tmp_path / 'run'
    T.main(TINY + [f'--out_dir={out}', '--max_iters=6', '--lr=3e-3'])
    log = read_log(out)
    train = [r for r in log if 'loss' in r]
    assert [r['step'] for r in train] == list(range(1, 7))
    assert all(r['imgs_per_sec'] > 0 and r['lr'] > 0 for r in train)
    assert [r['step'] for r in log if 'val_loss' in r] == [2, 4, 6]
    ckpt = torch.load(out / 'ckpt.pt', weights_only=True)
    assert ckpt['step'] == 6 and ckpt['config']['enc_dim'] == 64 and set(ckpt['config']) == set(T.CONFIG)
    assert Image.open(out / 'recon.png').size == (3 * 128, 8 * 128)  # 32 px images, shown at 128


def test_quickstart_loss_falls(tmp_path):
    """A short run of the built-in default: the training loss clearly falls."""
    T.main(['config/quickstart.py', f'--out_dir={tmp_path}', '--max_iters=20', '--eval_interval=20',
            '--synthetic_size=(5120,64)', '--enc_depth=2', '--num_workers=0'])
    loss = [r['loss'] for r in read_log(tmp_path) if 'loss' in r]
    assert loss[-1] < 0.7 * loss[0], loss


def final_params(out_dir):
    return torch.load(os.path.join(out_dir, 'ckpt.pt'), weights_only=True)['model']


@pytest.mark.parametrize('optimizer,tol,crop_resize', [('adamw', 1e-5, 'loader'), ('muon', 2e-3, 'loader'),
                                                        ('adamw', 1e-5, 'device')])
def test_two_process_torchrun_matches_one_process(tmp_path, optimizer, tol, crop_resize):
    # bias=False: a key bias has an exactly zero true gradient (softmax ignores shifts), and Adam
    # would blow its float noise, which differs with the reduction order, up to full-size steps.
    # The tolerances: the reduction order moves each gradient by fp32 rounding (~1e-7 relative);
    # AdamW's step then moves by as much (3 steps of lr 3e-3: ~1e-9, far under 1e-5); Muon's
    # Newton-Schulz input may round to another bf16 value (2^-8 relative, on CPUs with native
    # bf16), so each step moves by up to 2^-8 x lr x its shape scale (0.2 sqrt(256)): ~4e-5 a
    # step, ~1e-4 in 3, under 2e-3. A wrong run (another batch, a missed all-reduce) is off by ~lr.
    args = TINY + ['--max_iters=3', '--eval_interval=3', f'--optimizer={optimizer}', '--lr=3e-3', '--bias=False',
                   f'--crop_resize={crop_resize}']  # device: each rank resizes its own micro-batches
    run(args + [f'--out_dir={tmp_path / "one"}', '--micro_batch_size=4'])  # accumulation 4
    run(args + [f'--out_dir={tmp_path / "two"}', '--micro_batch_size=4'], torchrun=2)  # 2 ranks x accumulation 2
    one, two = final_params(tmp_path / 'one'), final_params(tmp_path / 'two')
    assert not torch.equal(one['decoder_pred.weight'], T.build_model(cfg()).state_dict()['decoder_pred.weight'])
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=tol, atol=tol, msg=k)
    la, lb = read_log(tmp_path / 'one'), read_log(tmp_path / 'two')
    assert [r['step'] for r in la] == [r['step'] for r in lb]
    np.testing.assert_allclose([r.get('loss', r.get('val_loss')) for r in lb],
                               [r.get('loss', r.get('val_loss')) for r in la], rtol=tol)


@pytest.mark.parametrize('optimizer', ['muon', 'adamw', 'lamb'])
def test_resume_continues_exactly_like_a_straight_run(tmp_path, optimizer):
    args = TINY + ['--max_iters=6', f'--optimizer={optimizer}', '--eval_interval=3', '--keep_ckpts=2']
    T.main(args + [f'--out_dir={tmp_path / "straight"}'])
    os.makedirs(tmp_path / 'resumed')
    os.link(tmp_path / 'straight' / 'ckpt_3.pt', tmp_path / 'resumed' / 'ckpt.pt')  # as if it had died after step 3
    T.main(args + [f'--out_dir={tmp_path / "resumed"}', '--init_from=resume'])
    straight, resumed = final_params(tmp_path / 'straight'), final_params(tmp_path / 'resumed')
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
    strip = lambda log: [{k: v for k, v in r.items() if k != 'imgs_per_sec'} for r in log]  # all but timings
    assert strip(read_log(tmp_path / 'resumed')) == strip(r for r in read_log(tmp_path / 'straight') if r['step'] > 3)
    assert sorted(os.listdir(tmp_path / 'straight')) == ['ckpt.pt', 'ckpt_3.pt', 'ckpt_6.pt', 'log.jsonl', 'recon.png']


def test_wandb_is_optional_logs_the_records_and_resumes_the_same_run(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'wandb', None)  # not installed: `import wandb` raises ImportError
    with pytest.raises(SystemExit, match='wandb package is not installed'):
        T.main(TINY + [f'--out_dir={tmp_path / "a"}', '--wandb_log=True', '--max_iters=1'])
    calls = []  # a stand-in for the package: records what train_mae.py hands it
    fake = types.ModuleType('wandb')
    fake.init = lambda **kw: calls.append(('init', kw)) or setattr(fake, 'run', SimpleNamespace(id=f"run{len(calls)}"))
    fake.log = lambda record, step: calls.append(('log', step, record))
    fake.Image = lambda path: ('image', os.path.basename(path))
    monkeypatch.setitem(sys.modules, 'wandb', fake)
    T.main(TINY + [f'--out_dir={tmp_path / "a"}', '--wandb_log=True', '--max_iters=4', '--eval_interval=2',
                   '--keep_ckpts=5', '--wandb_project=p'])
    (_, init), *logs = calls
    assert init['project'] == 'p' and init['config']['max_iters'] == 4 and init['id'] is None
    logged = [(step, k) for _, step, record in logs for k in record]
    assert (1, 'loss') in logged and (2, 'val_loss') in logged and (4, 'reconstructions') in logged
    assert [r for r in read_log(tmp_path / 'a') if r['step'] == 3] == [dict(rec, step=3) for _, s, rec in logs if s == 3]
    os.makedirs(tmp_path / 'b')
    os.link(tmp_path / 'a' / 'ckpt_2.pt', tmp_path / 'b' / 'ckpt.pt')
    calls.clear()
    T.main(TINY + [f'--out_dir={tmp_path / "b"}', '--wandb_log=True', '--max_iters=4', '--eval_interval=2',
                   '--init_from=resume', '--wandb_project=p'])
    assert calls[0][1]['id'] == 'run1' and calls[0][1]['resume'] == 'must'  # the same tracker run goes on
