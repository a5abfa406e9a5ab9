"""Choosing the global allocation's plan on held-out batches: uniform is always a candidate, the
candidate closest to the dense model wins, and its recorded score is the pruned model's own."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from stat_exp.factorize import GramBackend
from stat_exp.models import get_adapter
from stat_exp.models.flops import FlopsModel, shapes_of
from stat_exp.prune.budget import BudgetSpec, LayerPlan, allocate
from stat_exp.prune import plan_selection
from stat_exp.prune.plan_selection import HELD_OUT_PRICED, UNIFORM, candidate_plans, choose_plan, within_noise
from stat_exp.prune.runner import PruneRunner
from stat_exp.prune.stat import StatPruner
from tests.tiny import (batches, clone, tiny_falcon, tiny_gemma2, tiny_gpt2, tiny_gpt_neox, tiny_llama, tiny_mistral,
                        tiny_opt, tiny_phi3, tiny_qwen2, tiny_qwen3)

CPU = torch.device("cpu")
HELD_OUT = batches(2, seed=7)


def _runner(pruner=None, flops=0.6, **budget) -> PruneRunner:
    return PruneRunner(pruner or StatPruner(), BudgetSpec(flops=flops, seq_len=32, **budget),
                       GramBackend(block_dtype="float64"), progress=False)


def _kl(dense, pruned, held_out) -> float:
    """Mean KL(dense || pruned) over the held-out tokens (padding left out), from whole-model forwards."""
    total, n = 0.0, 0
    with torch.inference_mode():
        for b in held_out:
            p = torch.log_softmax(dense(**b).logits.float(), -1)
            q = torch.log_softmax(pruned(**b).logits.float(), -1)
            kl = (p.exp() * (p - q)).sum(-1).clamp_min(0)[b["attention_mask"].bool()]
            total, n = total + float(kl.sum()), n + kl.numel()
    return total / n


def _scored(model):
    runner = _runner()
    return runner, runner.score_layers(model, get_adapter(model), batches(), CPU)


def _choose(model, candidates, scored):
    adapter = get_adapter(model)
    blocks = ((i, layer, sc, st) for (i, layer), (sc, st) in zip(enumerate(adapter.layers()), scored))
    return choose_plan(candidates, blocks, model, adapter, HELD_OUT, CPU, CPU, StatPruner().apply)


@pytest.mark.parametrize("uniform_keeps_all", [True, False])
def test_the_candidate_closer_to_the_dense_model_wins(uniform_keeps_all):
    """Kills: always choosing global; choosing the larger divergence."""
    model = tiny_llama(layers=3)
    _, scored = _scored(model)
    shapes = shapes_of(get_adapter(model))
    full = [LayerPlan(len(sc.attn_levels) - 1, sh.ffn_width) for (sc, _), sh in zip(scored, shapes)]
    cut = [LayerPlan(0, sh.ffn_width // 4) for sh in shapes]
    candidates = {UNIFORM: full, "global": cut} if uniform_keeps_all else {UNIFORM: cut, "global": full}
    chosen = _choose(model, candidates, scored)
    assert chosen.chosen == (UNIFORM if uniform_keeps_all else "global")
    winner, loser = ("uniform", "global") if uniform_keeps_all else ("global", "uniform")
    assert chosen.scores[winner] < 1e-3 * chosen.scores[loser]


def test_a_candidate_better_only_within_the_noise_leaves_uniform_applied(monkeypatch):
    """The same far better global plan as above, with the noise threshold raised beyond reach: uniform
    is applied and the record says which candidate scored lowest and by how many standard errors.
    Kills: a choice that ignores the noise rule."""
    model = tiny_llama(layers=3)
    _, scored = _scored(model)
    shapes = shapes_of(get_adapter(model))
    full = [LayerPlan(len(sc.attn_levels) - 1, sh.ffn_width) for (sc, _), sh in zip(scored, shapes)]
    cut = [LayerPlan(0, sh.ffn_width // 4) for sh in shapes]
    assert _choose(model, {UNIFORM: cut, "global": full}, scored).chosen == "global"
    monkeypatch.setattr(plan_selection, "NOISE_SE", 1e9)
    chosen = _choose(model, {UNIFORM: cut, "global": full}, scored)
    record = chosen.record()
    assert record["chosen"] == UNIFORM and record["best"] == "global" and record["t_vs_uniform"] < -2


def test_within_noise_is_a_paired_test_over_the_held_out_examples():
    """Kills: an unpaired comparison (the examples' own spread would hide a consistent gain); a
    comparison of totals (one example's large gain would pass as a consistent one)."""
    uniform = torch.tensor([1.0, 5.0, 2.0, 9.0, 4.0, 7.0], dtype=torch.float64)
    assert within_noise(uniform - 0.05 + 0.001 * torch.arange(6), uniform)[0] is False  # small, consistent gain
    lucky = uniform.clone()
    lucky[3] -= 3.0  # a large gain on one example, small losses on the others
    lucky[[0, 1, 2, 4, 5]] += 0.2
    assert lucky.sum() < uniform.sum() and within_noise(lucky, uniform)[0] is True
    assert within_noise(uniform.clone(), uniform) == (True, 0.0)


def test_uniform_wins_a_tie():
    model = tiny_llama(layers=2)
    _, scored = _scored(model)
    shapes = shapes_of(get_adapter(model))
    same = [LayerPlan(0, sh.ffn_width // 2) for sh in shapes]
    assert _choose(model, {UNIFORM: same, "global": list(same)}, scored).chosen == UNIFORM


def test_candidates_are_uniform_global_and_floored_mixtures_within_the_budget():
    """Kills: dropping uniform from the candidates; floors not applied; a candidate over budget."""
    model = tiny_llama(layers=4)
    runner, scored = _scored(model)
    scores, shapes = [sc for sc, _ in scored], shapes_of(get_adapter(model))
    flops = FlopsModel(32)
    budget = BudgetSpec(flops=0.5, seq_len=32)
    candidates = candidate_plans(scores, shapes, flops, budget)
    assert list(candidates)[0] == UNIFORM
    assert candidates[UNIFORM] == allocate(scores, shapes, flops, 0.5, "uniform")
    dense = sum(flops.dense(s) for s in shapes)
    for name, plans in candidates.items():
        kept = sum(flops.layer(s, sc.attn_levels[p.attn_level].num_heads, sc.attn_levels[p.attn_level].num_kv_heads,
                               p.neurons) for s, sc, p in zip(shapes, scores, plans))
        assert kept <= 0.5 * dense * 1.01, name  # uniform rounds neurons to the nearest count
        if "floor" in name:
            share = float(name.rsplit(" ", 1)[1])
            assert all(p.neurons >= share * u.neurons for p, u in zip(plans, candidates[UNIFORM])), name


def test_the_held_out_priced_candidate_is_the_global_plan_on_the_held_out_ffn_costs():
    """STAT's default scoring measures every block's FFN costs on the batches its fold was not fitted
    on; the candidate is the global allocation on those (absent where any block lacks them). Kills:
    a candidate priced on the in-sample costs; one formed without every block's held-out costs."""
    model = tiny_llama(layers=3)
    _, scored = _scored(model)
    scores, shapes = [sc for sc, _ in scored], shapes_of(get_adapter(model))
    assert all(sc.ffn_held_out_cost is not None and len(sc.ffn_held_out_cost) == len(sc.ffn_cost) for sc in scores)
    scores[0].ffn_held_out_cost = scores[0].ffn_held_out_cost * 1e6  # held out, layer 0's neurons are priceless
    flops, budget = FlopsModel(32), BudgetSpec(flops=0.5, seq_len=32)
    candidates = candidate_plans(scores, shapes, flops, budget)
    expected = allocate([replace(sc, ffn_cost=sc.ffn_held_out_cost) for sc in scores], shapes, flops, 0.5, "global")
    assert candidates[HELD_OUT_PRICED] == expected != candidates["global"]
    assert expected[0].neurons == shapes[0].ffn_width
    scores[1].ffn_held_out_cost = None
    assert HELD_OUT_PRICED not in candidate_plans(scores, shapes, flops, budget)


def test_a_floor_keeps_every_layer_above_it_in_the_global_allocation():
    model = tiny_llama(layers=3)
    _, scored = _scored(model)
    scores, shapes = [sc for sc, _ in scored], shapes_of(get_adapter(model))
    for sc in scores[1:]:  # make every layer but the first look free to prune
        sc.ffn_cost = sc.ffn_cost * 1e-9
    flops = FlopsModel(32)
    free = allocate(scores, shapes, flops, 0.5, "global")
    floors = [LayerPlan(0, 40)] * 3
    floored = allocate(scores, shapes, flops, 0.5, "global", minimum=floors)
    assert min(p.neurons for p in free[1:]) < 40 <= min(p.neurons for p in floored)


class MisleadingStat(StatPruner):
    """STAT whose costs (in-sample and held-out) say the first layer's FFN is priceless and the
    others' free: every global plan empties the FFNs of every later layer."""

    in_sample_only = False

    def score(self, adapter, index, layer, stats):
        sc = super().score(adapter, index, layer, stats)
        scale = 1e6 if index == 0 else 1e-6
        sc.ffn_cost = sc.ffn_cost * scale
        if not self.in_sample_only:
            sc.ffn_held_out_cost = sc.ffn_held_out_cost * scale
        return sc


class OverfitStat(MisleadingStat):
    """The same, in the in-sample costs only (a fold that overfits the later layers' FFNs)."""

    in_sample_only = True


def _strong_ffns(model) -> None:
    """Scale up the later layers' FFN outputs so that emptying them changes the output a lot."""
    for layer in get_adapter(model).layers()[1:]:
        with torch.no_grad():
            layer.mlp.down_proj.weight.mul_(20)


def test_the_runner_applies_uniform_where_the_global_plan_is_worse_and_records_every_score():
    """Kills: a runner that applies the global plan regardless; uniform dropped from the candidates;
    a recorded score that is not the applied model's divergence."""
    base = tiny_llama(layers=3)
    _strong_ffns(base)
    model = clone(base)
    out = _runner(MisleadingStat()).run(model, get_adapter(model), batches(), CPU, held_out=HELD_OUT)
    record = out.allocation
    assert record["chosen"] == UNIFORM and record["held_out"][UNIFORM] < record["held_out"]["global"]
    assert record["measure"] == "kl" and record["held_out_tokens"] == sum(b["input_ids"].numel() for b in HELD_OUT)
    assert record["vs_uniform"] == 0.0 and record["margin_to_next"] > 0
    assert _kl(base, model, HELD_OUT) == pytest.approx(record["held_out"][UNIFORM], rel=1e-4)
    uniform = clone(base)
    _runner(MisleadingStat(), allocation="uniform").run(uniform, get_adapter(uniform), batches(), CPU)
    assert get_adapter(model).structure() == get_adapter(uniform).structure()


def test_held_out_ffn_prices_beat_in_sample_prices_that_mislead():
    """In-sample FFN costs that call the later layers free (as a fold that overfits them would) give
    a global plan that empties them; the same plan on the held-out costs does not, and scores closer
    to the dense model. Kills: a held-out-priced candidate built from the in-sample costs."""
    base = tiny_llama(layers=3)
    _strong_ffns(base)
    model = clone(base)
    record = _runner(OverfitStat()).run(model, get_adapter(model), batches(), CPU, held_out=HELD_OUT).allocation
    assert record["held_out"][HELD_OUT_PRICED] < record["held_out"]["global"]
    assert record["chosen"] != "global"


def test_the_runner_applies_the_global_plan_when_it_is_closer_and_its_score_is_the_models():
    base = tiny_llama(layers=3)
    model = clone(base)
    record = _runner().run(model, get_adapter(model), batches(), CPU, held_out=HELD_OUT).allocation
    _assert_best_unless_noise(record)
    assert _kl(base, model, HELD_OUT) == pytest.approx(record["held_out"][record["chosen"]], rel=1e-4)


def _assert_best_unless_noise(record: dict) -> None:
    """The lowest-scoring candidate is applied unless it beats uniform by no more than the noise."""
    assert record["held_out"][record["best"]] == min(record["held_out"].values())
    assert record["chosen"] == (UNIFORM if record["t_vs_uniform"] > -plan_selection.NOISE_SE else record["best"])


@pytest.mark.parametrize("build", [tiny_qwen2, tiny_qwen3, tiny_mistral, tiny_opt, tiny_gpt2, tiny_phi3, tiny_gemma2,
                                   tiny_falcon, tiny_gpt_neox], ids=lambda b: b.__name__[5:])
def test_every_family_scores_a_candidate_as_the_model_pruned_to_it(build):
    """The held-out streams run each family's blocks with their own call arguments (rotary, ALiBi,
    masks, padding) and its own head: the chosen plan's recorded divergence is the divergence of
    the model pruned to it, and no candidate scored lower. Kills: a stream that drops a block's call
    arguments (or the padding mask), a head that skips the final norm or soft-capping."""
    torch.manual_seed(0)
    base = build(layers=3)
    model = clone(base)
    held_out = batches(2, seed=7, pad_last=5)
    record = _runner().run(model, get_adapter(model), batches(pad_last=3), CPU, held_out=held_out).allocation
    _assert_best_unless_noise(record)
    assert _kl(base, model, held_out) == pytest.approx(record["held_out"][record["chosen"]], rel=1e-3, abs=1e-7)


def test_off_or_without_held_out_batches_the_global_plan_is_applied():
    base = tiny_llama(layers=3)
    _strong_ffns(base)
    plain, off, none = clone(base), clone(base), clone(base)
    _runner(MisleadingStat()).run(none, get_adapter(none), batches(), CPU)
    out = _runner(MisleadingStat(), select="off").run(off, get_adapter(off), batches(), CPU, held_out=HELD_OUT)
    assert out.allocation == {"chosen": "global"}
    selected = _runner(MisleadingStat()).run(plain, get_adapter(plain), batches(), CPU, held_out=HELD_OUT)
    assert get_adapter(off).structure() == get_adapter(none).structure() != get_adapter(plain).structure()
    assert selected.allocation["chosen"] == UNIFORM


@pytest.mark.parametrize("factors", ["hold", "recompute"])
def test_with_pruned_propagation_the_chosen_plan_is_fitted_on_the_pruned_stream(factors):
    """calib.propagate=pruned: the plan is chosen among the candidates (fitted on the dense stream),
    then applied block by block on the pruned stream, exactly as a run given that plan from the start.
    Kills: a pruned-propagation run that skips the choice (it applies the misleading global plan), or
    that applies the candidates' dense-stream fits."""
    base = tiny_llama(layers=3)
    _strong_ffns(base)
    chosen, uniform = clone(base), clone(base)
    runner = PruneRunner(MisleadingStat(), BudgetSpec(flops=0.6, seq_len=32), GramBackend(block_dtype="float64"),
                         propagate="pruned", progress=False, stream="block", factors=factors)
    record = runner.run(chosen, get_adapter(chosen), batches(), CPU, held_out=HELD_OUT).allocation
    assert record["chosen"] == UNIFORM and record["held_out"][UNIFORM] < record["held_out"]["global"]
    PruneRunner(MisleadingStat(), BudgetSpec(flops=0.6, seq_len=32, allocation="uniform"),
                GramBackend(block_dtype="float64"), propagate="pruned", progress=False,
                stream="block").run(uniform, get_adapter(uniform), batches(), CPU)
    assert get_adapter(chosen).structure() == get_adapter(uniform).structure()
    x = batches(1, seed=5)[0]
    torch.testing.assert_close(chosen(**x).logits, uniform(**x).logits, rtol=1e-5, atol=1e-5)
    dense_fit = clone(base)
    _runner(MisleadingStat()).run(dense_fit, get_adapter(dense_fit), batches(), CPU, held_out=HELD_OUT)
    assert not torch.allclose(chosen(**x).logits, dense_fit(**x).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("factors", ["spill", "recompute"])
def test_spilled_or_recomputed_factors_choose_and_prune_like_held_ones(tmp_path, factors):
    base = tiny_llama(layers=3)
    held, other = clone(base), clone(base)
    a = _runner().run(held, get_adapter(held), batches(), CPU, held_out=HELD_OUT).allocation
    runner = PruneRunner(StatPruner(), BudgetSpec(flops=0.6, seq_len=32), GramBackend(block_dtype="float64"),
                         progress=False, stream="block", factors=factors, spill_dir=tmp_path / "spill")
    b = runner.run(other, get_adapter(other), batches(), CPU, held_out=HELD_OUT).allocation
    assert a["chosen"] == b["chosen"] and np.allclose(list(a["held_out"].values()), list(b["held_out"].values()),
                                                      rtol=1e-6)
    x = batches(1, seed=5)[0]
    torch.testing.assert_close(held(**x).logits, other(**x).logits, rtol=1e-5, atol=1e-5)


def test_an_encoder_without_logits_is_scored_by_its_hidden_states():
    from tests.tiny import tiny_roberta

    model = tiny_roberta()
    out = _runner().run(model, get_adapter(model), batches(), CPU, held_out=HELD_OUT).allocation
    assert out["measure"] == "relative squared error" and 0 < out["held_out"][out["chosen"]] < 1


def test_disk_offload_chooses_like_resident_weights(tmp_path):
    from tests.test_scale import _open_disk, _saved

    base = tiny_llama(layers=3)
    folder = _saved(tmp_path, base)
    reference = clone(base)
    expected = _runner().run(reference, get_adapter(reference), batches(), CPU, held_out=HELD_OUT).allocation
    model, _, store = _open_disk(folder, tmp_path)
    runner = PruneRunner(StatPruner(), BudgetSpec(flops=0.6, seq_len=32), GramBackend(block_dtype="float64"),
                         progress=False, stream="block")
    got = runner.run(model, get_adapter(model), batches(), CPU, store, held_out=HELD_OUT).allocation
    assert got["chosen"] == expected["chosen"]
    assert np.allclose(list(got["held_out"].values()), list(expected["held_out"].values()), rtol=1e-5)
    store.prepare_for_eval()
    x = batches(1, seed=5)[0]
    torch.testing.assert_close(model(**x).logits, reference(**x).logits, rtol=1e-5, atol=1e-5)
    store.close()


@pytest.mark.parametrize("offload", ["none", "disk"])
def test_a_run_records_the_chosen_plan_and_every_candidates_score(tiny_job, tmp_path, offload):
    """results.json of a default STAT job: which plan won, every candidate's held-out KL, and the
    held-out examples drawn beyond the calibration's. Kills: a pipeline that passes no held-out
    batches (the record would say only {"chosen": "global"})."""
    from stat_exp.config.cli import compose_config
    from stat_exp.pipeline import run_pipeline

    args = tiny_job.args(f"execution.offload={offload}", pruner="stat", **{"budget.flops": 0.6,
                                                                             "budget.held_out_examples": 8})
    run_pipeline(compose_config(args), tmp_path)
    record = json.loads((tmp_path / "results.json").read_text())
    allocation = record["allocation"]
    assert record["status"] == "ok" and allocation["chosen"] in allocation["held_out"]
    assert UNIFORM in allocation["held_out"] and allocation["measure"] == "kl"
    assert allocation["held_out_tokens"] == 8 * 32
    assert {"margin_to_next", "vs_uniform", "seconds"} <= set(allocation) and allocation["vs_uniform"] <= 0
    assert record["plan"]["offload"] == offload


def test_select_off_records_the_global_plan(tiny_job, tmp_path):
    from stat_exp.config.cli import compose_config
    from stat_exp.pipeline import run_pipeline

    run_pipeline(compose_config(tiny_job.args(pruner="stat", **{"budget.select": "off"})), tmp_path)
    assert json.loads((tmp_path / "results.json").read_text())["allocation"] == {"chosen": "global"}
