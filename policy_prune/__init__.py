"""policy-prune: learn which tokens a frozen transformer can skip."""

from policy_prune.backbones import TokenBackbone, TokenState, load_backbone

__version__ = "0.1.0"

__all__ = ["TokenBackbone", "TokenState", "__version__", "load_backbone"]
