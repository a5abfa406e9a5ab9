"""The output sensitivity of each block: its block-at-a-time gradients are the whole model's, and
the runner forms, records and may apply the plan it prices."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from stat_exp.execution.offload import BlockStore
from stat_exp.models import get_adapter
from stat_exp.models.flops import FlopsModel, shapes_of
from stat_exp.prune.budget import BudgetSpec
from stat_exp.prune.plan_selection import GLOBAL, OUTPUT_PRICED, candidate_plans
from stat_exp.prune.sensitivity import SEED, boundary_gradients, output_sensitivity, sampled_labels, sampled_nll
from tests.test_plan_selection import HELD_OUT, _kl, _runner
from tests.tiny import batches, clone, tiny_llama, tiny_opt, tiny_roberta

CPU = torch.device("cpu")


def _resident(adapter):
    return BlockStore(adapter.model, adapter, CPU).block


def _whole_model_gradients(model, adapter, held_out) -> list[list[torch.Tensor]]:
    """[batch][block] dL/d(block output) by autograd through the whole model, labels drawn as
    boundary_gradients draws them."""
    grads = []
    for b, batch in enumerate(held_out):
        outputs: list[torch.Tensor] = []

        def keep(_module, _args, out):
            outputs.append(out[0] if isinstance(out, tuple) else out)

        hooks = [layer.register_forward_hook(keep) for layer in adapter.layers()]
        try:
            logits = model(**batch, use_cache=False).logits
        finally:
            for hook in hooks:
                hook.remove()
        labels = sampled_labels(logits, torch.Generator().manual_seed(SEED + b))
        loss = sampled_nll(logits, labels, batch["attention_mask"].bool())
        grads.append(list(torch.autograd.grad(loss, outputs)))
    return grads


@pytest.mark.parametrize("build", [tiny_llama, tiny_opt], ids=lambda b: b.__name__[5:])
def test_block_at_a_time_gradients_are_the_whole_models(build):
    """Kills: a backward step that drops a block's call arguments (rotary, the padding mask), the head
    gradient taken at the wrong boundary, gradients carried through the wrong block."""
    torch.manual_seed(0)
    model = build(layers=3).eval()
    adapter = get_adapter(model)
    held_out = batches(2, seed=7, pad_last=5)
    expected = _whole_model_gradients(model, adapter, held_out)
    seen = []
    with torch.inference_mode():  # the runner's mode: the gradients must be taken regardless
        for i, _, grads, _ in boundary_gradients(model, adapter, held_out, _resident(adapter), CPU, CPU):
            seen.append(i)
            for b, g in enumerate(grads):
                torch.testing.assert_close(g, expected[b][i], rtol=1e-4, atol=1e-7)
    assert seen == [2, 1, 0]
    assert all(p.grad is None for p in model.parameters())


def test_the_sensitivity_is_the_gradient_energy_times_the_median_input_energy():
    torch.manual_seed(0)
    model = tiny_llama(layers=2).eval()
    adapter = get_adapter(model)
    held_out = batches(2, seed=7, pad_last=5)
    weights = output_sensitivity(model, adapter, held_out, _resident(adapter), CPU, CPU)
    masks = [b["attention_mask"].bool() for b in held_out]
    for i, inputs, grads, _ in boundary_gradients(model, adapter, held_out, _resident(adapter), CPU, CPU):
        g = torch.cat([x[m] for x, m in zip(grads, masks)])
        h = torch.cat([x[m] for x, m in zip(inputs, masks)]).double()
        want = float(g.square().sum(-1).mean()) / g.shape[-1] * float(h.square().sum(-1).median())
        assert weights[i] == pytest.approx(want, rel=1e-6) and want > 0


def _dominant_middle_block(scale: float = 50.0):
    """A 3-block llama whose middle block's outputs dominate the residual stream: the first block's
    errors, priced against its small input energy, look dear to STAT but barely reach the output."""
    torch.manual_seed(0)
    model = tiny_llama(layers=3)
    middle = get_adapter(model).layers()[1]
    with torch.no_grad():
        middle.mlp.down_proj.weight.mul_(scale)
        middle.self_attn.o_proj.weight.mul_(scale)
    return model


def test_the_output_priced_candidate_beats_global_where_residual_prices_mislead_and_is_applied():
    """Kills: the candidate left out or priced without the sensitivity (or by its inverse), a recorded
    score that is not the applied model's divergence, the sensitivity missing from the record."""
    base = _dominant_middle_block()
    model = clone(base)
    record = _runner(flops=0.4, select="output_priced").run(model, get_adapter(model), batches(), CPU,
                                                           held_out=HELD_OUT).allocation
    assert record["chosen"] == OUTPUT_PRICED and record["held_out"][OUTPUT_PRICED] < 0.8 * record["held_out"][GLOBAL]
    assert len(record["sensitivity"]) == 3 and min(record["sensitivity"]) > 0
    assert _kl(base, model, HELD_OUT) == pytest.approx(record["held_out"][OUTPUT_PRICED], rel=1e-4)


def test_the_output_priced_candidate_prices_copies_and_is_left_out_when_it_repeats_a_plan():
    model = tiny_llama(layers=3)
    runner = _runner()
    scores = [sc for sc, _ in runner.score_layers(model, get_adapter(model), batches(), CPU)]
    before = [sc.ffn_cost.copy() for sc in scores]
    shapes, flops, budget = shapes_of(get_adapter(model)), FlopsModel(32), BudgetSpec(flops=0.5, seq_len=32)
    assert OUTPUT_PRICED not in candidate_plans(scores, shapes, flops, budget, [2.0] * 3)  # = the global plan
    skewed = candidate_plans(scores, shapes, flops, budget, [1e6, 1.0, 1.0])
    assert skewed[OUTPUT_PRICED][0].neurons > skewed[GLOBAL][0].neurons
    assert all(np.array_equal(sc.ffn_cost, b) for sc, b in zip(scores, before))
    assert OUTPUT_PRICED not in candidate_plans(scores, shapes, flops, budget)


def test_an_encoder_gets_no_output_priced_candidate():
    model = tiny_roberta()
    record = _runner(select="output_priced").run(model, get_adapter(model), batches(), CPU, held_out=HELD_OUT).allocation
    assert OUTPUT_PRICED not in record["held_out"] and "sensitivity" not in record


@pytest.mark.parametrize("build", [tiny_llama, tiny_roberta], ids=["llama", "roberta"])
def test_the_planner_counts_the_sensitivitys_passes_and_boundaries_for_a_model_with_logits(build):
    """Kills: a planner that leaves out the forward and backward passes or the stored boundaries, or
    counts them for an encoder (which gets no sensitivity)."""
    from stat_exp.execution.plan import Job, plan_sizes
    from stat_exp.factorize import GramBackend
    from stat_exp.prune.plan_selection import max_candidates
    from stat_exp.prune.stat import StatPruner

    model = build(layers=8) if build is tiny_llama else build()  # 8 blocks: more boundaries than streams
    held_out = 8
    job = Job(model=model, pruner=StatPruner(), backend=GramBackend(), dtype=torch.float32, sequences=4, seq_len=32,
              batch_size=4, held_out_streams=held_out * (max_candidates("output_priced") + 1), held_out_examples=held_out)
    plain, sizes = plan_sizes(replace(job, held_out_examples=0)), plan_sizes(job)
    adapter = get_adapter(model)
    if build is tiny_llama:
        dense = sum(FlopsModel(32).dense(sh) for sh in shapes_of(adapter))
        assert sizes.selection_flops == pytest.approx(plain.selection_flops + 3 * held_out * dense)
        boundaries = (len(adapter.layers()) + 2) * held_out * 32 * adapter.hidden_size * 4
        assert sizes.selection - max(b.weights for b in sizes.blocks) == max(boundaries, job.held_out_streams * 32
                                                                              * adapter.hidden_size * 4)
    else:
        assert (sizes.selection, sizes.selection_flops) == (plain.selection, plain.selection_flops)


def test_the_default_choice_leaves_the_output_priced_candidate_out():
    """budget.select=held_out (the default) neither weighs the blocks nor forms the candidate: it lost to
    the global plan on SmolLM2 (docs/allocation.md). Kills: the sensitivity computed by default."""
    model = _dominant_middle_block()
    record = _runner(flops=0.4).run(model, get_adapter(model), batches(), CPU, held_out=HELD_OUT).allocation
    assert OUTPUT_PRICED not in record["held_out"] and "sensitivity" not in record
