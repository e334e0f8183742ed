"""Tiny randomly initialised models of every supported family (no downloads), keyed by name."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=5)
BERT = dict(vocab_size=120, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64)


def _timm(**kw: object) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        from timm.models.vision_transformer import VisionTransformer

        return VisionTransformer(**{**VIT, **kw})

    return make


def _deit_distilled() -> nn.Module:
    from timm.models.deit import VisionTransformerDistilled

    return VisionTransformerDistilled(**VIT)


def _bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(**BERT))


def _roberta() -> nn.Module:
    from transformers import RobertaConfig, RobertaModel

    return RobertaModel(RobertaConfig(**BERT, pad_token_id=1))


def _distilbert() -> nn.Module:
    from transformers import DistilBertConfig, DistilBertModel

    return DistilBertModel(DistilBertConfig(vocab_size=120, dim=32, n_layers=4, n_heads=2, hidden_dim=64))


def _hf_vit(classify: bool) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        from transformers import ViTConfig, ViTForImageClassification, ViTModel

        cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                        intermediate_size=64, num_labels=5)
        return ViTForImageClassification(cfg) if classify else ViTModel(cfg)

    return make


TINY: dict[str, Callable[[], nn.Module]] = {
    "timm-vit-cls": _timm(),
    "timm-vit-reg4": _timm(reg_tokens=4),
    "timm-vit-gap": _timm(global_pool="avg", class_token=False),
    "timm-vit-reg-gap": _timm(global_pool="avg", reg_tokens=2, fc_norm=True),
    "timm-deit-distilled": _deit_distilled,
    "hf-bert": _bert,
    "hf-roberta": _roberta,
    "hf-distilbert": _distilbert,
    "hf-vit": _hf_vit(classify=False),
    "hf-vit-classifier": _hf_vit(classify=True),
}
TEXT = ("hf-bert", "hf-roberta", "hf-distilbert")


def make(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return TINY[name]().eval()


def inputs(name: str, batch: int = 3, seed: int = 0) -> torch.Tensor | dict[str, torch.Tensor]:
    """Images, or token ids whose rows have different padded lengths (row 0 full)."""
    g = torch.Generator().manual_seed(seed)
    if name not in TEXT:
        return torch.randn(batch, 3, 32, 32, generator=g)
    length = 12
    ids = torch.randint(5, 120, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(1, batch):
        mask[row, length - 3 * (row % 3):] = 0  # lengths 12, 9, 6, 12, 9, 6, ...
    ids = ids.masked_fill(mask == 0, 1 if name == "hf-roberta" else 0)
    return {"input_ids": ids, "attention_mask": mask}


def original_output(name: str, model: nn.Module, x: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor:
    """What the adapter's head must reproduce, computed with the model's own forward."""
    if name.startswith("timm"):
        return model(x)
    if name == "hf-vit-classifier":
        return model(pixel_values=x).logits
    if name == "hf-vit":
        return model(pixel_values=x).last_hidden_state[:, 0]
    out = model(**x).last_hidden_state
    w = x["attention_mask"].unsqueeze(-1).float()
    return (out * w).sum(1) / w.sum(1)


def split(name: str, n: int = 12, seed: int = 0, labels: bool = True):
    """A small in-memory data split for a tiny model (images or padded token ids)."""
    from policy_prune.data import Split

    x = inputs(name, batch=n, seed=seed)
    y = torch.randint(0, 5, (n,), generator=torch.Generator().manual_seed(seed)) if labels else None
    return Split(name="train", inputs=x, labels=y)


WORDS = (
    "the", "a", "of", "to", "in", "is", "and", "for", "on", "with", "it", "that", "this", "as", "be", "by",
    "are", "was", "or", "from", "code", "python", "value", "list", "function", "returns", "object", "class",
    "module", "name", "type", "string", "number", "error", "file",
)


def sentence_transformer(folder, normalize: bool = False, seed: int = 0):
    """A tiny BERT + mean-pooling SentenceTransformer built from local files in ``folder`` (no hub)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Normalize, Pooling, Transformer
    from transformers import BertConfig, BertModel, BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab))
    torch.manual_seed(seed)
    BertModel(BertConfig(**{**BERT, "vocab_size": len(vocab)})).save_pretrained(folder / "bert")
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder / "bert")
    modules = [Transformer(str(folder / "bert")), Pooling(BERT["hidden_size"], "mean")]
    return SentenceTransformer(modules=modules + ([Normalize()] if normalize else []), device="cpu").eval()


def sentences(n: int = 8, seed: int = 0) -> list[str]:
    """``n`` sentences of 3 to 14 words from the tiny vocabulary (different lengths: padded batches)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 15, (n,), generator=g).tolist()
    return [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (k,), generator=g)) for k in lengths]
