"""The preconditioner object: argument checks, dtype/device changes, checkpoints, copies, replicas,
foreign solvers and truthful warnings (issue 12 "Robustness", issue 14 item 2)."""
import copy
import gc
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchdiffeq
from torch import nn

import snopt_dyn

T01 = torch.tensor([0.0, 1.0], dtype=torch.float64)


class Field(nn.Module):
    def __init__(self, d=3, h=5):
        super().__init__()
        self.l1, self.l2 = nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, t, z):
        return self.l2(torch.tanh(self.l1(z)))


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc, self.field, self.head = nn.Linear(4, 3), Field(), nn.Linear(3, 2)

    def forward(self, x):
        t = T01.to(x)
        return self.head(snopt_dyn.odeint_adjoint(self.field, self.enc(x), t, method="rk4",
                                                  rtol=1e-6, atol=1e-6, options={"step_size": 0.25})[-1])


def _data(n=6, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 4, generator=g).to(dtype), torch.randn(n, 2, generator=g).to(dtype)


def _iterate(model, precond, x, y):
    model.zero_grad()
    F.mse_loss(model(x), y).backward()
    precond.step()


# ------------------------------------------------------------------------ arguments
@pytest.mark.parametrize("kwargs, name", [
    ({"damping": 0.0}, "damping"), ({"damping": -1.0}, "damping"), ({"damping": float("nan")}, "damping"),
    ({"damping": float("inf")}, "damping"), ({"alpha": 1.0}, "alpha"), ({"alpha": -0.1}, "alpha"),
    ({"alpha": float("nan")}, "alpha"), ({"update_freq": 0}, "update_freq"), ({"update_freq": 2.5}, "update_freq"),
    ({"num_samples": 0}, "num_samples"), ({"sample_step": 0.0}, "sample_step"),
    ({"sample_step": float("nan")}, "sample_step"), ({"batch_size": 0}, "batch_size"),
    ({"moment": "exact"}, "moment"), ({"loss_reduction": "none"}, "loss_reduction"),
])
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        snopt_dyn.SNOpt(nn.Linear(2, 2), **kwargs)


def test_bad_scheduled_damping_raises_at_step():
    model = nn.Sequential(nn.Linear(2, 2))
    precond = snopt_dyn.SNOpt(model, damping=lambda k: 0.0)
    model(torch.randn(3, 2)).sum().backward()
    with pytest.raises(ValueError, match="damping"):
        precond.step()


# ------------------------------------------------------------------------ dtype, device, checkpoints
def test_model_converted_after_construction_keeps_working():
    torch.manual_seed(1)
    model = Model().float()
    precond = snopt_dyn.SNOpt(model, update_freq=2, num_samples=3)
    x, y = _data(dtype=torch.float32)
    _iterate(model, precond, x, y)
    model.double()
    x, y = _data()
    for _ in range(3):  # a non-refresh step on the old state, then a refresh
        _iterate(model, precond, x, y)
    st = precond._layers[model.field.l1]
    assert st.u_a.dtype == torch.float64 and st.m2.dtype == torch.float64
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_load_state_dict_casts_to_the_model_dtype():
    torch.manual_seed(2)
    src = Model().double()
    p_src = snopt_dyn.SNOpt(src, update_freq=5, num_samples=3)
    x, y = _data()
    _iterate(src, p_src, x, y)
    dst = copy.deepcopy(src).float()
    p_dst = snopt_dyn.SNOpt(dst, update_freq=5, num_samples=3)
    p_dst.load_state_dict(p_src.state_dict())
    assert p_dst._layers[dst.field.l1].u_a.dtype == torch.float32
    xf, yf = _data(dtype=torch.float32)
    _iterate(dst, p_dst, xf, yf)  # a non-refresh step with the loaded bases
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in dst.parameters())


def test_load_state_dict_names_mismatched_layers_and_shapes():
    src = snopt_dyn.SNOpt(nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1)))
    state = src.state_dict()
    with pytest.raises(ValueError, match=r"lacks: \['2'\]"):
        snopt_dyn.SNOpt(nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1), nn.Linear(1, 1))).load_state_dict(state)
    state["layers"]["0"]["u_a"] = torch.eye(4)
    with pytest.raises(ValueError, match=r"0\.u_a has shape \(4, 4\), the layer needs \(3, 3\)"):
        snopt_dyn.SNOpt(nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))).load_state_dict(state)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_keeps_statistics_in_float32(dtype):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).to(dtype)
    precond = snopt_dyn.SNOpt(model, update_freq=2)
    x, y = torch.randn(16, 4).to(dtype), torch.randn(16, 2).to(dtype)
    for _ in range(3):
        model.zero_grad()
        F.mse_loss(model(x), y).backward()
        precond.step()
    for module in (model[0], model[2]):
        st = precond._layers[module]
        assert st.u_a.dtype == st.u_g.dtype == st.m2.dtype == torch.float32
        assert module.weight.grad.dtype == dtype and torch.isfinite(module.weight.grad.float()).all()


# ------------------------------------------------------------------------ copies and lifetime
def test_deepcopy_and_pickle_point_to_state_dict():
    precond = snopt_dyn.SNOpt(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="state_dict"):
        copy.deepcopy(precond)
    with pytest.raises(TypeError, match="state_dict"):
        pickle.dumps(precond)


def test_dropped_preconditioner_removes_its_hooks():
    model = Model()
    precond = snopt_dyn.SNOpt(model)
    assert model.field.l1._forward_hooks
    del precond
    gc.collect()
    assert not any(m._forward_hooks for m in model.modules())
    pickle.dumps(model)  # and the model still pickles


def test_calls_of_layer_copies_warn_instead_of_key_error():
    """nn.DataParallel replicas are shallow copies of the registered layers that share their hooks
    (``replicate`` copies the hook dicts); their calls must not crash SNOpt."""
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    precond = snopt_dyn.SNOpt(model)
    replica = nn.Sequential(copy.copy(model[0]), copy.copy(model[1]))
    assert replica[0]._forward_hooks  # the registered hook came along
    with pytest.warns(UserWarning, match="DistributedDataParallel"):
        replica(torch.randn(4, 2)).sum().backward()
    model(torch.randn(4, 2)).sum().backward()
    precond.step()  # the real layers' statistics are intact
    assert precond.layers()["0"]["A"] == (3, 3)


def test_data_parallel_on_cpu_runs():
    model = nn.DataParallel(Model().double())
    precond = snopt_dyn.SNOpt(model, num_samples=3)
    x, y = _data()
    _iterate(model, precond, x, y)
    assert precond.layers()["module.field.l1"]["role"] == "ode"


# ------------------------------------------------------------------------ truthful warnings
class NativeModel(nn.Module):
    """The torchdiffeq examples' pattern without wrap: the field solved by torchdiffeq.odeint."""

    def __init__(self):
        super().__init__()
        self.field, self.head = Field(), nn.Linear(3, 2)

    def forward(self, x):
        return self.head(torchdiffeq.odeint(self.field, x, T01.to(x), method="rk4", options={"step_size": 0.25})[-1])


def test_field_solved_by_torchdiffeq_warns_once_and_keeps_raw_gradient():
    torch.manual_seed(4)
    model = NativeModel().double()
    precond = snopt_dyn.SNOpt(model, update_freq=2)
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(4):  # two refreshes
            model.zero_grad()
            F.mse_loss(model(x), y).backward()
            raw = {n: p.grad.clone() for n, p in model.named_parameters()}
            precond.step()
            for name in ("field.l1.weight", "field.l2.weight"):
                assert torch.equal(model.get_parameter(name).grad, raw[name])  # never preconditioned
            assert not torch.equal(model.head.weight.grad, raw["head.weight"])  # the head is
    messages = [str(w.message) for w in caught if "torchdiffeq's own solver" in str(w.message)]
    assert len(messages) == 2 and {"'field.l1'" in m or "'field.l2'" in m for m in messages} == {True}
    assert all("snopt_dyn.wrap(model)" in m for m in messages)
    assert precond.layers()["field.l1"]["A"] is None and precond.factors().get("field.l1") is None
    assert precond.layers()["field.l1"]["role"] == "foreign" and precond.layers()["head"]["role"] == "static"


class Energy(nn.Module):
    """A torchdyn-HNN-style field: the value is the symplectic gradient of an energy network."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, t, x):
        with torch.enable_grad():
            x = x if x.requires_grad else x.detach().requires_grad_(True)
            dh = torch.autograd.grad(self.net(x).sum(), x, create_graph=torch.is_grad_enabled())[0]
        return torch.cat([dh[:, 1:], -dh[:, :1]], 1)


def test_energy_field_warning_says_what_is_true():
    torch.manual_seed(5)
    field = Energy().double()
    precond = snopt_dyn.SNOpt(field, num_samples=3)
    x = torch.randn(5, 2, dtype=torch.float64)
    out = snopt_dyn.odeint_adjoint(field, x, T01, method="rk4", options={"step_size": 0.25})
    out[-1].pow(2).mean().backward()
    raw = field.net[2].weight.grad.clone()
    with pytest.warns(UserWarning) as caught:
        precond.step()
    (msg,) = [str(w.message) for w in caught if "'net.2'" in str(w.message)]
    assert "solved by the engine" in msg and "does not reach the field's value" in msg
    assert "autograd_uses=True" in msg and "is its vector field solved" not in msg
    assert torch.equal(field.net[2].weight.grad, raw)
    assert precond.layers()["net.0"]["role"] == "ode" and precond.layers()["net.0"]["A"] is not None
    precond.remove()
    # with the fix the energy's last layer gets factors from the field's vector-Jacobian products
    precond = snopt_dyn.SNOpt(field, num_samples=3, autograd_uses=True)
    field.zero_grad()
    snopt_dyn.odeint_adjoint(field, x, T01, method="rk4", options={"step_size": 0.25})[-1].pow(2).mean().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        precond.step()
    assert precond.layers()["net.2"]["A"] == (9, 9) and precond.layers()["net.2"]["samples"] == 3
