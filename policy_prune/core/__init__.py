"""The inference core: backbones, features, scorer, artifact and ``prune``; needs only torch + safetensors
(+ timm / transformers for the model it wraps) and imports nothing from training or evaluation."""
