"""STAT's quality options on tiny models: the ridge and its held-out choice, greedy heads, the
intercept; and their bad values, one line with exit code 2."""
from __future__ import annotations

import re

import pytest
import torch

from stat_exp.calibrate import LayerStream
from stat_exp.config.signature import check_node
from stat_exp.errors import ConfigError, UserError
from stat_exp.factorize import GramBackend
from stat_exp.factorize.base import Factorization, pivoted_cholesky
from stat_exp.models import get_adapter
from stat_exp.prune.budget import BudgetSpec, LayerPlan
from stat_exp.prune.correction import error_curve, ridged_cholesky
from stat_exp.prune.head_selection import corrected_error
from stat_exp.prune.runner import PruneRunner
from stat_exp.prune.stat import RIDGES, NeuronFold, StatPruner
from stat_exp.prune.surgery import head_channels
from tests.jobs import run_cli
from tests.tiny import batches, clone, tiny_llama

CPU = torch.device("cpu")


def correlated(n: int, m: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(m, m, generator=g, dtype=torch.float64)
    return torch.randn(n, m, generator=g, dtype=torch.float64) @ mixing + 0.5


def scored(model, pruner, data=None):
    """Every layer's (scores, stats) of one dense stream, as the runner computes them."""
    adapter = get_adapter(model)
    make = pruner.accumulator(GramBackend(block_dtype="float64"))
    stream = LayerStream(model, adapter, data or batches(), CPU, "dense", make, progress=False,
                         moments=pruner.requirements.moments)
    return [(pruner.score(adapter, i, layer, stats), stats) for i, layer, stats in stream]


def module_inputs(model, pick, data, layer: int = 0) -> list[torch.Tensor]:
    """Per batch, the real-token inputs of one projection of a layer (float64)."""
    module = pick(get_adapter(model), get_adapter(model).layers()[layer])
    seen = []
    handle = module.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().double()))
    with torch.no_grad():
        for b in data:
            model(**b)
    handle.remove()
    return [x.reshape(-1, x.shape[-1])[b["attention_mask"].bool().reshape(-1)] for x, b in zip(seen, data)]


@pytest.mark.parametrize("ridge", [0.0, 0.3])
def test_held_out_error_curve_is_the_error_of_a_direct_fit(ridge):
    """error_curve(R of the fit Gram, V, held-out Gram)[k] = ||(Z_r - Z_k T) V_r^T||^2 on held-out rows."""
    fit, held = correlated(300, 12, 0), correlated(90, 12, 1)
    V = torch.randn(5, 12, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    G = fit.T @ fit
    curve = error_curve(ridged_cholesky(G, ridge), V, held.T @ held)
    for k in (0, 4, 11, 12):
        Gkk = G[:k, :k] + ridge * torch.diag(G.diagonal()[:k])
        T = torch.linalg.solve(Gkk, G[:k, k:]) if k else torch.zeros(0, 12, dtype=torch.float64)
        direct = ((held[:, k:] - held[:, :k] @ T) @ V[:, k:].T).square().sum()
        assert float(curve[k]) == pytest.approx(float(direct), rel=1e-6, abs=1e-9)


def test_a_gram_of_fewer_tokens_than_units_is_lifted_from_the_singular_jitter():
    """Said to have fewer tokens than units (so singular), a Gram skips the lifts below
    SINGULAR_JITTER, each a whole failed factorization on a 7B's FFN; with enough tokens, or a
    ridge, the ladder starts at JITTER as before. Kills: `tokens` ignored, or applied to full-rank Grams."""
    from stat_exp.prune.correction import JITTER, SINGULAR_JITTER

    def lift(R: torch.Tensor, G: torch.Tensor, ridge: float = 0.0) -> float:
        """The diagonal lift R^T R adds beyond G + ridge diag(G), relative to G's mean diagonal."""
        return float((R.T @ R - G - ridge * torch.diag(G.diagonal())).diagonal().mean() / G.diagonal().mean())

    Z, full = correlated(5, 12, 4), correlated(40, 12, 5)
    G, F = Z.T @ Z, full.T @ full
    assert lift(ridged_cholesky(G, tokens=5), G) == pytest.approx(SINGULAR_JITTER, rel=1e-3)
    assert lift(ridged_cholesky(G), G) < SINGULAR_JITTER / 10  # a smaller lift factors it: the ladder from JITTER
    assert lift(ridged_cholesky(F, tokens=40), F) == pytest.approx(JITTER, rel=1e-2)
    assert lift(ridged_cholesky(G, 0.3, tokens=5), G, 0.3) == pytest.approx(JITTER, rel=1e-2)


def test_ridge_at_zero_strength_is_todays_fold():
    """The fold the ridge path factors (unpivoted, in the pivot order) is the pivoted factor's."""
    Z = correlated(400, 16, 3)
    w = torch.linspace(0.5, 2.0, 16, dtype=torch.float64)
    Gw = (Z.T @ Z) * w[:, None] * w[None, :]
    perm, R = pivoted_cholesky(Gw)
    today = Factorization(perm=perm, R=R, weights=w)
    fold = NeuronFold(perm, w, Gw[perm][:, perm], [0.0] * 17, None)
    for k in (1, 7, 15):
        torch.testing.assert_close(fold.correction(k), today.correction(k), rtol=1e-7, atol=1e-9)


def test_pruned_model_with_a_vanishing_ridge_matches_todays():
    base = tiny_llama()
    spec = BudgetSpec(flops=0.6, seq_len=32)
    models = []
    for pruner in (StatPruner(), StatPruner(ridge=1e-12)):
        model = clone(base)
        PruneRunner(pruner, spec, GramBackend(block_dtype="float64"), progress=False).run(
            model, get_adapter(model), batches(), CPU)
        models.append(model)
    x = batches(1, seed=5)[0]
    assert get_adapter(models[0]).structure() == get_adapter(models[1]).structure()
    torch.testing.assert_close(models[1](**x).logits, models[0](**x).logits, rtol=1e-4, atol=1e-4)


def test_a_strong_ridge_shrinks_the_fold_to_plain_slicing():
    model = tiny_llama(layers=1)
    pruner = StatPruner(ridge=1e9)
    [(sc, stats)] = scored(model, pruner)
    adapter = get_adapter(model)
    down = adapter.ffn(adapter.layers()[0]).down
    dense = down.weight.detach().clone()
    pruner.apply(adapter, 0, adapter.layers()[0], sc, LayerPlan(len(sc.attn_levels) - 1, 64), stats)
    torch.testing.assert_close(down.weight, dense[:, sc.ffn_order[:64]], rtol=1e-5, atol=1e-6)


def test_auto_ridge_prices_every_count_by_its_best_held_out_error():
    """With ridge=auto and held-out costs, ffn_cost[k] x the energy scale is the smallest, over
    RIDGES, held-out error of the fold fitted on the other batches (every fourth batch is held out)."""
    model = tiny_llama(layers=1, ffn=48)
    data = batches(n=8, batch=2, seq=24)
    [(sc, stats)] = scored(model, StatPruner(ridge="auto", costs="held_out"), data)
    Z = module_inputs(model, lambda a, l: a.ffn(l).down, data)
    fit, held = torch.cat([z for i, z in enumerate(Z) if i % 4 != 3]), torch.cat(Z[3::4])
    W = get_adapter(model).ffn(get_adapter(model).layers()[0]).down.weight.detach().double()
    fold = sc.heavy.ffn
    p, w = fold.perm, fold.weights
    n, n_held = sum(len(z) for z in Z), len(held)
    for k in (8, 30, 47):
        errors = []
        for ridge in RIDGES:
            A = fit[:, p] * w[p]
            G = A.T @ A
            T = torch.linalg.solve(G[:k, :k] + ridge * torch.diag(G.diagonal()[:k]), G[:k, k:])
            H = held[:, p] * w[p]
            errors.append(float((((H[:, k:] - H[:, :k] @ T) / w[p][k:]) @ W[:, p][:, k:].T).square().sum()))
        assert sc.ffn_cost[k] * stats.typical_energy == pytest.approx(min(errors) * n / n_held, rel=1e-4)


def test_greedy_heads_never_pay_more_than_pivoting_and_find_a_redundant_head():
    """Head 1 repeats head 0 (same queries, same KV group), with a large output weight: pivoting on
    whole-head contributions keeps it, but once corrected it costs nothing to remove."""
    model = tiny_llama(heads=8, kv_heads=2, layers=1)
    attn = get_adapter(model).attention(get_adapter(model).layers()[0])
    with torch.no_grad():
        attn.q.weight[8:16] = attn.q.weight[0:8]
        attn.o.weight[:, 8:16] *= 6.0
    [(pivot, _)] = scored(model, StatPruner(ridge=1e-12))
    [(greedy, stats)] = scored(model, StatPruner(heads="greedy"))
    assert all(g <= p * (1 + 1e-9) + 1e-12 for g, p in zip(greedy.attn_cost, pivot.attn_cost))
    assert any(g < 0.5 * p for g, p in zip(greedy.attn_cost, pivot.attn_cost))
    X = torch.cat(module_inputs(model, lambda a, l: a.attention(l).o, batches()))
    W = attn.o.weight.detach().double()
    for level, cost in zip(greedy.attn_levels, greedy.attn_cost):  # each cost is the error actually paid
        kept = head_channels(level.heads, 8)
        removed = head_channels(sorted(set(range(8)) - set(level.heads)), 8)
        assert cost * stats.typical_energy == pytest.approx(corrected_error(X.T @ X, W, kept, removed), rel=1e-6,
                                                           abs=1e-9)


def test_intercept_keeps_the_mean_output_and_lowers_the_error():
    base = tiny_llama(layers=1)
    X = torch.cat(module_inputs(base, lambda a, l: a.ffn(l).down, batches()))
    dense = get_adapter(base).ffn(get_adapter(base).layers()[0]).down
    Y = X @ dense.weight.detach().double().T
    errors = {}
    for intercept in (False, True):
        model = clone(base)
        pruner = StatPruner(intercept=intercept, ridge=1e-12)
        [(sc, stats)] = scored(model, pruner)
        adapter = get_adapter(model)
        pruner.apply(adapter, 0, adapter.layers()[0], sc, LayerPlan(len(sc.attn_levels) - 1, 40), stats)
        down = adapter.ffn(adapter.layers()[0]).down
        out = X[:, sc.ffn_order[:40]] @ down.weight.detach().double().T
        if intercept:
            out = out + down.bias.detach().double()
            torch.testing.assert_close(out.mean(0), Y.mean(0), rtol=1e-5, atol=1e-6)
        errors[intercept] = float((out - Y).square().sum())
    assert errors[True] < errors[False]


@pytest.mark.parametrize("kwargs,message", [
    ({"ridge": -1.0}, "pruner.ridge=-1.0; must be greater than or equal to 0 or one of: auto"),
    ({"validation": 1.5}, "pruner.validation=1.5; must be less than 1"),
    ({"heads": "best"}, "pruner.heads='best'; allowed: pivot, greedy"),
])
def test_bad_options_are_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_node("pruner", {"_target_": "stat_exp.prune.stat.StatPruner", **kwargs})


def test_a_split_without_held_out_batches_is_one_line():
    model = tiny_llama(layers=1)
    with pytest.raises(UserError, match="pruner.validation=0.25 leaves no calibration batches to hold out"):
        PruneRunner(StatPruner(ridge="auto"), BudgetSpec(0.7, 32), GramBackend(), progress=False).run(
            model, get_adapter(model), batches(n=2), CPU)


@pytest.mark.parametrize("args,message", [
    (["pruner.ridge=-1"], "pruner.ridge=-1; must be greater than or equal to 0 or one of: auto"),
    (["pruner.validation=1.5"], "pruner.validation=1.5; must be less than 1"),
    (["calib.num_examples=1", "budget.flops=0.9"], "calibration has 32 tokens"),
])
def test_bad_stat_input_exits_2_with_one_line(tiny_job, tmp_path, args, message):
    proc = run_cli(tiny_job.args(f"hydra.run.dir={tmp_path / 'run'}", "pruner=stat", *args), tmp_path)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and message in errors[0], proc.stderr[-3000:]


def test_compensation_keeping_everything_changes_nothing():
    """With every unit kept, the pruned model's inputs are the dense ones at every block, so the
    corrections fitted to the dense outputs reproduce the dense weights."""
    model = tiny_llama()
    x = batches(1, seed=5)[0]
    ref = model(**x).logits
    out = PruneRunner(StatPruner(compensate=True), BudgetSpec(flops=1.0, seq_len=32), GramBackend(block_dtype="float64"),
                      progress=False).run(model, get_adapter(model), batches(), CPU)
    assert out.achieved["flops_fraction"] == 1.0
    torch.testing.assert_close(model(**x).logits, ref, rtol=1e-4, atol=1e-4)


def test_compensation_fits_the_dense_outputs_on_the_pruned_inputs():
    """Block 1's FFN is refitted so that, on the inputs the pruned block 0 produces, its output is
    the least-squares fit of the dense model's block-1 FFN output."""
    base = tiny_llama(layers=2)
    dense_z = torch.cat(module_inputs(base, lambda a, l: a.ffn(l).down, batches(), layer=1))
    model = clone(base)
    PruneRunner(StatPruner(compensate=True), BudgetSpec(flops=0.5, seq_len=32, allocation="uniform"),
                GramBackend(block_dtype="float64"), progress=False).run(model, get_adapter(model), batches(), CPU)
    W = get_adapter(base).ffn(get_adapter(base).layers()[1]).down.weight.detach().double()
    down = get_adapter(model).ffn(get_adapter(model).layers()[1]).down
    pruned_z = torch.cat(module_inputs(model, lambda a, l: a.ffn(l).down, batches(), layer=1))
    target = dense_z @ W.T
    fitted = pruned_z @ down.weight.detach().double().T
    best = pruned_z @ torch.linalg.lstsq(pruned_z, target).solution
    # the stream fitted on block 1's inputs before block 1's own attention was pruned, so compare
    # with what the dense model's FFN gives on the same pruned inputs: the refit is closer to target
    plain = clone(base)
    PruneRunner(StatPruner(), BudgetSpec(flops=0.5, seq_len=32, allocation="uniform"), GramBackend(block_dtype="float64"),
                propagate="pruned", progress=False).run(plain, get_adapter(plain), batches(), CPU)
    plain_z = torch.cat(module_inputs(plain, lambda a, l: a.ffn(l).down, batches(), layer=1))
    plain_out = plain_z @ get_adapter(plain).ffn(get_adapter(plain).layers()[1]).down.weight.detach().double().T
    assert (fitted - target).square().sum() < (plain_out - target).square().sum()
    assert (fitted - target).square().sum() >= (best - target).square().sum() * (1 - 1e-6)


@pytest.mark.parametrize("options", [{}, {"ridge": 0.3, "intercept": True, "heads": "greedy"}, {"compensate": True}],
                         ids=["pivoted", "options", "compensated"])
def test_every_fold_costs_the_output_error_its_weights_leave(options):
    """Each STAT strategy's cost() at a keep-count is the error its weight() leaves in the module's
    output on the calibration tokens (the compensated fit prices relative to keeping every unit,
    which on a first block, fed the dense inputs, leaves the layer as it is)."""
    model, data = tiny_llama(layers=1), batches()
    pruner = StatPruner(**options)
    adapter = get_adapter(model)
    stream = LayerStream(model, adapter, data, CPU, "pruned" if pruner.compensate else "dense",
                         pruner.accumulator(GramBackend(block_dtype="float64")), progress=False,
                         moments=pruner.requirements.moments, dense_targets=pruner.requirements.dense_targets)
    [(sc, layer)] = [(pruner.score(adapter, i, layer, stats), layer) for i, layer, stats in stream]
    attn, ffn = adapter.attention(layer), adapter.ffn(layer)
    modules = [(sc.heavy.ffn, ffn.down, lambda a, l: a.ffn(l).down, [1, 17, 64, 127, 128],
                lambda k: sc.ffn_order[:k]),
               (sc.heavy.attn, attn.o, lambda a, l: a.attention(l).o, range(len(sc.attn_levels)),
                lambda k: head_channels(sc.attn_levels[k].heads, attn.head_dim))]
    for fold, out, pick, counts, kept in modules:
        Z = torch.cat(module_inputs(model, pick, data))
        W = out.weight.detach().double()

        def measured(k: int) -> float:
            weight, bias = fold.weight(out, k)
            folded = W[:, kept(k)] if weight is None else weight.double()
            y = Z[:, kept(k)] @ folded.T + (0.0 if bias is None else bias)
            return float((Z @ W.T - y).square().sum())

        cost = fold.cost()
        for k in counts:  # rel: the jitter that lets near-collinear head channels factor moves costs by ~1e-4
            assert float(cost[k]) == pytest.approx(measured(k), rel=1e-3, abs=1e-6 * float(cost[0]))
