"""Quantizer numerics against hand computations."""

import math

import pytest
import torch

from qrealign.errors import QrealignError
from qrealign.quant.quantizer import ActQuantizer, WeightQuantizer
from qrealign.quant.scheme import PRESETS, QuantArgs, Scheme, get_scheme


def test_weight_asymmetric_per_channel_matches_hand_computation():
    w = torch.tensor([[-1.0, 0.33, 1.13, 2.0]])
    q = WeightQuantizer(QuantArgs(4, symmetric=False, strategy="channel"), w.shape, lwc=False)
    # range [-1, 2] -> scale 3/15 = 0.2, zero = round(1 / 0.2) = 5
    # 0.33/0.2 = 1.65 -> 2 -> 0.4 ; 1.13/0.2 = 5.65 -> 6 -> 1.2
    assert torch.allclose(q(w), torch.tensor([[-1.0, 0.4, 1.2, 2.0]]), atol=1e-6)


def test_weight_symmetric_per_channel_matches_hand_computation():
    w = torch.tensor([[-0.9, 0.33, 1.13, 2.0]])
    q = WeightQuantizer(QuantArgs(4, symmetric=True, strategy="channel"), w.shape, lwc=False)
    s = 2.0 / 7  # absmax / qmax, integer grid [-8, 7], zero 0
    expected = torch.tensor([[-3 * s, 1 * s, 4 * s, 7 * s]])
    assert torch.allclose(q(w), expected, atol=1e-6)


def test_weight_per_group_uses_each_group_range():
    w = torch.tensor([[0.0, 1.0, 2.0, 3.0, 0.0, 10.0, 20.0, 30.0]])
    q = WeightQuantizer(QuantArgs(2, symmetric=False, strategy="group", group_size=4), w.shape, lwc=False)
    # group 1: range [0,3], scale 1 -> exact; group 2: range [0,30], scale 10 -> exact
    assert torch.allclose(q(w), w, atol=1e-5)
    # one range over the whole row would round 1.0 and 2.0 to 0 (scale 10)
    q_row = WeightQuantizer(QuantArgs(2, strategy="channel"), w.shape, lwc=False)
    assert q_row(w)[0, 1].item() == 0.0


def test_lwc_initial_clipping_is_sigmoid_4():
    w = torch.tensor([[-1.0, 2.0]])
    q = WeightQuantizer(QuantArgs(8), w.shape, lwc=True)
    scale, zero = q.params(w)
    sig = 1 / (1 + math.exp(-4.0))
    assert scale.item() == pytest.approx(3 * sig / 255, rel=1e-6)
    assert zero.item() == round(sig / (3 * sig / 255))


def test_activation_per_token_dynamic_asymmetric():
    x = torch.tensor([[[-1.0, 0.0, 3.0], [0.4, 1.0, 1.5]]])
    q = ActQuantizer(QuantArgs(8, strategy="token"))
    out = q(x)
    s = 4.0 / 255  # token 0: range [-1, 3]; zero = round(63.75) = 64
    assert torch.allclose(out[0, 0], torch.tensor([-64 * s, 0.0, 191 * s]), atol=1e-6)
    # token 1 has its own range [0.4, 1.5]: scale 1.1/255, zero round(-92.73) = -93
    # 0.4/s = 92.7 -> 93 ; 1.0/s = 231.8 -> 232 ; 1.5/s = 347.7 -> 348 -> clamped to 255 - (-93)
    s1 = 1.1 / 255
    assert torch.allclose(out[0, 1], torch.tensor([93 * s1, 232 * s1, 348 * s1]), atol=1e-6)


def test_straight_through_estimator_passes_gradients():
    w = torch.randn(3, 8, requires_grad=True)
    q = WeightQuantizer(QuantArgs(4), w.shape, lwc=True)
    q(w).sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()
    assert q.upbound_factor.grad is not None and q.upbound_factor.grad.abs().sum() > 0


def test_static_activation_observes_then_quantizes():
    q = ActQuantizer(QuantArgs(8, strategy="tensor", dynamic=False))
    with pytest.raises(RuntimeError):
        q(torch.ones(2, 3))
    q.observe(True)
    x = torch.tensor([[-2.0, 0.0, 2.0]])
    assert torch.equal(q(x), x)
    q.observe(False)
    assert q.static_min.item() == -2.0 and q.static_max.item() == 2.0
    assert torch.allclose(q(x), x, atol=4 / 255)


def test_schemes_are_data_and_round_trip():
    for scheme in PRESETS.values():
        assert Scheme.from_dict(scheme.to_dict()) == scheme
    assert PRESETS["W4A16"].weights.group_size == 128 and PRESETS["W4A16"].activations is None
    custom = get_scheme("W4A8-g64-sym")
    assert custom.weights.group_size == 64 and custom.weights.symmetric and custom.activations.num_bits == 8
    with pytest.raises(QrealignError, match="unknown scheme"):
        get_scheme("W9X9")
    # one name per scheme, whatever the case: per-scheme settings are looked up by name
    assert get_scheme("w8a8") is PRESETS["W8A8"] and get_scheme("w8a8-SYM") is PRESETS["W8A8-sym"]
    assert get_scheme("w4a8-G64").name == "W4A8-g64"
    mixed = get_scheme("W8A8-sym-asym-act")  # symmetric weights, asymmetric activations
    assert mixed.weights.symmetric and not mixed.activations.symmetric
    wsym = get_scheme("W8A8-wsym")
    assert wsym.weights.symmetric and not wsym.activations.symmetric
    with pytest.raises(QrealignError, match="group size"):
        get_scheme("W8A8-g0")
    # nonsense that used to pass: a run that quantizes nothing, FP weights under a W32 name, two groups
    for bad, match in (("W16A16", "quantizes nothing"), ("W32A8", "W32: bits must be 2..16"),
                       ("W4A16-g32-g64", "-g more than once"), ("W8A8-sym-sym", "-sym more than once"),
                       ("W16A8-g64", "group size applies")):
        with pytest.raises(QrealignError, match=match):
            get_scheme(bad)
    assert get_scheme("W16A8").weights is None and get_scheme("W8A16").activations is None
    with pytest.raises(QrealignError):
        QuantArgs(1)


def test_scheme_options_that_would_change_nothing_are_refused_and_w4a16_is_grouped_by_any_name():
    """Review 67: `W4A16-wsym` ran per-channel while the W4A16 presets are g128, options with no
    effect passed silently, and bad dict schemes failed with a bare KeyError or a tensor error."""
    for name in ("W4A16", "W4A16-sym", "W4A16-wsym", "W3A16"):
        w = get_scheme(name).weights
        assert (w.strategy, w.group_size) == ("group", 128), name
    assert get_scheme("W8A16").weights.strategy == "channel"  # 8-bit weight-only stays per-channel
    assert get_scheme("W4A16-g64-wsym").weights.group_size == 64
    for bad, match in (("W4A16-asym-act", "A16 keeps them FP"), ("W8A8-asym-act", "asymmetric already"),
                       ("W8A8-sym-wsym", "-sym already does"), ("W16A8-wsym", "W16 keeps them FP")):
        with pytest.raises(QrealignError, match=match):
            get_scheme(bad)
    for kwargs, match in (({"strategy": "group", "group_size": -128}, "positive integer"),
                          ({"strategy": "group", "group_size": 2.5}, "positive integer"),
                          ({"strategy": "channel", "group_size": 64}, "applies to strategy 'group'")):
        with pytest.raises(QrealignError, match=match):
            QuantArgs(4, **kwargs)
    with pytest.raises(QrealignError, match="needs 'name'"):
        Scheme.from_dict({"weights": {"num_bits": 8}, "activations": None})


def test_an_asymmetric_weight_range_holds_zero_so_same_sign_groups_keep_their_precision():
    """Review 67: a same-sign small group put the scale and zero point at their clamps and every
    weight dequantized to one wrong number (and export refused the zero point). A weight range
    now holds 0, as compressed-tensors' observers do; one that holds it already is unchanged."""
    from qrealign.quant.quantizer import fake_quant, qparams

    w = torch.tensor([[0.30, 0.3004, -1.0, -1.05]])
    q = WeightQuantizer(QuantArgs(8, strategy="group", group_size=2), w.shape, lwc=False)
    out = q(w)
    step = torch.tensor([[0.3004, 0.3004, 1.05, 1.05]]) / 255
    assert ((out - w).abs() <= step / 2 + 1e-7).all()
    scale, zero = q.params(w)
    assert ((zero >= 0) & (zero <= 255)).all()  # a code, as a checkpoint stores it
    # a range with both signs: the old formula, bit for bit and in gradient
    args = QuantArgs(8)
    torch.manual_seed(0)
    y = torch.randn(16, 64, requires_grad=True)
    lo, hi = y.amin(dim=-1, keepdim=True), y.amax(dim=-1, keepdim=True)
    old_scale = ((hi - lo) / 255).clamp(1e-5, 1e4)
    old_zero = (-lo / old_scale).clamp(-1e4, 1e4).round().detach()
    scale, zero = qparams(lo, hi, args, hold_zero=True)
    assert torch.equal(scale, old_scale) and torch.equal(zero, old_zero)
    g_new = torch.autograd.grad(fake_quant(y, scale, zero, args).square().sum(), y, retain_graph=True)[0]
    g_old = torch.autograd.grad(fake_quant(y, old_scale, old_zero, args).square().sum(), y)[0]
    assert torch.equal(g_new, g_old)
    # LWC factors that cross on a same-sign row (min shrunk less than max) no longer invert the range
    w = torch.tensor([[-1.0, -1.05, -1.1, -1.02]])
    q = WeightQuantizer(QuantArgs(8), w.shape, lwc=True)
    with torch.no_grad():
        q.lowbound_factor.fill_(0.0)  # xmin -> 0.5 x -1.1 = -0.55, above xmax = -1.0: an inverted range
        q.upbound_factor.fill_(20.0)
    scale, zero = q.params(w)
    assert scale.item() == pytest.approx(0.55 / 255, rel=1e-5) and zero.item() == 255


def test_lwc_init_sets_the_initial_clipping():
    w = torch.tensor([[-1.0, 2.0]])
    q = WeightQuantizer(QuantArgs(8), w.shape, lwc=True, init=8.0)
    scale, _ = q.params(w)
    assert scale.item() == pytest.approx(3 / (1 + math.exp(-8.0)) / 255, rel=1e-6)


def test_group_size_that_does_not_divide_the_width_is_a_clear_error():
    from qrealign.errors import QrealignError

    with pytest.raises(QrealignError, match="W4A16-g64"):  # SmolLM2's 576 = 4.5 x 128
        WeightQuantizer(QuantArgs(4, strategy="group", group_size=128), torch.Size([8, 576]), lwc=False)


def test_rounding_offset_picks_floor_or_ceil_and_snaps_to_the_same_codes():
    w = torch.tensor([[-1.0, 0.33, 1.13, 2.0]])  # scale 0.2, zero 5: w / s = -5, 1.65, 5.65, 10
    q = WeightQuantizer(QuantArgs(4, symmetric=False, strategy="channel"), w.shape, lwc=False, rounding=True)
    assert torch.equal(q(w), WeightQuantizer(q.args, w.shape, lwc=False)(w))  # offset 0 = round to nearest
    with torch.no_grad():
        q.rounding.copy_(torch.tensor([[0.0, -0.4, -0.1, 0.3]]))
    # 1.65 - 0.4 = 1.25 -> 1 (floor instead of ceil); 5.65 - 0.1 -> 6 (unchanged); 10.3 -> 10
    expected = torch.tensor([[-1.0, 0.2, 1.2, 2.0]])
    assert torch.allclose(q(w), expected, atol=1e-6)
    q.snap_rounding_(w)
    assert torch.equal(q.rounding, torch.tensor([[0.0, -1.0, 0.0, 0.0]]))
    assert torch.allclose(q(w), expected, atol=1e-6)
    codes, scale, zero = q.codes(w)
    assert torch.allclose((codes - zero) * scale, expected, atol=1e-6)


def test_rounding_offsets_get_gradients_and_stay_within_half_a_step():
    w = torch.randn(4, 32)
    q = WeightQuantizer(QuantArgs(8, symmetric=True, strategy="group", group_size=16), w.shape, rounding=True)
    assert q.rounding.shape == (8, 16)
    (q(w) * torch.randn(4, 32)).sum().backward()
    assert q.rounding.grad is not None and q.rounding.grad.abs().sum() > 0
    with torch.no_grad():
        q.rounding.add_(3.0)
    q.clamp_rounding_()
    assert q.rounding.max() == 0.5


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [4, 8])
def test_inference_path_is_bit_identical_to_the_training_path(symmetric, bits):
    """Without gradients the per-token quantizer takes a fused in-place path; it must give exactly
    the training (straight-through) path's values, including clamped outliers and constant rows."""
    torch.manual_seed(0)
    x = torch.randn(3, 5, 64) * torch.logspace(-3, 2, 64)
    x[0, 0] = 0.25  # a constant token (zero range -> minimum scale)
    args = QuantArgs(bits, symmetric=symmetric, strategy="token")
    q = ActQuantizer(args)
    reference = q(x.clone().requires_grad_()).detach()
    with torch.no_grad():
        fast = q(x)
    assert torch.equal(fast, reference)


def test_inference_path_quantizes_a_shared_input_once_and_notices_changes():
    """q/k/v read the same tensor: the second quantizer reuses the first's result, but not after
    the input was modified in place or for other quantization args."""
    q8, q4 = ActQuantizer(QuantArgs(8, strategy="token")), ActQuantizer(QuantArgs(4, strategy="token"))
    x = torch.randn(2, 16)
    with torch.no_grad():
        first = q8(x)
        assert q8(x) is first
        assert not torch.equal(q4(x), first)
        x.mul_(3)
        again = q8(x)
    assert again is not first
    assert torch.equal(again, q8(x.clone().requires_grad_()).detach())


def test_inference_path_under_inference_mode_and_memo_released_with_its_input():
    import gc

    from qrealign.quant import quantizer

    q = ActQuantizer(QuantArgs(8, strategy="token"))
    x = torch.randn(2, 16)
    reference = q(x.clone().requires_grad_()).detach()
    with torch.inference_mode():  # no version counters there: computed, not memoised
        assert torch.equal(q(x.clone()), reference) and torch.equal(q(x), reference)
    with torch.no_grad():
        q(x)
    assert quantizer._last[3] is not None
    del x
    gc.collect()
    assert quantizer._last[3] is None  # the quantized copy does not outlive its input


def test_compiled_weight_quantizer_matches_eager():
    # torch.compile fuses the fake-quantizer; the quantized weight and the rounding offsets'
    # gradient stay bit-identical, the weight's and LWC's gradients agree to float rounding.
    torch.manual_seed(0)
    args = get_scheme("W4A8").weights
    w0 = torch.randn(24, 32)
    offsets = torch.empty(24, 32).uniform_(-0.4, 0.4)
    results = []
    for compiled in (False, True):
        q = WeightQuantizer(args, w0.shape, lwc=True, rounding=True)
        with torch.no_grad():
            q.rounding.copy_(offsets)
        q.compiled = compiled
        w = w0.clone().requires_grad_(True)
        out = q(w)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        results.append((out.detach(), w.grad, q.rounding.grad, q.upbound_factor.grad, q.lowbound_factor.grad))
    (eager, compiled) = results
    assert torch.equal(eager[0], compiled[0])
    assert torch.equal(eager[2], compiled[2])
    for a, b in zip(eager[1:], compiled[1:]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert "compiled" not in dict(q.state_dict())


def test_compiled_activation_quantizer_matches_eager():
    torch.manual_seed(0)
    x0 = torch.randn(3, 5, 16) * 4
    results = []
    for compiled in (False, True):
        q = ActQuantizer(get_scheme("W8A8").activations)
        q.compiled = compiled
        x = x0.clone().requires_grad_(True)
        out = q(x)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        results.append((out.detach(), x.grad))
    assert torch.equal(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_activations_are_quantized_in_float32_like_serving_engines(symmetric, dtype):
    """vLLM's int8 kernels read bf16 activations and compute the per-token scale and codes in
    float32: both quantizer paths do the same (in bf16 a few per cent of the codes, a third when
    asymmetric, landed one to three steps off) and hand back the input's dtype."""
    torch.manual_seed(0)
    args = QuantArgs(8, symmetric, "token")
    x = (torch.randn(16, 64) * 3 + 0.5).to(dtype)
    want = ActQuantizer(args)(x.float()).to(dtype)  # the float32 arithmetic on the same half values
    q = ActQuantizer(args)
    got = q(x)
    assert got.dtype == dtype and torch.equal(got, want)
    train = x.clone().requires_grad_(True)
    out = q(train)
    assert out.dtype == dtype and torch.equal(out.detach(), want)
    out.float().sum().backward()
    assert train.grad is not None and train.grad.dtype == dtype


def test_asymmetric_schemes_past_the_zero_points_range_are_refused():
    """The asymmetric zero point is kept within +-1e4 (as OmniQuant); at 14 bits and more an
    ordinary range needs more (weights in [-1, 0.05]: zero 15604 at 14 bits), and the values came
    out off by a third of their range."""
    from qrealign.quant.quantizer import qparams

    with pytest.raises(QrealignError, match="asymmetric 14-bit quantization is not supported"):
        get_scheme("W14A16")
    assert get_scheme("W14A16-sym").weights.num_bits == 14
    args = QuantArgs(13)  # the widest asymmetric grid: a one-sided range still comes back within a step
    x = torch.linspace(-1.0, 0.05, 64)[None]
    scale, zero = qparams(x.amin(1, keepdim=True), x.amax(1, keepdim=True), args)
    assert zero.abs().max() < 1e4
    back = (torch.clamp(torch.round(x / scale) + zero, args.qmin, args.qmax) - zero) * scale
    assert (back - x).abs().max() <= scale.max() / 2 + 1e-7


def test_a_strategy_that_does_not_fit_its_role_is_refused():
    """The quantizers branch on group-or-not (weights) and dynamic-or-not (activations): a scheme
    given as data with per-token weights or dynamic per-tensor activations would silently run as
    something else, so it is an error."""
    from qrealign.errors import QrealignError
    from qrealign.quant.scheme import QuantArgs, Scheme

    ok = Scheme("mine", QuantArgs(8, True, "channel"), QuantArgs(8, True, "token", None, True))
    assert Scheme.from_dict(ok.to_dict()) == ok
    assert Scheme("static", QuantArgs(4, False, "group", 64), QuantArgs(8, True, "tensor", None, False))
    bad = [({"num_bits": 8, "symmetric": True, "strategy": "token"}, None),
           ({"num_bits": 8, "symmetric": True}, {"num_bits": 8, "symmetric": True, "strategy": "tensor", "dynamic": True}),
           ({"num_bits": 8, "symmetric": True}, {"num_bits": 8, "symmetric": True, "strategy": "channel"})]
    for weights, acts in bad:
        with pytest.raises(QrealignError, match="quantized per"):
            Scheme.from_dict({"name": "bad", "weights": weights, "activations": acts})


def test_compiling_without_a_cpp_compiler_is_one_line_before_any_work(monkeypatch):
    """torch.compile on CPU builds C++ kernels: without a compiler the demo failed at its first
    compiled step, a quarter of an hour in. The check says so up front (CPU only: GPU kernels are Triton's)."""
    import torch._inductor.cpp_builder as cpp_builder

    from qrealign.errors import QrealignError
    from qrealign.quant.quantizer import check_compiler

    def no_compiler():
        raise RuntimeError("InvalidCxxCompiler")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    with pytest.raises(QrealignError, match="needs a C\\+\\+ compiler on CPU.*CLI --no-compile-quantizer"):
        check_compiler("cpu")
    with pytest.raises(QrealignError, match="measured with it: it has no switch there") as raised:
        check_compiler("cpu", demo=True)  # the demo's first-token rows have no switch to name
    assert "--no-compile-quantizer" not in str(raised.value)
    monkeypatch.setattr("qrealign.quant.quantizer._has_triton", lambda: True)
    check_compiler("cuda")  # the C++ compiler is not checked there (Triton is)
    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", lambda: "g++")
    check_compiler("cpu")


def test_compiling_without_the_python_headers_is_one_line_before_any_work(monkeypatch, tmp_path):
    """The compiled CPU kernels are Python extensions (#include <Python.h>): a machine with g++ but
    without python3-dev failed at the first compiled step, after the lab (review 70)."""
    import torch._inductor.cpp_builder as cpp_builder

    from qrealign.errors import QrealignError
    from qrealign.quant.quantizer import check_compiler

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", lambda: "g++")
    monkeypatch.setattr(cpp_builder, "_get_python_include_dirs", lambda: [str(tmp_path)])
    with pytest.raises(QrealignError, match=r"needs the Python headers \(Python.h\).*CLI --no-compile-quantizer"):
        check_compiler("cpu")
    (tmp_path / "Python.h").write_text("/* present */\n")
    check_compiler("cpu")


def test_compiling_on_cuda_without_triton_is_one_line_before_any_work(monkeypatch):
    import qrealign.quant.quantizer as quantizer

    monkeypatch.setattr(quantizer, "_has_triton", lambda: False)
    with pytest.raises(QrealignError, match="Triton.*switch the option off \\(CLI --no-compile-quantizer;"):
        quantizer.check_compiler("cuda")
    monkeypatch.setattr(quantizer, "_has_triton", lambda: True)
    quantizer.check_compiler("cuda")


def test_snapped_rounding_offsets_held_as_int8_give_the_same_codes():
    """An exporter only computes codes: offsets held as int8 take a byte per weight instead of
    four (review 74: an in-memory export held a float32 copy of every weight), to the same codes."""
    from qrealign.quant.quantizer import WeightQuantizer
    from qrealign.quant.scheme import get_scheme

    torch.manual_seed(0)
    w = torch.randn(8, 32)
    q = WeightQuantizer(get_scheme("W4A16-g16").weights, w.shape, lwc=True, rounding=True)
    with torch.no_grad():
        q.rounding.uniform_(-0.5, 0.5)
    q.snap_rounding_(w)
    before, fake_before = q.codes(w), q(w)
    q.rounding_as_int8_()
    assert q.rounding.dtype == torch.int8 and "rounding" in dict(q.named_buffers())
    assert "rounding" not in dict(q.named_parameters())
    after = q.codes(w)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert torch.equal(q(w), fake_before)  # the fake-quantized weight too
    unsnapped = WeightQuantizer(get_scheme("W4A16-g16").weights, w.shape, lwc=True, rounding=True)
    with torch.no_grad():
        unsnapped.rounding.fill_(0.3)
    with pytest.raises(ValueError, match="not whole steps"):
        unsnapped.rounding_as_int8_()
