"""Related methods as train_robust options: AdvProp auxiliary batch norm, CutMix, and the `variants`
that turn them into extra runs (rows) of the DAG. Known answers, on the CPU, at tiny scale."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline import aux_bn, checkpoint, losses, models
from pipeline import cutmix as cm
from pipeline import loader as loader_mod
from pipeline import params as P
from pipeline import train_robust as tr
from pipeline.losses import mixed_cross_entropy, smoothed_cross_entropy
from tests.helpers import robust_cfg

# --- auxiliary batch norm ---


def test_count_route_sends_each_row_through_its_own_batch_norm():
    """Route 4 on 8 rows: the 4 leading (real) rows through main, the rest (generated) through aux."""
    torch.manual_seed(0)
    dual = aux_bn.DualBatchNorm2d(nn.BatchNorm2d(3))
    reference_main, reference_aux = nn.BatchNorm2d(3), nn.BatchNorm2d(3)
    x = torch.randn(8, 3, 4, 4)
    x[4:] = x[4:] * 3 + 5                                   # the "generated" rows: another distribution
    with aux_bn.routed(dual, 4):
        out = dual(x)
    torch.testing.assert_close(out[:4], reference_main(x[:4]))
    torch.testing.assert_close(out[4:], reference_aux(x[4:]))
    # each set of running statistics saw only its own rows
    torch.testing.assert_close(dual.main.running_mean, reference_main.running_mean)
    torch.testing.assert_close(dual.aux.running_mean, reference_aux.running_mean)
    assert not torch.allclose(dual.main.running_mean, dual.aux.running_mean)
    assert dual.route is None                                # the route ends with the block
    with aux_bn.routed(dual, 9), pytest.raises(ValueError, match="leading rows"):
        dual(x)


def test_the_source_route_traces_without_a_graph_break():
    """torch.compile (dynamo) traces a source-routed forward as one graph: the route is a host-side count,
    not a mask whose .all()/.any()/.sum() are read back on every batch norm (a graph break and a device
    synchronisation each)."""
    model = aux_bn.convert(models.build("small_cnn")).train()
    x = torch.rand(8, 3, 32, 32)
    routes = aux_bn.routes_for("source", 5)
    assert routes is not None and all(isinstance(route, int) for route in routes)

    def forward(images: torch.Tensor) -> torch.Tensor:
        with aux_bn.routed(model, routes[0]):
            return model(images)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(forward)(x)
    assert explained.graph_break_count == 0, explained.break_reasons


def test_advprop_training_keeps_two_sets_of_statistics_and_infers_with_main(tiny_params, small_sets, tmp_path):
    cfg = robust_cfg(tiny_params, aux_bn="adversarial", attack_steps=2)
    model = aux_bn.convert(models.build("small_cnn"))
    result = tr.train_robust(cfg, 0, "cpu", "baseline", small_sets["train"], small_sets["val"], [], [],
                             tmp_path, progress=False)
    state = checkpoint.latest(tmp_path)["ema"]["model"]
    main_mean, aux_mean = state["body.1.main.running_mean"], state["body.1.aux.running_mean"]
    assert not torch.allclose(main_mean, aux_mean)          # clean and adversarial batches differ
    # the returned (saved) network is the plain architecture carrying the main batch norms only
    plain = result.ema_model
    assert not aux_bn.duals(plain) and set(plain.state_dict()) == set(models.build("small_cnn").state_dict())
    torch.testing.assert_close(plain.state_dict()["body.1.running_mean"], main_mean)
    model.load_state_dict(state)
    model.eval()
    x = torch.rand(4, 3, 32, 32)
    torch.testing.assert_close(model(x), plain.eval()(x))   # inference = main route
    with aux_bn.routed(model, "aux"):
        assert not torch.allclose(model(x), plain(x))
    best = models.build("small_cnn")
    best.load_state_dict(result.best_state)                 # best.pt loads into the registry model too


def test_source_mode_sends_generated_rows_through_aux(tiny_params, small_sets, generated, tmp_path):
    cfg = robust_cfg(tiny_params, aux_bn="source")
    tr.train_robust(cfg, 0, "cpu", "gaussian", small_sets["train"], small_sets["val"], [generated[0]],
                    [generated[1]], tmp_path, progress=False)
    state = checkpoint.latest(tmp_path)["model"]
    assert not torch.allclose(state["body.1.main.running_mean"], state["body.1.aux.running_mean"])
    assert state["body.1.aux.num_batches_tracked"] > 0


def test_routes_for_each_mode():
    assert aux_bn.routes_for("none", 1) is None
    assert aux_bn.routes_for("adversarial", 1) == ("main", "aux")
    assert aux_bn.routes_for("source", 1) == (1, 1)
    with pytest.raises(ValueError, match="aux_bn"):
        aux_bn.routes_for("both", 1)


def test_the_loader_puts_each_ranks_real_rows_first(small_sets, generated):
    """The source route's count is the rank's leading real rows of every batch (loader.MixedBatches)."""
    real = loader_mod.pool([small_sets["train"]])
    gen = loader_mod.pool([generated[0]], [generated[1]])
    for rank in range(3):
        batches = loader_mod.MixedBatches(real, gen, loader_mod.BatchSpec(16, 7, 0, rank, 3))
        for step in range(2):
            _, _, is_generated = batches[step]
            assert not is_generated[:batches.real_rows].any() and is_generated[batches.real_rows:].all()


# --- CutMix ---


def test_cutmix_label_weight_equals_the_pasted_area():
    n = 16
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 32, 32).clone()  # image i = value i
    y = torch.arange(n) % 10
    selected = torch.ones(n, dtype=torch.bool)
    selected[:4] = False                                       # rows 0..3 are not mixed
    mixed, mix = cm.cutmix(x, y, torch.zeros(n), selected, 1.0, np.random.default_rng(0), "per_row", 10)
    for i in range(n):
        pasted = (mixed[i, 0] != i).float().mean().item()     # share of pixels now from the partner
        partner = int(mixed[i, 0][mixed[i, 0] != i][0]) if pasted else i
        if not selected[i]:
            assert pasted == 0 and mix.lam[i] == 1
        elif partner != i:
            assert mix.lam[i].item() == pytest.approx(1 - pasted)
            assert mix.y_partner[i] == y[partner]
            assert 4 <= partner < n                            # partners come from selected rows only
    assert (mix.lam[4:] < 1).any()
    again, mix_again = cm.cutmix(x, y, torch.zeros(n), selected, 1.0, np.random.default_rng(0), "per_row", 10)
    assert torch.equal(again, mixed) and torch.equal(mix_again.lam, mix.lam)   # seeded: resume-safe
    assert len(set(mix.lam[4:].tolist())) > 1 and mix.attack_target is None   # a box per row, clean target


def test_the_reference_scheme_draws_one_box_per_batch_and_attacks_from_the_mixed_labels():
    """As the JAX reference (utils.py:130-167, experiment.py:271-275): every selected row gets the same box
    (so the same lam), and the TRADES attack's target is lam * y + (1 - lam) * y_partner (smoothed)."""
    n = 16
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 32, 32).clone()
    y, smoothing = torch.arange(n) % 10, torch.full((n,), 0.1)
    selected = torch.ones(n, dtype=torch.bool)
    selected[:4] = False
    mixed, mix = cm.cutmix(x, y, smoothing, selected, 1.0, np.random.default_rng(1), "reference", 10)
    pasted = [mask for mask in (mixed[i, 0] != i for i in range(4, n)) if mask.any()]   # rows with another partner
    assert len(pasted) > 1 and all(torch.equal(mask, pasted[0]) for mask in pasted)   # one box for the batch
    assert len(set(mix.lam[4:].tolist())) == 1 and (mix.lam[:4] == 1).all()
    lam = mix.lam.unsqueeze(1)
    expected = lam * cm.soft_labels(y, smoothing, 10) + (1 - lam) * cm.soft_labels(mix.y_partner, smoothing, 10)
    torch.testing.assert_close(mix.attack_target, expected)
    torch.testing.assert_close(mix.attack_target.sum(1), torch.ones(n))
    # the attack moves away from that target, not from the clean prediction
    torch.manual_seed(0)
    model = models.build("small_cnn").train()
    attack = tr.AttackSpec("linf", 8 / 255, 2 / 255, 2)
    images = torch.rand(n, 3, 32, 32)
    runs = [losses.trades_attack(model, images, attack, torch.Generator().manual_seed(0), target=target)
            for target in (None, mix.attack_target, None)]
    assert torch.equal(runs[0], runs[2]) and not torch.equal(runs[0], runs[1])


def test_a_label_attack_with_the_reference_cutmix_is_refused(tiny_params):
    robust = {**tiny_params["train_robust"], "loss": "pgd", "cutmix_alpha": 1.0, "cutmix_scheme": "reference"}
    with pytest.raises(P.ParamsError, match="train_robust.cutmix_scheme: reference"):
        P.validate({**tiny_params, "train_robust": robust})
    P.validate({**tiny_params, "train_robust": {**robust, "cutmix_scheme": "per_row"}})


def test_mixed_cross_entropy_weights_both_labels():
    logits, y, y_b = torch.randn(5, 10), torch.tensor([0, 1, 2, 3, 4]), torch.tensor([5, 6, 7, 8, 9])
    lam = torch.tensor([1.0, 0.5, 0.25, 0.0, 0.75])
    mix = cm.Mix(y_b, torch.zeros(5), lam)
    expected = (lam * F.cross_entropy(logits, y, reduction="none")
                + (1 - lam) * F.cross_entropy(logits, y_b, reduction="none")).mean()
    torch.testing.assert_close(mixed_cross_entropy(logits, y, 0.0, mix), expected)
    torch.testing.assert_close(mixed_cross_entropy(logits, y, 0.1), smoothed_cross_entropy(logits, y, 0.1))


def test_cutmix_selection_by_source():
    is_generated = torch.tensor([True, False, True])
    assert cm.selection("generated", is_generated).tolist() == [True, False, True]
    assert cm.selection("real", is_generated).tolist() == [False, True, False]
    assert cm.selection("both", is_generated).all()


def test_resume_with_cutmix_and_aux_bn_equals_uninterrupted(tiny_params, small_sets, generated, tmp_path):
    cfg = robust_cfg(tiny_params, checkpoint_every=1, cutmix_alpha=1.0, aux_bn="adversarial")

    def run(workdir, stop_after=None):
        return tr.train_robust(cfg, 0, "cpu", "gaussian-cutmix", small_sets["train"], small_sets["val"],
                               [generated[0]], [generated[1]], workdir, stop_after=stop_after, progress=False,
                               entry=P.Run("gaussian-cutmix", "gaussian", "cutmix", None, 0))

    whole = run(tmp_path / "whole")
    with pytest.raises(tr.Preempted):
        run(tmp_path / "cut", stop_after=3)
    resumed = run(tmp_path / "cut")
    a, b = whole.ema_model.state_dict(), resumed.ema_model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert whole.metrics.variant == "cutmix" and whole.metrics.generator == "gaussian"


# --- variants: extra runs of the DAG ---


def test_variants_add_runs_with_their_settings(tiny_params):
    tiny_params["variants"]["names"] = ["advprop", "cutmix"]
    cfg = P.validate(tiny_params)
    assert P.runs(cfg) == ["baseline", "gaussian", "baseline-advprop", "gaussian-advprop", "baseline-cutmix",
                           "gaussian-cutmix"]
    assert P.get_run(cfg, "gaussian-cutmix") == P.Run("gaussian-cutmix", "gaussian", "cutmix", None, 0)
    assert P.get_run(cfg, "baseline") == P.Run("baseline", None, None, None, 0)
    assert P.train_robust_for(cfg, "gaussian-advprop")["aux_bn"] == "adversarial"
    assert P.train_robust_for(cfg, "gaussian")["aux_bn"] == "none"
    with pytest.raises(P.ParamsError, match="variants.names"):
        P.train_robust_for(cfg, "gaussian-source_bn")          # settings defined but not listed


@pytest.mark.parametrize("change, fragment", [
    (lambda v: v["names"].append("missing"), "variants.settings: no entry for listed variant 'missing'"),
    (lambda v: v["settings"].update(bad={"nope": 1}), "variants.settings.bad: unknown train_robust keys"),
    (lambda v: v["settings"].update(bad={"aux_bn": "sometimes"}),
     "(?s)variants.settings.bad: .*variants.settings.bad.aux_bn"),
    (lambda v: v["names"].append("Has-Dash"), "variants.names"),
])
def test_bad_variants_are_named(tiny_params, change, fragment):
    change(tiny_params["variants"])
    with pytest.raises(P.ParamsError, match=fragment):
        P.validate(tiny_params)
