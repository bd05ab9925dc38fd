"""Tests for convs/pau_triton.py: the fused PAU kernels, run on the CPU in Triton's interpreter
(``TRITON_INTERPRET=1``, read when the kernels are defined, hence a fresh process)."""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import REPO

pytest.importorskip("triton")
from convs import pau_triton  # noqa: E402

SCRIPT = textwrap.dedent("""
    import json, torch
    from convs import pau_closed_form as cf, pau_triton as pt
    from convs.pau import PAU, pau_parameters

    def rel(u, v):
        return float((u - v).abs().max() / v.abs().max().clamp_min(1e-30))

    out = {"levels": {}}
    gen = torch.Generator().manual_seed(0)
    a = torch.tensor([0.03, 0.62, 2.38, 3.07, 1.52, 0.25]) + 0.1 * torch.randn(6, generator=gen)
    b = torch.tensor([-1.19, 4.41, 0.91, 0.35]) + 0.1 * torch.randn(4, generator=gen)
    for n in (1, 1000, pt.BLOCK, 3 * pt.BLOCK + 17):          # one block, a partial one, several
        x = torch.randn(n, generator=gen) * 4
        x[: min(n, 2)] = 0.0
        g, hx = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
        ha, hb = torch.randn(6, generator=gen), torch.randn(4, generator=gen)
        errors = [rel(pt.value(x, a, b), cf.value(x, a, b))]
        errors += [rel(u, v) for u, v in zip(pt.grad(g, x, a, b), cf.grad(g, x, a, b))]
        args = (hx, ha, hb, g, x, a, b)
        errors += [rel(u, v) for u, v in zip(pt.grad_grad(*args), cf.grad_grad(*args))]
        first, again = pt.grad(g, x, a, b), pt.grad(g, x, a, b)
        out["levels"][n] = {"max_rel_error": max(errors),
                            "deterministic": all(torch.equal(u, v) for u, v in zip(first, again))}

    def bilevel_pattern(kernels, channels_last):
        # φ's gradient through an inner gradient step of a conv net: levels 0, 1 and 2 all run
        cf.kernels_for = lambda device: kernels
        torch.manual_seed(0)
        p = PAU("fused")
        conv1, conv2 = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, padding=1)
        x = torch.randn(4, 3, 8, 8)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
            conv1, conv2 = (c.to(memory_format=torch.channels_last) for c in (conv1, conv2))
        def net(w):
            return p(conv2(p(torch.nn.functional.conv2d(x, w, conv1.bias, padding=1)))).mean((2, 3))
        w = conv1.weight
        (gw,) = torch.autograd.grad(net(w).pow(2).mean(), w, create_graph=True)
        return torch.autograd.grad(net(w - 0.5 * gw).sum(), pau_parameters(p))

    torch_kernels = cf._TorchKernels
    for channels_last in (False, True):
        want = bilevel_pattern(torch_kernels, channels_last)
        got = bilevel_pattern(pt, channels_last)
        out["bilevel_cl" if channels_last else "bilevel"] = max(rel(u, v) for u, v in zip(got, want))
    out["probe"] = pt._probe(torch.device("cpu"))          # None: the kernels agree with the formulas
    right = pt.grad
    pt.grad = lambda *args, **kw: tuple(t * 1.001 for t in right(*args, **kw))
    out["probe_of_a_wrong_kernel"] = pt._probe(torch.device("cpu"))
    print("RESULT " + json.dumps(out))
""")


def test_the_kernels_equal_the_torch_formulas_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    for n, level in out["levels"].items():
        assert level["max_rel_error"] < 2e-5, (n, level)    # measured: up to 4e-6 (float32 rounding)
        assert level["deterministic"], n
    assert out["bilevel"] < 2e-5 and out["bilevel_cl"] < 2e-5, out
    assert out["probe"] is None
    assert "differ from the torch formulas" in out["probe_of_a_wrong_kernel"]


def test_a_device_where_the_kernels_cannot_run_gets_a_reason_not_an_error():
    """Without a GPU (and outside the interpreter) Triton cannot launch: the probe says why, once,
    and ``kernels_for`` would hand out the torch formulas."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the interpreter runs the kernels on the CPU")
    reason = pau_triton.why_unavailable(torch.device("cpu"))
    assert isinstance(reason, str) and reason
    assert not pau_triton.available(torch.device("cpu")) and pau_triton.available()


# The kernels' argument types, for compiling them without a GPU.
_SIGNATURES = {
    "_value_kernel": ("x_ptr", "a_ptr", "b_ptr", "y_ptr"),
    "_grad_kernel": ("g_ptr", "x_ptr", "a_ptr", "b_ptr", "gx_ptr", "part_ptr"),
    "_grad_grad_kernel": ("hx_ptr", "ha_ptr", "hbs_ptr", "g_ptr", "x_ptr", "a_ptr", "b_ptr", "dg_ptr", "dx_ptr",
                          "part_ptr"),
}


def test_the_kernels_compile_for_an_h100_without_spilling(tmp_path, monkeypatch):
    """The interpreter runs Python, not the compiler: here each kernel is compiled for sm_90 (H100,
    H200) to a cubin with the launch's block and warps, no GPU needed, and ptxas reports no
    spilled registers; both as Triton builds it for a launch with 16-byte aligned tensors and a
    size divisible by 16 (the usual one: vector loads) and without those hints."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    for (name, pointers), aligned in itertools.product(_SIGNATURES.items(), (True, False)):
        signature = {**{p: "*fp32" for p in pointers}, "n": "i32", "BLOCK": "constexpr"}
        hints = {(i,): [["tt.divisibility", 16]] for i in range(len(pointers) + 1)} if aligned else None
        kernel = triton.compile(ASTSource(fn=getattr(pau_triton, name), signature=signature,
                                          constexprs={"BLOCK": pau_triton.BLOCK}, attrs=hints),
                                target=GPUTarget("cuda", 90, 32), options={"num_warps": pau_triton.NUM_WARPS})
        assert len(kernel.asm["cubin"]) > 0, name
        if aligned:
            assert "ld.global.v4" in kernel.asm["ptx"], name      # the hints reached the compiler
        if os.path.exists(ptxas):
            ptx = tmp_path / f"{name}-{aligned}.ptx"
            ptx.write_text(kernel.asm["ptx"])
            report = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", str(ptx), "-o", os.devnull],
                                    capture_output=True, text=True)
            assert report.returncode == 0, report.stderr[-2000:]
            assert "0 bytes spill stores" in report.stderr, (name, report.stderr[-2000:])
