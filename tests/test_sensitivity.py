"""The output sensitivity of each block: its block-at-a-time gradients are the whole model's, and
the runner forms, records and may apply the plan it prices."""
from __future__ import annotations

import pytest
import torch

from stat_exp.execution.offload import BlockStore
from stat_exp.models import get_adapter
from stat_exp.prune.sensitivity import SEED, boundary_gradients, output_sensitivity, sampled_labels, sampled_nll
from tests.tiny import batches, tiny_llama, tiny_opt, tiny_roberta

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


def test_an_encoder_has_no_output_sensitivity():
    model = tiny_roberta()
    adapter = get_adapter(model)
    assert output_sensitivity(model, adapter, batches(1), _resident(adapter), CPU, CPU) is None
