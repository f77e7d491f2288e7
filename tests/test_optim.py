"""APT optimizers: equivalence with torch where APT reduces to it, golden values, round trips."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from apt_hf.optim import (
    APTAdamW,
    APTMuon,
    Muon,
    adjusted_lr,
    beta_from_cos,
    build_optimizer,
    cosine,
    direction_preservation,
    split_parameters,
    zeropower_via_newtonschulz,
)


def _params(shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=gen).requires_grad_() for s in shapes]


def _clone(params):
    return [p.detach().clone().requires_grad_() for p in params]


def _run_pair(opt_a, params_a, opt_b, params_b, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for pa, pb in zip(params_a, params_b, strict=True):
            g = torch.randn(pa.shape, generator=gen)
            pa.grad, pb.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()


# ---------------------------------------------------------------- equivalence with torch
@pytest.mark.parametrize("apt", [True, False])
def test_aptadamw_equals_torch_adamw_when_beta_fixed(apt):
    shapes = [(16, 8), (8,), (4, 3, 3, 3)]
    ours, ref = _params(shapes), None
    ref = _clone(ours)
    opt = APTAdamW(
        [{"params": ours[:2]}, {"params": ours[2:], "weight_decay": 0.0}],
        lr=3e-3,
        betas=(0.9, 0.99),
        weight_decay=0.1,
        apt=apt,
        beta_min=0.9,
    )
    tref = torch.optim.AdamW(
        [{"params": ref[:2]}, {"params": ref[2:], "weight_decay": 0.0}],
        lr=3e-3,
        betas=(0.9, 0.99),
        weight_decay=0.1,
    )
    _run_pair(opt, ours, tref, ref, steps=150)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        sa, sb = opt.state[a], tref.state[b]
        torch.testing.assert_close(sa["exp_avg"], sb["exp_avg"], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(sa["exp_avg_sq"], sb["exp_avg_sq"])


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("cls", ["muon", "aptmuon"])
def test_muon_bit_identical_to_torch_muon_on_2d(cls, nesterov):
    ours = _params([(16, 8), (8, 32), (12, 12)])
    ref = _clone(ours)
    kw = {"lr": 1e-2, "momentum": 0.9, "weight_decay": 0.1, "nesterov": nesterov}
    if cls == "muon":
        opt = Muon(ours, ns_dtype="bfloat16", **kw)
    else:
        opt = APTMuon(ours, ns_dtype="bfloat16", beta_min=0.9, direction_preservation="none", **kw)
    tref = torch.optim.Muon(ref, adjust_lr_fn="original", **kw)
    _run_pair(opt, ours, tref, ref, steps=30)
    for a, b in zip(ours, ref, strict=True):
        assert torch.equal(a, b)
        assert torch.equal(opt.state[a]["momentum_buffer"], tref.state[b]["momentum_buffer"])


def test_muon_match_rms_adamw_equals_torch():
    ours = _params([(16, 8)])
    ref = _clone(ours)
    opt = Muon(ours, lr=1e-2, adjust_lr="match_rms_adamw", ns_dtype="bfloat16")
    tref = torch.optim.Muon(ref, lr=1e-2, weight_decay=0.0, adjust_lr_fn="match_rms_adamw")
    _run_pair(opt, ours, tref, ref, steps=5)
    assert torch.equal(ours[0], ref[0])


def test_conv_weight_goes_through_muon_flattened():
    (w,) = _params([(8, 4, 3, 3)])
    w0 = w.detach().clone()
    g = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(3))
    for adjust in ("original", "match_rms_adamw"):
        p = w0.clone().requires_grad_()
        opt = Muon([p], lr=0.1, momentum=0.9, nesterov=False, adjust_lr=adjust, ns_dtype="float32")
        p.grad = g.clone()
        opt.step()
        u = (0.1 * g).reshape(8, 36)  # EMA buffer after one step: (1 - 0.9) g
        expected = w0 - adjusted_lr(0.1, adjust, 8, 36) * zeropower_via_newtonschulz(
            u, dtype=torch.float32
        ).reshape(8, 4, 3, 3)
        torch.testing.assert_close(p.detach(), expected)
    assert adjusted_lr(1.0, "original", 8, 36) == 1.0
    assert adjusted_lr(1.0, "original", 36, 8) == pytest.approx(math.sqrt(36 / 8))
    assert adjusted_lr(1.0, "match_rms_adamw", 8, 36) == pytest.approx(1.2)


def test_newton_schulz_orthogonalises():
    g = torch.randn(32, 16, generator=torch.Generator().manual_seed(0))
    o = zeropower_via_newtonschulz(g, dtype=torch.float32)
    s = torch.linalg.svdvals(o)
    assert o.shape == g.shape
    assert s.min() > 0.5 and s.max() < 1.3  # the quintic's band around 1


# ---------------------------------------------------------------- golden values
def test_golden_cosine_and_beta_maps():
    g, m = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])
    c = cosine(g @ m, g @ g, m @ m, 0.0)
    assert c.item() == pytest.approx(1 / math.sqrt(2), abs=1e-7)
    assert beta_from_cos(c, 0.5, 0.9, "linear").item() == pytest.approx(
        0.5 + 0.4 * 0.8535534, abs=1e-6
    )
    assert beta_from_cos(c, 0.5, 0.9, "relu").item() == pytest.approx(0.7828427, abs=1e-6)
    neg = torch.tensor(-0.5)
    assert beta_from_cos(neg, 0.5, 0.9, "linear").item() == pytest.approx(0.6)
    assert beta_from_cos(neg, 0.5, 0.9, "relu").item() == pytest.approx(0.5)
    # c_1 := 1 while the moment is zero
    assert cosine(torch.tensor(0.0), torch.tensor(1.0), torch.tensor(0.0), 1e-8).item() == 1.0


def _hand_adamw_two_steps(beta_map, lr=0.1, beta_min=0.5, beta_max=0.9, beta2=0.999, eps=1e-8):
    """The spec's equations with Python floats: g1 = [1, 1], g2 = [1, 0]."""
    s = (lambda c: (1 + c) / 2) if beta_map == "linear" else (lambda c: max(c, 0.0))
    theta, m, v, P = [0.0, 0.0], [0.0, 0.0], [0.0, 0.0], 1.0
    record = []
    for t, g in enumerate(([1.0, 1.0], [1.0, 0.0]), start=1):
        mn = math.sqrt(sum(x * x for x in m))
        c = (
            1.0
            if mn == 0
            else sum(a * b for a, b in zip(g, m, strict=False))
            / (math.sqrt(sum(x * x for x in g)) * mn + 1e-8)
        )
        beta = beta_min + (beta_max - beta_min) * s(c)
        m = [beta * a + (1 - beta) * b for a, b in zip(m, g, strict=False)]
        v = [beta2 * a + (1 - beta2) * b * b for a, b in zip(v, g, strict=False)]
        P *= beta
        theta = [
            th - lr * (mi / (1 - P)) / (math.sqrt(vi / (1 - beta2**t)) + eps)
            for th, mi, vi in zip(theta, m, v, strict=True)
        ]
        record.append((c, beta, P))
    return theta, m, record


@pytest.mark.parametrize("beta_map", ["linear", "relu"])
def test_golden_full_apt_adamw_step(beta_map):
    theta, m, record = _hand_adamw_two_steps(beta_map)
    # hard-coded golden numbers for step 2 (c = 1/sqrt(2))
    assert record[1][0] == pytest.approx(0.70710678, abs=1e-7)
    expected_beta = {"linear": 0.84142136, "relu": 0.78284271}[beta_map]
    assert record[1][1] == pytest.approx(expected_beta, abs=1e-7)
    assert record[1][2] == pytest.approx(0.9 * expected_beta, abs=1e-7)

    p = torch.zeros(2, requires_grad=True)
    opt = APTAdamW(
        [p], lr=0.1, betas=(0.9, 0.999), weight_decay=0.0, beta_min=0.5, beta_map=beta_map
    )
    for g in ([1.0, 1.0], [1.0, 0.0]):
        p.grad = torch.tensor(g)
        opt.step()
    st = opt.state[p]
    assert st["bias_prod"].item() == pytest.approx(record[1][2], rel=1e-6)
    torch.testing.assert_close(st["exp_avg"], torch.tensor(m), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(p.detach(), torch.tensor(theta), rtol=1e-5, atol=1e-6)
    diag = opt.diagnostics()
    assert diag["beta_mean"] == pytest.approx(expected_beta, abs=1e-6)
    assert diag["cos_mean"] == pytest.approx(0.70710678, abs=1e-6)
    # instant share = (1 - beta) ||g2|| / ||m2||
    share = (1 - expected_beta) * 1.0 / math.sqrt(sum(x * x for x in m))
    assert diag["instant_share"] == pytest.approx(share, rel=1e-5)


def test_golden_global_granularity():
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    opt = APTMuon(
        [{"params": [a, b], "algorithm": "adamw"}],
        beta_min=0.5,
        beta_max=0.9,
        granularity="global",
        adamw_beta_min=0.5,
    )
    a.grad, b.grad = torch.tensor([1.0, 1.0]), torch.tensor([0.0, -1.0])
    opt.step()  # m_a = 0.1 [1, 1], m_b = 0.1 [0, -1]
    a.grad, b.grad = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    opt.step()
    # global c = (0.1 - 0.1) / (sqrt(2) * sqrt(0.03)) = 0 -> linear beta = 0.7 for both tensors
    diag = opt.diagnostics()
    assert diag["cos_mean"] == pytest.approx(0.0, abs=1e-7)
    assert diag["beta_mean"] == pytest.approx(0.7, abs=1e-6)
    assert opt.state[a]["bias_prod"].item() == pytest.approx(0.9 * 0.7, rel=1e-6)


def test_golden_apt_muon_step_tensor_granularity():
    w = torch.zeros(2, 2, requires_grad=True)
    opt = APTMuon(
        [w], lr=0.1, momentum=0.9, beta_min=0.5, direction_preservation="none", ns_dtype="float32"
    )
    w.grad = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    opt.step()
    buf1 = opt.state[w]["momentum_buffer"].clone()
    torch.testing.assert_close(buf1, 0.1 * w.grad)  # c_1 = 1 -> beta = beta_max = 0.9
    before = w.detach().clone()
    g2 = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    w.grad = g2
    opt.step()
    beta = 0.5 + 0.4 * (1 + 1 / math.sqrt(2)) / 2
    buf2 = beta * buf1 + (1 - beta) * g2
    torch.testing.assert_close(opt.state[w]["momentum_buffer"], buf2)
    u = beta * buf2 + (1 - beta) * g2
    expected = before - 0.1 * zeropower_via_newtonschulz(u, dtype=torch.float32)
    torch.testing.assert_close(w.detach(), expected)


# ---------------------------------------------------------------- direction preservation
def test_direction_preservation_variants():
    u = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    g = torch.tensor([[0.0, 2.0], [0.0, 0.0]])
    assert torch.equal(direction_preservation(u, g, "none", 0.5), u)
    torch.testing.assert_close(
        direction_preservation(u, g, "row", 0.5, eps=0.0), torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    )
    un = u / math.sqrt(29.0)
    torch.testing.assert_close(
        direction_preservation(u, g, "instant", 0.5, eps=0.0),
        un + 0.5 * torch.tensor([[0.0, 1.0], [0.0, 0.0]]),
    )
    with pytest.raises(ValueError, match="direction_preservation"):
        direction_preservation(u, g, "bogus", 0.5)


@pytest.mark.parametrize("dp", ["row", "instant"])
def test_apt_muon_applies_direction_preservation(dp):
    w = torch.zeros(3, 4, requires_grad=True)
    g = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    opt = APTMuon(
        [w], lr=0.1, beta_min=0.5, direction_preservation=dp, dp_gamma=0.7, ns_dtype="float32"
    )
    w.grad = g
    opt.step()
    u = 0.95 * (0.05 * g) + 0.05 * g  # c_1 = 1 -> beta = 0.95, nesterov
    expected = -0.1 * zeropower_via_newtonschulz(
        direction_preservation(u, g, dp, 0.7), dtype=torch.float32
    )
    torch.testing.assert_close(w.detach(), expected)


# ---------------------------------------------------------------- state, grads, diagnostics
def _tiny_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 16),
        nn.LayerNorm(16),
        nn.Linear(16, 8),
        nn.Linear(8, 3),
    )


def _train(model, opt, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(5, 1, 8, 8, generator=gen)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


@pytest.mark.parametrize("kind", ["adamw", "muon"])
def test_state_dict_round_trip_resumes_bit_identically(kind):
    ref = _tiny_net()
    opt_ref = build_optimizer(ref, kind, heads=["6"], lr=1e-2, beta_min=0.6)
    _train(ref, opt_ref, 4, seed=0)

    half = _tiny_net()
    opt_half = build_optimizer(half, kind, heads=["6"], lr=1e-2, beta_min=0.6)
    _train(half, opt_half, 2, seed=0)
    buf = io.BytesIO()
    torch.save({"model": half.state_dict(), "opt": opt_half.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)

    resumed = _tiny_net()
    resumed.load_state_dict(ckpt["model"])
    opt_res = build_optimizer(resumed, kind, heads=["6"], lr=1e-2, beta_min=0.6)
    opt_res.load_state_dict(ckpt["opt"])
    # the groups are still the live dicts that hold the model's parameters
    assert {id(p) for g in opt_res.param_groups for p in g["params"]} == {
        id(p) for p in resumed.parameters()
    }
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):  # replay the data stream of the first half
        torch.randn(5, 1, 8, 8, generator=gen)
    for _ in range(2):
        x = torch.randn(5, 1, 8, 8, generator=gen)
        opt_res.zero_grad()
        resumed(x).square().mean().backward()
        opt_res.step()
    for a, b in zip(ref.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    for pa, pb in zip(ref.parameters(), resumed.parameters(), strict=True):
        sa, sb = opt_ref.state[pa], opt_res.state[pb]
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key


def test_optimizer_does_not_modify_grads_in_place():
    model = _tiny_net()
    opt = build_optimizer(
        model, "muon", heads=["6"], direction_preservation="row", update_cos_every=1
    )
    model(torch.randn(2, 1, 8, 8)).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, grads[n]), n


def test_diagnostics_fixed_beta_instant_share_is_one_minus_beta():
    p = torch.zeros(4, requires_grad=True)
    opt = APTAdamW([p], lr=1e-3, beta_min=0.9, update_cos_every=1)  # apt on, beta fixed at 0.9
    for _ in range(60):
        p.grad = torch.ones(4)
        opt.step()
    d = opt.diagnostics()
    assert d["beta_mean"] == pytest.approx(0.9) and d["beta_min_seen"] == pytest.approx(0.9)
    assert d["cos_mean"] == pytest.approx(1.0, abs=1e-5)
    assert d["instant_share"] == pytest.approx(0.1 / (1 - 0.9**60), rel=1e-4)
    assert d["update_cos"] == pytest.approx(1.0, abs=1e-5)


def test_apt_lowers_beta_when_gradient_flips():
    p = torch.zeros(4, requires_grad=True)
    opt = APTAdamW([p], lr=1e-3, beta_min=0.5)
    p.grad = torch.ones(4)
    opt.step()
    p.grad = -torch.ones(4)
    opt.step()
    assert opt.diagnostics()["beta_mean"] == pytest.approx(0.5)  # c = -1 -> beta_min


def test_no_apt_group_reports_no_diagnostics():
    p = torch.zeros(4, requires_grad=True)
    opt = APTAdamW([p], apt=False)
    p.grad = torch.ones(4)
    opt.step()
    assert opt.diagnostics() == {}


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": -1.0}, r"lr=-1.0"),
        ({"betas": (1.0, 0.999)}, r"betas\[0\]=1.0"),
        ({"beta_min": 0.95}, r"beta_min=0.95 .*\[0.0, 0.9\]"),
        ({"beta_max": 1.5}, r"beta_max=1.5"),
        ({"beta_map": "tanh"}, r"beta_map='tanh'.*linear"),
        ({"granularity": "layer"}, r"granularity='layer'.*global"),
        ({"weight_decay": -0.1}, r"weight_decay"),
        ({"eps": -1.0}, r"eps=-1.0"),
    ],
)
def test_adamw_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        APTAdamW([torch.zeros(2, requires_grad=True)], **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"momentum": 1.0}, r"momentum=1.0"),
        ({"ns_steps": 0}, r"ns_steps=0"),
        ({"adjust_lr": "x"}, r"adjust_lr='x'.*match_rms_adamw"),
        ({"direction_preservation": "col"}, r"direction_preservation='col'.*instant"),
        ({"dp_gamma": -1.0}, r"dp_gamma=-1.0"),
        ({"ns_dtype": "float16"}, r"ns_dtype='float16'"),
        ({"update_cos_every": -1}, r"update_cos_every"),
    ],
)
def test_muon_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        APTMuon([torch.zeros(2, 2, requires_grad=True)], **kwargs)


def test_muon_rejects_vectors_with_a_hint():
    with pytest.raises(ValueError, match="algorithm='adamw'"):
        Muon([torch.zeros(3, requires_grad=True)])


# ---------------------------------------------------------------- parameter split
def test_split_parameters_standard_muon_split_and_trainer_decay_rule():
    from transformers import BertConfig, BertModel, Trainer

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    model = nn.ModuleDict(
        {"encoder": BertModel(cfg), "head_a": nn.Linear(16, 3), "head_b": nn.Linear(16, 1)}
    )
    split = split_parameters(model, heads=["head_a", model["head_b"]])
    assert set(split.heads) == {"head_a.weight", "head_a.bias", "head_b.weight", "head_b.bias"}
    assert all(n.endswith(".weight") and (".layer." in n or ".pooler." in n) for n in split.muon)
    assert len(split.muon) == 2 * 6 + 1  # q, k, v, attn-out, intermediate, output per layer; pooler
    assert "encoder.embeddings.word_embeddings.weight" in split.adamw_decay
    assert set(split.shared) | set(split.heads) == {n for n, _ in model.named_parameters()}
    ours_decay = set(split.muon) | set(split.adamw_decay) | set(split.head_decay)
    assert ours_decay == set(Trainer.get_decay_parameter_names(None, model))


def test_split_first_conv_goes_to_adamw_and_conv_weights_to_muon():
    model = _tiny_net()
    split = split_parameters(model, heads=["6"])
    assert "0.weight" in split.adamw_decay  # the stem conv
    assert split.muon == ["3.weight", "5.weight"]
    assert split.head_decay == ["6.weight"] and split.head_no_decay == ["6.bias"]
    with pytest.raises(ValueError, match="'nope' names no parameter"):
        split_parameters(model, heads=["nope"])


def test_build_optimizer_groups_scheduler_and_clipping():
    model = _tiny_net()
    extra = nn.Parameter(torch.zeros(2))
    opt = build_optimizer(model, "muon", heads=["6"], lr=0.02, adamw_lr=1e-3, extra_params=[extra])
    names = [g["name"] for g in opt.param_groups]
    assert names == [
        "muon",
        "adamw_decay",
        "adamw_no_decay",
        "heads_decay",
        "heads_no_decay",
        "extra",
    ]
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name["muon"]["algorithm"] == "muon" and by_name["muon"]["lr"] == 0.02
    assert by_name["adamw_decay"]["lr"] == 1e-3 and by_name["adamw_no_decay"]["weight_decay"] == 0
    assert by_name["heads_decay"]["apt"] is False and by_name["muon"]["apt"] is True
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    assert by_name["muon"]["lr"] == 0.01 and by_name["adamw_decay"]["lr"] == 5e-4
    model(torch.randn(2, 1, 8, 8)).sum().backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    adamw = build_optimizer(model, "adamw", heads=["6"], apt_scope="all", weight_decay=0.05)
    assert [g["name"] for g in adamw.param_groups] == [
        "adamw_decay",
        "adamw_no_decay",
        "heads_decay",
        "heads_no_decay",
    ]
    assert all(g["apt"] for g in adamw.param_groups)
    assert adamw.param_groups[0]["weight_decay"] == 0.05
    with pytest.raises(ValueError, match="optimizer='sgd'"):
        build_optimizer(model, "sgd")
