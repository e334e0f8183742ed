"""policy-prune: learn which tokens a frozen transformer can skip.

The inference API needs only torch, safetensors and numpy (plus timm or transformers for the model you
prune)::

    model = policy_prune.load_backbone("digits-vit")      # or your own timm ViT / HF encoder
    scorer = policy_prune.load_scorer("runs/<run>/scorer")
    fast = policy_prune.prune(model, scorer, rule="keep_ratio", keep_ratio=0.5)
"""

from typing import TYPE_CHECKING, Any

from policy_prune.core.artifact import load_scorer
from policy_prune.core.backbones import TokenBackbone, TokenState
from policy_prune.errors import PolicyPruneError, UsageError, UserError
from policy_prune.version import __version__

if TYPE_CHECKING:
    from policy_prune.core.inference import PrunedModel, prune
    from policy_prune.embedded import load_backbone
    from policy_prune.model_export import export_onnx

__all__ = ["PolicyPruneError", "PrunedModel", "TokenBackbone", "TokenState", "UsageError", "UserError", "__version__",
           "export_onnx", "load_backbone", "load_scorer", "prune"]

# Loaded on first use, so that `import policy_prune` stays light.
_LAZY = {"prune": "policy_prune.core.inference", "PrunedModel": "policy_prune.core.inference",
         "load_backbone": "policy_prune.embedded", "export_onnx": "policy_prune.model_export"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'policy_prune' has no attribute {name!r}")
