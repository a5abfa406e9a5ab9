"""Kwon et al.'s mask tuning as published (retraining-free-pruning, prune/rescale.py).

Layer by layer, every kept head and neuron gets a scale, fitted by least squares so that the
student layer reproduces its teacher on the calibration tokens:
- the student's inputs propagate through the already-tuned student layers; the teacher's through
  the teacher's own masked layers (the teacher is the model masked at the first step of their
  two-step schedule, kept FLOPs sqrt(target), untuned);
- the target is the teacher's sublayer output plus its residual, minus the student's residual and
  the projection's bias, so the scales also absorb how far the student's residual stream drifted;
- attention: one scale per kept head, with an intercept column that is fitted and discarded, and
  not in the first layer; FFN: one scale per kept neuron, on the FFN inputs that the layer's
  already-tuned attention produces; no intercept;
- solved as their code does: LSMR on the normal equations, damped toward scale 1 (damp=1); a fit
  that fails or leaves [-max_scale, max_scale] stops the tuning of this and every later layer.

The residual of the FFN is the FFN's input in post-LN blocks (BERT: the residual sum is
normalised after each sublayer) and block input + attention output in pre-norm blocks.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.sparse.linalg import lsmr
from torch import nn

from stat_exp.calibrate import capture_block_inputs, real_tokens
from stat_exp.models.base import ModelAdapter
from stat_exp.models.hooks import Hooks, StopForward, stops_forward
from stat_exp.prune.surgery import head_channels

LSMR_DAMP = 1.0  # their solver's damping (toward scale 1)
LSMR_MAX_ITER = 100_000
LSMR_OK = 3  # istop below this: converged (their success test)


def _out(result) -> torch.Tensor:
    return result[0] if isinstance(result, tuple) else result


class MaskTuner:
    """Carries the teacher's and the student's block inputs over the calibration batches."""

    def __init__(self, model: nn.Module, adapter: ModelAdapter, batches: list[dict[str, torch.Tensor]],
                 device: torch.device, max_scale: float):
        self.adapter, self.max_scale = adapter, max_scale
        self.boundary = capture_block_inputs(model, adapter, batches, device)
        self.teacher = list(self.boundary.hidden)
        self.student = list(self.boundary.hidden)
        self.stopped = False

    def tune(self, index: int, layer: nn.Module, teacher: tuple[torch.Tensor, torch.Tensor],
             student: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Scales for the student's kept heads and neurons (None: left unscaled) of the still-dense
        `layer`; `teacher`/`student`: (kept query heads, kept neurons). Also moves the teacher on."""
        attn, ffn = self.adapter.attention(layer), self.adapter.ffn(layer)
        t_heads, t_neurons = _unit_mask(teacher[0], attn.num_heads, attn.head_dim), _unit_mask(teacher[1], ffn.width, 1)
        attn_targets, ffn_targets, self.teacher = self.teacher_pass(index, layer, t_heads, t_neurons)
        if self.stopped:
            return None, None
        s_heads = _unit_mask(student[0], attn.num_heads, attn.head_dim)
        head_scales = None
        if index > 0 and len(student[0]) < attn.num_heads:
            head_scales = self._solve(*self.head_system(index, layer, s_heads, attn_targets, student[0]))
            head_scales = None if head_scales is None else head_scales[:-1]  # the intercept is discarded
        if head_scales is not None:
            s_heads = s_heads.clone()
            s_heads[head_channels(student[0], attn.head_dim)] = head_scales.repeat_interleave(attn.head_dim).to(s_heads)
        neuron_scales = None
        if not self.stopped and len(student[1]) < ffn.width:
            neuron_mask = _unit_mask(student[1], ffn.width, 1)
            neuron_scales = self._solve(*self.neuron_system(index, layer, s_heads, neuron_mask, ffn_targets,
                                                            student[1]))
        return head_scales, neuron_scales

    def advance(self, index: int, layer: nn.Module) -> None:
        """Feed the (now pruned and tuned) student layer its inputs: the next layer's inputs."""
        with torch.inference_mode():
            self.student = [_out(layer(h, *calls[index].args, **calls[index].kwargs))
                            for h, calls in zip(self.student, self.boundary.calls)]

    def teacher_pass(self, index, layer, head_mask, neuron_mask):
        """Per batch: attention output + residual, FFN output + residual (real tokens), and the
        teacher's block outputs."""
        attn, ffn = self.adapter.attention(layer), self.adapter.ffn(layer)
        attn_targets, ffn_targets, outputs = [], [], []
        for i, hidden in enumerate(self.teacher):
            mask = self.boundary.masks[i]
            seen = self._run(index, layer, i, hidden, head_mask, neuron_mask, stop_at_down=False)
            attn_targets.append((real_tokens(seen["o_out"], mask) + real_tokens(hidden, mask)).double())
            ffn_targets.append((real_tokens(seen["down_out"], mask) + real_tokens(seen["ffn_residual"], mask)).double())
            outputs.append(seen["block_out"])
        return ([t - _bias(attn.o) for t in attn_targets], [t - _bias(ffn.down) for t in ffn_targets], outputs)

    def head_system(self, index, layer, head_mask, targets, kept_heads) -> tuple[torch.Tensor, torch.Tensor]:
        """Normal equations of the kept heads' contributions after O (and an intercept column)
        against the targets minus the student's residual."""
        attn = self.adapter.attention(layer)
        W = attn.o.weight.detach().double()
        channels = head_channels(kept_heads, attn.head_dim).to(W.device)
        H, dh = len(kept_heads), attn.head_dim
        device = self.student[0].device
        A = torch.zeros(H + 1, H + 1, dtype=torch.float64, device=device)
        b = torch.zeros(H + 1, dtype=torch.float64, device=device)
        for i, (hidden, target) in enumerate(zip(self.student, targets)):
            mask = self.boundary.masks[i]
            seen = self._run(index, layer, i, hidden, head_mask, None, stop_at_down=True)
            X = real_tokens(seen["o_in"], mask).double()[:, channels]  # kept heads' outputs
            B = target - real_tokens(hidden, mask).double()  # minus the student's residual
            Wk = W[:, channels]
            per_head = X.view(-1, H, dh)
            contrib = torch.einsum("thd,ohd->tho", per_head, Wk.view(-1, H, dh))  # (tokens, heads, d_out)
            A[:H, :H] += torch.einsum("tho,tgo->hg", contrib, contrib)
            A[:H, H] += contrib.sum((0, 2))
            A[H, H] += contrib.shape[0] * contrib.shape[2]
            b[:H] += torch.einsum("tho,to->h", contrib, B)
            b[H] += B.sum()
        A[H, :H] = A[:H, H]
        return A, b

    def neuron_system(self, index, layer, head_mask, neuron_mask, targets, kept) -> tuple[torch.Tensor, torch.Tensor]:
        """Normal equations of the kept neurons' contributions after down against the targets
        minus the student's FFN residual (with the layer's tuned attention)."""
        ffn = self.adapter.ffn(layer)
        kept = torch.as_tensor(kept).to(ffn.down.weight.device)
        Wk = ffn.down.weight.detach().double()[:, kept]
        A = torch.zeros(len(kept), len(kept), dtype=torch.float64, device=Wk.device)
        b = torch.zeros(len(kept), dtype=torch.float64, device=Wk.device)
        for i, (hidden, target) in enumerate(zip(self.student, targets)):
            mask = self.boundary.masks[i]
            seen = self._run(index, layer, i, hidden, head_mask, neuron_mask, stop_at_down=True)
            Z = real_tokens(seen["down_in"], mask).double()[:, kept]
            B = target - real_tokens(seen["ffn_residual"], mask).double()
            A += Z.T @ Z
            b += (Z * (B @ Wk)).sum(0)
        A *= Wk.T @ Wk
        return A, b

    def _solve(self, A: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
        """1 + lsmr(A, b - A 1, damp=1), or None (and tuning stops) when it fails or is out of range."""
        A, b = A.cpu(), b.cpu()
        ones = torch.ones(A.shape[0], dtype=torch.float64)
        if A.shape[0] == 1:
            x, ok = (b - A @ ones) / A[0, 0], True
        else:
            sol = lsmr(A.numpy(), (b - A @ ones).numpy(), damp=LSMR_DAMP, maxiter=LSMR_MAX_ITER)
            x, ok = torch.from_numpy(np.asarray(sol[0])), sol[1] < LSMR_OK
        scales = x + 1
        if not ok or not torch.isfinite(scales).all() or float(scales.abs().max()) > self.max_scale:
            self.stopped = True
            return None
        return scales

    def _run(self, index, layer, batch: int, hidden, head_mask, neuron_mask, stop_at_down: bool) -> dict[str, torch.Tensor]:
        """Block `index` on one batch with unit masks (None: all kept), recording what the fits need."""
        attn, ffn = self.adapter.attention(layer), self.adapter.ffn(layer)
        seen: dict[str, torch.Tensor] = {}

        def o_pre(module, args):
            x = args[0] if head_mask is None else args[0] * head_mask.to(args[0])
            seen["o_in"] = x
            return (x, *args[1:])

        def down_pre(module, args):
            x = args[0] if neuron_mask is None else args[0] * neuron_mask.to(args[0])
            seen["down_in"] = x
            if stop_at_down:
                raise StopForward
            return (x, *args[1:])

        with Hooks() as hooks, torch.inference_mode(), stops_forward():
            hooks.pre(attn.o, o_pre).post(attn.o, lambda m, a, out: seen.__setitem__("o_out", out))
            hooks.pre(ffn.up or ffn.gate_up, lambda m, a: seen.__setitem__("ffn_in", a[0]))
            hooks.pre(ffn.down, down_pre).post(ffn.down, lambda m, a, out: seen.__setitem__("down_out", out))
            call = self.boundary.calls[batch][index]
            seen["block_out"] = _out(layer(hidden, *call.args, **call.kwargs))
        post_ln = self.adapter.post_ln
        seen["ffn_residual"] = seen["ffn_in"] if post_ln else hidden + seen["o_out"].view_as(hidden)
        return seen


def _bias(linear: nn.Linear) -> torch.Tensor | float:
    """The layer's bias in float64 (0 without one)."""
    return 0.0 if linear.bias is None else linear.bias.detach().double()


def _unit_mask(kept: torch.Tensor | list[int], units: int, size: int) -> torch.Tensor:
    mask = torch.zeros(units)
    mask[torch.as_tensor(kept, dtype=torch.long)] = 1.0
    return mask.repeat_interleave(size)
