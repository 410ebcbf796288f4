"""The student: a BERT encoder from a size preset, with BERT's MLM head and/or the MLSM head (K output
units), as its objective asks; and what its training costs in FLOPs.

Heads compute logits only for the masked positions. The model saves with save_pretrained (AutoModel
loads it; AutoModelForMaskedLM too when it has an MLM head), the MLSM head beside it as
mlsm_head.safetensors.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..integrity import write_json
from ..objectives import objective as objective_named

PRESETS = {
    "tiny": dict(num_hidden_layers=2, hidden_size=128, num_attention_heads=2, intermediate_size=512),
    "small": dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=4, intermediate_size=1024),
    "medium": dict(num_hidden_layers=8, hidden_size=512, num_attention_heads=8, intermediate_size=2048),
    "base": dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072),
}
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


class MlsmHead(torch.nn.Module):
    """Transform + K output units, shaped like BERT's MLM head."""

    def __init__(self, hidden: int, atoms: int, eps: float = 1e-12):
        super().__init__()
        self.dense = torch.nn.Linear(hidden, hidden)
        self.norm = torch.nn.LayerNorm(hidden, eps=eps)
        self.decoder = torch.nn.Linear(hidden, atoms)
        for linear in (self.dense, self.decoder):
            torch.nn.init.normal_(linear.weight, std=0.02)
            torch.nn.init.zeros_(linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(F.gelu(self.dense(hidden))))


class Student(torch.nn.Module):
    def __init__(self, config, objective: str, atoms: int | None):
        from transformers import BertForMaskedLM, BertModel

        super().__init__()
        self.objective = objective_named(objective)
        self.backbone = (BertForMaskedLM(config) if self.objective.mlm_head
                         else BertModel(config, add_pooling_layer=False))
        self.mlsm_head = (MlsmHead(config.hidden_size, atoms, config.layer_norm_eps) if self.objective.mlsm_head
                          else None)

    @property
    def encoder(self):
        return self.backbone.bert if hasattr(self.backbone, "bert") else self.backbone

    def compile_encoder(self) -> None:
        """torch.compile the encoder only: the heads see a varying number of masked positions."""
        # Not a submodule: the compiled wrapper must not add its own names to the state dict.
        object.__setattr__(self, "_encode", torch.compile(self.encoder, dynamic=True))

    def hidden(self, batch: dict) -> torch.Tensor:
        """The last layer's states at the masked positions (the only ones the heads need)."""
        encode = getattr(self, "_encode", self.encoder)
        hidden = encode(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
                        attention_mask=batch["attention_mask"]).last_hidden_state
        return hidden[batch["masked"]]

    def forward(self, batch: dict) -> dict:
        hidden = self.hidden(batch)
        out = {}
        if self.objective.mlm_head:
            out["mlm_logits"] = self.backbone.cls(hidden)
        if self.mlsm_head is not None:
            out["mlsm_logits"] = self.mlsm_head(hidden)
        return out

    def save(self, directory: Path, tokenizer, metadata: dict) -> None:
        from safetensors.torch import save_file

        self.backbone.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        if self.mlsm_head is not None:
            state = {k: v.detach().cpu().contiguous() for k, v in self.mlsm_head.state_dict().items()}
            save_file(state, str(directory / "mlsm_head.safetensors"),
                      metadata={"atoms": str(state["decoder.bias"].numel())})
        write_json(directory / "pretraining.json", metadata)


def build_config(params: dict, tokenizer, max_len: int):
    from transformers import BertConfig

    return BertConfig(vocab_size=len(tokenizer), max_position_embeddings=max(512, max_len),
                      pad_token_id=tokenizer.pad_token_id, attn_implementation="sdpa",
                      hidden_dropout_prob=params["dropout"], attention_probs_dropout_prob=params["dropout"],
                      **PRESETS[params["size"]])


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of the GPU, for MFU; None where unknown (CPU, other GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def flops_per_token(model: Student, params: dict, seq_len: int) -> float:
    """Training FLOPs per input token: 6 x the encoder's weights, attention, and the heads, which run on
    masked positions only (the MLM decoder shares the embedding matrix, so it is counted apart)."""
    config = model.encoder.config
    encoder = sum(p.numel() for p in model.encoder.parameters()) \
        - sum(p.numel() for p in model.encoder.embeddings.parameters())
    heads = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in model.encoder.parameters())
    if model.objective.mlm_head:
        heads += config.vocab_size * config.hidden_size
    attention = 12 * config.num_hidden_layers * config.hidden_size * seq_len
    return 6 * encoder + attention + 6 * heads * params["mask_fraction"]
