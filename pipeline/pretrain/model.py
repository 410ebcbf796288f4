"""The student: a BERT encoder (from a size preset, any BERT config, or a checkpoint to continue from), with
BERT's MLM head and/or the MLSM head (K output units), as its objective asks; and what its training costs
in FLOPs.

The MLSM head is `separate` (its own transform, LayerNorm and K output units) or `tied`, as the reference
builds it: K extra rows (and bias entries) of the MLM decoder, behind the MLM head's own transform and
LayerNorm, so a student with a tied head always has the MLM head. Heads compute logits only for the masked
positions. The model saves with save_pretrained (AutoModel loads it; AutoModelForMaskedLM too when it has
an MLM head), the MLSM head beside it as mlsm_head.safetensors (for a tied head: the K extra decoder rows
and bias entries; reference_layout() rebuilds the reference's model with V + K decoder rows from them).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..common import StageError
from ..data.integrity import write_json
from ..objectives import objective as objective_named
from .data import encoder_mask, gather_masked

MLSM_HEAD_FILE = "mlsm_head.safetensors"
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


class TiedMlsmHead(torch.nn.Module):
    """K extra rows of the MLM decoder and their bias entries; the transform is the MLM head's."""

    def __init__(self, hidden: int, atoms: int, std: float):
        super().__init__()
        self.decoder = torch.nn.Linear(hidden, atoms)
        # As the reference's resize_token_embeddings gave its K added rows (transformers 4.34): N(0, std), bias 0.
        torch.nn.init.normal_(self.decoder.weight, std=std)
        torch.nn.init.zeros_(self.decoder.bias)

    def forward(self, transformed: torch.Tensor) -> torch.Tensor:
        return self.decoder(transformed)


class Student(torch.nn.Module):
    def __init__(self, config, objective: str, atoms: int | None, mlsm_head: str = "separate", backbone=None):
        from transformers import BertForMaskedLM, BertModel

        super().__init__()
        self.objective = objective_named(objective)
        self.tied = self.objective.mlsm_head and mlsm_head == "tied"
        self.has_mlm_head = self.objective.mlm_head or self.tied
        if backbone is None:
            backbone = BertForMaskedLM(config) if self.has_mlm_head else BertModel(config, add_pooling_layer=False)
        self.backbone = backbone
        self.mlsm_head = None
        if self.tied:
            self.mlsm_head = TiedMlsmHead(config.hidden_size, atoms, config.initializer_range)
            if not self.objective.mlm_head:
                # MLSM alone reads the MLM head's transform, never its vocabulary bias: it takes no gradient
                # (under DDP, a parameter that never gets one stops the second update).
                self.backbone.cls.predictions.bias.requires_grad_(False)
        elif self.objective.mlsm_head:
            self.mlsm_head = MlsmHead(config.hidden_size, atoms, config.layer_norm_eps)

    @property
    def encoder(self):
        return self.backbone.base_model

    def compile_encoder(self) -> None:
        """torch.compile the encoder only: the heads see a varying number of masked positions."""
        # Not a submodule: the compiled wrapper must not add its own names to the state dict.
        object.__setattr__(self, "_encode", torch.compile(self.encoder, dynamic=True))

    def hidden(self, batch: dict) -> torch.Tensor:
        """The last layer's states at the masked positions (the only ones the heads need)."""
        encode = getattr(self, "_encode", self.encoder)
        hidden = encode(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
                        attention_mask=encoder_mask(self.encoder, batch)).last_hidden_state
        return gather_masked(hidden, batch)

    def heads(self, hidden: torch.Tensor) -> dict:
        """The logits the objective needs at these states: mlm_logits (the vocabulary), mlsm_logits (K)."""
        out = {}
        if self.tied:
            predictions = self.backbone.cls.predictions
            transformed = predictions.transform(hidden)
            out["mlsm_logits"] = self.mlsm_head(transformed)
            if self.objective.mlm_head:
                out["mlm_logits"] = predictions.decoder(transformed)
            return out
        if self.objective.mlm_head:
            out["mlm_logits"] = self.backbone.cls(hidden)
        if self.mlsm_head is not None:
            out["mlsm_logits"] = self.mlsm_head(hidden)
        return out

    def forward(self, batch: dict) -> dict:
        return self.heads(self.hidden(batch))

    @torch.no_grad()
    def start_heads_at_priors(self, token_log_probs: torch.Tensor | None, atom_log_probs: torch.Tensor | None) -> list:
        """Set the MLM head's output bias to the log of the training tokens' frequencies and the MLSM head's to
        the log of the mean target distribution (where given): at the start each head predicts its prior,
        and no weights are bent to learn it. Tokens with no probability (the special ones, never a label)
        get the lowest finite log probability. Returns the heads set."""
        done = []
        if self.objective.mlm_head and token_log_probs is not None:
            finite = torch.isfinite(token_log_probs)
            floored = torch.where(finite, token_log_probs, token_log_probs[finite].min())
            self.backbone.cls.predictions.bias.copy_(floored)
            done.append("mlm")
        if self.mlsm_head is not None and atom_log_probs is not None:
            self.mlsm_head.decoder.bias.copy_(atom_log_probs)
            done.append("mlsm")
        return done

    def save(self, directory: Path, tokenizer, metadata: dict) -> None:
        from safetensors.torch import save_file

        self.backbone.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        if self.mlsm_head is not None:
            state = {k: v.detach().cpu().contiguous() for k, v in self.mlsm_head.state_dict().items()}
            # One metadata key: safetensors writes several in a per-process hash order, so the same head
            # would not always be the same bytes. The kind shows in the tensors (a separate head's transform).
            save_file(state, str(directory / MLSM_HEAD_FILE), metadata={"atoms": str(state["decoder.bias"].numel())})
        write_json(directory / "pretraining.json", metadata)

    def load_mlsm_head(self, directory: str | Path) -> bool:
        """Take the MLSM head saved beside a model (continued pre-training), if it is of this kind and size."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(directory) / MLSM_HEAD_FILE
        if self.mlsm_head is None or not path.exists():
            return False
        with safe_open(str(path), "pt") as saved:
            meta, separate = saved.metadata() or {}, "dense.weight" in saved.keys()
        if separate == self.tied or int(meta.get("atoms", -1)) != self.mlsm_head.decoder.out_features:
            return False
        self.mlsm_head.load_state_dict(load_file(str(path)))
        return True


def reference_layout(directory: str | Path):
    """A saved student with a tied MLSM head as the reference's model: AutoModelForMaskedLM whose decoder (and
    input embeddings) have the K MLSM rows after the V vocabulary rows, its bias the K entries after V."""
    from safetensors.torch import load_file
    from transformers import AutoModelForMaskedLM

    head = load_file(str(Path(directory) / MLSM_HEAD_FILE))
    model = AutoModelForMaskedLM.from_pretrained(directory, trust_remote_code=False)
    vocab = model.config.vocab_size
    model.resize_token_embeddings(vocab + len(head["decoder.bias"]), mean_resizing=False)
    with torch.no_grad():
        model.get_output_embeddings().weight[vocab:] = head["decoder.weight"]
        model.cls.predictions.bias[vocab:] = head["decoder.bias"]
        model.cls.predictions.decoder.bias = model.cls.predictions.bias
    return model


def build_config(params: dict, tokenizer, max_len: int):
    """A fresh student's config: a size preset, or the config of the model source `architecture` (its shape,
    not its weights, as the reference's --reinit), with the corpus vocabulary and the student's dropout."""
    from transformers import AutoConfig, BertConfig

    dropout = {"hidden_dropout_prob": params["dropout"], "attention_probs_dropout_prob": params["dropout"]}
    source = params.get("architecture")
    if not source:
        return BertConfig(vocab_size=len(tokenizer), max_position_embeddings=max(512, max_len),
                          pad_token_id=tokenizer.pad_token_id, attn_implementation="sdpa", **dropout,
                          **PRESETS[params["size"]])
    from ..models import loading, resolve_model_source

    path = resolve_model_source(source)
    with loading(f"architecture {source!r}"):
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    check_shape(config, source, max_len)
    config.update({"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id, **dropout})
    config._attn_implementation = "sdpa"
    return config


def check_shape(config, source: str, max_len: int) -> None:
    if config.model_type != "bert":
        raise StageError(f"model source {source!r} is a {config.model_type!r} model; students are BERT models "
                         "(model_type bert): give a BERT config or checkpoint")
    if config.max_position_embeddings < max_len:
        raise StageError(f"model source {source!r} has {config.max_position_embeddings} positions, fewer than the "
                         f"longest sequences ({max_len} tokens)")


def load_backbone(params: dict, max_len: int, with_mlm_head: bool, corpus_manifest: dict):
    """The backbone of a student that continues pre-training the checkpoint `init` (weights and config)."""
    from transformers import AutoConfig, BertForMaskedLM, BertModel

    from ..models import check_vocabulary, loading, resolve_model_source

    source = params["init"]
    path = resolve_model_source(source)
    with loading(f"init {source!r}"):
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    check_shape(config, source, max_len)
    check_vocabulary(source, path, config, corpus_manifest, role="init")
    options = {"hidden_dropout_prob": params["dropout"], "attention_probs_dropout_prob": params["dropout"],
               "attn_implementation": "sdpa"}
    with loading(f"init {source!r}"):
        if with_mlm_head:
            return BertForMaskedLM.from_pretrained(path, trust_remote_code=False, **options)
        return BertModel.from_pretrained(path, add_pooling_layer=False, trust_remote_code=False, **options)


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
