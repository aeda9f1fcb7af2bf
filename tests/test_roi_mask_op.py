"""The C++/CUDA op lxmert_fast::roi_feature_mask(_) against the reference, bit for bit.

The oracle is lxmert_fast.reference.roi_feature_mask over lxmert_fast.philox.philox_bits at the
same (seed, offset). Outputs are compared as raw bits (NaN payloads and -0.0 included), since
the op only zeroes or copies rows. The first test to run loads the extension, JIT-building it
(about 45 s on two cores) when lxmert_fast._C is not installed.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
import torch
from lxmert_testing import allow_auto

from lxmert_fast import backend, ops, reference, roi_mask, use_backend
from lxmert_fast.philox import philox_bits

# The CUDA kernel's cases run where it is built: benchmarks/gpu_check.sh runs this file on the card.
pytestmark = pytest.mark.cuda

OP = torch.ops.lxmert_fast
CSRC = Path(roi_mask.__file__).resolve().parent.parent / "csrc"
PRETRAIN_P = (0.15, 0.8, 0.1)
HAS_CUDA_KERNEL = (
    torch.cuda.is_available()
    and roi_mask.supports(torch.empty(1, 1, 1, device="cuda"), 0, 0, *PRETRAIN_P) is None
)
BIT_VIEW = {
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float64: torch.int64,
}


@pytest.fixture(scope="module", autouse=True)
def _extension() -> None:
    roi_mask.load_extension()


def reference_mask(features: torch.Tensor, seed: int, offset: int, p: tuple[float, float, float]):
    b, n, _ = features.shape
    bits = philox_bits(seed, offset, b * n, features.device).view(b, n, 4)
    return reference.roi_feature_mask(features, bits, *p)


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    a, e = actual.view(BIT_VIEW[actual.dtype]), expected.view(BIT_VIEW[expected.dtype])
    if not torch.equal(a, e):
        rows = (a != e).reshape(-1, max(a.shape[-1], 1)).any(-1).nonzero().flatten()
        raise AssertionError(f"{len(rows)} rows differ, first rows {rows[:8].tolist()}")


def make_features(shape: tuple[int, int, int], dtype: torch.dtype, device: str = "cpu") -> torch.Tensor:
    """Random rows with a few NaN and -0.0 entries, so a bit copy is told apart from a value copy."""
    x = torch.randn(shape, dtype=torch.float32).to(dtype)
    flat = x.view(-1)
    if flat.numel() >= 4:
        flat[1], flat[-2] = float("nan"), -0.0
    return x.to(device)


SHAPES = [(1, 1, 1), (1, 36, 8), (2, 1, 5), (3, 7, 33), (4, 36, 64), (5, 3, 2049), (2, 3, 0), (0, 4, 5)]
CASES = [
    (0, 0, PRETRAIN_P),
    (2**63 + 12345, 2**32 - 5, (0.5, 0.3, 0.5)),  # key words above 2**63; counter crosses 2**32
    (-7, 9, (1.0, 0.0, 1.0)),  # every object replaced
    (123456789, 2**40, (1.0, 1.0, 0.0)),  # every object zeroed
    (42, 3, (0.0, 0.8, 0.1)),  # nothing selected
    (99, 1000, (0.7, 0.8, 0.2)),  # p_zero + p_replace == 1: no kept objects
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize(("seed", "offset", "p"), CASES)
def test_cpu_matches_reference(shape, dtype, seed, offset, p) -> None:
    x = make_features(shape, dtype)
    ref_out, ref_action = reference_mask(x, seed, offset, p)
    out, action = roi_mask.roi_feature_mask(x, seed, offset, *p)
    assert_same_bits(out, ref_out)
    assert torch.equal(action, ref_action)
    assert out.data_ptr() != x.data_ptr() or x.numel() == 0


def test_cpu_misaligned_view_matches_reference() -> None:
    base = make_features((1, 1, 1 + 6 * 36 * 7), torch.float32).view(-1)
    x = base[1:].view(6, 36, 7)  # contiguous, storage offset of one element
    out, action = roi_mask.roi_feature_mask(x, 5, 11, 0.6, 0.5, 0.4)
    ref_out, ref_action = reference_mask(x, 5, 11, (0.6, 0.5, 0.4))
    assert_same_bits(out, ref_out)
    assert torch.equal(action, ref_action)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 5, 3), (6, 36, 7), (16, 4, 9)], ids=str)
@pytest.mark.parametrize("p", [PRETRAIN_P, (1.0, 0.5, 0.5), (0.9, 0.2, 0.7)])
def test_inplace_matches_out_of_place(shape, dtype, p) -> None:
    x = make_features(shape, dtype)
    expected_out, expected_action = roi_mask.roi_feature_mask(x, 77, 5, *p)
    y = x.clone()
    result, action = roi_mask.roi_feature_mask_(y, 77, 5, *p)
    assert result is y
    assert_same_bits(y, expected_out)
    assert torch.equal(action, expected_action)


def test_inplace_reads_original_rows_of_corrupted_sources() -> None:
    """Every object selected, half replaced: many sources are themselves zeroed or replaced."""
    b, n = 8, 6
    x = torch.arange(b * n, dtype=torch.float32).repeat_interleave(3).view(b, n, 3)
    y = x.clone()
    _, action = roi_mask.roi_feature_mask_(y, 3, 0, 1.0, 0.5, 0.5)
    replaced = (action == reference.ROI_REPLACED).flatten()
    sources = y.view(b * n, 3)[replaced, 0].long()
    modified_sources = (action.flatten()[sources] != reference.ROI_KEPT).sum()
    assert modified_sources > 0, "the case should exercise sources that are corrupted in the same call"
    assert torch.equal(y, reference_mask(x, 3, 0, (1.0, 0.5, 0.5))[0])


def test_rates_within_binomial_bounds() -> None:
    b, n = 2048, 64
    x = torch.zeros(b, n, 1)
    _, action = roi_mask.roi_feature_mask(x, 2024, 0, *PRETRAIN_P)
    counts = torch.bincount(action.flatten().long(), minlength=4).tolist()
    selected = counts[1] + counts[2] + counts[3]

    def within(k: int, trials: int, p: float) -> bool:
        return abs(k - trials * p) <= 6 * math.sqrt(trials * p * (1 - p))

    assert within(selected, b * n, 0.15), counts
    assert within(counts[1], selected, 0.8), counts
    assert within(counts[2], selected, 0.1), counts
    assert within(counts[3], selected, 0.1), counts


def test_same_seed_same_output_other_seed_or_offset_differs() -> None:
    x = make_features((8, 36, 16), torch.float32)
    out1, action1 = roi_mask.roi_feature_mask(x, 11, 0, 0.3)
    out2, action2 = roi_mask.roi_feature_mask(x, 11, 0, 0.3)
    assert torch.equal(out1.view(torch.int32), out2.view(torch.int32)) and torch.equal(action1, action2)
    assert not torch.equal(action1, roi_mask.roi_feature_mask(x, 12, 0, 0.3)[1])
    assert not torch.equal(action1, roi_mask.roi_feature_mask(x, 11, 8 * 36, 0.3)[1])


def test_replaced_rows_come_from_another_image() -> None:
    b, n, d = 8, 36, 4
    x = torch.arange(b * n, dtype=torch.float32)[:, None].expand(b * n, d).reshape(b, n, d).contiguous()
    out, action = roi_mask.roi_feature_mask(x, 8, 0, 0.5, 0.2, 0.8)
    rows = (action == reference.ROI_REPLACED).flatten().nonzero().flatten()
    assert len(rows) > 10
    sources = out.view(b * n, d)[rows, 0].long()
    assert torch.all(sources // n != rows // n)
    assert torch.equal(out.view(b * n, d)[rows], x.view(b * n, d)[sources])
    zeroed = action == reference.ROI_ZEROED
    assert torch.all(out[zeroed] == 0) and torch.equal(out[action == 0], x[action == 0])


def test_single_image_leaves_replaced_rows_unchanged() -> None:
    x = make_features((1, 36, 5), torch.float32)
    out, action = roi_mask.roi_feature_mask(x, 4, 0, 1.0, 0.0, 1.0)
    assert torch.all(action == reference.ROI_REPLACED)
    assert_same_bits(out, x)


BAD_INPUTS = {
    "rank": (lambda: torch.zeros(4, 5), {}, ValueError, "features: expected a 3-D"),
    "non_contiguous": (
        lambda: torch.zeros(4, 6, 5).transpose(1, 2),
        {},
        ValueError,
        "features: expected a contiguous",
    ),
    "dtype": (lambda: torch.zeros(2, 3, 4, dtype=torch.int32), {}, TypeError, "features: expected dtype"),
    "p_select_negative": (lambda: torch.zeros(2, 3, 4), {"p_select": -0.1}, ValueError, "p_select"),
    "p_zero_above_one": (lambda: torch.zeros(2, 3, 4), {"p_zero": 1.5}, ValueError, "p_zero"),
    "p_replace_nan": (lambda: torch.zeros(2, 3, 4), {"p_replace": math.nan}, ValueError, "p_replace"),
    "p_zero_plus_p_replace": (
        lambda: torch.zeros(2, 3, 4),
        {"p_zero": 0.8, "p_replace": 0.3},
        ValueError,
        "p_zero \\+ p_replace",
    ),
    "offset_negative": (lambda: torch.zeros(2, 3, 4), {"offset": -1}, ValueError, "offset"),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=str)
@pytest.mark.parametrize("op", ["roi_feature_mask", "roi_feature_mask_"])
def test_bad_input_names_the_argument(case, op) -> None:
    make, overrides, error, message = BAD_INPUTS[case]
    kwargs = {"offset": 0, "p_select": 0.15, "p_zero": 0.8, "p_replace": 0.1, **overrides}
    with pytest.raises(error, match=message):
        getattr(OP, op)(make(), 1, **kwargs)


@pytest.mark.parametrize("case", BAD_INPUTS, ids=str)
@pytest.mark.parametrize("op", ["roi_feature_mask", "roi_feature_mask_"])
def test_fake_kernels_raise_what_eager_raises(case, op) -> None:
    """Meta tensors and FakeTensorMode run the fake kernel: same exception type as the C++ kernel."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    make, overrides, error, message = BAD_INPUTS[case]
    kwargs = {"offset": 0, "p_select": 0.15, "p_zero": 0.8, "p_replace": 0.1, **overrides}
    with pytest.raises(error, match=message):
        getattr(OP, op)(make().to("meta"), 1, **kwargs)
    with FakeTensorMode() as mode, pytest.raises(error, match=message):
        getattr(OP, op)(mode.from_tensor(make()), 1, **kwargs)


def _root_cause(exc: BaseException) -> BaseException:
    while (inner := exc.__cause__ or exc.__context__) is not None:
        exc = inner
    return exc


@pytest.mark.parametrize("case", ["rank", "dtype"])
@pytest.mark.parametrize("op", ["roi_feature_mask", "roi_feature_mask_"])
def test_compiled_bad_input_raises_what_eager_raises(case, op) -> None:
    make, _, error, message = BAD_INPUTS[case]
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: getattr(OP, op)(t, 1), backend="aot_eager", fullgraph=True)
    with pytest.raises(Exception) as caught:
        compiled(make())
    # Dynamo reports any exception of a fake kernel as its own TorchRuntimeError (a RuntimeError),
    # chained through Unsupported to what the fake kernel raised: that root is what must match eager.
    root = _root_cause(caught.value)
    assert type(root) is error and re.match(message, str(root)), repr(root)


def test_seed_out_of_range_names_the_argument() -> None:
    with pytest.raises(ValueError, match="seed"):
        roi_mask.roi_feature_mask(torch.zeros(2, 3, 4), 2**64)
    with pytest.raises(ValueError, match="seed"):
        roi_mask.roi_feature_mask_(torch.zeros(2, 3, 4), -(2**63) - 1)


@pytest.mark.parametrize(
    ("shape", "dtype"), [((3, 5, 7), torch.float32), ((1, 4, 6), torch.float16), ((4, 2, 3), torch.bfloat16)]
)
def test_opcheck(shape, dtype) -> None:
    x = make_features(shape, dtype).nan_to_num()  # opcheck compares with assert_close: NaN != NaN
    args = (x, 5, 3, 0.6, 0.5, 0.4)
    torch.library.opcheck(OP.roi_feature_mask.default, args)
    torch.library.opcheck(OP.roi_feature_mask_.default, (x.clone(), *args[1:]))


def _masked_twice(x: torch.Tensor):
    out, action = OP.roi_feature_mask(x, 21, 0, 0.5, 0.6, 0.3)
    y = x * 2
    action_ = OP.roi_feature_mask_(y, 21, 0, 0.5, 0.6, 0.3)
    return out + 1, action, y, action_


@pytest.mark.parametrize("compiler_backend", ["aot_eager", "inductor"])
def test_torch_compile(compiler_backend) -> None:
    torch._dynamo.reset()
    x = make_features((4, 6, 8), torch.float32).nan_to_num()
    compiled = torch.compile(_masked_twice, backend=compiler_backend, fullgraph=True, dynamic=False)
    for got, expected in zip(compiled(x), _masked_twice(x), strict=True):
        assert torch.equal(got, expected)
    wrapped = torch.compile(
        lambda t: roi_mask.roi_feature_mask(t, 9, 4, 0.5)[0] * 3, backend=compiler_backend
    )
    assert torch.equal(wrapped(x), roi_mask.roi_feature_mask(x, 9, 4, 0.5)[0] * 3)


def test_fake_kernels_with_default_arguments() -> None:
    """torch.compile drops trailing arguments equal to the schema defaults before the fake runs."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        x = mode.from_tensor(torch.zeros(3, 5, 7, dtype=torch.bfloat16))
        out, action = OP.roi_feature_mask(x, 1)
        inplace_action = OP.roi_feature_mask_(x, 1)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert action.shape == inplace_action.shape == (3, 5) and action.dtype == torch.int8
    compiled = torch.compile(lambda t: ops.roi_feature_mask(t, 3)[0] + 1, backend="aot_eager")
    y = make_features((4, 6, 8), torch.float32).nan_to_num()
    assert torch.equal(compiled(y), ops.roi_feature_mask(y, 3)[0] + 1)


def test_dispatcher_uses_cpp_op_under_auto_and_reference_when_asked(monkeypatch) -> None:
    allow_auto(monkeypatch, ops.ROI_FEATURE_MASK, "cpu")  # auto picks it where it is measured faster
    calls = {"reference": 0, "cpp": 0}
    original_reference, original_impl = reference.roi_feature_mask, roi_mask.impl

    def counting_reference(*args, **kwargs):
        calls["reference"] += 1
        return original_reference(*args, **kwargs)

    def counting_impl(*args, **kwargs):
        calls["cpp"] += 1
        return original_impl(*args, **kwargs)

    fast = backend.fast_path_of(ops.ROI_FEATURE_MASK)
    assert fast.impl is roi_mask.impl and fast.on_cpu
    monkeypatch.setattr(reference, "roi_feature_mask", counting_reference)
    monkeypatch.setitem(
        backend._fast_paths, ops.ROI_FEATURE_MASK, backend.FastPath(counting_impl, fast.supports, True)
    )
    x = make_features((3, 36, 10), torch.bfloat16)
    with use_backend("auto"):
        fast_out, fast_action = ops.roi_feature_mask(x, 31, 2)
    assert calls == {"reference": 0, "cpp": 1}
    with use_backend("reference"):
        ref_out, ref_action = ops.roi_feature_mask(x, 31, 2)
    assert calls == {"reference": 1, "cpp": 1}
    assert_same_bits(fast_out, ref_out)
    assert torch.equal(fast_action, ref_action)


def test_dispatcher_non_contiguous_features_use_cpp_op() -> None:
    x = make_features((3, 10, 36), torch.float32).transpose(1, 2)
    with use_backend("auto"):
        out, action = ops.roi_feature_mask(x, 1, 0, 0.5)
    ref_out, ref_action = reference_mask(x, 1, 0, (0.5, 0.8, 0.1))
    assert_same_bits(out, ref_out)
    assert torch.equal(action, ref_action)


def test_dispatcher_falls_back_to_reference_for_features_that_require_grad(monkeypatch) -> None:
    allow_auto(monkeypatch, ops.ROI_FEATURE_MASK, "cpu")
    monkeypatch.setattr(backend, "_warned", set())
    x = make_features((2, 5, 3), torch.float32).nan_to_num().requires_grad_()
    with use_backend("auto"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, _ = ops.roi_feature_mask(x, 1, 0, 1.0, 0.5, 0.5)
    assert any("require grad" in str(w.message) for w in caught)
    out.sum().backward()
    assert x.grad is not None


NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None, reason="nvcc not found: the CUDA kernel header is not compile-checked")
def test_cuda_kernel_header_compiles_for_sm90(tmp_path) -> None:
    """The kernels (torch-free header) compile for the H100, and the 16-byte path uses v4 accesses."""
    source = tmp_path / "roi_mask_check.cu"
    source.write_text(
        '#include "roi_mask_kernel.h"\n'
        "using lxmert_fast::RoiMaskParams;\n"
        "cudaError_t out_of_place(const void* f, void* o, int8_t* a, const RoiMaskParams& p, int64_t rb,\n"
        "                         cudaStream_t s) { return lxmert_fast::roi_mask_launch(f, o, a, p, rb, s); }\n"
        "cudaError_t in_place(void* f, void* src, int8_t* a, int32_t* slot, unsigned int* c,\n"
        "                     const RoiMaskParams& p, int64_t rb, cudaStream_t s) {\n"
        "  return lxmert_fast::roi_mask_inplace_launch(f, src, a, slot, c, p, rb, s);\n"
        "}\n"
    )
    common = [NVCC, "-arch=sm_90", "-O3", "-std=c++17", f"-I{CSRC}"]
    for extra in (
        ["-c", "-o", str(tmp_path / "roi_mask_check.o")],
        ["-ptx", "-o", str(tmp_path / "roi_mask_check.ptx")],
    ):
        result = subprocess.run([*common, str(source), *extra], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
    ptx = (tmp_path / "roi_mask_check.ptx").read_text()
    assert "ld.global.nc.v4.u32" in ptx and "st.global.v4.u32" in ptx


needs_cuda_kernel = pytest.mark.skipif(
    not HAS_CUDA_KERNEL, reason="no CUDA device or lxmert_fast._C built without CUDA"
)


@needs_cuda_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 36, 8), (3, 7, 33), (256, 36, 2048), (5, 3, 2049)], ids=str)
@pytest.mark.parametrize(("seed", "offset", "p"), CASES[:3])
def test_cuda_matches_cpu(shape, dtype, seed, offset, p) -> None:
    x = make_features(shape, dtype)
    expected_out, expected_action = roi_mask.roi_feature_mask(x, seed, offset, *p)
    out, action = roi_mask.roi_feature_mask(x.cuda(), seed, offset, *p)
    assert_same_bits(out.cpu(), expected_out)
    assert torch.equal(action.cpu(), expected_action)
    y = x.cuda()
    _, action_ = roi_mask.roi_feature_mask_(y, seed, offset, *p)
    assert_same_bits(y.cpu(), expected_out)
    assert torch.equal(action_.cpu(), expected_action)


@needs_cuda_kernel
@pytest.mark.parametrize("elements_off", [1, 2, 3])
def test_cuda_misaligned_views(elements_off) -> None:
    base = make_features((1, 1, elements_off + 6 * 36 * 64), torch.float16).view(-1)
    x = base[elements_off:].view(6, 36, 64)
    expected_out, expected_action = roi_mask.roi_feature_mask(x, 3, 0, 0.6, 0.5, 0.4)
    out, action = roi_mask.roi_feature_mask(x.cuda(), 3, 0, 0.6, 0.5, 0.4)
    assert_same_bits(out.cpu(), expected_out)
    assert torch.equal(action.cpu(), expected_action)
    y = base.cuda()[elements_off:].view(6, 36, 64)
    roi_mask.roi_feature_mask_(y, 3, 0, 0.6, 0.5, 0.4)
    assert_same_bits(y.cpu(), expected_out)


@needs_cuda_kernel
def test_cuda_dispatcher_and_opcheck() -> None:
    x = make_features((4, 36, 24), torch.bfloat16, "cuda").nan_to_num()
    with use_backend("auto"):
        out, action = ops.roi_feature_mask(x, 8, 1)
    ref_out, ref_action = reference_mask(x, 8, 1, PRETRAIN_P)
    assert_same_bits(out.cpu(), ref_out.cpu())
    assert torch.equal(action, ref_action)
    torch.library.opcheck(OP.roi_feature_mask.default, (x, 8, 1, 0.5, 0.5, 0.4))
    torch.library.opcheck(OP.roi_feature_mask_.default, (x.clone(), 8, 1, 0.5, 0.5, 0.4))
