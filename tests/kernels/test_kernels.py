"""Every op and fast backend against the fp32 PyTorch reference: forward and backward, odd shapes,
ignore masks, temperatures, extreme logits, dtypes; invalid input; dispatch."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import rlhf_kernels as K
from rlhf_kernels import reference

FAST = [name for name in ("triton", "cpp") if K.available_backends("cpu")[name] == ""]
CUDA = torch.cuda.is_available()


def reference_grad(fn, logits, *args, **kwargs):
    x = logits.detach().float().requires_grad_()
    out = fn(x, *args, **kwargs)
    return out, x


def check_op(backend, logits, labels, weights, temperature=1.0, atol=2e-5):
    """token_logprobs forward and backward (with a non-trivial upstream gradient) vs reference."""
    x = logits.detach().clone().requires_grad_()
    got = K.token_logprobs(x, labels, temperature=temperature, backend=backend)
    (got * weights).sum().backward()
    ref_x = logits.detach().float().requires_grad_()
    want = reference.token_logprobs(ref_x, labels, temperature=temperature)
    (want * weights).sum().backward()
    assert got.dtype == torch.float32 and got.shape == labels.shape
    torch.testing.assert_close(got, want, atol=atol, rtol=1e-5)
    torch.testing.assert_close(x.grad.float(), ref_x.grad, atol=atol, rtol=1e-4)


@pytest.mark.skipif(not FAST, reason="no fast backend built")
@pytest.mark.parametrize("backend", FAST)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 9), v=st.integers(1, 700), seed=st.integers(0, 2**31 - 1),
    ignore=st.sampled_from(["none", "some", "all"]), temperature=st.sampled_from([1.0, 0.7, 1.5]),
    scale=st.sampled_from([1.0, 30.0]),
)
@example(n=1, v=1, seed=0, ignore="none", temperature=1.0, scale=1.0)
@example(n=3, v=513, seed=1, ignore="some", temperature=0.7, scale=30.0)
def test_token_logprobs_matches_reference(backend, n, v, seed, ignore, temperature, scale):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, v, generator=g) * scale
    labels = torch.randint(0, v, (n,), generator=g)
    if ignore == "some":
        labels[::2] = -100
    elif ignore == "all":
        labels[:] = -100
    weights = torch.randn(n, generator=g)
    check_op(backend, logits, labels, weights, temperature, atol=2e-5 * scale)


@pytest.mark.parametrize("backend", FAST)
def test_extreme_logits(backend):
    logits = torch.randn(4, 300)
    logits[0, 7] = 1e4          # one huge logit
    logits[1] = -1e4            # all very negative
    logits[1, 3] = 1e4
    logits[2, ::3] = -1e4       # mixed extremes
    logits[3, :200] = float("-inf")  # masked-out vocabulary entries
    labels = torch.tensor([7, 4, 2, 299])
    check_op(backend, logits, labels, torch.tensor([1.0, -2.0, 0.5, 3.0]), atol=1e-3)
    lp = K.token_logprobs(logits, labels, backend=backend)
    assert torch.isfinite(lp).all() and lp[0] == 0.0 and lp[1] < -1e4


@pytest.mark.parametrize("backend", FAST)
def test_batched_shapes_and_large_vocab(backend):
    if backend == "triton":
        shape, v = (2, 3), 5003  # the interpreter is slow; keep it small
    else:
        shape, v = (2, 5), 152_064
    logits = torch.randn(*shape, v)
    labels = torch.randint(0, v, shape)
    labels[0, 1] = -100
    check_op(backend, logits, labels, torch.randn(*shape), atol=1e-5)


@pytest.mark.parametrize("backend", [b for b in FAST if b == "cpp"] + (["triton"] if CUDA else []))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_no_worse_than_pytorch(backend, dtype):
    """Rule: the kernel's error vs fp32 is no worse than PyTorch's own in that dtype."""
    device = "cuda" if backend == "triton" else "cpu"
    torch.manual_seed(0)
    logits32 = torch.randn(64, 3001, device=device) * 4
    labels = torch.randint(0, 3001, (64,), device=device)
    low = logits32.to(dtype)
    truth = reference.token_logprobs(low.float(), labels)  # exact math on the rounded inputs
    torch_low = torch.log_softmax(low, -1).gather(-1, labels[:, None]).squeeze(-1).float()
    ours = K.token_logprobs(low, labels, backend=backend)
    assert (ours - truth).abs().max() <= (torch_low - truth).abs().max() + 1e-6
    x = low.clone().requires_grad_()
    K.token_logprobs(x, labels, backend=backend).sum().backward()
    assert x.grad.dtype == dtype
    xr = low.float().requires_grad_()
    reference.token_logprobs(xr, labels).sum().backward()
    xt = low.clone().requires_grad_()
    torch.log_softmax(xt, -1).gather(-1, labels[:, None]).sum().backward()
    assert (x.grad.float() - xr.grad).abs().max() <= (xt.grad.float() - xr.grad).abs().max() + 1e-6


@pytest.mark.parametrize("backend", ["reference", *FAST])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_matches_torch(backend, reduction):
    torch.manual_seed(1)
    logits = torch.randn(6, 37, requires_grad=True)
    labels = torch.randint(0, 37, (6,))
    labels[2] = -100
    got = K.cross_entropy(logits, labels, reduction=reduction, backend=backend)
    want = torch.nn.functional.cross_entropy(logits, labels, reduction=reduction, ignore_index=-100)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    (g1,) = torch.autograd.grad(got.sum(), logits)
    (g2,) = torch.autograd.grad(want.sum(), logits)
    torch.testing.assert_close(g1, g2, atol=1e-6, rtol=1e-5)


def test_cross_entropy_all_ignored_is_zero_not_nan():
    logits = torch.randn(3, 5, requires_grad=True)
    loss = K.cross_entropy(logits, torch.full((3,), -100), backend="reference")
    loss.backward()
    assert loss.item() == 0.0 and logits.grad.abs().sum() == 0


@pytest.mark.parametrize("backend", ["reference", *FAST])
def test_ppo_clip_loss_and_stats_match_reference(backend):
    torch.manual_seed(2)
    logits = torch.randn(2, 4, 29, requires_grad=True)
    labels = torch.randint(0, 29, (2, 4))
    labels[1, 2:] = -100
    old = reference.token_logprobs(logits.detach(), labels) + 0.4 * torch.randn(2, 4)
    adv = torch.randn(2, 4)
    loss, stats = K.ppo_clip_loss(logits, labels, old, adv, clip_eps=0.2, return_stats=True, backend=backend)
    want, want_stats = reference.ppo_clip_loss(logits, labels, old, adv, clip_eps=0.2, return_stats=True)
    torch.testing.assert_close(loss, want, atol=1e-6, rtol=1e-5)
    for key in ("clip_frac", "ratio_mean", "ratio_max", "approx_kl"):
        torch.testing.assert_close(stats[key], want_stats[key], atol=1e-6, rtol=1e-5)
    (g1,) = torch.autograd.grad(loss, logits)
    (g2,) = torch.autograd.grad(want, logits)
    torch.testing.assert_close(g1, g2, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", FAST)
def test_fused_linear_ops_match_reference(backend, monkeypatch):
    from rlhf_kernels import fused

    monkeypatch.setattr(fused, "LINEAR_CHUNK_BYTES", 4 * 101 * 3)  # force several chunks (3 rows each)
    monkeypatch.setattr(fused, "LINEAR_GRAD_MIN_ROWS", 3)
    torch.manual_seed(3)
    hidden = torch.randn(10, 16, requires_grad=True)
    weight = torch.randn(101, 16, requires_grad=True)
    labels = torch.randint(0, 101, (10,))
    labels[4] = -100
    old, adv = torch.randn(10) - 4, torch.randn(10)
    cases = [
        (K.linear_token_logprobs, reference.linear_token_logprobs, (), {"temperature": 0.8}),
        (K.linear_cross_entropy, reference.linear_cross_entropy, (), {}),
        (K.linear_ppo_clip_loss, reference.linear_ppo_clip_loss, (old, adv), {}),
    ]
    for fast, ref, extra, kwargs in cases:
        got = fast(hidden, weight, labels, *extra, backend=backend, **kwargs)
        want = ref(hidden, weight, labels, *extra, **kwargs)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        g_fast = torch.autograd.grad(got.sum(), (hidden, weight))
        g_ref = torch.autograd.grad(want.sum(), (hidden, weight))
        for a, b in zip(g_fast, g_ref):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", FAST)
def test_fused_linear_logprobs_with_detached_entropy_in_one_pass(backend, monkeypatch):
    """``linear_token_logprobs(..., with_entropy=True, entropy_grad=False)`` under autograd: the
    log-probs and their gradients of the reference, the entropy of the reference (detached), from
    one matrix product per chunk (counted)."""
    from rlhf_kernels import fused

    monkeypatch.setattr(fused, "LINEAR_CHUNK_BYTES", 4 * 101 * 3)  # several chunks of 3 rows
    torch.manual_seed(4)
    hidden = torch.randn(10, 16, requires_grad=True)
    weight = torch.randn(101, 16, requires_grad=True)
    labels = torch.randint(0, 101, (10,))
    labels[2] = -100
    products = []
    real = fused.logit_chunks
    monkeypatch.setattr(fused, "logit_chunks", lambda *a: products.append(1) or real(*a))
    logp, entropy = K.linear_token_logprobs(hidden, weight, labels, backend=backend, with_entropy=True,
                                            entropy_grad=False, temperature=0.9)
    assert len(products) == 1 and not entropy.requires_grad  # one pass over the chunks for both
    want = reference.linear_token_logprobs(hidden, weight, labels, temperature=0.9)
    torch.testing.assert_close(logp, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, reference.token_entropy(hidden.detach() @ weight.detach().T, temperature=0.9),
                               atol=1e-5, rtol=1e-5)
    upstream = torch.randn(10)
    for a, b in zip(torch.autograd.grad((logp * upstream).sum(), (hidden, weight)),
                    torch.autograd.grad((want * upstream).sum(), (hidden, weight))):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["reference", *FAST])
def test_invalid_input_is_a_clear_error(backend):
    logits = torch.randn(3, 10)
    with pytest.raises(IndexError, match="label 10 out of range for vocab size 10"):
        K.token_logprobs(logits, torch.tensor([0, 10, 1]), backend=backend)
    with pytest.raises(IndexError, match="label -5 out of range"):
        K.cross_entropy(logits, torch.tensor([0, -5, 1]), backend=backend)
    with pytest.raises(ValueError, match=r"labels shape \(2,\) must equal logits shape without the vocab dim \(3,\)"):
        K.token_logprobs(logits, torch.tensor([0, 1]), backend=backend)
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        K.token_logprobs(logits, torch.tensor([0.0, 1.0, 2.0]), backend=backend)
    with pytest.raises(ValueError, match="empty input"):
        K.token_logprobs(torch.randn(0, 10), torch.zeros(0, dtype=torch.long), backend=backend)
    with pytest.raises(ValueError, match="old_logprobs shape"):
        K.ppo_clip_loss(logits, torch.tensor([0, 1, 2]), torch.zeros(2), torch.zeros(3), backend=backend)
    with pytest.raises(IndexError, match="out of range"):
        K.linear_token_logprobs(torch.randn(2, 4), torch.randn(5, 4), torch.tensor([1, 7]), backend=backend)
    with pytest.raises(ValueError, match="unknown reduction 'avg'"):
        K.cross_entropy(logits, torch.tensor([0, 1, 2]), reduction="avg", backend=backend)


def test_dispatch(monkeypatch):
    assert K.resolve_backend("reference", torch.device("cpu"))[0] == "reference"
    with pytest.raises(ValueError, match="unknown kernel backend 'cuda'; accepted: auto, reference, triton, cpp"):
        K.resolve_backend("cuda", torch.device("cpu"))
    monkeypatch.setenv(K.ENV_BACKEND, "reference")
    assert K.resolve_backend(None, torch.device("cpu"))[0] == "reference"
    monkeypatch.delenv(K.ENV_BACKEND)
    expected = "cpp" if "cpp" in FAST else "reference"
    assert K.resolve_backend(None, torch.device("cpu"))[0] == expected
    if "cpp" not in FAST:
        with pytest.raises(RuntimeError, match="kernel backend 'cpp' is unavailable"):
            K.resolve_backend("cpp", torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_on_gpu_large(dtype):
    torch.manual_seed(0)
    logits = (torch.randn(512, 151_936, device="cuda") * 3).to(dtype)
    labels = torch.randint(0, 151_936, (512,), device="cuda")
    labels[::7] = -100
    x = logits.clone().requires_grad_()
    got = K.token_logprobs(x, labels, backend="triton")
    got.sum().backward()
    xr = logits.float().requires_grad_()
    want = reference.token_logprobs(xr, labels)
    want.sum().backward()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    torch.testing.assert_close(x.grad.float(), xr.grad, atol=tol, rtol=tol)


@pytest.mark.skipif("cpp" not in FAST, reason="C++ extension not built")
@pytest.mark.parametrize("level", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpp_every_instruction_set_path(monkeypatch, level, dtype):
    """Scalar, AVX2 and AVX-512 row kernels each match the reference (levels above the CPU's
    best fall back to it), including tails shorter than a vector and blocks of -inf."""
    from rlhf_kernels import cpp

    monkeypatch.setattr(cpp, "level_cap", level)
    torch.manual_seed(level)
    logits = (torch.randn(5, 2048 * 2 + 37) * 5).to(dtype)
    logits[1, :2048] = float("-inf")  # a whole block that contributes nothing
    labels = torch.tensor([0, 3000, -100, 4132, 17])
    x = logits.clone().requires_grad_()
    got = K.token_logprobs(x, labels, temperature=0.9, backend="cpp")
    (got * torch.tensor([1.0, 2.0, 3.0, -1.0, 0.5])).sum().backward()
    xr = logits.float().requires_grad_()
    want = reference.token_logprobs(xr, labels, temperature=0.9)
    (want * torch.tensor([1.0, 2.0, 3.0, -1.0, 0.5])).sum().backward()
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # the gradient is stored in the input dtype
    torch.testing.assert_close(x.grad.float(), xr.grad, atol=tol, rtol=tol)
    assert x.grad[2].abs().sum() == 0


@pytest.mark.skipif("cpp" not in FAST, reason="C++ extension not built")
def test_cpp_hugepage_gradient_buffer_accumulates(monkeypatch):
    """The huge-page gradient buffer behaves like any tensor: a leaf's .grad accumulates over calls."""
    from rlhf_kernels import cpp

    monkeypatch.setattr(cpp, "HUGEPAGE_MIN_BYTES", 0)
    logits = torch.randn(64, 1000, requires_grad=True)
    labels = torch.randint(0, 1000, (64,))
    for _ in range(2):
        K.cross_entropy(logits, labels, backend="cpp").backward()
    xr = logits.detach().requires_grad_()
    (2 * torch.nn.functional.cross_entropy(xr, labels)).backward()
    torch.testing.assert_close(logits.grad, xr.grad, atol=1e-6, rtol=1e-5)
    assert cpp.new_grad(logits).shape == logits.shape


@pytest.mark.skipif("triton" not in FAST, reason="triton unavailable")
def test_triton_multi_block_online_lse(monkeypatch):
    """Small blocks make the interpreter run the GPU's multi-block loop: the running max/sum
    rescaling, a leading block of -inf, and a vocabulary that is not a multiple of the block."""
    from rlhf_kernels.triton import ops

    monkeypatch.setitem(ops.BLOCK_CAP, "cpu", 64)
    torch.manual_seed(5)
    logits = torch.randn(4, 300) * 8
    logits[0, :128] = float("-inf")
    logits[2, 250] = 1e4
    labels = torch.tensor([200, 7, 250, -100])
    check_op("triton", logits, labels, torch.tensor([1.0, -1.0, 2.0, 3.0]), temperature=0.8, atol=1e-4)
    x = logits.clone().requires_grad_()
    K.cross_entropy(x, labels, backend="triton").backward()  # the one-kernel loss + gradient paths
    xr = logits.clone().requires_grad_()
    reference.cross_entropy(xr, labels).backward()
    torch.testing.assert_close(x.grad, xr.grad, atol=1e-6, rtol=1e-5)
    old, adv = reference.token_logprobs(logits, labels) + torch.tensor([0.5, -0.1, 0.0, 0.0]), torch.tensor([1.0, -2.0, 0.5, 1.0])
    x.grad, xr.grad = None, None
    K.ppo_clip_loss(x, labels, old, adv, backend="triton").backward()
    reference.ppo_clip_loss(xr, labels, old, adv).backward()
    torch.testing.assert_close(x.grad, xr.grad, atol=1e-6, rtol=1e-5)


def test_auto_fallback_says_why_once(monkeypatch):
    import rlhf_kernels

    monkeypatch.setattr(rlhf_kernels, "_load_impl", lambda name: (None, "the C++ extension is not built (test)"))
    monkeypatch.setattr(rlhf_kernels, "_warned", set())
    with pytest.warns(RuntimeWarning, match="no fast backend for cpu tensors \\(cpp: the C\\+\\+ extension is not built"):
        assert K.resolve_backend(None, torch.device("cpu"))[0] == "reference"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert K.resolve_backend(None, torch.device("cpu"))[0] == "reference"  # second time: silent


@pytest.mark.skipif("cpp" not in FAST, reason="C++ extension not built")
def test_cpp_gradient_buffer_reused_only_when_free(monkeypatch):
    from rlhf_kernels import cpp

    monkeypatch.setattr(cpp, "HUGEPAGE_MIN_BYTES", 0)
    monkeypatch.setattr(cpp, "_cached_buffer", None)
    logits = torch.randn(8, 100)
    first = cpp.new_grad(logits)
    second = cpp.new_grad(logits)  # `first` is alive: must not share memory
    assert first.data_ptr() != second.data_ptr()
    view = second[2:]
    del second
    third = cpp.new_grad(logits)  # a view still holds the cached buffer
    assert third.data_ptr() != view.data_ptr() - 2 * 100 * 4
    ptr = third.data_ptr()
    del third
    assert cpp.new_grad(logits).data_ptr() == ptr  # freed: reused
    monkeypatch.setattr(cpp, "CACHE_GRAD_BUFFER", False)
    a = cpp.new_grad(logits)
    b = cpp.new_grad(logits)
    assert a.data_ptr() != b.data_ptr()


def test_float64_goes_to_reference_under_auto_and_is_an_error_when_explicit():
    logits = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([1, 2, 3])
    out = K.token_logprobs(logits, labels)
    torch.testing.assert_close(out, reference.token_logprobs(logits, labels))
    for backend in FAST:
        with pytest.raises(TypeError, match=f"kernel backend '{backend}' reads float32, bfloat16 and float16 logits"):
            K.token_logprobs(logits, labels, backend=backend)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_entropy_gradient_in_forward_sweep(backend, reduction):
    """mean/sum CE on backends that write the gradient during the forward: scaled upstream
    gradients, a retained graph backpropagated twice, and an all-ignored batch."""
    torch.manual_seed(4)
    logits = torch.randn(2, 6, 53, requires_grad=True)
    labels = torch.randint(0, 53, (2, 6))
    labels[0, :4] = -100
    ref = logits.detach().clone().requires_grad_()
    want = torch.nn.functional.cross_entropy(ref.view(-1, 53), labels.view(-1), reduction=reduction)
    got = K.cross_entropy(logits, labels, reduction=reduction, backend=backend)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    (3.0 * got).backward(retain_graph=True)
    (3.0 * want).backward(retain_graph=True)
    torch.testing.assert_close(logits.grad, ref.grad, atol=1e-6, rtol=1e-5)
    (0.5 * got).backward()  # second backward through the same graph: recomputed, then accumulated
    (0.5 * want).backward()
    torch.testing.assert_close(logits.grad, ref.grad, atol=1e-6, rtol=1e-5)
    empty = torch.randn(3, 5, requires_grad=True)
    loss = K.cross_entropy(empty, torch.full((3,), -100), reduction=reduction, backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and empty.grad.abs().sum() == 0


@pytest.mark.parametrize("backend", FAST)
def test_non_contiguous_logits_reuse_their_private_copy(backend):
    """A sliced [B, T-1, V] view is copied once; the backward writes the gradient into that copy."""
    torch.manual_seed(6)
    full = torch.randn(2, 5, 17, requires_grad=True)
    labels = torch.randint(0, 17, (2, 4))
    got = K.token_logprobs(full[:, :-1], labels, backend=backend)
    (got * torch.arange(8.0).view(2, 4)).sum().backward(retain_graph=True)
    ref = full.detach().clone().requires_grad_()
    (reference.token_logprobs(ref[:, :-1], labels) * torch.arange(8.0).view(2, 4)).sum().backward()
    torch.testing.assert_close(full.grad, ref.grad, atol=1e-6, rtol=1e-5)
    with pytest.raises(RuntimeError, match="second backward through token_logprobs of a non-contiguous logits view"):
        got.sum().backward()


@pytest.mark.parametrize("backend", FAST)
def test_ppo_loss_gradient_in_forward_sweep(backend):
    """Clipped and unclipped tokens of both advantage signs, ratio exactly 1, an ignored token, a
    scaled upstream gradient and a second backward through a retained graph."""
    torch.manual_seed(7)
    logits = torch.randn(3, 5, 41, requires_grad=True)
    labels = torch.randint(0, 41, (3, 5))
    labels[2, 3:] = -100
    logp0 = reference.token_logprobs(logits.detach(), labels)
    old = logp0 + torch.tensor([0.0, 0.5, -0.5, 0.05, -0.05]).repeat(3, 1)  # r = 1, clipped low/high, inside
    adv = torch.tensor([1.0, -1.0, 2.0, -0.5, 0.0]).repeat(3, 1)
    ref = logits.detach().clone().requires_grad_()
    want, want_stats = reference.ppo_clip_loss(ref, labels, old, adv, clip_eps=0.2, return_stats=True)
    got, stats = K.ppo_clip_loss(logits, labels, old, adv, clip_eps=0.2, return_stats=True, backend=backend)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    for key in want_stats:
        torch.testing.assert_close(stats[key], want_stats[key], atol=1e-6, rtol=1e-5)
    (2.0 * got).backward(retain_graph=True)
    (2.0 * want).backward(retain_graph=True)
    torch.testing.assert_close(logits.grad, ref.grad, atol=1e-6, rtol=1e-5)
    got.backward()
    want.backward()
    torch.testing.assert_close(logits.grad, ref.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("rows_per_chunk", [3, 512])
def test_fused_linear_losses_gradient_in_forward(backend, rows_per_chunk, monkeypatch):
    """linear_cross_entropy (mean, sum) and linear_ppo_clip_loss compute d/dhidden and d/dweight in the
    forward chunk loop: equal to the reference for any chunking and upstream gradient, for hidden
    alone, weight alone or both; a second backward is a clear error."""
    from rlhf_kernels import fused

    monkeypatch.setattr(fused, "LINEAR_CHUNK_BYTES", 4 * 101 * 3)
    monkeypatch.setattr(fused, "LINEAR_GRAD_MIN_ROWS", rows_per_chunk)
    torch.manual_seed(5)
    hidden = torch.randn(11, 16, requires_grad=True)
    weight = torch.randn(101, 16, requires_grad=True)
    labels = torch.randint(0, 101, (11,))
    labels[[2, 7]] = -100
    old, adv = torch.randn(11) - 4, torch.randn(11)
    cases = [
        (lambda h, w, **k: K.linear_cross_entropy(h, w, labels, **k), lambda h, w: reference.linear_cross_entropy(h, w, labels)),
        (lambda h, w, **k: K.linear_cross_entropy(h, w, labels, reduction="sum", **k),
         lambda h, w: reference.linear_cross_entropy(h, w, labels, reduction="sum")),
        (lambda h, w, **k: K.linear_ppo_clip_loss(h, w, labels, old, adv, clip_eps=0.1, **k),
         lambda h, w: reference.linear_ppo_clip_loss(h, w, labels, old, adv, clip_eps=0.1)),
    ]
    for fast, ref in cases:
        for wrt in ((hidden, weight), (hidden,), (weight,)):
            got, want = fast(hidden, weight, backend=backend), ref(hidden, weight)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            g_fast = torch.autograd.grad(2.5 * got, wrt)
            g_ref = torch.autograd.grad(2.5 * want, wrt)
            for a, b in zip(g_fast, g_ref):
                torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    loss = K.linear_cross_entropy(hidden, weight, labels, backend=backend)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward through a fused-linear loss"):
        loss.backward()
    _, stats = K.linear_ppo_clip_loss(hidden, weight, labels, old, adv, backend=backend, return_stats=True)
    _, want_stats = reference.linear_ppo_clip_loss(hidden, weight, labels, old, adv, return_stats=True)
    for key, value in want_stats.items():
        torch.testing.assert_close(stats[key], value, atol=1e-5, rtol=1e-5)


def entropy64(logits, temperature):
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("backend", ["reference", *FAST])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("v", [1, 7, 513])
def test_token_entropy_matches_float64(backend, v, temperature, monkeypatch):
    """token_entropy and linear_token_entropy (chunked) against float64 PyTorch, forward and backward,
    odd vocabularies, extreme logits, batched shapes."""
    from rlhf_kernels import fused

    monkeypatch.setattr(fused, "LINEAR_CHUNK_BYTES", 4 * v * 2)  # two rows per chunk
    torch.manual_seed(v)
    logits = torch.randn(3, 5, v) * 3
    logits[0, 0, 0] = 1e4
    logits[1, 1, -1] = -1e4
    weights = torch.randn(3, 5, dtype=torch.float64)
    x = logits.clone().requires_grad_()
    got = K.token_entropy(x, temperature=temperature, backend=backend)
    (got * weights.float()).sum().backward()
    x64 = logits.double().requires_grad_()
    want = entropy64(x64, temperature)
    (want * weights).sum().backward()
    torch.testing.assert_close(reference.token_entropy(logits, temperature=temperature), got.detach(), atol=1e-5, rtol=1e-5)
    assert got.shape == (3, 5) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=2e-5, rtol=1e-4)
    assert float(got[0, 0]) == pytest.approx(0.0, abs=1e-6)  # one logit dominates: a certain choice
    hidden = torch.randn(9, 8, requires_grad=True)
    weight = torch.randn(v, 8, requires_grad=True)
    got = K.linear_token_entropy(hidden, weight, temperature=temperature, backend=backend)
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    want = entropy64(h64 @ w64.t(), temperature)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-5)
    up = torch.randn(9, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad((got * up.float()).sum(), (hidden, weight)),
                    torch.autograd.grad((want * up).sum(), (h64, w64))):
        torch.testing.assert_close(a.double(), b, atol=1e-4, rtol=1e-4)


def test_token_entropy_rejects_bad_input():
    with pytest.raises(ValueError, match="temperature must be > 0"):
        K.token_entropy(torch.randn(2, 3), temperature=0)
    with pytest.raises(ValueError, match="need non-empty floating-point logits"):
        K.token_entropy(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"need hidden \[N, H\] and weight \[V, H\]"):
        K.linear_token_entropy(torch.randn(2, 4), torch.randn(5, 3))


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_token_entropy_low_precision_no_worse_than_pytorch(backend, dtype):
    """bf16/fp16 logits: the fast entropy (fp32 inside) is at least as close to the float64 truth as
    PyTorch's own computation on the same low-precision input."""
    torch.manual_seed(0)
    logits = (torch.randn(6, 3001) * 4).to(dtype)
    truth = entropy64(logits.double(), 1.0)
    got = K.token_entropy(logits, backend=backend).double()
    torch_err = (entropy64(logits.float(), 1.0).double() - truth).abs().max()
    assert (got - truth).abs().max() <= max(2 * torch_err, 1e-5)


@pytest.mark.parametrize("backend", ["reference", *FAST])
def test_linear_logprobs_with_entropy_in_one_pass(backend, monkeypatch):
    """with_entropy=True: log-probs and entropy from one pass per chunk equal the two separate ops;
    with gradients it falls back to the two differentiable ops."""
    from rlhf_kernels import fused

    monkeypatch.setattr(fused, "LINEAR_CHUNK_BYTES", 4 * 97 * 4)
    torch.manual_seed(4)
    hidden, weight = torch.randn(11, 8), torch.randn(97, 8)
    labels = torch.randint(0, 97, (11,))
    labels[3] = -100
    logp, entropy = K.linear_token_logprobs(hidden, weight, labels, backend=backend, with_entropy=True, temperature=0.9)
    torch.testing.assert_close(logp, reference.linear_token_logprobs(hidden, weight, labels, temperature=0.9),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, reference.linear_token_entropy(hidden, weight, temperature=0.9),
                               atol=2e-5, rtol=1e-5)
    h = hidden.clone().requires_grad_()
    logp, entropy = K.linear_token_logprobs(h, weight, labels, backend=backend, with_entropy=True)
    assert logp.requires_grad and entropy.requires_grad
