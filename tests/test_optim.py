"""optim.py: airbench's decoupled hyperparameters, the whitening bias's epochs, Muon for the
conv filters, the LR schedule and lookahead."""
import pytest
import torch

from model import build_model
from optim import (FilterMuon, lookahead_decay, lookahead_pull, lookahead_state, lr_schedule,
                   make_optimizers, make_schedulers, stop_ended_gradients)
from run_setup import get_args


def fast94_args(*flags):
    return get_args(["--preset", "fast94", *flags])


def test_decoupled_hyperparameters_follow_airbench():
    model = build_model("fast94")
    (sgd,) = make_optimizers(model, fast94_args())
    others, shifts, whiten_bias = sgd.param_groups
    # lr 11.5 per 1024 examples / (1 + 1/(1 - 0.85)) at batch 1024; decay per step lr * wd.
    assert others["lr"] == pytest.approx(1.5)
    assert others["lr"] * others["weight_decay"] == pytest.approx(0.0153 / (1 + 1 / 0.15))
    assert shifts["lr"] == pytest.approx(64 * 1.5)
    assert shifts["lr"] * shifts["weight_decay"] == pytest.approx(0.0153 / (1 + 1 / 0.15))
    norms = [m.bias for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert {id(p) for p in shifts["params"]} == {id(p) for p in norms}
    assert all(p is not model.whiten.weight for p in others["params"])   # frozen: not trained
    assert whiten_bias["params"] == [model.whiten.bias] and whiten_bias["trains_epochs"] == 3
    assert whiten_bias["lr"] == others["lr"]
    half = make_optimizers(model, fast94_args("--batch-size", "512"))[0]
    assert half.param_groups[0]["lr"] == pytest.approx(0.75)              # LR scales with batch


def test_the_whitening_bias_stops_training_after_its_epochs():
    torch.manual_seed(0)
    model = build_model("fast94")
    args = fast94_args("--epochs", "5")
    (sgd,) = make_optimizers(model, args)
    # 4 steps per epoch: 3 epochs = 12 steps
    (sched,) = make_schedulers([sgd], 4, lr_schedule(args, args.epochs * 4))
    biases = []
    for step in range(16):
        sgd.zero_grad()
        model(torch.randn(8, 3, 32, 32)).square().mean().backward()
        sgd.step()
        sched.step()
        biases.append(model.whiten.bias.detach().clone())
    assert not torch.equal(biases[10], biases[11])          # step 12 (index 11) still trains
    assert all(torch.equal(biases[11], b) for b in biases[12:])
    assert sgd.param_groups[0]["lr"] > 0


def test_a_group_whose_training_ended_gets_no_gradient_and_the_weights_stay_the_same():
    torch.manual_seed(0)
    stopped, kept = build_model("fast94"), build_model("fast94")
    kept.load_state_dict(stopped.state_dict())
    args = fast94_args("--epochs", "5")
    x = torch.randn(8, 3, 32, 32)
    steps = {}
    for model in (stopped, kept):
        opts = make_optimizers(model, args)
        steps[model] = opts, make_schedulers(opts, 1, lr_schedule(args, args.epochs))
    for epoch in range(5):                                    # one step per epoch
        stop_ended_gradients(steps[stopped][0], epoch)
        assert stopped.whiten.bias.requires_grad == (epoch < 3)
        for model, (opts, scheds) in steps.items():
            opts[0].zero_grad()
            model(x).square().mean().backward()
            opts[0].step()
            scheds[0].step()
    assert stopped.whiten.bias.grad is None and kept.whiten.bias.grad is not None
    for (name, a), b in zip(stopped.state_dict().items(), kept.state_dict().values()):
        assert torch.equal(a, b), name


def test_muon_updates_the_conv_filters_through_matrices_sharing_their_storage():
    torch.manual_seed(0)
    model = build_model("fast94")
    sgd, muon = make_optimizers(model, fast94_args("--optimizer", "muon"))
    filters = [p for n, p in model.named_parameters() if p.ndim == 4 and p.requires_grad]
    matrices = muon.param_groups[0]["params"]
    assert isinstance(muon, FilterMuon) and isinstance(muon, torch.optim.Muon)
    assert [id(f) for f in muon.filters] == [id(f) for f in filters] and len(filters) == 6
    assert all(w.data_ptr() == m.data_ptr() and m.shape == (w.shape[0], w[0].numel())
               for w, m in zip(filters, matrices))
    assert not any(p.ndim == 4 for g in sgd.param_groups for p in g["params"])
    before = [w.detach().clone() for w in filters]
    model(torch.randn(4, 3, 32, 32)).square().mean().backward()
    muon.step()                            # hands each filter's gradient to its matrix
    assert all(not torch.equal(b, w) for b, w in zip(before, filters))
    muon.zero_grad()                       # the filters' gradients too: no sum over steps
    assert all(f.grad is None for f in filters)


def test_lr_schedule_is_piecewise_linear():
    args = fast94_args()
    assert lr_schedule(args, 100)(0) == pytest.approx(0.2)
    assert lr_schedule(args, 100)(23) == pytest.approx(1.0)
    assert lr_schedule(args, 100)(99) == pytest.approx(0.07)
    assert lr_schedule(args, 100)(61) == pytest.approx(1 - 0.93 * 38 / 76)
    # The scheduler steps once more after the last step: the factor stays at its end value.
    assert lr_schedule(args, 100)(100) == pytest.approx(0.07)
    assert min(lr_schedule(get_args([]), total)(s) for total in (1, 2, 3, 16, 61)
               for s in range(total + 2)) == pytest.approx(0.001)


def test_lookahead_pull_moves_the_slow_copy_then_resets_the_weights():
    model = build_model("fast94")
    slow = [t.clone() for t in lookahead_state(model)]
    with torch.no_grad():
        for t in lookahead_state(model):
            t.add_(1.0)
    fast = [t.clone() for t in lookahead_state(model)]
    lookahead_pull(model, slow, 0.75)
    for s, f, now in zip(slow, fast, lookahead_state(model)):
        assert torch.allclose(s, f - 0.75, atol=1e-6) and torch.equal(now, s)
    assert lookahead_decay(0, 10) == 0 and lookahead_decay(10, 10) == pytest.approx(0.95 ** 5)
