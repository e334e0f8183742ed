"""Adapters: keep-all equality with the wrapped model, no mutation, attention rows, loading specs."""

from __future__ import annotations

import pytest
import torch

from policy_prune.core.backbones import HFEncoderBackbone, TimmViTBackbone, adapt, load_backbone
from policy_prune.errors import UserError
from tests import tiny


@pytest.mark.parametrize("name", sorted(tiny.TINY))
def test_keep_all_equals_original(name: str) -> None:
    model = tiny.make(name)
    x = tiny.inputs(name)
    backbone = adapt(model)
    with torch.no_grad():
        expected = tiny.original_output(name, model, x)
        got = backbone(x)
        pruned_keep_all, _, counts = backbone.forward_pruned(x, [1, 2], lambda s, i, layer: torch.ones_like(s.valid))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pruned_keep_all, expected, rtol=1e-5, atol=1e-5)
    if name in tiny.TEXT:  # padded text tokens never count as kept
        assert counts[0].tolist() == x["attention_mask"].sum(1).tolist()


@pytest.mark.parametrize("name", ["timm-vit-reg4", "hf-bert", "hf-vit-classifier"])
def test_adapter_never_mutates_model(name: str) -> None:
    model = tiny.make(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules_before = [type(m) for m in model.modules()]
    backbone = adapt(model)
    with torch.no_grad():
        backbone.forward_pruned(tiny.inputs(name), [1], lambda s, i, layer: s.protected)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [type(m) for m in model.modules()] == modules_before
    assert not model.training


def _reference_attention_timm(model: torch.nn.Module, x: torch.Tensor, layer: int) -> torch.Tensor:
    """The explicit softmax(qk^T) map, captured from timm's own unfused path."""
    captured = {}
    attn = model.blocks[layer].attn
    attn.fused_attn = False
    hook = attn.attn_drop.register_forward_hook(lambda m, inp, out: captured.setdefault("a", inp[0]))
    try:
        model(x)
    finally:
        hook.remove()
        attn.fused_attn = True
    return captured["a"]  # [B, H, N, N]


@pytest.mark.parametrize("name", ["timm-vit-cls", "timm-deit-distilled"])
@pytest.mark.parametrize("layer", [0, 2])
def test_attention_from_cls_matches_explicit_map_timm(name: str, layer: int) -> None:
    model = tiny.make(name)
    x = tiny.inputs(name)
    backbone = adapt(model)
    with torch.no_grad():
        ref = _reference_attention_timm(model, x, layer)[:, :, 0].mean(1)
        state = backbone.run_blocks(backbone.embed(x), 0, layer)
        got = backbone.attention_from_cls(state, layer)
        mean_q = backbone.attention_from_cls(state, layer, query="mean")
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.sum(1), torch.ones(got.shape[0]))
    ref_mean = _reference_attention_timm(model, x, layer).mean(dim=(1, 2))
    torch.testing.assert_close(mean_q, ref_mean, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["hf-bert", "hf-distilbert", "hf-vit"])
def test_attention_from_cls_matches_eager_attentions_hf(name: str) -> None:
    model = tiny.make(name)
    model.set_attn_implementation("eager")
    x = tiny.inputs(name)
    kwargs = {"pixel_values": x} if name == "hf-vit" else dict(x)
    backbone = adapt(model)
    with torch.no_grad():
        attentions = model(**kwargs, output_attentions=True).attentions
        state = backbone.embed(x)
        for layer in range(backbone.depth):
            got = backbone.attention_from_cls(state, layer)
            torch.testing.assert_close(got, attentions[layer][:, :, 0].mean(1) * state.valid, rtol=1e-5, atol=1e-6)
            state = backbone.run_blocks(state, layer, layer + 1)


def test_protected_tokens() -> None:
    assert adapt(tiny.make("timm-deit-distilled")).embed(tiny.inputs("timm-deit-distilled")).protected[0].sum() == 2
    assert adapt(tiny.make("timm-vit-reg4")).embed(tiny.inputs("timm-vit-reg4")).protected[0].sum() == 5
    assert adapt(tiny.make("timm-vit-gap")).embed(tiny.inputs("timm-vit-gap")).protected.sum() == 0
    x = tiny.inputs("hf-bert")
    state = adapt(tiny.make("hf-bert")).embed(x)
    lengths = x["attention_mask"].sum(1)
    for row, n in enumerate(lengths.tolist()):  # [CLS] and the last real token ([SEP])
        assert state.protected[row].nonzero().flatten().tolist() == [0, n - 1]
    special = torch.zeros_like(x["input_ids"])
    special[:, 3] = 1
    state = adapt(tiny.make("hf-bert")).embed({**x, "special_tokens_mask": special})
    assert state.protected.nonzero()[:, 1].unique().tolist() == [3]


def test_load_backbone_specs(tmp_path) -> None:
    from safetensors.torch import save_file

    backbone = load_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=3)
    assert isinstance(backbone, TimmViTBackbone) and backbone.depth == 2
    assert not backbone.training and not backbone.model.training  # the adapter reports eval mode too
    ckpt = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() + 1 for k, v in backbone.model.state_dict().items()}, str(ckpt))
    again = load_backbone("timm:vit_tiny_patch16_224", checkpoint=ckpt, img_size=32, patch_size=8, depth=2, num_classes=3)
    torch.testing.assert_close(again.model.head.bias, backbone.model.head.bias + 1)

    model = tiny.make("hf-bert")
    model.save_pretrained(tmp_path / "bert")
    for spec in (str(tmp_path / "bert"), f"hf:{tmp_path / 'bert'}"):
        hf = load_backbone(spec)
        assert isinstance(hf, HFEncoderBackbone) and hf.output_kind == "embedding"
        x = tiny.inputs("hf-bert")
        with torch.no_grad():
            torch.testing.assert_close(hf(x), tiny.original_output("hf-bert", model, x))
    with pytest.raises(UserError, match="unknown backbone"):
        load_backbone("no_such_model_xyz")
    with pytest.raises(UserError, match="checkpoint not found"):
        load_backbone("vit_tiny_patch16_224", checkpoint=tmp_path / "missing.safetensors")
    # A checkpoint that is not one, is broken, or is for another head: one line each, never a traceback.
    kw = {"img_size": 32, "patch_size": 8, "depth": 2}
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    (tmp_path / "broken.safetensors").write_bytes(b"\xff" * 64)
    for path, why in ((tmp_path / "notes.pt", "cannot be read as a state dict"),
                      (tmp_path / "broken.safetensors", "cannot be read as a state dict"),
                      (ckpt, "does not fit 'vit_tiny_patch16_224' as built .*head")):  # 3 classes, built with 10
        with pytest.raises(UserError, match=why) as err:
            load_backbone("vit_tiny_patch16_224", checkpoint=path, num_classes=10, **kw)
        assert "\n" not in str(err.value)
    torch.save([torch.ones(2)], tmp_path / "list.pt")
    with pytest.raises(UserError, match="holds a list, not a state dict"):
        load_backbone("vit_tiny_patch16_224", checkpoint=tmp_path / "list.pt", **kw)


def test_unsupported_models_are_rejected() -> None:
    with pytest.raises(TypeError):
        adapt(torch.nn.Linear(3, 3))
    from timm.models.vision_transformer import VisionTransformer

    with pytest.raises(ValueError, match="global_pool"):
        adapt(VisionTransformer(**{**tiny.VIT, "global_pool": "map"}))


def test_signature_describes_architecture() -> None:
    sig = adapt(tiny.make("timm-vit-reg4")).signature()
    assert sig["family"] == "timm-vit" and sig["depth"] == 4 and sig["width"] == 32 and sig["grid"] == [4, 4]
    assert sig["prefix_tokens"] == 5
    sig = adapt(tiny.make("hf-bert")).signature()
    assert sig["family"] == "hf-encoder" and sig["vocab_size"] == 120 and sig["pooling"] == "mean"


def test_folded_cls_query_follows_weight_changes() -> None:
    """The folded CLS query is cached per layer and rebuilt when the model's weights change in place."""
    model = tiny.make("timm-vit-cls")
    backbone = adapt(model)
    x = tiny.inputs("timm-vit-cls")
    with torch.no_grad():
        state = backbone.run_blocks(backbone.embed(x), 0, 1)
        before = backbone.attention_from_cls(state, 1)
        assert backbone.cls_query(1) is backbone.cls_query(1)  # cached
        model.blocks[1].norm1.weight.mul_(3.0)
        model.blocks[1].attn.qkv.weight[:8].mul_(-2.0)
        after = backbone.attention_from_cls(state, 1)
        ref = _reference_attention_timm(model, x, 1)[:, :, 0].mean(1)
    torch.testing.assert_close(after, ref, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(before, after)
