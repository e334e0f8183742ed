"""policy-prune: learn which tokens a frozen transformer can skip."""

from typing import TYPE_CHECKING, Any

from policy_prune.core.artifact import load_scorer
from policy_prune.core.backbones import TokenBackbone, TokenState, load_backbone

if TYPE_CHECKING:
    from policy_prune.core.inference import PrunedModel, prune

__version__ = "0.1.0"

__all__ = ["PrunedModel", "TokenBackbone", "TokenState", "__version__", "load_backbone", "load_scorer", "prune"]

# The inference API imports transformers' ModelOutput; load it on first use so `import policy_prune` stays light.
_LAZY = {"prune": "policy_prune.core.inference", "PrunedModel": "policy_prune.core.inference"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'policy_prune' has no attribute {name!r}")
