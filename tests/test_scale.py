"""Block-at-a-time execution: offloaded weights, bounded global allocation, per-block call
arguments, the planner, and the CUDA path (skipped without a GPU)."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, Gemma2Config, Gemma2ForCausalLM

from stat_exp.calibrate import capture_block_inputs
from stat_exp.errors import ConfigError
from stat_exp.execution import plan as execution_plan
from stat_exp.execution.offload import HostStore, OffloadError, checkpoint_index, open_model
from stat_exp.execution.plan import PlanError
from stat_exp.factorize import GramBackend, QRBackend
from stat_exp.models import get_adapter
from stat_exp.models.flops import shapes_of
from stat_exp.models.decoders import LlamaAdapter
from stat_exp.parts import build_parts
from stat_exp.prune.budget import BudgetSpec
from stat_exp.prune.kwon import KwonPruner
from stat_exp.prune.runner import PruneRunner
from stat_exp.prune.stat import StatPruner
from stat_exp.prune.stat_paper import StatPaperPruner
from tests.tiny import VOCAB, batches, clone, tiny_llama

CPU = torch.device("cpu")
GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the CUDA path is checked by "
                                                               "python -m benchmarks.gpu_check on a GPU machine)")


def _run(model, store=None, stream="block", factors="hold", spill_dir=None, flops=0.6, propagate="dense",
         backend=None, device=CPU, pruner=None):
    runner = PruneRunner(pruner or StatPruner(), BudgetSpec(flops=flops, seq_len=32), backend or GramBackend(block_dtype="float64"),
                         propagate, progress=False, stream=stream, factors=factors, spill_dir=spill_dir)
    return runner.run(model, get_adapter(model), batches(pad_last=4), device, store)


def _saved(tmp_path: Path, model) -> Path:
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("stream,factors", [("block", "hold"), ("block", "spill"), ("block", "recompute"),
                                            ("model", "spill"), ("model", "recompute")])
def test_every_execution_mode_prunes_exactly_like_the_held_model_major_path(tmp_path, stream, factors):
    base = tiny_llama(layers=3)
    reference, model = clone(base), clone(base)
    expected = _run(reference, stream="model", factors="hold")
    got = _run(model, stream=stream, factors=factors, spill_dir=tmp_path / "spill")
    assert got.structure == expected.structure
    x = batches(1, seed=5)[0]
    torch.testing.assert_close(model(**x).logits, reference(**x).logits, rtol=1e-5, atol=1e-5)
    assert not (tmp_path / "spill").exists() or not any((tmp_path / "spill").iterdir())


def test_spilled_factors_leave_memory_and_come_back_from_disk(tmp_path, monkeypatch):
    """With spill, no block's factorization stays in memory while the allocation waits."""
    from stat_exp.execution import factors as pending

    seen = []
    real = pending.SpilledPending._stash
    monkeypatch.setattr(pending.SpilledPending, "_stash",
                        lambda self, i, sc: (real(self, i, sc), seen.append((i, sc.heavy, self._path(i).exists()))))
    _run(tiny_llama(layers=3), factors="spill", spill_dir=tmp_path / "spill")
    assert [i for i, _, _ in seen] == [0, 1, 2]
    assert all(heavy is None and on_disk for _, heavy, on_disk in seen)


def test_blocks_on_the_host_are_onloaded_one_at_a_time(monkeypatch):
    """offload=cpu: the stream asks the store for each block in turn and gives it back."""
    model = tiny_llama(layers=3)
    events = []
    store = HostStore(model, get_adapter(model), CPU)
    on, off = store.onload, store.offload
    monkeypatch.setattr(store, "onload", lambda i: events.append(("on", i)) or on(i))
    monkeypatch.setattr(store, "offload", lambda i: events.append(("off", i)) or off(i))
    _run(model, store=store, factors="hold")
    first_pass = events[:6]
    assert first_pass == [("on", 0), ("off", 0), ("on", 1), ("off", 1), ("on", 2), ("off", 2)]


def test_disk_offload_prunes_like_resident_weights_and_writes_pruned_blocks(tmp_path):
    base = tiny_llama(layers=3)
    folder = _saved(tmp_path, base)
    reference = clone(base)
    expected = _run(reference, stream="model")
    model, _, store = _open_disk(folder, tmp_path)
    assert all(p.device.type == "meta" for layer in get_adapter(model).layers() for p in layer.parameters())
    got = _run(model, store=store)
    assert got.structure == expected.structure
    assert sorted(p.name for p in (tmp_path / "work").glob("block_*.safetensors")) == [
        "block_00000.safetensors", "block_00001.safetensors", "block_00002.safetensors"]
    store.prepare_for_eval()  # accelerate streams the pruned blocks from their files
    x = batches(1, seed=5)[0]
    torch.testing.assert_close(model(**x).logits, reference(**x).logits, rtol=1e-5, atol=1e-5)
    store.close()
    assert not (tmp_path / "work").exists()


def test_a_two_stage_pruner_restreams_the_blocks_it_pruned_from_disk(tmp_path):
    """stat_paper prunes the FFNs, then streams the FFN-pruned blocks again for the heads: with the
    blocks on disk the second stage reads the pruned block files."""
    base = tiny_llama(layers=3)
    folder = _saved(tmp_path, base)
    reference = clone(base)
    expected = _run(reference, stream="model", pruner=StatPaperPruner())
    model, _, store = _open_disk(folder, tmp_path)
    got = _run(model, store=store, pruner=StatPaperPruner())
    assert got.structure == expected.structure != _run(clone(base), stream="model").structure
    store.prepare_for_eval()
    x = batches(1, seed=5)[0]
    torch.testing.assert_close(model(**x).logits, reference(**x).logits, rtol=1e-5, atol=1e-5)
    store.close()


def _open_disk(folder: Path, tmp_path: Path):
    tok_dir = folder
    AutoTokenizer.from_pretrained(_tokenizer_folder()).save_pretrained(tok_dir)
    return open_model(str(folder), "causal_lm", "float32", CPU, "disk", tmp_path / "work")


def _tokenizer_folder() -> str:
    from stat_exp.assets import model_path

    return str(model_path("minilm_l6"))


def test_a_folder_without_safetensors_or_with_a_broken_index_is_one_line(tmp_path):
    with pytest.raises(OffloadError, match="needs safetensors weights"):
        checkpoint_index(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(OffloadError, match="cannot read the checkpoint index"):
        checkpoint_index(tmp_path)


def test_a_truncated_block_file_is_one_line(tmp_path):
    folder = _saved(tmp_path, tiny_llama(layers=2))
    model, _, store = _open_disk(folder, tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(OffloadError, match="cannot read"):
        store.onload(0)


def test_propagate_pruned_feeds_each_block_the_pruned_outputs(monkeypatch):
    """Block 1's statistics under propagate=pruned are those of pruned block 0's outputs: checked
    against the Gram computed by hand from the final model's block 0 and the dense block 1."""
    base = tiny_llama(layers=2)
    model = clone(base)
    grams = {}
    real = StatPruner._scores
    monkeypatch.setattr(StatPruner, "_scores", lambda self, adapter, i, layer, stats, priced: (
        grams.__setitem__(i, stats.ffn_factor.gram().clone()), real(self, adapter, i, layer, stats, priced))[1])
    _run(model, propagate="pruned", factors="hold")  # the last scoring of block 1 is the pruned pass
    data = batches(pad_last=4)
    boundary = capture_block_inputs(model, get_adapter(model), data, CPU)
    block0, block1 = model.model.layers[0], clone(base).model.layers[1]
    inputs = []
    handle = block1.mlp.down_proj.register_forward_pre_hook(lambda m, a: inputs.append(a[0]))
    with torch.inference_mode():
        for hidden, mask, calls in zip(boundary.hidden, boundary.masks, boundary.calls):
            out = block0(hidden, *calls[0].args, **calls[0].kwargs)
            block1(out[0] if isinstance(out, tuple) else out, *calls[1].args, **calls[1].kwargs)
            inputs[-1] = inputs[-1][mask] if mask is not None else inputs[-1].reshape(-1, inputs[-1].shape[-1])
    handle.remove()
    X = torch.cat(inputs).double()
    torch.testing.assert_close(grams[1], X.T @ X, rtol=1e-6, atol=1e-6)
    grams_pruned = grams.copy()
    _run(clone(base), propagate="dense", factors="hold")
    assert not torch.allclose(grams_pruned[1], grams[1], rtol=1e-3)  # dense propagation differs


def _tiny_gemma2() -> Gemma2ForCausalLM:
    cfg = Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=4,
                       layer_types=["sliding_attention", "full_attention"] * 2, attn_implementation="eager")
    return Gemma2ForCausalLM(cfg).eval()


def test_block_replay_uses_each_blocks_own_arguments():
    """Gemma 2 alternates sliding-window and global attention: replaying blocks one at a time with
    block 0's mask for every block would change every other block's output."""
    model = _tiny_gemma2()
    adapter = LlamaAdapter(model)  # Gemma 2's blocks have Llama's layout; only layers() is used here
    data = batches(1, seq=12)
    boundary = capture_block_inputs(model, adapter, data, CPU)
    masks = [boundary.calls[0][i].kwargs["attention_mask"] for i in range(4)]
    assert masks[0] is masks[2] and masks[1] is masks[3] and not torch.equal(masks[0], masks[1])
    hidden = boundary.hidden[0]
    with torch.inference_mode():
        reference = model(**data[0], output_hidden_states=True).hidden_states
        for i, layer in enumerate(adapter.layers()):
            call = boundary.calls[0][i]
            out = layer(hidden, *call.args, **call.kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
            if i < 3:
                torch.testing.assert_close(hidden, reference[i + 1], rtol=1e-5, atol=1e-5)


def test_kwon_refuses_offloaded_blocks():
    model = tiny_llama()
    store = HostStore(model, get_adapter(model), CPU)
    with pytest.raises(ConfigError, match="offload=none"):
        PruneRunner(KwonPruner(), BudgetSpec(flops=0.6, seq_len=32), GramBackend(), progress=False).run(
            model, get_adapter(model), batches(), CPU, store)


def _config(tmp_path: Path, *overrides: str):
    """The checked run config of a tiny saved Llama (as the pipeline sees it)."""
    from omegaconf import OmegaConf

    from stat_exp.config.cli import compose_config
    from stat_exp.config.validate import checked_config

    folder = tmp_path / "model"
    if not folder.exists():
        tiny_llama(layers=2).save_pretrained(folder)
        AutoTokenizer.from_pretrained(_tokenizer_folder()).save_pretrained(folder)
    return OmegaConf.create(checked_config(compose_config(
        [f"model.source={folder}", "calib.num_examples=4", "calib.seq_len=32", "budget.seq_len=32", *overrides])))


def make_plan(cfg, device: torch.device, run_dir: Path):
    """The plan of a config with the parts a run builds from it."""
    return execution_plan.make_plan(cfg, build_parts(cfg, device, run_dir), device, run_dir)


def test_plan_resolves_auto_to_the_fast_path_for_small_models(tmp_path):
    plan = make_plan(_config(tmp_path), CPU, tmp_path)
    assert (plan.execution.offload, plan.execution.stream, plan.execution.factors) == ("none", "model", "hold")
    assert plan.peak_host_mb > 0 and plan.seconds > 0


def test_plan_bounds_memory_when_the_model_does_not_fit(tmp_path):
    """Declared memory too small for the weights: blocks go to disk and nothing grows with depth."""
    cfg = _config(tmp_path, "execution.host_memory_mb=1")
    plan_cfg = _config(tmp_path)
    weights_mb = make_plan(plan_cfg, CPU, tmp_path).rows[0][1]
    with pytest.raises(PlanError, match="MB of host memory, 1 MB are available"):
        make_plan(cfg, CPU, tmp_path)
    assert weights_mb > 0


def test_planning_a_gpu_without_one_needs_its_memory(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match="execution.device_memory_mb"):
        make_plan(_config(tmp_path), torch.device("cuda"), tmp_path)
    plan = make_plan(_config(tmp_path, "execution.device_memory_mb=80000"), torch.device("cuda"), tmp_path)
    assert plan.device == "cuda" and plan.execution.offload == "none"


def test_bad_execution_values_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="execution.offload='tape'"):
        _config(tmp_path, "execution.offload=tape")
    with pytest.raises(ConfigError, match="execution.tflops=0; must be greater than 0"):
        _config(tmp_path, "execution.tflops=0")
    with pytest.raises(ConfigError, match="execution.stream=model needs"):
        make_plan(_config(tmp_path, "execution.offload=cpu", "execution.stream=model"), CPU, tmp_path)


def test_plan_command_prints_a_table_and_a_json_line(tmp_path):
    _config(tmp_path)  # writes the model folder
    proc = subprocess.run([sys.executable, "-m", "stat_exp.execution", f"model.source={tmp_path / 'model'}",
                           "execution.offload=disk"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"peak_host_mb", "peak_device_mb", "disk_mb", "seconds", "tflops"} <= set(summary)
    assert summary["offload"] == "disk" and summary["stream"] == "block" and summary["disk_mb"] > 0
    assert "| peak host memory |" in proc.stdout
    # the planner reads shapes only: a folder of config.json (and tokenizer) alone plans the same
    # (all but the process's own baseline memory and the throughput probe)
    def sized(stdout: str) -> list[str]:
        return [line for line in stdout.splitlines() if line.startswith("| ") and not
                any(word in line for word in ("peak", "time", "of which"))]

    (tmp_path / "model" / "model.safetensors").unlink()
    config_only = subprocess.run([sys.executable, "-m", "stat_exp.execution", f"model.source={tmp_path / 'model'}",
                                  "execution.offload=disk"], capture_output=True, text=True, timeout=300)
    assert config_only.returncode == 0, config_only.stderr
    assert sized(config_only.stdout) == sized(proc.stdout) and len(sized(proc.stdout)) >= 6


def test_a_plan_that_does_not_fit_fails_before_weights_load(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "stat_exp.run", f"model.source={tmp_path / 'nonexistent'}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    _config(tmp_path)
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "stat_exp.run", f"model.source={tmp_path / 'model'}",
                           "execution.host_memory_mb=1", "logger=none", f"hydra.run.dir={run_dir}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "1 MB are available" in errors[0], proc.stderr
    record = json.loads((run_dir / "results.json").read_text())
    assert record["status"] == "failed" and record["timing_s"].get("load") is None


@GPU
def test_cuda_prunes_like_the_cpu():
    base = tiny_llama(layers=2)
    cpu_model, gpu_model = clone(base), clone(base).cuda()
    a = _run(cpu_model)
    b = _run(gpu_model, backend=GramBackend(device="cuda", block_dtype="float64"), device=torch.device("cuda"))
    assert a.structure == b.structure


@GPU
def test_cuda_qr_runs_on_the_device():
    model = tiny_llama(layers=2).cuda()
    _run(model, backend=QRBackend(device="cuda"), device=torch.device("cuda"))
    assert all(p.device.type == "cuda" for p in model.parameters())


def test_gpu_check_stops_in_one_line_without_a_gpu_and_its_smoke_run_passes():
    """The GPU check itself runs end to end (tiny shapes). Without a GPU its parity rows compare
    LAPACK with the torch loops an accelerator runs, not the CPU with itself."""
    if not torch.cuda.is_available():
        proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check"], capture_output=True, text=True)
        assert proc.returncode == 2 and proc.stderr.strip().startswith("error: no CUDA device")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--small"], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("| ok |") == 3 and "| scale," in proc.stdout  # parity gram, qr; factorization
    if not torch.cuda.is_available():
        assert proc.stdout.count("vs cpu torch loops") == 2


def test_the_planner_counts_the_held_out_curve_of_stats_overfit_check():
    """The check's held-out FFN curve (its own factor, one and a third triangular solves, U and the upper
    blocks of U U^T) was half of a 7B-shaped job on the CPU, and its working set a quarter of the peak,
    both missing from the planner.
    Kills: a planner without its flops or its memory, or with them where the statistics are not split."""
    from stat_exp.execution.plan import Job, plan_sizes
    from stat_exp.prune.stat import StatPruner

    model = tiny_llama()
    job = Job(model=model, pruner=StatPruner(), backend=GramBackend(), dtype=torch.float32, sequences=4, seq_len=32,
              batch_size=4)
    checked, unchecked = plan_sizes(job), plan_sizes(replace(job, pruner=StatPruner(overfit_check=False)))
    shapes = [(sh.hidden, sh.ffn_width) for sh in shapes_of(get_adapter(model))]
    assert checked.curve_flops - unchecked.curve_flops == pytest.approx(
        sum(5 * m ** 3 / 3 + 2 * d * m ** 2 for d, m in shapes))
    assert [b.score_work for b in checked.blocks] == [(5 * m * m + 2 * d * m) * 8 for d, m in shapes]
    assert [b.score_work for b in unchecked.blocks] == [(2 * m * m + 2 * d * m) * 8 for d, m in shapes]


def test_the_time_model_prices_each_phase_and_pass(tmp_path):
    """Per phase, the passes of the runner: recompute doubles the factorizations, propagate=pruned
    adds the pruned block's rerun less the down projections the statistics run skips, and with a
    global allocation a dense pricing pass before it."""
    from stat_exp.execution.plan import Job, Rates, Sizes, _phase_seconds, plan_sizes
    from stat_exp.prune.plan_selection import max_candidates

    s = Sizes(blocks=[], rest_weights=0, hidden=0, eval_work=0, tokens=0, calibration_flops=100.0, down_flops=20.0,
              gram_flops=10.0, factor_flops=3.0, curve_flops=4.0, fold_flops=5.0, pivot_steps=10)
    r = Rates(gram=0.5, factor=0.1, float64=0.5, pivot_s=0.1)
    dense = _phase_seconds(s, r, 1.0, False, True, "dense", 0.5)
    assert dense == {"calibrate": 120.0, "factorize": 31.0, "curves": 8.0, "fold": 10.0}
    assert _phase_seconds(s, r, 1.0, True, True, "dense", 0.5)["factorize"] == 62.0
    uniform = _phase_seconds(s, r, 1.0, False, False, "pruned", 0.5)
    assert uniform["calibrate"] == 100.0 - 20.0 + 50.0 + 20.0
    glob = _phase_seconds(s, r, 1.0, False, True, "pruned", 0.5)
    assert glob["calibrate"] == 120.0 + uniform["calibrate"] and glob["factorize"] == 62.0
    assert glob["curves"] == dense["curves"]
    # choosing the plan: the held-out streams and a fold of every block per candidate
    chosen = replace(s, selection_flops=30.0, selection_folds=4)
    assert _phase_seconds(chosen, r, 1.0, False, True, "dense", 0.5)["select"] == 30.0 + 4 * 10.0
    assert "select" not in _phase_seconds(chosen, r, 1.0, False, False, "dense", 0.5)
    parts = build_parts(_config(tmp_path), torch.device("cpu"), tmp_path)
    assert parts.held_out_candidates == max_candidates("held_out") and parts.held_out_streams == 8 * (1 + 5)
    job = Job(model=tiny_llama(), pruner=StatPruner(), backend=GramBackend(), dtype=torch.float32, sequences=4,
              seq_len=32, batch_size=4, held_out_streams=parts.held_out_streams,
              held_out_candidates=parts.held_out_candidates)
    assert plan_sizes(job).selection_folds == 5
