"""Test-wide environment: no network, no user cache, W&B offline into a temporary folder."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_TMP = Path(tempfile.mkdtemp(prefix="policy-prune-tests-"))
os.environ["POLICY_PRUNE_CACHE"] = str(_TMP / "cache")
os.environ["WANDB_MODE"] = "offline"
for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
    os.environ[var] = str(_TMP / var.lower())
    Path(os.environ[var]).mkdir(parents=True, exist_ok=True)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
