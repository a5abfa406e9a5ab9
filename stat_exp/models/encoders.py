"""Adapters for bidirectional encoders: BERT / RoBERTa (one layout) and DistilBERT.

Blocks are found through `model.base_model`, so a bare encoder (BertModel) and a task model
(BertForSequenceClassification, whose encoder sits at `.bert`) share one adapter. These models
infer the head count from the projection widths at run time; `set_head_counts` only keeps the
bookkeeping attributes honest for code that reads them.
"""
from __future__ import annotations

from torch import nn

from stat_exp.models.base import AttentionParts, FFNParts, ModelAdapter


def _multi_head(module: nn.Module, q: nn.Linear, k: nn.Linear, v: nn.Linear, o: nn.Linear,
                head_dim: int) -> AttentionParts:
    heads = q.out_features // head_dim
    return AttentionParts(module=module, q=q, k=k, v=v, o=o, num_heads=heads, num_kv_heads=heads, head_dim=head_dim)


class BertAdapter(ModelAdapter):
    """Post-norm blocks: attention.self.{query,key,value}, attention.output.dense, intermediate/output."""

    model_types = ("bert", "roberta")
    causal = False
    post_ln = True

    def layers(self) -> list[nn.Module]:
        return list(self.model.base_model.encoder.layer)

    def attention(self, layer: nn.Module) -> AttentionParts:
        sa = layer.attention.self
        return _multi_head(sa, sa.query, sa.key, sa.value, layer.attention.output.dense, sa.attention_head_size)

    def ffn(self, layer: nn.Module) -> FFNParts:
        return FFNParts(up=layer.intermediate.dense, down=layer.output.dense)



class DistilBertAdapter(ModelAdapter):
    """DistilBERT: attention.{q,k,v,out}_lin and ffn.lin1/lin2 in transformer.layer."""

    model_types = ("distilbert",)
    causal = False
    post_ln = True

    def layers(self) -> list[nn.Module]:
        return list(self.model.base_model.transformer.layer)

    def attention(self, layer: nn.Module) -> AttentionParts:
        a = layer.attention
        return _multi_head(a, a.q_lin, a.k_lin, a.v_lin, a.out_lin, a.attention_head_size)

    def ffn(self, layer: nn.Module) -> FFNParts:
        return FFNParts(up=layer.ffn.lin1, down=layer.ffn.lin2)
