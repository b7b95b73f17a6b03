"""volfuse.SyncBatchNorm over torch.distributed's gloo backend, 2 and 3 processes on this
machine: equal to torch.nn.BatchNorm3d on the global batch (outputs, input grads, weight and
bias grads summed over the processes, running statistics, num_batches_tracked) with uneven
batches and a process with zero samples, both memory layouts, float32 and float64, momentum or
None, 2-D to 5-D inputs; an error on one process raises on all and changes nothing anywhere
(and the next call works: the processes stay in step); convert_sync_batchnorm; DDP training of
a small 3D CNN after convert_sync_batchnorm equals single-process training on the global batch.

Reference: torch.nn.BatchNorm3d in float64 on the concatenated batch (the bound for a float32
run is a few float32 roundings of the O(1) values)."""
import os
import sys
import tempfile
import traceback
import unittest
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import volfuse


def tol(dtype):
    return (1e-12, 1e-10) if dtype == torch.float64 else (2e-5, 2e-4)  # (relative, absolute)


def close(a, b, dtype, what, scale=1.0):
    rtol, atol = tol(dtype)
    a, b = a.double(), b.double()
    if not torch.allclose(a, b, rtol=rtol, atol=atol * scale):
        raise AssertionError("{}: max |difference| {:.3g} (atol {:.3g}, rtol {:.3g})".format(
            what, (a - b).abs().max().item() if a.numel() else 0.0, atol * scale, rtol))


def part(t, splits, rank):
    first = sum(splits[:rank])
    return t[first:first + splits[rank]]


def check_equal_to_global(rank, world, splits, dtype, layout, momentum, dims, seed):
    """One rank's half of a scenario: 2 training steps and an eval step vs BatchNorm on the
    global batch (computed identically on every rank from the same seed)."""
    C = 3
    g = torch.Generator().manual_seed(seed)
    shape = {5: (C, 3, 4, 5), 4: (C, 4, 5), 3: (C, 7), 2: (C,)}[dims]
    N = sum(splits)
    ref = torch.nn.BatchNorm3d(C, momentum=momentum).double() if dims == 5 else \
        torch.nn.BatchNorm1d(C, momentum=momentum).double() if dims in (2, 3) else \
        torch.nn.BatchNorm2d(C, momentum=momentum).double()
    with torch.no_grad():
        ref.weight.copy_(torch.rand(C, generator=g, dtype=torch.double) + 0.5)
        ref.bias.copy_(torch.randn(C, generator=g, dtype=torch.double))
    sbn = volfuse.SyncBatchNorm(C, momentum=momentum).to(dtype)
    with torch.no_grad():
        sbn.weight.copy_(ref.weight)
        sbn.bias.copy_(ref.bias)
    for step, training in enumerate((True, True, False)):
        ref.train(training)
        sbn.train(training)
        x = torch.randn((N,) + shape, generator=g, dtype=torch.double) * 2 + 3
        dy = torch.randn((N,) + shape, generator=g, dtype=torch.double)
        xg = x.clone().requires_grad_()
        yg = ref(xg)
        yg.backward(dy)
        xl = part(x, splits, rank).to(dtype)
        if layout == "channels_last" and dims == 5:
            xl = xl.contiguous(memory_format=torch.channels_last_3d)
        xl.requires_grad_()
        sbn.zero_grad()
        y = sbn(xl)
        y.backward(part(dy, splits, rank).to(dtype))
        what = "rank {} step {} {}".format(rank, step, "train" if training else "eval")
        close(y.detach(), part(yg.detach(), splits, rank), dtype, what + " output")
        close(xl.grad, part(xg.grad, splits, rank), dtype, what + " input grad")
        close(sbn.running_mean, ref.running_mean, dtype, what + " running_mean")
        close(sbn.running_var, ref.running_var, dtype, what + " running_var")
        assert sbn.num_batches_tracked.item() == ref.num_batches_tracked.item(), what + " num_batches_tracked"
        if training:  # weight/bias grads: this process's contribution; their sum is the global one
            gw, gb = sbn.weight.grad.double().clone(), sbn.bias.grad.double().clone()
            dist.all_reduce(gw)
            dist.all_reduce(gb)
            scale = N * x[0].numel() / C
            close(gw, ref.weight.grad, dtype, what + " weight grad (summed)", scale ** 0.5)
            close(gb, ref.bias.grad, dtype, what + " bias grad (summed)", scale ** 0.5)
        ref.zero_grad()


def check_errors(rank, world):
    """A bad input on one process: every process raises, no state changes anywhere, and the
    processes stay in step (the next good call works)."""
    C = 4
    sbn = volfuse.SyncBatchNorm(C)
    x = torch.randn(2, C, 2, 3, 3)
    before = {k: v.clone() for k, v in sbn.state_dict().items()}
    bad_cases = {
        "channels": torch.randn(2, C + 1, 2, 3, 3) if rank == world - 1 else x,
        "dtype": x.double() if rank == 0 else x,  # the module's parameters are float32
        "dims": torch.randn(5) if rank == 0 else x,  # torch's module checks this before anything
        "half": x.half() if rank == 0 else x,  # a dtype volfuse does not run
    }
    for name, xin in bad_cases.items():
        try:
            sbn(xin)
        except (RuntimeError, ValueError) as e:
            msg = str(e)
            if rank != (world - 1 if name == "channels" else 0):  # the others: the failing process's message
                assert "process" in msg and "failed in forward" in msg, (name, msg)
        else:
            raise AssertionError("rank {}: {} error not raised".format(rank, name))
        for k, v in sbn.state_dict().items():
            assert torch.equal(v, before[k]), (name, k)
    # A global batch of one value per channel: PyTorch's ValueError, on every process.
    one = torch.randn(1 if rank == 0 else 0, C, 1, 1, 1)
    try:
        sbn(one)
    except ValueError as e:
        assert "Expected more than 1 value per channel" in str(e)
    else:
        raise AssertionError("one value per channel accepted")
    for k, v in sbn.state_dict().items():
        assert torch.equal(v, before[k]), ("one value", k)
    # In step: a good call after the failures.
    y = sbn(x)
    assert y.shape == x.shape and sbn.num_batches_tracked.item() == 1


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv3d(2, 4, 3, padding=1), torch.nn.BatchNorm3d(4), torch.nn.ReLU(),
            torch.nn.Conv3d(4, 4, 3, padding=1), torch.nn.BatchNorm3d(4), torch.nn.ReLU())
        self.head = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3, 4)))


def check_ddp(rank, world):
    """DDP training (3 SGD steps) of Net after convert_sync_batchnorm, equal batches per
    process, vs the same net trained in one process on the global batch (float64)."""
    torch.manual_seed(5)
    net = Net().double()
    ref = Net().double()
    ref.load_state_dict(net.state_dict())
    model = torch.nn.parallel.DistributedDataParallel(volfuse.convert_sync_batchnorm(net))
    assert sum(isinstance(m, volfuse.SyncBatchNorm) for m in net.modules()) == 2
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    per = 2
    g = torch.Generator().manual_seed(9)
    for step in range(3):
        x = torch.randn(world * per, 2, 4, 5, 5, generator=g, dtype=torch.double)
        t = torch.randint(0, 3, (world * per,), generator=g)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x[rank * per:(rank + 1) * per]), t[rank * per:(rank + 1) * per])
        loss.backward()  # DDP averages the grads: the global batch's mean loss
        opt.step()
        ref_opt.zero_grad()
        torch.nn.functional.cross_entropy(ref(x), t).backward()
        ref_opt.step()
    for (name, p), q in zip(net.state_dict().items(), ref.state_dict().values()):
        if p.dtype.is_floating_point:
            close(p, q, torch.float64, "rank {} DDP {}".format(rank, name))
        else:
            assert torch.equal(p, q), name


def worker(rank, world, init_file, failures):
    dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))  # a protocol bug fails, it does not hang CI
    torch.set_num_threads(1)
    try:
        splits = {2: [3, 1], 3: [2, 0, 3]}[world]
        seed = 100
        for dtype in (torch.float64, torch.float32):
            for layout in ("contiguous", "channels_last"):
                for momentum in (0.1, None):
                    seed += 1
                    check_equal_to_global(rank, world, splits, dtype, layout, momentum, 5, seed)
        for dims in (2, 3, 4):
            seed += 1
            check_equal_to_global(rank, world, splits, torch.float64, "contiguous", 0.1, dims, seed)
        check_errors(rank, world)
        check_ddp(rank, world)
        # convert_sync_batchnorm keeps the tensors (shared, as torch's does) and converts
        # volfuse.BatchNorm3d too.
        bn = volfuse.BatchNorm3d(3)
        s = volfuse.convert_sync_batchnorm(torch.nn.Sequential(bn, torch.nn.BatchNorm2d(3)))
        assert type(s[0]) is volfuse.SyncBatchNorm and type(s[1]) is volfuse.SyncBatchNorm
        assert s[0].weight is bn.weight and s[0].running_var is bn.running_var
    except Exception:
        failures.put("rank {} of {}:\n{}".format(rank, world, traceback.format_exc()))
        raise
    finally:
        dist.destroy_process_group()


class SyncOverGloo(unittest.TestCase):
    def run_world(self, world):
        with tempfile.TemporaryDirectory() as d:
            ctx = mp.get_context("spawn")
            failures = ctx.SimpleQueue()
            try:
                mp.start_processes(worker, args=(world, os.path.join(d, "store"), failures), nprocs=world,
                                   join=True, start_method="spawn")
            except Exception:
                msgs = []
                while not failures.empty():
                    msgs.append(failures.get())
                self.fail("\n".join(msgs) or traceback.format_exc())

    def test_two_processes(self):
        self.run_world(2)

    def test_three_processes(self):
        self.run_world(3)

    def test_single_process_and_eval_need_no_group(self):
        # Not distributed: torch's SyncBatchNorm needs a process group even to decide; so does
        # volfuse's in training.  Eval mode does not ask (it never synchronizes).
        sbn = volfuse.SyncBatchNorm(2).eval()
        ref = torch.nn.BatchNorm3d(2).eval()
        x = torch.randn(2, 2, 2, 3, 3)
        self.assertTrue(torch.allclose(sbn(x), ref(x), atol=1e-6))
        # torch.nn.SyncBatchNorm's face: repr and state_dict keys.
        theirs = torch.nn.SyncBatchNorm(2, momentum=None, affine=False)
        ours = volfuse.SyncBatchNorm(2, momentum=None, affine=False)
        self.assertEqual(repr(ours), repr(theirs))
        self.assertEqual(list(ours.state_dict()), list(theirs.state_dict()))


if __name__ == "__main__":
    unittest.main(argv=sys.argv[:1], verbosity=2)
