"""Baseline pruners (random, wanda_sp, flap, kwon) on tiny random Llama models: scores against
hand-computed values, the FLOPs budget, runnable pruned models, FLAP's bias compensation and
saving, random's seeding and copied structures."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from stat_exp.calibrate import LayerStream
from stat_exp.config.signature import check_node
from stat_exp.errors import ConfigError
from stat_exp.export import load_pruned
from stat_exp.export.save import save_pruned
from stat_exp.factorize.gram import GramBackend
from stat_exp.models import get_adapter
from stat_exp.models.flops import FlopsModel, shapes_of
from stat_exp.prune.budget import BudgetSpec
from stat_exp.prune.flap import FlapPruner
from stat_exp.prune.kwon import KwonPruner, cached_mask_gradients, mask_gradients, rearranged
from stat_exp.prune.kwon_tuning import MaskTuner, _unit_mask
from stat_exp.prune.random import RandomPruner
from stat_exp.prune.runner import PruneRunner
from stat_exp.prune.wanda import WandaPruner
from stat_exp.run import CONF_DIR
from tests.tiny import VOCAB, tiny_llama, tiny_opt
from tests.tiny import batches as make_batches

CPU = torch.device("cpu")
PRUNERS = {"wanda_sp": WandaPruner, "flap": FlapPruner, "kwon": KwonPruner, "random": RandomPruner,
           "random_budget": lambda: RandomPruner(allocation="budget")}


def llama(layers: int = 2) -> torch.nn.Module:
    """The same tiny random Llama on every call, so dense and pruned copies can be compared."""
    torch.manual_seed(0)
    return tiny_llama(layers=layers)


@pytest.fixture(scope="module")
def batches() -> list[dict[str, torch.Tensor]]:
    """Random token ids with padded rows, so padding must stay out of every statistic."""
    return make_batches(n=3, batch=4, seq=24, pad_last=9, seed=1)


def prune(pruner, batches, flops: float, allocation: str = "global", model: torch.nn.Module | None = None):
    model = llama() if model is None else model
    outcome = PruneRunner(pruner, BudgetSpec(flops, 64, allocation), GramBackend(), progress=False).run(
        model, get_adapter(model), batches, CPU)
    return model, outcome


def captured_inputs(model, batches) -> dict[str, list[torch.Tensor]]:
    """Non-padding inputs of every o_proj and down_proj (float64), by hooks on the dense model."""
    found: dict[str, list[torch.Tensor]] = {}
    mask = [None]
    handles = [m.register_forward_pre_hook(lambda mod, args, n=name: found.setdefault(n, []).append(args[0][mask[0]].double()))
               for name, m in model.named_modules() if name.endswith(("o_proj", "down_proj"))]
    with torch.no_grad():
        for b in batches:
            mask[0] = b["attention_mask"].bool()
            model(**b)
    for h in handles:
        h.remove()
    return {k: torch.cat(v) for k, v in found.items()}


def layer_scores(pruner, model, batches):
    adapter = get_adapter(model)
    stream = LayerStream(model, adapter, batches, CPU, make_accumulator=GramBackend().accumulator, progress=False)
    return [pruner.score(adapter, i, layer, stats) for i, layer, stats in stream]


def expected_curves(heads: torch.Tensor, neurons: torch.Tensor, scores) -> None:
    """The LayerScores of additive scores: ffn_cost[k] = sum of all but the k best neurons, and so on."""
    top = torch.sort(neurons, descending=True).values
    cost = neurons.sum() - torch.cat([torch.zeros(1, dtype=top.dtype), top.cumsum(0)])
    np.testing.assert_allclose(scores.ffn_cost, cost.numpy(), rtol=1e-6, atol=1e-7 * float(neurons.sum()))
    kept = [heads[list(lv.heads)].sum() for lv in scores.attn_levels]
    np.testing.assert_allclose(scores.attn_cost, [float(heads.sum() - k) for k in kept], rtol=1e-6,
                               atol=1e-7 * float(heads.sum()))


def test_wanda_scores_match_hand_computed(batches):
    model = llama()
    x = captured_inputs(model, batches)
    for i, sc in enumerate(layer_scores(WandaPruner(), model, batches)):
        layer = model.model.layers[i]
        s = {}
        for key, lin in (("o_proj", layer.self_attn.o_proj), ("down_proj", layer.mlp.down_proj)):
            X = x[f"model.layers.{i}.{'self_attn' if key == 'o_proj' else 'mlp'}.{key}"]
            s[key] = lin.weight.double().abs().mean(0) * X.norm(dim=0)
        expected_curves(s["o_proj"].view(8, 8).sum(1).detach(), s["down_proj"].detach(), sc)


def test_flap_scores_match_hand_computed(batches):
    model = llama()
    x = captured_inputs(model, batches)

    def std(v):
        return (v - v.mean()) / v.std()

    for i, sc in enumerate(layer_scores(FlapPruner(), model, batches)):
        layer = model.model.layers[i]
        Xo, Xd = x[f"model.layers.{i}.self_attn.o_proj"], x[f"model.layers.{i}.mlp.down_proj"]
        attn = (Xo.var(0, unbiased=False) * layer.self_attn.o_proj.weight.double().square().sum(0)) ** 2
        ffn = Xd.var(0, unbiased=False) * layer.mlp.down_proj.weight.double().square().sum(0)
        heads, neurons = sc.state.standardised
        torch.testing.assert_close(heads, std(attn.detach()).view(8, 8).mean(1), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(neurons, std(ffn.detach()), rtol=1e-5, atol=1e-6)


def test_kwon_fisher_matches_activation_gradients(batches):
    """dL/dm of a unit mask at m=1 is <x_unit, dL/dx_unit> summed over tokens."""
    model = llama()
    grads = mask_gradients(model, get_adapter(model), batches)
    for b_index, batch in enumerate(batches):
        acts = {}

        def keep(mod, args, name):
            args[0].retain_grad()
            acts[name] = args[0]

        handles = [m.register_forward_pre_hook(lambda mod, args, n=name: keep(mod, args, n))
                   for name, m in model.named_modules() if name.endswith(("o_proj", "down_proj"))]
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        model.zero_grad()
        model(**batch, labels=labels).loss.backward()
        for h in handles:
            h.remove()
        for i in range(2):
            xo = acts[f"model.layers.{i}.self_attn.o_proj"]
            xd = acts[f"model.layers.{i}.mlp.down_proj"]
            head_grad = (xo * xo.grad).double().sum((0, 1)).view(8, 8).sum(1)
            neuron_grad = (xd * xd.grad).double().sum((0, 1))
            torch.testing.assert_close(grads[i][0][b_index], head_grad, rtol=1e-4, atol=1e-7)
            torch.testing.assert_close(grads[i][1][b_index], neuron_grad, rtol=1e-4, atol=1e-7)
    pruner = KwonPruner()
    pruner.grads = grads
    for i, sc in enumerate(layer_scores(pruner, model, batches)):
        expected_curves(grads[i][0].square().sum(0), grads[i][1].square().sum(0), sc)


@pytest.mark.parametrize("name", sorted(PRUNERS))
@pytest.mark.parametrize("allocation", ["global", "uniform"])
def test_budget_met_and_pruned_model_runs(name, allocation, batches):
    for target in (0.8, 0.55):
        model, outcome = prune(PRUNERS[name](), batches, target, allocation)
        assert abs(outcome.achieved["flops_fraction"] - target) <= 0.01 * target
        assert outcome.achieved["flops_fraction"] < 1
    with torch.no_grad():
        logits = model(**batches[0]).logits
        generated = model.generate(batches[0]["input_ids"][:1], max_new_tokens=3, do_sample=False)
    assert torch.isfinite(logits).all() and generated.shape[1] == batches[0]["input_ids"].shape[1] + 3


@pytest.mark.parametrize("name", sorted(PRUNERS))
def test_multi_head_model_with_biases(name, batches):
    model, outcome = prune(PRUNERS[name](), batches, 0.6, model=tiny_opt())
    assert abs(outcome.achieved["flops_fraction"] - 0.6) <= 0.006
    with torch.no_grad():
        assert torch.isfinite(model(**batches[0]).logits).all()


def test_flap_global_is_one_threshold(batches):
    """Beyond each layer's first neuron, no removed neuron outscores a kept one (neurons cost the same)."""
    model = llama(3)
    scores = layer_scores(FlapPruner(), model, batches)
    plans = FlapPruner().fixed_plans([0, 1, 2], scores, shapes_of(get_adapter(model)), FlopsModel(64), BudgetSpec(0.6, 64))
    kept, removed = [], []
    for sc, plan in zip(scores, plans):
        standardised = sc.state.standardised[1][sc.ffn_order]
        kept += standardised[1: plan.neurons].tolist()
        removed += standardised[plan.neurons:].tolist()
    assert kept and removed and min(kept) >= max(removed)


def test_flap_bias_keeps_mean_output(batches):
    dense = llama()
    x = captured_inputs(dense, batches)
    pruned, _ = prune(FlapPruner(), batches, 0.6)
    modules = dict(pruned.named_modules())
    dense_modules = dict(dense.named_modules())
    for name, X in x.items():
        new, old = modules[name], dense_modules[name]
        assert new.in_features < old.in_features and new.bias is not None
        kept = torch.cdist(new.weight.T.double(), old.weight.T.double()).argmin(1)  # columns are copied unchanged
        with torch.no_grad():
            mean_pruned = (X[:, kept] @ new.weight.double().T + new.bias.double()).mean(0)
            mean_dense = (X @ old.weight.double().T).mean(0)
        torch.testing.assert_close(mean_pruned, mean_dense, rtol=1e-5, atol=1e-6)


def test_flap_save_load_round_trip(batches, tmp_path):
    model, _ = prune(FlapPruner(), batches, 0.6)
    vocab = {f"t{i}": i for i in range(VOCAB)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="t0")))
    save_pruned(model, tokenizer, tmp_path / "model", "causal_lm")
    recorded = json.loads((tmp_path / "model" / "config.json").read_text())["stat_exp_pruning"]["parameters"]
    assert sorted(n for n in recorded if n.endswith(".bias")) == sorted(
        f"layers.{i}.{m}.bias" for i in range(2) for m in ("self_attn.o_proj", "mlp.down_proj"))
    loaded = load_pruned(tmp_path / "model")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batches[0]).logits, model(**batches[0]).logits)


def test_kwon_tuning_targets_teacher_output_minus_student_residual(batches):
    """Their rescale.py: the FFN target is teacher FFN output + teacher residual - bias - student
    residual; with the teacher dense and the student's attention pruned, the residuals differ by
    the removed heads' output. Checked against the normal equations built from hooks."""
    model = llama()
    adapter = get_adapter(model)
    layer = adapter.layers()[0]
    tuner = MaskTuner(model, adapter, batches, CPU, max_scale=10.0)
    kept_heads, kept = [0, 1, 2, 3], torch.arange(0, 128, 3)
    head_mask = _unit_mask(kept_heads, 8, 8)
    _, ffn_targets, _ = tuner.teacher_pass(0, layer, None, None)
    A, b = tuner.neuron_system(0, layer, head_mask, _unit_mask(kept, 128, 1), ffn_targets, kept)
    seen = {}  # the dense teacher's O inputs and FFN input/output
    handles = [layer.self_attn.o_proj.register_forward_hook(lambda m, a, o: seen.setdefault("o", []).append((a[0], o))),
               layer.mlp.down_proj.register_forward_hook(lambda m, a, o: seen.setdefault("d", []).append((a[0], o)))]
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    for h in handles:
        h.remove()
    W = layer.mlp.down_proj.weight.detach().double()
    Wo = layer.self_attn.o_proj.weight.detach().double()
    rhs = []
    for (xo, _), (z, down_out), batch in zip(seen["o"], seen["d"], batches):
        real = batch["attention_mask"].bool().reshape(-1)
        xo, z, down_out = (t.reshape(-1, t.shape[-1])[real].double() for t in (xo, z, down_out))
        removed_heads = xo * (1 - head_mask.double())  # teacher residual - student residual = their output
        rhs.append(down_out + removed_heads @ Wo.T)
    student_z = []  # the student's FFN inputs, from its pruned attention
    mask = _unit_mask(kept_heads, 8, 8)
    handle = layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a: (a[0] * mask,))
    grab = layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: student_z.append(a[0]))
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    handle.remove()
    grab.remove()
    Z = torch.cat([z.reshape(-1, z.shape[-1])[bt["attention_mask"].bool().reshape(-1)].double()
                   for z, bt in zip(student_z, batches)])[:, kept]
    B = torch.cat(rhs)
    contrib = Z[:, :, None] * W[:, kept].T[None]  # (tokens, kept, d_out)
    torch.testing.assert_close(A, torch.einsum("tko,tjo->kj", contrib, contrib), rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(b, torch.einsum("tko,to->k", contrib, B), rtol=1e-5, atol=1e-8)


def test_kwon_teacher_keeps_the_square_root_of_the_target(batches):
    """Their schedule (two steps): the teacher is searched at sqrt(target) kept FLOPs."""
    model = llama(3)
    pruner = KwonPruner(tune=False)
    pruner.grads = mask_gradients(model, get_adapter(model), batches)
    scores = layer_scores(pruner, model, batches)
    shapes, flops = shapes_of(get_adapter(model)), FlopsModel(64)
    pruner.fixed_plans([0, 1, 2], scores, shapes, flops, BudgetSpec(0.49, 64))
    teacher = [pruner._teacher_plans[i] for i in range(3)]
    kept = sum(flops.attention(sh, sc.attn_levels[p.attn_level].num_heads, sc.attn_levels[p.attn_level].num_kv_heads)
               + flops.ffn(sh, p.neurons) for sh, sc, p in zip(shapes, scores, teacher))
    assert kept / sum(flops.dense(sh) for sh in shapes) == pytest.approx(0.7, abs=0.01)


def published_greedy(grads: torch.Tensor, n_pruned: int) -> torch.Tensor:
    """Kwon et al.'s rearrangement as published (a list of pruned units, re-summed every step)."""
    g = grads.T
    visit = g.square().sum(1).argsort().tolist()
    pruned = visit[:n_pruned]
    for unit in visit[n_pruned:]:
        pruned.append(unit)
        vectors = g[pruned]
        del pruned[int((vectors.sum(0) - vectors).square().sum(1).argmin())]
    keep = torch.ones(g.shape[0], dtype=torch.bool)
    keep[pruned] = False
    return torch.nonzero(keep).flatten()


def test_rearrangement_matches_published_greedy():
    for seed in range(5):
        g = torch.randn(6, 40, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        assert torch.equal(rearranged(g, torch.arange(15), [list(range(40))]), published_greedy(g, 25))
    blocks = [list(range(0, 6)), list(range(6, 12))]
    kept = rearranged(g[:, :12], torch.tensor([0, 1, 6, 7, 8]), blocks)
    assert len(kept) == 5 and int((kept < 6).sum()) == 2


def test_random_is_reproducible_and_seeded(batches):
    a, _ = prune(RandomPruner(seed=3), batches, 0.6)
    b, _ = prune(RandomPruner(seed=3), batches, 0.6)
    c, _ = prune(RandomPruner(seed=4), batches, 0.6)
    sa, sb, sc = (m.state_dict() for m in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(sa[k].shape != sc[k].shape or not torch.equal(sa[k], sc[k]) for k in sa)


@pytest.mark.parametrize("kind", ["results.json", "structure.json"])
def test_random_copies_structure_file(kind, batches, tmp_path):
    _, source = prune(KwonPruner(tune=False), batches, 0.6, model=llama(3))
    path = tmp_path / kind
    path.write_text(json.dumps({"structure": source.structure} if kind == "results.json" else source.structure))
    _, copied = prune(RandomPruner(structure_file=str(path)), batches, 0.9, model=llama(3))
    assert copied.structure == source.structure


@pytest.mark.parametrize("name", ["random", "wanda_sp", "flap", "kwon", "stat_nocorr", "slicegpt", "block_drop"])
def test_pruner_configs_instantiate(name):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"pruner={name}", "experiment=compare_pruners"])
    pruner = instantiate(cfg.pruner)
    assert pruner.name == ("stat" if name == "stat_nocorr" else name)
    assert cfg.calib.num_examples == 64 and cfg.eval.perplexity.max_tokens == 16384


def test_a_pruner_can_fix_its_allocation(batches):
    """wanda_sp and magnitude_sp ship with allocation=uniform (their scores do not compare across
    layers): whatever budget.allocation says, every layer keeps the same counts."""
    _, fixed = prune(WandaPruner(allocation="uniform"), batches, 0.6, allocation="global")
    _, uniform = prune(WandaPruner(), batches, 0.6, allocation="uniform")
    assert fixed.structure == uniform.structure
    assert len(set(fixed.structure["neurons"])) == 1
    with pytest.raises(ConfigError, match="pruner.allocation='layerwise'; allowed: budget, global, uniform"):
        check_node("pruner", {"_target_": "stat_exp.prune.wanda.WandaPruner", "allocation": "layerwise"})


def test_a_pruner_can_fix_its_propagation(batches):
    """wanda_sp ships with propagate=pruned (FLAP's prune_wanda_sp feeds each block the pruned
    previous block's outputs): whatever calib.propagate says, it prunes as with propagate=pruned,
    which differs from dense propagation."""
    def run(pruner, propagate):
        model = llama(3)
        PruneRunner(pruner, BudgetSpec(0.55, 64, "uniform"), None, propagate, progress=False).run(
            model, get_adapter(model), batches, CPU)
        return model.state_dict()

    fixed, pruned, dense = run(WandaPruner(propagate="pruned"), "dense"), run(WandaPruner(), "pruned"), \
        run(WandaPruner(), "dense")
    assert all(torch.equal(fixed[k], pruned[k]) for k in fixed)
    assert any(fixed[k].shape != dense[k].shape or not torch.equal(fixed[k], dense[k]) for k in fixed)
    with pytest.raises(ConfigError, match="pruner.propagate"):
        check_node("pruner", {"_target_": "stat_exp.prune.wanda.WandaPruner", "propagate": "sideways"})


def test_kwon_fisher_cache_is_reused_only_for_the_same_weights_and_examples(batches, tmp_path, monkeypatch):
    """A budget sweep computes the mask gradients once; other weights or other examples recompute them."""
    import stat_exp.prune.kwon as kwon

    calls = []
    monkeypatch.setattr(kwon, "mask_gradients", lambda *a: calls.append(1) or mask_gradients(*a))
    cache = tmp_path / "sweep" / "fisher.pt"
    model = llama()
    first = cached_mask_gradients(model, get_adapter(model), batches, cache)
    again = cached_mask_gradients(llama(), get_adapter(model), batches, cache)
    assert len(calls) == 1 and cache.is_file() and not list(cache.parent.glob(".*tmp"))
    for (h1, n1), (h2, n2) in zip(first, again):
        assert torch.equal(h1, h2) and torch.equal(n1, n2)
    cached_mask_gradients(model, get_adapter(model), batches[:2], cache)  # other examples
    assert len(calls) == 2
    other = llama()
    with torch.no_grad():
        other.model.layers[0].mlp.down_proj.weight[0, 0] += 1e-3  # other weights
    cached_mask_gradients(other, get_adapter(other), batches[:2], cache)
    assert len(calls) == 3
    pruned = [prune(KwonPruner(fisher_examples=None, fisher_cache=str(cache)), batches, 0.6)[0] for _ in range(2)]
    assert len(calls) == 4  # the two jobs of a sweep: one gradient pass
    x = batches[0]["input_ids"]
    assert torch.equal(pruned[0](x).logits, pruned[1](x).logits)


def test_kwon_takes_its_fisher_information_from_its_own_examples(batches, tokenizer):
    """Fisher information from `fisher_examples` examples (their 2,048), drawn by the calibration
    config for the pruner alone; the layer-wise tuning stays on the calibration batches."""
    from stat_exp.data.calibration import TextCalibration

    calibration = TextCalibration("wiki_calib", num_examples=4, seq_len=16, batch_size=2)
    examples = calibration.batches(tokenizer, num_examples=10)
    assert sum(len(b["input_ids"]) for b in examples) == 10 and len(calibration.batches(tokenizer)) == 2
    model = llama()
    pruner = KwonPruner(fisher_examples=10)
    own = make_batches(n=5, batch=2, seq=24, seed=7)
    PruneRunner(pruner, BudgetSpec(0.6, 64), None, progress=False).run(model, get_adapter(model), batches, CPU,
                                                                       examples=own)
    assert pruner.grads[0][0].shape[0] == len(own)  # one gradient per batch of its own examples
    with pytest.raises(ConfigError, match="pruner.fisher_examples"):
        check_node("pruner", {"_target_": "stat_exp.prune.kwon.KwonPruner", "fisher_examples": 0})
