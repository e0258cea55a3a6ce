"""LARS (sslab.modules.lars) against its formula on tiny parameters, and method.optimizer=lars for a method."""

import pytest
import torch

from sslab.modules.lars import LARS


def test_update_equals_the_formula_over_two_steps():
    w0 = torch.tensor([3.0, 4.0])  # ||w|| = 5
    g = torch.tensor([0.6, -0.8])
    lr, wd, m, eta = 0.1, 0.01, 0.9, 0.001
    w = torch.nn.Parameter(w0.clone())
    opt = LARS([w], lr=lr, weight_decay=wd, momentum=m, eta=eta)
    # step 1 by hand: u = g + wd w, q = eta ||w|| / ||u||, mu = q u, w -= lr mu
    u = g + wd * w0
    q = eta * w0.norm() / u.norm()
    mu = q * u
    w1 = w0 - lr * mu
    w.grad = g.clone()
    opt.step()
    assert torch.allclose(w.detach(), w1, atol=1e-7)
    u = g + wd * w1
    mu = m * mu + eta * w1.norm() / u.norm() * u
    w.grad = g.clone()
    opt.step()
    assert torch.allclose(w.detach(), w1 - lr * mu, atol=1e-7)


def test_groups_without_adaptation_take_plain_momentum_steps_and_zero_norms_are_safe():
    b = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    z = torch.nn.Parameter(torch.zeros(2))  # ||w|| = 0: trust ratio 1
    opt = LARS([{"params": [b], "weight_decay": 0.0, "lars_adapt": False}, {"params": [z]}], lr=0.5)
    b.grad = torch.tensor([0.2, 0.4])
    z.grad = torch.tensor([1.0, 0.0])
    opt.step()
    assert torch.allclose(b.detach(), torch.tensor([1.0 - 0.1, -2.0 - 0.2]))
    assert torch.allclose(z.detach(), torch.tensor([-0.5, 0.0]))


def test_method_optimizer_lars_excludes_biases_and_norms(tiny_cfg):
    from sslab.build import build_datamodule, build_method

    cfg = tiny_cfg("method.optimizer=lars")
    model = build_method(cfg, build_datamodule(cfg))
    assert model.optimizer_name == "lars"
    opt = model.make_optimizer(0.1)
    assert isinstance(opt, LARS) and opt.defaults["eta"] == 0.001 and opt.defaults["momentum"] == 0.9
    adapted = {id(p) for g in opt.param_groups if g["lars_adapt"] for p in g["params"]}
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert adapted == decayed and adapted
    for name, p in model.named_parameters():
        if p.requires_grad and p.ndim == 1:  # biases and norm weights: neither adaptation nor decay
            assert id(p) not in adapted, name
    assert isinstance(build_method(tiny_cfg(), build_datamodule(cfg)).make_optimizer(0.1), torch.optim.AdamW)


def test_unknown_optimizer_is_refused(tiny_cfg):
    from sslab.build import build_datamodule, build_method
    from sslab.errors import SSLabError

    cfg = tiny_cfg("method.optimizer=sgd")
    with pytest.raises(SSLabError, match=r"method\.optimizer='sgd' is unknown"):
        build_method(cfg, build_datamodule(cfg))


@pytest.mark.slow
def test_a_short_run_trains_with_lars(tiny_cfg):
    from sslab.runs.training import train

    train(tiny_cfg("method.optimizer=lars", "method.base_lr=0.2", "trainer.max_steps=2", "callbacks=[]"))
