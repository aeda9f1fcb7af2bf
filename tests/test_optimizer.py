"""Optimisers from ``build_optimizer``: the fast paths (fused AdamW, multi-tensor BertAdam) take the
same steps as the per-parameter loops, BertAdam follows the authors' rule, and resuming keeps the
implementation.

Parameters are awkward on purpose: mixed shapes (a 1-D one like DeepSpeed's flat ZeRO partitions),
one without a gradient (skipped), a group with weight decay and one without.
"""

import copy

import pytest
import torch

from lxmert_fast.pretraining import BertAdam, build_optimizer

SHAPES = ((7, 13), (13,), (3, 5, 2), (1,), (97,))
LR, EPS, WD, STEPS = 1e-2, 1e-6, 0.01, 5
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def make_params(device: torch.device = CPU) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g).to(device).requires_grad_() for s in (*SHAPES, (4, 4))]


def groups_of(params: list[torch.Tensor]) -> list[dict]:
    """Decay on the matrices, none on the vectors (as ``parameter_groups``); the last param gets no grad."""
    return [
        {"params": [params[0], params[2], params[5]], "weight_decay": WD},
        {"params": [params[1], params[3], params[4]], "weight_decay": 0.0},
    ]


def gradients(step: int, device: torch.device = CPU) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    # Scales far apart, so eps and the second moment both matter.
    return [(torch.randn(s, generator=g) * 10.0 ** (i - 3)).to(device) for i, s in enumerate(SHAPES)]


def run(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], steps: range) -> list[torch.Tensor]:
    for step in steps:
        for p, grad in zip(params[: len(SHAPES)], gradients(step, params[0].device), strict=True):
            p.grad = grad
        optimizer.step()
    return [p.detach().clone() for p in params]


def trained(name: str, fused: bool | None, device: torch.device = CPU):
    # Built on CPU parameters that then move to ``device``, as train.py builds it before DeepSpeed
    # moves the model.
    params = make_params()
    optimizer = build_optimizer(name, groups_of(params), LR, EPS, device, fused=fused)
    for p in params:
        p.data = p.data.to(device)
    return optimizer, run(optimizer, params, range(STEPS))


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x.double() - y.double()).abs().max().item() for x, y in zip(a, b, strict=True))


def bert_adam_reference(params: list[torch.Tensor], steps: int) -> list[torch.Tensor]:
    """The authors' rule (pytorch-pretrained-bert BertAdam without its per-parameter clipping) in float64."""
    decay = {id(p) for p in groups_of(params)[0]["params"]}
    out = [p.detach().double().clone() for p in params]
    m = [torch.zeros_like(p) for p in out]
    v = [torch.zeros_like(p) for p in out]
    for step in range(steps):
        for i, grad in enumerate(gradients(step)):
            grad = grad.double()
            m[i] = 0.9 * m[i] + 0.1 * grad
            v[i] = 0.999 * v[i] + 0.001 * grad * grad
            update = m[i] / (v[i].sqrt() + EPS)  # no bias correction
            if id(params[i]) in decay:
                update = update + WD * out[i]
            out[i] = out[i] - LR * update
    return out


def test_unknown_name_is_refused_naming_the_argument():
    with pytest.raises(ValueError, match="optimizer: expected one of adamw, bert_adam, got 'adam'"):
        build_optimizer("adam", groups_of(make_params()), LR, EPS, CPU)


def test_adamw_implementation_per_device():
    # Built while the model is still on the CPU, as train.py does before DeepSpeed moves it.
    on_cuda = build_optimizer("adamw", groups_of(make_params()), LR, EPS, CUDA)
    assert on_cuda.defaults["fused"] is True and all(g["fused"] is True for g in on_cuda.param_groups)
    on_cpu = build_optimizer("adamw", groups_of(make_params()), LR, EPS, CPU)
    assert (on_cpu.defaults["fused"], on_cpu.defaults["foreach"]) == (False, True)
    loop = build_optimizer("adamw", groups_of(make_params()), LR, EPS, CUDA, fused=False)
    assert (loop.defaults["fused"], loop.defaults["foreach"]) == (False, False)


def test_adamw_fast_paths_match_the_loop_on_cpu():
    _, loop = trained("adamw", fused=False)
    _, default = trained("adamw", fused=None)
    _, fused = trained("adamw", fused=True)
    # The CPU default reproduces the loop (and so earlier CPU runs) bit for bit.
    torch.testing.assert_close(default, loop, rtol=0, atol=0)
    # Observed (torch 2.13): max |fused - loop| = 3.0e-8 (2.1e-7 relative) after 5 steps.
    torch.testing.assert_close(fused, loop, rtol=1e-6, atol=1e-7)


def test_bert_adam_foreach_matches_the_loop_and_the_authors_rule():
    opt, foreach = trained("bert_adam", fused=None)
    assert isinstance(opt, BertAdam) and opt.foreach
    _, loop = trained("bert_adam", fused=False)
    # On the CPU the foreach ops run the loop's ops tensor by tensor.
    torch.testing.assert_close(foreach, loop, rtol=0, atol=0)
    no_grad = opt.param_groups[0]["params"][2]
    assert torch.equal(foreach[5], make_params()[5]) and no_grad not in opt.state and len(opt.state) == 5
    reference = bert_adam_reference(make_params(), STEPS)
    # Observed: max |fp32 - float64| = 2.0e-7 (3.9e-7 relative); torch's bias-corrected Adam is 0.27 off.
    torch.testing.assert_close(foreach, [r.float() for r in reference], rtol=1e-6, atol=1e-7)
    assert max_diff(foreach, make_params()) > 1e-3  # the steps moved the parameters


def test_state_layout_and_resume_keep_the_chosen_implementation():
    # BertAdam: a loop checkpoint (the layout of earlier runs) resumes in the foreach path.
    params = make_params()
    old = BertAdam(groups_of(params), lr=LR, eps=EPS, foreach=False)
    run(old, params, range(2))
    saved = copy.deepcopy(old.state_dict())  # state_dict() shares the live state tensors
    assert {k for s in saved["state"].values() for k in s} == {"exp_avg", "exp_avg_sq"}
    assert all("foreach" not in g for g in saved["param_groups"])
    resumed_params = [p.detach().clone().requires_grad_() for p in params]
    resumed = build_optimizer("bert_adam", groups_of(resumed_params), LR, EPS, CPU)
    resumed.load_state_dict(saved)
    assert resumed.foreach
    torch.testing.assert_close(
        run(resumed, resumed_params, range(2, STEPS)), run(old, params, range(2, STEPS)), rtol=0, atol=0
    )

    # AdamW: a checkpoint of torch's default AdamW (no ``fused`` in its groups) resumes fused.
    params = make_params()
    old = torch.optim.AdamW(groups_of(params), lr=LR, eps=EPS)
    run(old, params, range(2))
    resumed_params = [p.detach().clone().requires_grad_() for p in params]
    resumed = build_optimizer("adamw", groups_of(resumed_params), LR, EPS, CPU, fused=True)
    resumed.load_state_dict(copy.deepcopy(old.state_dict()))
    assert all(g["fused"] is True and g["foreach"] is False for g in resumed.param_groups)
    assert all(s["step"].dtype == torch.float32 for s in resumed.state.values())
    torch.testing.assert_close(
        run(resumed, resumed_params, range(2, STEPS)), run(old, params, range(2, STEPS)), rtol=1e-6, atol=1e-7
    )


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fast_paths_match_the_loops_on_cuda():
    for name in ("adamw", "bert_adam"):
        fast_opt, fast = trained(name, fused=None, device=CUDA)
        _, loop = trained(name, fused=False, device=CUDA)
        assert fast[0].is_cuda
        if name == "adamw":
            assert all(g["fused"] is True for g in fast_opt.param_groups)
            assert all(s["step"].is_cuda for s in fast_opt.state.values())
        torch.testing.assert_close(fast, loop, rtol=1e-6, atol=1e-7)
