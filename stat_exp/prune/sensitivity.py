"""How much an error in each block's output changes the model's output: a per-block weight that turns
STAT's residual-energy prices into prices of the output.

STAT prices a block's error relative to the typical energy of its input tokens; what that error does
to the output depends on everything after the block. The expected KL between the model's output and
that of a model whose block i output is perturbed by a small isotropic e is e^T F_i e / 2, with F_i
the Fisher of the output distribution w.r.t. that block's output. Its trace is estimated from
gradients of the log-likelihood of labels sampled from the model itself (E_y[g g^T] = F), one
backward pass over held-out batches. Computed block at a time, as the runner works: one forward pass
keeps every block boundary's hidden states, then each block is run again in reverse order with
gradients to carry dL/dh back to its input.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
from torch import nn

from stat_exp.calibrate import BlockCall, capture_block_inputs, real_tokens
from stat_exp.models.base import ModelAdapter, has_token_logits
from stat_exp.prune.plan_selection import HEAD_TOKENS, head_output, run_block

Blocks = Callable[[int], AbstractContextManager[nn.Module]]  # block i on the device (BlockStore.block)
SEED = 0  # labels are drawn from the dense model's outputs with this seed, so a run repeats


def sampled_labels(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One label per position drawn from the model's own output distribution (the Fisher's labels)."""
    probs = torch.softmax(logits.detach().float(), -1)
    return torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator).reshape(probs.shape[:-1])


def sampled_nll(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """-sum over real tokens of log p(label): the loss whose gradients estimate the output Fisher."""
    logp = torch.log_softmax(logits.float(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return -logp[mask].sum()


def boundary_gradients(model: nn.Module, adapter: ModelAdapter, batches: list[dict[str, torch.Tensor]],
                       blocks: Blocks, device: torch.device, home: torch.device
                       ) -> Iterator[tuple[int, list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]]:
    """Yield (i, block i's inputs, dL/d(block i's outputs), which tokens are real), one list entry
    per batch, from the last block to the first; L is `sampled_nll` with labels drawn per batch from
    a generator seeded SEED + batch index, in chunks of the head's rows. Runs with gradients even
    under the caller's inference_mode or no_grad."""
    boundary = capture_block_inputs(model, adapter, batches, device, home)
    masks = [b["attention_mask"].bool() for b in batches]
    hidden = [boundary.hidden]
    tuple_output = False
    with torch.inference_mode():
        for i in range(len(adapter.layers())):
            with blocks(i) as layer:
                out, tuple_output = run_block(layer, i, hidden[-1], boundary, device)
            hidden.append(out)
    grads = [_head_gradient(model, adapter, batch, final, device, tuple_output, SEED + b)
             for b, (batch, final) in enumerate(zip(batches, hidden.pop()))]
    for i in reversed(range(len(adapter.layers()))):
        inputs = hidden.pop()
        yield i, inputs, grads, masks
        with blocks(i) as layer:
            grads = [_input_gradient(layer, calls[i], h, g, device) for h, g, calls in zip(inputs, grads, boundary.calls)]


def _head_gradient(model, adapter, batch, final, device, tuple_output, seed) -> torch.Tensor:
    """dL/d(last block's output) for one batch, the head run on HEAD_TOKENS tokens at a time."""
    generator = torch.Generator(device=device).manual_seed(seed)
    rows = max(1, HEAD_TOKENS // batch["input_ids"].shape[-1])
    parts = []
    for start in range(0, batch["input_ids"].shape[0], rows):
        part = {k: v[start: start + rows] for k, v in batch.items()}
        with _gradients():
            h = final[start: start + rows].to(device).clone().requires_grad_()
            logits, _ = head_output(model, adapter, part, h, device, tuple_output)
            loss = sampled_nll(logits, sampled_labels(logits, generator), part["attention_mask"].to(device).bool())
            parts.append(torch.autograd.grad(loss, h)[0].to(final.device))
    return torch.cat(parts)


def _input_gradient(layer: nn.Module, call: BlockCall, h: torch.Tensor, grad_out: torch.Tensor,
                    device: torch.device) -> torch.Tensor:
    """dL/d(block input) from dL/d(block output): the block run again on its input, with gradients
    (w.r.t. the input only: no parameter's .grad is touched)."""
    with _gradients():
        x = h.to(device).clone().requires_grad_()
        y = layer(x, *_usable(call.args), **_usable(call.kwargs))
        y = y[0] if isinstance(y, tuple) else y
        return torch.autograd.grad(y, x, grad_out.to(device))[0].to(h.device)


@contextmanager
def _gradients() -> Iterator[None]:
    """Autograd on, whatever the caller's mode (the runner streams under inference_mode)."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def _usable(value: Any) -> Any:
    """`value` with inference tensors (the recorded call arguments) cloned, so autograd may save them."""
    if isinstance(value, torch.Tensor):
        return value.clone() if value.is_inference() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_usable(v) for v in value)
    if isinstance(value, dict):
        return {k: _usable(v) for k, v in value.items()}
    return value


def output_sensitivity(model: nn.Module, adapter: ModelAdapter, batches: list[dict[str, torch.Tensor]],
                       blocks: Blocks, device: torch.device, home: torch.device) -> list[float] | None:
    """Per block, s_i x m_i: s_i the mean over real tokens of |dL/d(block output)|^2 / hidden size (the
    output Fisher's trace per dimension: twice the expected KL a unit isotropic error in the block's
    output causes), m_i the median real token's squared input norm. STAT's prices divide by n_tokens
    x that median, so multiplied by w_i they price a block's output error by its effect on the output.
    None for a model without logits (an encoder: no output distribution to sample from)."""
    if not has_token_logits(model):
        return None
    weights = [0.0] * len(adapter.layers())
    for i, inputs, grads, masks in boundary_gradients(model, adapter, batches, blocks, device, home):
        g = torch.cat([real_tokens(x.float(), m.to(x.device)) for x, m in zip(grads, masks)])
        x = torch.cat([real_tokens(x.float(), m.to(x.device)) for x, m in zip(inputs, masks)])
        s = float(g.square().sum(-1).mean()) / g.shape[-1]
        weights[i] = s * float(x.double().square().sum(-1).median())
    return weights
