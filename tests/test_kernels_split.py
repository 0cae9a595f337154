"""The split reduction and its in-kernel merge: launches per pass, the arrival counters, overflow and accuracy.

On CPU these run under the Triton interpreter (one program at a time, so it cannot show a race between the
programs of a channel block: ``test_split_merge_is_bitwise_deterministic_natively`` hammers that on a GPU).
Configurations are forced through ``config=`` so that each test pins the path it checks.
"""

from __future__ import annotations

import collections

import pytest
import torch

from bnbench.kernels import KernelConfig, launchers
from bnbench.testing import reference, rel_err, tolerance


@pytest.fixture
def kernel_launches(monkeypatch) -> collections.Counter:
    """Counts kernel launches by kernel name (every launch goes through ``launchers._launch``)."""
    counts = collections.Counter()
    original = launchers._launch

    def counted(kernel, grid, *args, **kwargs):
        counts[kernel.__name__] += 1
        return original(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(launchers, "_launch", counted)
    return counts


def _split(block_n=2, block_c=2, block_s=1, partials=3) -> KernelConfig:
    return KernelConfig(block_n, block_c, block_s, num_partials=partials, num_warps=1)


def _fwd_bwd(x, cfg, *, training=True, eps=1e-5, activation="relu"):
    """Launcher-level forward and backward with one config; returns everything they produce."""
    C = x.shape[1]
    gen = torch.Generator().manual_seed(7)
    weight = (torch.rand(C, generator=gen) + 0.5).to(x.device)
    bias = (torch.randn(C, generator=gen) * 0.5).to(x.device)
    rm = (torch.randn(C, generator=gen) * 0.1).to(x.device)
    rv = (torch.rand(C, generator=gen) + 0.5).to(x.device)
    dy = torch.randn(x.shape, generator=gen).to(x.device, x.dtype)
    if training:
        y, mean, rstd = launchers.bn_act_fwd_train(
            x, weight, bias, rm, rv, momentum=0.1, eps=eps, activation=activation, config=cfg
        )
        dx, dw, db = launchers.bn_act_bwd(
            dy, x, mean, rstd, weight, bias, training=True, eps=eps, activation=activation, config=cfg
        )
    else:
        y = launchers.bn_act_fwd_eval(x, rm, rv, weight, bias, eps=eps, activation=activation, config=cfg)
        mean = rstd = None
        dx, dw, db = launchers.bn_act_bwd(
            dy, x, rm, rv, weight, bias, training=False, eps=eps, activation=activation, config=cfg
        )
    return dict(y=y, mean=mean, rstd=rstd, rm=rm, rv=rv, dx=dx, dw=dw, db=db, weight=weight, bias=bias, dy=dy)


@pytest.mark.parametrize("shape", [(9, 5), (3, 5, 7)])
def test_split_path_is_two_launches_each_way_and_one_in_eval(shape, kernel_launches, device):
    x = torch.randn(shape, device=device) * 2 + 1
    cfg = _split(block_s=1 if len(shape) == 2 else 4)
    assert cfg.partials(launchers.plan(x, cfg)[0])[0] > 1
    out = _fwd_bwd(x, cfg)
    assert kernel_launches == {"_bn_act_fwd_stats_kernel": 1, "_bn_act_fwd_apply_kernel": 1,
                               "_bn_act_bwd_reduce_kernel": 1, "_bn_act_bwd_dx_kernel": 1}  # fmt: skip
    ref = reference(x, None, None, out["weight"], out["bias"], training=True, activation="relu", grad_output=out["dy"])
    assert rel_err(out["y"], ref.y) < tolerance(x.dtype)
    assert rel_err(out["dw"], ref.grad_weight) < tolerance(x.dtype)
    kernel_launches.clear()
    _fwd_bwd(x, cfg, training=False)
    assert kernel_launches == {"_bn_act_fwd_apply_kernel": 1, "_bn_act_bwd_reduce_kernel": 1}


@pytest.mark.parametrize("resident", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_small_path_is_one_launch_each_way_resident_or_looping(resident, training, kernel_launches, device):
    x = torch.randn(6, 3, 5, device=device) * 2 + 1
    # L = 5 pads an image past 1/8, so (n, l) run as one row axis of 30 rows (N = 1): one tile of 32 rows covers it
    cfg = KernelConfig(8, 4, 32, num_partials=1, num_warps=1) if resident else KernelConfig(2, 4, 4, 1, num_warps=1)
    assert (cfg.tiles(launchers.plan(x, cfg)[0])[0] == 1) == resident
    out = _fwd_bwd(x, cfg, training=training)
    fwd = "_bn_act_fwd_fused_kernel" if training else "_bn_act_fwd_apply_kernel"
    assert kernel_launches == {fwd: 1, "_bn_act_bwd_fused_kernel": 1}
    rm = None if training else out["rm"]
    rv = None if training else out["rv"]
    ref = reference(x, rm, rv, out["weight"], out["bias"], training=training, activation="relu", grad_output=out["dy"])
    assert rel_err(out["y"], ref.y) < tolerance(x.dtype)
    assert rel_err(out["dx"], ref.grad_input) < tolerance(x.dtype)
    assert rel_err(out["dw"], ref.grad_weight) < tolerance(x.dtype)
    assert rel_err(out["db"], ref.grad_bias) < tolerance(x.dtype)


def test_planner_keeps_small_inputs_register_resident_on_narrow_channel_blocks(monkeypatch):
    from bnbench.kernels import _plan

    monkeypatch.setattr(_plan, "_sm_count", lambda device: 132)  # plan for an H100/H200
    cpu = torch.device("cpu")

    def plan(t):
        geom, (strides,) = _plan.geometry_of(t)
        return geom, _plan.default_config(geom, strides, t.element_size(), cpu)

    geom, cfg = plan(torch.empty(256, 1024, device="meta"))
    # one tile per program (x loaded once), 32-byte runs of 8 fp32 channels: 128 programs for 132 SMs
    assert cfg.num_partials == 1 and cfg.tiles(geom)[0] == 1
    assert (cfg.block_size_n, cfg.block_size_c) == (256, 8) and -(-geom.C // cfg.block_size_c) == 128
    assert cfg.num_warps == 8  # 2048 elements: 8 per thread
    geom, cfg = plan(torch.empty(256, 1024, device="meta", dtype=torch.bfloat16))
    assert cfg.tiles(geom)[0] == 1 and cfg.block_size_c == 16  # 32-byte runs of 16-bit channels
    geom, cfg = plan(torch.empty(64, 3, 8, 8, device="meta"))  # NCHW: the tile covers N and S
    assert cfg.tiles(geom)[0] == 1 and (cfg.block_size_n, cfg.block_size_s) == (64, 64)
    geom, cfg = plan(torch.empty(256, 512, 7, 7, device="meta"))  # 12544 rows: past the register budget
    assert cfg.tiles(geom)[0] > 1
    # (n, s) flattened into rows (49 pads an image by 31%): 8 warps, as the looping fused backward spills at 4
    assert geom.flat_rows and cfg.num_warps == 8


#: the elementwise passes' addressing variants: (N, C) rows, NCHW tiles along S, channels_last (rows merged) and
#: NCHW with a small S flattened into rows (S = 12 pads a 16-wide tile by 1/4)
_MULTI_TILE_SHAPES = [((11, 5), False), ((5, 3, 4, 4), False), ((5, 3, 4, 4), True), ((5, 3, 3, 4), False)]


@pytest.mark.parametrize("tiles_per_program", [2, 4])  # 4: some shapes end on a program with fewer tiles
@pytest.mark.parametrize(("shape", "channels_last"), _MULTI_TILE_SHAPES)
def test_elementwise_passes_walk_several_tiles_per_program(shape, channels_last, tiles_per_program, monkeypatch,
                                                           device):  # fmt: skip
    """The apply and dx kernels with k tiles per program (the planner gives k > 1 only on inputs too large for the
    interpreter): every element written once (outputs are poisoned with NaN), results as with one tile each."""
    from bnbench.kernels import _plan

    k = tiles_per_program
    planned = []  # (tiles, programs) of each elementwise launch

    def grid(n_tiles, c_blocks, warps, sms):
        planned.append((n_tiles, -(-n_tiles // k)))
        return planned[-1][1], k

    monkeypatch.setattr(_plan, "_elementwise_grid", grid)
    monkeypatch.setattr(launchers, "_alloc_like", lambda t: torch.full_like(t, float("nan")))
    grids = []
    original = launchers._launch

    def recorded(kernel, grid, *args, **kwargs):
        if kernel.__name__ in ("_bn_act_fwd_apply_kernel", "_bn_act_bwd_dx_kernel"):
            grids.append(grid[0])
        return original(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(launchers, "_launch", recorded)
    x = torch.randn(shape, device=device) * 2 + 1
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    cfg = _split(block_s=1 if len(shape) == 2 else 4)
    for training in (True, False):
        out = _fwd_bwd(x, cfg, training=training)
        rm = None if training else out["rm"]
        rv = None if training else out["rv"]
        ref = reference(x, rm, rv, out["weight"], out["bias"], training=training, activation="relu",
                        grad_output=out["dy"])  # fmt: skip
        assert rel_err(out["y"], ref.y) < tolerance(x.dtype), training
        assert rel_err(out["dx"], ref.grad_input) < tolerance(x.dtype), training
    # apply and dx in training, apply in eval: each ran with k tiles per program over more than k tiles
    assert len(grids) == 3 and grids == [programs for _, programs in planned], (grids, planned)
    assert all(n_tiles > k for n_tiles, _ in planned), planned


def test_arrival_counters_are_left_at_zero_and_running_stats_update_once(device):
    x = torch.randn(10, 5, device=device) * 3 - 2
    out = _fwd_bwd(x, _split())
    assert torch.count_nonzero(launchers._arrival_counters(x.device)) == 0  # reset by the last program
    # one momentum step from the initial statistics: an update applied twice would move them further
    gen = torch.Generator().manual_seed(7)
    torch.rand(5, generator=gen), torch.randn(5, generator=gen)
    rm0 = (torch.randn(5, generator=gen) * 0.1).to(device)
    rv0 = (torch.rand(5, generator=gen) + 0.5).to(device)
    x64 = x.double()
    assert rel_err(out["rm"], 0.9 * rm0.double() + 0.1 * x64.mean(0)) < 1e-6
    assert rel_err(out["rv"], 0.9 * rv0.double() + 0.1 * x64.var(0, unbiased=True)) < 1e-6


@pytest.mark.parametrize("cfg", [None, _split(block_c=4, partials=4)], ids=["default", "split"])
def test_overflowing_deviations_give_finite_output_and_infinite_variance_like_pytorch(cfg, device):
    # deviations past sqrt(fp32 max) ~ 1.8e19: their squares overflow. PyTorch: infinite variance, rstd 0, the
    # output is act(bias) (finite), running_var inf. The old Chan merge made NaN of it (inf * 0).
    x = torch.randn(16, 4, device=device) * 1e20
    weight = torch.ones(4, device=device)
    bias = torch.full((4,), 0.5, device=device)
    rm, rv = torch.zeros(4, device=device), torch.ones(4, device=device)
    rm_t, rv_t = rm.clone(), rv.clone()
    y, mean, rstd = launchers.bn_act_fwd_train(
        x, weight, bias, rm, rv, momentum=0.1, eps=1e-5, activation="identity", config=cfg
    )
    y_t = torch.nn.functional.batch_norm(x, rm_t, rv_t, weight, bias, training=True)
    assert torch.isinf(rv_t).all()  # what PyTorch does, so what must be matched
    assert torch.isfinite(y).all() and torch.equal(y, y_t)
    assert torch.isinf(rv).all() and torch.equal(rstd, torch.zeros_like(rstd))
    assert torch.isfinite(mean).all() and rel_err(rm, rm_t) < 1e-5


@pytest.mark.parametrize("cfg", [None, KernelConfig(64, 8, 1, num_partials=8, num_warps=2)], ids=["default", "split"])
def test_channels_last_weight_gradient_is_as_accurate_as_pytorch_fp32(cfg, device):
    # issue 13: the channels_last dweight was several times less accurate than PyTorch's own fp32 result (the
    # summation order); per-lane accumulators and a tree over the lanes must keep it within PyTorch's error.
    torch.manual_seed(3)
    x = (torch.randn(32, 8, 8, 8, device=device) * 2 + 0.5).to(memory_format=torch.channels_last)
    weight = torch.rand(8, device=device) + 0.5
    bias = torch.randn(8, device=device) * 0.5
    dy = torch.randn_like(x)
    ref = reference(x, None, None, weight, bias, training=True, activation="identity", grad_output=dy)
    _, mean, rstd = launchers.bn_act_fwd_train(
        x, weight, bias, None, None, momentum=0.1, eps=1e-5, activation="identity", config=cfg
    )
    _, dw, db = launchers.bn_act_bwd(
        dy, x, mean, rstd, weight, bias, training=True, eps=1e-5, activation="identity", config=cfg
    )
    xt, wt, bt = (t.detach().clone().requires_grad_(True) for t in (x, weight, bias))
    torch.nn.functional.batch_norm(xt, None, None, wt, bt, training=True).backward(dy)
    floor = 1e-7  # a few fp32 roundings: both errors can be that small
    assert rel_err(dw, ref.grad_weight) <= 2 * rel_err(wt.grad, ref.grad_weight) + floor
    assert rel_err(db, ref.grad_bias) <= 2 * rel_err(bt.grad, ref.grad_bias) + floor


def test_split_merge_keeps_large_mean_small_std_exact(device):
    # |mean| / std = 1e5 across many partials: the merge works on deviations from partial 0's mean
    torch.manual_seed(0)
    x = 1000.0 + 0.01 * torch.randn(96, 3, device=device)
    _, mean, rstd = launchers.bn_act_fwd_train(
        x, None, None, None, None, momentum=0.1, eps=0.0, activation="identity", config=_split(block_c=4, partials=12)
    )
    x64 = x.double()
    assert abs(mean.double() - x64.mean(0)).max() < 1e-4  # an fp32 ulp of 1000 is 6e-5
    assert rel_err(1.0 / rstd.double() ** 2, x64.var(0, unbiased=False)) < 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("shape", "channels_last"), [((4096, 256), False), ((64, 64, 28, 28), True), ((32, 128, 14, 14), False)]
)
def test_split_merge_is_bitwise_deterministic_natively(shape, channels_last):
    # programs of a channel block race to the arrival counter natively: whichever arrives last, the merge order
    # is the partials' index order, so 50 reruns give the same bits (and the counters end at zero)
    x = torch.randn(shape, device="cuda") * 2 + 1
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    geom, cfg = launchers.plan(x)
    if cfg.num_partials == 1:
        cfg = KernelConfig(cfg.block_size_n, cfg.block_size_c, cfg.block_size_s, num_partials=64, num_warps=4)
    assert cfg.partials(geom)[0] > 1
    first = _fwd_bwd(x, cfg)
    for _ in range(50):
        again = _fwd_bwd(x, cfg)
        for key in ("y", "mean", "rstd", "rm", "rv", "dx", "dw", "db"):
            assert torch.equal(first[key], again[key]), key
    torch.cuda.synchronize()
    assert torch.count_nonzero(launchers._arrival_counters(x.device)) == 0


def test_cached_plans_are_never_stale_across_dtype_strides_alignment_and_flags(device):
    # the launch configuration is cached per layout key: consecutive calls that change the dtype, the strides,
    # the 16-byte alignment (a storage offset of one element) and the flags must each get their own plan
    base = torch.randn(2 * 120 + 1, device=device) * 2 + 1
    variants = [
        ("fp32", base[:120].view(6, 4, 5)),
        ("bf16", base[:120].view(6, 4, 5).to(torch.bfloat16)),
        ("offset by one element", base[1:121].view(6, 4, 5)),
        ("strided", base[:-1].view(6, 4, 10)[..., ::2]),
        ("channels_last", base[:120].view(6, 4, 5, 1).to(memory_format=torch.channels_last)),
        ("fp32 again", base[:120].view(6, 4, 5)),
    ]
    for affine in (True, False):
        for activation in ("relu", "sigmoid"):
            for what, x in variants:
                C = x.shape[1]
                weight = torch.rand(C, device=device) + 0.5 if affine else None
                bias = torch.randn(C, device=device) if affine else None
                dy = torch.randn(x.shape, device=device).to(x.dtype)
                y, mean, rstd = launchers.bn_act_fwd_train(
                    x, weight, bias, None, None, momentum=0.1, eps=1e-5, activation=activation
                )
                dx, _, _ = launchers.bn_act_bwd(
                    dy, x, mean, rstd, weight, bias, training=True, eps=1e-5, activation=activation
                )
                ref = reference(x, None, None, weight, bias, training=True, activation=activation, grad_output=dy)
                tol = tolerance(x.dtype)
                assert rel_err(y, ref.y) < tol, (what, affine, activation)
                assert rel_err(dx, ref.grad_input) < 10 * tol, (what, affine, activation)
