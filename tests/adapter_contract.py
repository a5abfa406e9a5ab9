"""One contract every adapter meets, run on a tiny random model of its family (subclass per family
in test_adapters.py, defining `build`).

- pruning nothing leaves the outputs unchanged;
- cutting heads and neurons equals zeroing them in the dense model (slicing, fused layouts and the
  module's run-time head bookkeeping are all right);
- STAT through the runner reaches the budget and the model runs (and generates, for decoders);
- the FLOPs model matches torch's count of the executed matmuls, block by block;
- both grouped-query modes give valid layouts where KV heads are fewer than heads;
- a pruned model saved with stat_exp.export reloads with the same outputs (load_pruned, and
  from_pretrained with trust_remote_code).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from stat_exp.export import load_pruned, save_pruned
from stat_exp.factorize import GramBackend
from stat_exp.models import get_adapter
from stat_exp.models.flops import FlopsModel, LayerShape
from stat_exp.models.loading import TASKS
from stat_exp.prune.budget import BudgetSpec
from stat_exp.prune.none import NoPruner
from stat_exp.prune.runner import PruneRunner
from stat_exp.prune.scores import attention_levels, attention_units
from stat_exp.prune.stat import StatPruner
from stat_exp.prune.surgery import head_channels, prune_attention, prune_ffn
from stat_exp.types import GQA_MODES
from tests.tiny import batches, clone

CPU = torch.device("cpu")
SEQ = 16  # tokens of the FLOPs check


@pytest.fixture
def one_thread():
    """Tiny matmuls on one thread: on a shared, loaded machine two OpenMP threads spend ~40 ms per
    matmul waiting for each other (measured: 48 ms vs 0.12 ms for a 128 x 64 product)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def output(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**batch)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def stat(model: nn.Module, flops: float, gqa: str = "per_group"):
    return PruneRunner(StatPruner(gqa=gqa), BudgetSpec(flops=flops, seq_len=32), GramBackend(), progress=False).run(
        model, get_adapter(model), batches(3), CPU)


class AdapterContract:
    """Name does not start with Test: pytest collects the per-family subclasses only."""

    task = "causal_lm"  # how saving records the model ("encoder" and "sequence_classification" for encoders)

    @pytest.fixture(autouse=True)
    def _one_thread(self, one_thread):
        yield

    def build(self) -> nn.Module:
        raise NotImplementedError

    @pytest.fixture
    def model(self) -> nn.Module:
        return self.build().eval()

    def test_keep_everything_is_identity(self, model):
        x = batches(1, pad_last=5)[0]
        ref = output(model, x)
        for pruner in (NoPruner(), StatPruner()):
            m = clone(model)
            out = PruneRunner(pruner, BudgetSpec(flops=1.0, seq_len=32), GramBackend(), progress=False).run(
                m, get_adapter(m), batches(2), CPU)
            assert out.achieved["flops_fraction"] == pytest.approx(1.0)
            torch.testing.assert_close(output(m, x), ref, rtol=1e-5, atol=1e-5)

    def test_cutting_units_equals_zeroing_them(self, model):
        """Per layer a different GQA mode, a random valid head level and half the neurons."""
        reference, pruned = clone(model), clone(model)
        ref_adapter, adapter = get_adapter(reference), get_adapter(pruned)
        g = torch.Generator().manual_seed(1)
        handles = []
        for i, (ref_layer, layer) in enumerate(zip(ref_adapter.layers(), adapter.layers())):
            attn, ffn = adapter.attention(layer), adapter.ffn(layer)
            mode = GQA_MODES[i % 2]
            units = len(attention_units(attn.num_heads, attn.num_kv_heads, mode))
            levels = attention_levels(torch.randperm(units, generator=g).tolist(), attn.num_heads, attn.num_kv_heads, mode)
            level = levels[(len(levels) - 1) // 2]
            neurons = torch.randperm(ffn.width, generator=g)[: ffn.width // 2].sort().values
            handles += [_zero_inputs_except(ref_adapter.attention(ref_layer).o, head_channels(level.heads, attn.head_dim)),
                        _zero_inputs_except(ref_adapter.ffn(ref_layer).down, neurons)]
            prune_attention(adapter, layer, level)
            prune_ffn(adapter, layer, neurons)
            assert (adapter.attention(layer).num_heads, adapter.attention(layer).num_kv_heads) == (
                level.num_heads, level.num_kv_heads)
        x = batches(1, pad_last=5)[0]
        torch.testing.assert_close(output(pruned, x), output(reference, x), rtol=1e-4, atol=1e-5)
        for h in handles:
            h.remove()

    def test_stat_reaches_the_budget_and_the_model_runs(self, model):
        dense_params = sum(p.numel() for p in model.parameters())
        out = stat(model, 0.6)
        assert sum(p.numel() for p in model.parameters()) == out.achieved["params"] < dense_params
        assert out.achieved["flops_fraction"] == pytest.approx(0.6, abs=0.01)
        assert torch.isfinite(output(model, batches(1, pad_last=5)[0])).all()
        self._runs(model)

    def test_flops_model_matches_counted_matmuls_per_block(self, model):
        """Prune unevenly, then count with eager attention so score and context matmuls count too."""
        stat(model, 0.55)
        adapter = get_adapter(model)
        model.set_attn_implementation("eager")
        with FlopCounterMode(display=False) as counter:
            model(**batches(1, batch=1, seq=SEQ)[0])
        counted = counter.get_flop_counts()
        names = {id(m): n for n, m in model.named_modules()}
        flops = FlopsModel(SEQ)
        for layer in adapter.layers():
            shape = LayerShape.of(adapter.attention(layer), adapter.ffn(layer))
            executed = sum(counted[f"{type(model).__name__}.{names[id(layer)]}"].values())
            assert executed == pytest.approx(flops.dense(shape), rel=1e-9)

    @pytest.mark.parametrize("gqa", GQA_MODES)
    def test_grouped_query_modes_keep_valid_layouts(self, model, gqa):
        adapter = get_adapter(model)
        dense = [adapter.attention(layer) for layer in adapter.layers()]
        if all(a.num_kv_heads == a.num_heads for a in dense):
            pytest.skip("multi-head attention: one query head per KV head")
        stat(model, 0.5, gqa)
        for before, layer in zip(dense, adapter.layers()):
            after = adapter.attention(layer)
            assert after.num_heads % after.num_kv_heads == 0
            if gqa == "per_group":
                assert after.num_kv_heads == before.num_kv_heads
            else:
                assert after.group_size == before.group_size
        assert torch.isfinite(output(model, batches(1, pad_last=5)[0])).all()
        self._runs(model)

    def test_saved_pruned_model_reloads(self, model, tmp_path, tokenizer):
        stat(model, 0.6)
        x = batches(1, pad_last=5)[0]
        save_pruned(model, tokenizer, tmp_path, self.task)
        # stat-exp's loader, and transformers' with the modeling file the folder ships
        for reloaded in (load_pruned(tmp_path), TASKS[self.task].from_pretrained(tmp_path, trust_remote_code=True)):
            assert get_adapter(reloaded).structure() == get_adapter(model).structure()
            torch.testing.assert_close(output(reloaded, x), output(model, x), rtol=1e-5, atol=1e-5)

    def _runs(self, model: nn.Module) -> None:
        """Decoders also generate (the KV cache holds per-layer head counts)."""
        if get_adapter(model).causal and hasattr(model, "generate"):
            ids = batches(1)[0]["input_ids"][:1, :8]
            assert model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0).shape[1] == 11


def _zero_inputs_except(linear: nn.Linear, kept: torch.Tensor):
    """A hook that zeroes every input channel of `linear` outside `kept` (the dense reference)."""
    mask = torch.zeros(linear.in_features)
    mask[kept] = 1.0
    return linear.register_forward_pre_hook(lambda module, args: (args[0] * mask.to(args[0].dtype),))
