"""Check gate learning on a CUDA device against the CPU, and time it there.

Run from the repository root on a machine with a GPU (under 3 minutes)::

    python benchmarks/gpu_check.py

1. For the same members, log-alphas and gates, the merged weights, the
   deterministic gates and the log-alpha gradients on the GPU must match the
   CPU's within tolerance. A whole ``fit`` with the same seed is also run on
   both and the largest gap between the learned gates is printed: it is not
   asserted, because the shuffling and the gate noise come from a generator on
   the fit device, and CUDA and CPU generators draw different numbers.
2. The ratios of ``benchmarks/speed.py`` are printed for the GPU, with the
   card's name: gate-learning epoch / plain PyTorch epoch / skorch epoch, and
   predict time of the merged net / one member, for K = 2, 5, 10; peak GPU
   memory of ``fit`` from ``torch.cuda.max_memory_allocated``.

Without CUDA it says so and exits with status 0.
"""

import copy
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import speed

from sk_softmerge import SoftMerge, SoftMergeClassifier
from sk_softmerge._core._gates import logistic_noise


def synchronized(fn):
    def run():
        fn()
        torch.cuda.synchronize()

    return run


def check_against_cpu(members, X, y):
    modules = [m.module_ for m in members[:5]]
    cpu = SoftMerge(modules, device="cpu")
    gpu = SoftMerge(modules, device="cuda")
    log_alpha = torch.randn_like(
        cpu.log_alpha, generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        cpu.log_alpha.copy_(log_alpha)
        gpu.log_alpha.copy_(log_alpha)
    gates = torch.rand(cpu.log_alpha.shape, generator=torch.Generator().manual_seed(1))
    merged_cpu = cpu.merged_parameters(gates.requires_grad_())
    merged_gpu = gpu.merged_parameters(gates.detach().cuda().requires_grad_())
    for name, value in merged_cpu.items():
        torch.testing.assert_close(merged_gpu[name].cpu(), value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gpu.gates().cpu(), cpu.gates())

    X_t = torch.from_numpy(X[:256])
    y_t = torch.from_numpy(y[:256])
    noise = logistic_noise(cpu.log_alpha.shape, torch.Generator().manual_seed(2))
    # Deterministic gates, and a training step's sampled gates (fused path).
    for kwargs in ({}, {"gate_noise": noise}):
        grads = []
        for merger, device in ((cpu, "cpu"), (gpu, "cuda")):
            on_device = {k: v.to(device) for k, v in kwargs.items()}
            out = merger(X_t.to(device), **on_device)
            loss = torch.nn.functional.cross_entropy(out, y_t.to(device))
            (grad,) = torch.autograd.grad(loss, merger.log_alpha)
            grads.append(grad.cpu())
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)

    fits = [
        SoftMergeClassifier(members[:5], max_epochs=3, device=d, random_state=0).fit(
            X, y
        )
        for d in ("cpu", "cuda")
    ]
    gap = np.abs(fits[0].gates_ - fits[1].gates_).max()
    print(
        "CPU and GPU agree: merged weights and log-alpha gradients for the same "
        "gates and for the same gate noise; gates after 3 epochs differ by at "
        f"most {gap:.3f} (different noise streams)."
    )


def ratios(arch, members, X, y, X_test, n_epochs=3, repeats=3):
    X_t = torch.from_numpy(X).cuda()
    y_t = torch.from_numpy(y).cuda()
    for k in speed.N_MEMBERS:

        def merge(k=k):
            SoftMergeClassifier(
                members[:k],
                max_epochs=n_epochs,
                batch_size=speed.BATCH_SIZE,
                cv=None,
                validation_fraction=0,
                device="cuda",
                random_state=0,
            ).fit(X, y)

        def plain():
            module = copy.deepcopy(members[0].module_).cuda()
            speed.plain_epochs(module, X_t, y_t, n_epochs)

        def skorch():
            net = speed.skorch_net(copy.deepcopy(members[0].module_), n_epochs)
            net.set_params(device="cuda").fit(X, y)

        times = speed.paired(
            {
                n: synchronized(f)
                for n, f in {"merge": merge, "plain": plain, "skorch": skorch}.items()
            },
            repeats,
        )
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        merge()
        peak = torch.cuda.max_memory_allocated() - before
        vs_plain = speed.paired_ratio(times, "merge", "plain")
        vs_skorch = speed.paired_ratio(times, "merge", "skorch")
        print(
            f"{arch} K={k}: merge / plain {vs_plain:.2f}, "
            f"merge / skorch {vs_skorch:.2f}, "
            f"merge {1e3 * statistics.median(times['merge']) / n_epochs:.1f} "
            f"ms/epoch, peak GPU memory of fit {peak / 1024:.0f} KiB"
        )

    merged = SoftMergeClassifier(
        members[:5], max_epochs=1, device="cuda", random_state=0
    ).fit(X, y)

    def on_gpu(net):
        # merged_net_ keeps the members' skorch device (here the CPU): both nets
        # are moved to the GPU, so that the two predict on the same device.
        net = copy.deepcopy(net).set_params(device="cuda")
        net.module_.cuda()
        return net

    merged_net, member = on_gpu(merged.merged_net_), on_gpu(members[0])

    def calls(net, n_calls=10):
        return lambda: [net.predict_proba(X_test) for _ in range(n_calls)]

    times = speed.paired(
        {
            "merged": synchronized(calls(merged_net)),
            "member": synchronized(calls(member)),
        },
        11,
    )
    vs_member = speed.paired_ratio(times, "merged", "member")
    print(
        f"{arch} predict on the GPU: merged / member {vs_member:.3f} "
        "(11 paired repeats of 10 calls)"
    )


def main():
    if not torch.cuda.is_available():
        print(
            "CUDA is not available on this machine: nothing to check. Run this "
            "script on a machine with an NVIDIA GPU."
        )
        return
    start = time.perf_counter()
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    X, y, X_test = speed.load_mnist1d()
    members = speed.make_members(speed.MLP, X, y, max(speed.N_MEMBERS))
    check_against_cpu(members, X, y)
    ratios("MLP", members, X, y, X_test)
    members = speed.make_members(speed.CNN, X, y, max(speed.N_MEMBERS))
    ratios("CNN", members, X, y, X_test)
    print(f"done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
