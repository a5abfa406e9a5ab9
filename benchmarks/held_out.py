"""The held-out protocol for choosing STAT's options: never tune on the text that is reported.

`wiki_calib` is split by article: its last `TAIL_ARTICLES` articles (about 100,000 tokens) are the
validation text, and calibration windows are drawn from the rest only, so no calibration token is
ever scored. Options and defaults are chosen on this validation text; `wiki_eval` (other articles
again) is kept for the reported tables.

`stream_statistics` streams calibration batches once and keeps every layer's statistics (Gram
matrices split into fit and held-out batches, channel sums, token energies), so many variants can
be scored from one pass; `grow` adds further batches to the same statistics, so calibration sizes
64, 128, ... are measured from one growing pass.
"""
from __future__ import annotations

import torch

from benchmarks.common import CPU
from stat_exp.calibrate import ChannelMoments, LayerStats, LayerStream, NormGain
from stat_exp.data.calibration import sample_windows
from stat_exp.data.text import encode, load_text
from stat_exp.eval.perplexity import perplexity
from stat_exp.factorize import GramBackend
from stat_exp.models import get_adapter
from stat_exp.prune.stat import StatPruner

TAIL_ARTICLES = 10
SEQ_LEN, BATCH = 256, 8


def split_wiki_calib() -> tuple[str, str]:
    """(calibration text, validation text): wiki_calib without and with only its last articles."""
    articles = load_text("wiki_calib").split("\n\n")
    return "\n\n".join(articles[:-TAIL_ARTICLES]), "\n\n".join(articles[-TAIL_ARTICLES:])


def calibration_batches(tokenizer, num_examples: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Random windows of the calibration part (the first n windows of a larger draw are the same)."""
    return calibration_and_held_out(tokenizer, num_examples, 0, seed)[0]


def calibration_and_held_out(tokenizer, num_examples: int, held_out: int, seed: int = 0
                             ) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]]:
    """The first `num_examples` windows (`calibration_batches`' own) and the `held_out` after them,
    split by window, so no batch straddles the two whatever the counts."""
    windows = sample_windows(encode(tokenizer, split_wiki_calib()[0]), num_examples + held_out, SEQ_LEN, seed)
    return _batches(windows[:num_examples]), _batches(windows[num_examples:])


def _batches(windows: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": b, "attention_mask": torch.ones_like(b)} for b in windows.split(BATCH)]


def validation_ppl(model, tokenizer, max_tokens: int) -> float:
    return perplexity(model, tokenizer, split_wiki_calib()[1], seq_len=SEQ_LEN, max_tokens=max_tokens,
                      batch_size=BATCH, progress=False)["ppl"]


class Statistics:
    """Every layer's STAT statistics over the batches streamed so far, held for re-scoring."""

    def __init__(self, model, validation: float = 0.25):
        self.model, self.adapter = model, get_adapter(model)
        probe = StatPruner(ridge="auto", validation=validation)  # the held-out split, so every option can score
        self._make = probe.accumulator(GramBackend())
        self.accumulators: list = []
        self.moments: list[tuple[ChannelMoments, ChannelMoments]] = []
        self.energy: list[list[torch.Tensor]] = []
        self.gains: list[tuple[NormGain, NormGain]] = []

    def grow(self, batches: list[dict[str, torch.Tensor]]) -> None:
        """Stream more batches into the same statistics (whole multiples of the held-out period)."""
        created = iter(range(len(self.accumulators) or 2 * len(self.adapter.layers())))

        def make(dim: int):
            i = next(created)
            if i == len(self.accumulators):
                self.accumulators.append(self._make(dim))
            return self.accumulators[i]

        stream = LayerStream(self.model, self.adapter, batches, CPU, "dense", make, progress=False, moments=True)
        for i, _, stats in stream:
            if i == len(self.moments):
                self.moments.append((stats.attn, stats.ffn))
                self.gains.append((stats.attn_gain, stats.ffn_gain))
                self.energy.append([])
            else:
                for mine, new in zip(self.moments[i], (stats.attn, stats.ffn)):
                    mine.n_tokens += new.n_tokens
                    mine.sum += new.sum
                    mine.sumsq += new.sumsq
                for mine, new in zip(self.gains[i], (stats.attn_gain, stats.ffn_gain)):
                    mine.log_sum += new.log_sum
                    mine.n_tokens += new.n_tokens
            self.energy[i].append(stats.token_energy[: stats.n_tokens].clone())

    def layer(self, i: int) -> LayerStats:
        energy = torch.cat(self.energy[i])
        return LayerStats(attn=self.moments[i][0], ffn=self.moments[i][1], attn_factor=self.accumulators[2 * i],
                          ffn_factor=self.accumulators[2 * i + 1], n_tokens=len(energy), token_energy=energy,
                          attn_gain=self.gains[i][0], ffn_gain=self.gains[i][1])

    def scored(self, pruner: StatPruner) -> list:
        """(scores, stats) of every layer under `pruner`'s options, from the held statistics."""
        out = []
        for i, layer in enumerate(self.adapter.layers()):
            stats = self.layer(i)
            out.append((pruner.score(self.adapter, i, layer, stats), stats))
        return out
