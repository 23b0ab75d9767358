"""The Q-realign loss on hand-built tensors."""

import math

import pytest
import torch

from qrealign.calibrate.losses import LossInputs, ReconstructionLoss, per_sample_mse
from qrealign.calibrate.safety import SafetyLoss


def _inputs(layer=0):
    fp = torch.zeros(2, 3, 2)
    q = torch.zeros(2, 3, 2)
    q[0, 1] = torch.tensor([1.0, 1.0])  # benign sample: error 1.0 on token 1
    q[0, 2] = torch.tensor([2.0, 0.0])  # error mean((2^2 + 0)/2) = 2 on token 2
    q[1, 2] = torch.tensor([0.5, -0.5])  # malicious sample's last token
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])  # sample 0 left-padded
    return LossInputs(fp, q, torch.tensor([0, 1]), mask, torch.tensor([2, 2]), layer, 2)


def test_reconstruction_ignores_padding_and_averages_samples():
    inp = _inputs()
    mse = per_sample_mse(inp.fp_out, inp.q_out, inp.attention_mask)
    # sample 0: real tokens 1, 2 -> (1 + 2) / 2 = 1.5 ; sample 1: token 2 error 0.25 over 3 tokens
    assert mse.tolist() == pytest.approx([1.5, 0.25 / 3])
    loss, _ = ReconstructionLoss()(inp)
    assert loss.item() == pytest.approx((1.5 + 0.25 / 3) / 2)


def test_sink_weight_and_normalisation():
    inp = _inputs()
    mse = per_sample_mse(inp.fp_out, inp.q_out, inp.attention_mask, sink_weight=0.0)
    assert mse[0].item() == pytest.approx(2.0)  # first real token (1) excluded
    # the authors' padded average keeps the pad position but still drops the *real* first token:
    # sample 0 -> (pad 0 + token 2's 2) / 2 tokens weighted; sample 1 -> token 2's 0.25 / 2
    padded = per_sample_mse(inp.fp_out, inp.q_out, inp.attention_mask, sink_weight=0.0, include_padding=True)
    assert padded.tolist() == pytest.approx([2.0 / 2, 0.25 / 2])
    fp = torch.full((1, 2, 2), 2.0)
    q = torch.full((1, 2, 2), 3.0)
    rel = per_sample_mse(fp, q, torch.ones(1, 2), normalize=True)
    assert rel.item() == pytest.approx(1.0 / 4.0)


def test_paper_loss_benign_mse_malicious_softplus():
    inp = _inputs()
    w = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    b = torch.tensor([-0.5, 0.0])
    loss, logs = SafetyLoss(w, b)(inp)
    z = 0.5 * 2.0 - 0.5  # probe logit of the malicious last token
    expected = (1.5 + math.log1p(math.exp(-z))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert logs["z_mal"] == pytest.approx((z, 1))


def test_options_lambda_margin_hinge_recon_benign_side():
    inp = _inputs()
    w = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    b = torch.tensor([-0.5, 0.0])
    z = 0.5
    hinge = SafetyLoss(w, b, probe_loss="hinge", margin=1.0, lam=3.0)(inp)[0]
    assert hinge.item() == pytest.approx((1.5 + 3.0 * (1.0 - z)) / 2)
    past = SafetyLoss(w, b, probe_loss="hinge", margin=0.25)(inp)[0]
    assert past.item() == pytest.approx(1.5 / 2)  # past the margin: no push
    both = SafetyLoss(w, b, recon_on_malicious=True)(inp)[0]
    assert both.item() == pytest.approx((1.5 + 0.25 / 3 + math.log1p(math.exp(-z))) / 2)
    # benign side: benign last token [2, 0] -> z_b = 2*2 - 0.5 = 3.5
    side = SafetyLoss(w, b, benign_side=2.0)(inp)[0]
    assert side.item() == pytest.approx((1.5 + 2.0 * math.log1p(math.exp(3.5)) + math.log1p(math.exp(-z))) / 2)


def test_inactive_layers_fall_back_to_reconstruction():
    inp = _inputs(layer=1)
    w, b = torch.ones(2, 2), torch.zeros(2)
    loss = SafetyLoss(w, b, layers=(0,))
    assert loss(inp)[0].item() == pytest.approx(ReconstructionLoss()(inp)[0].item())
    assert loss.needs_fp(inp.labels, 1).all()
    assert loss.needs_fp(inp.labels, 0).tolist() == [True, False]
    unusable = SafetyLoss(w, b, usable=(False, True))
    assert not unusable.active(0) and unusable.active(1)


@pytest.mark.parametrize("bad", [{"lam": -1.0}, {"sink_weight": -1.0}, {"benign_side": -0.5}, {"benign_margin": -1.0},
                                 {"lam": math.nan}, {"margin": math.nan}, {"probe_loss": "hinged"}])
def test_weights_that_would_turn_a_term_around_are_refused(bad):
    """lam = -1 pushes malicious prompts to the benign side of the probe: it un-aligns. The
    first-token objective already refused negative weights; the probe loss now does too."""
    from qrealign.errors import QrealignError

    with pytest.raises(QrealignError, match=next(iter(bad))):
        SafetyLoss(torch.zeros(2, 4), torch.zeros(2), **bad)
    SafetyLoss(torch.zeros(2, 4), torch.zeros(2), lam=0.0, margin=-1.0)  # zero weights and any finite margin are fine


def test_probe_weights_built_by_hand_enter_the_run_fingerprint():
    """A SafetyLoss built from tensors (not `from_probes`) names its weights in its repr, which
    enters the run fingerprint: re-fitted probes must not resume blocks trained against old ones."""
    w = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    same, other_b, other_w = SafetyLoss(w, torch.zeros(3)), SafetyLoss(w, torch.ones(3)), SafetyLoss(-w, torch.zeros(3))
    assert repr(SafetyLoss(w.clone(), torch.zeros(3))) == repr(same)
    assert len({repr(same), repr(other_b), repr(other_w)}) == 3
    assert same.probe_id.startswith("weights:")
    assert SafetyLoss(w, torch.zeros(3), probe_id="fit-1").probe_id == "fit-1"  # a given id is kept
