"""The inference install: load_scorer + prune import nothing of the training stack (nor the other host library),
and the command line without the train extra says which extra to install."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from policy_prune.core.artifact import save_scorer
from policy_prune.core.backbones import adapt
from policy_prune.core.scorer import random_scorer
from tests import tiny

ROOT = Path(__file__).resolve().parents[1]
TRAINING_STACK = ["gymnasium", "stable_baselines3", "wandb", "matplotlib", "sklearn", "rich", "yaml"]

# The user's model is built first (timm itself imports wandb and yaml when they are installed). Then every
# forbidden package is dropped from sys.modules and any later attempt to import one is recorded and refused:
# an import policy-prune makes, swallowed or not, shows up in `attempts`.
SCRIPT = """
import sys, torch
from tests import tiny
family, path, forbidden = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
model = tiny.make(family)
x = tiny.inputs(family, batch=2)
for name in list(sys.modules):
    if name.split(".")[0] in forbidden:
        del sys.modules[name]
attempts = []
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in forbidden:
            attempts.append(name)
            raise ImportError(name)
sys.meta_path.insert(0, Refuse())

import policy_prune
scorer = policy_prune.load_scorer(path)
fast = policy_prune.prune(model, scorer, rule="keep_ratio", keep_ratio=0.5)
with torch.no_grad():
    out, kept = fast(**x, return_kept=True) if isinstance(x, dict) else fast(x, return_kept=True)
assert kept.dtype == torch.bool and kept.shape[0] == 2 and 0 < int(kept.sum()) < kept.numel()
loaded = sorted({n.split(".")[0] for n in sys.modules} & set(forbidden))
print("attempts", attempts, "loaded", loaded)
sys.exit(1 if attempts or loaded else 0)
"""


@pytest.mark.parametrize("family,host_not_needed", [("timm-vit-cls", "transformers"), ("hf-bert", "timm")])
def test_inference_api_imports_no_training_stack(tmp_path, family: str, host_not_needed: str) -> None:
    """load_scorer + prune + a forward on a timm model (and an HF one) never import the training stack,
    nor transformers for the timm model, nor timm for the HF model."""
    model = tiny.make(family)
    save_scorer(random_scorer(adapt(model), [1, 2]), tmp_path / "scorer", adapt(model).signature())
    forbidden = ",".join([*TRAINING_STACK, host_not_needed])
    proc = subprocess.run([sys.executable, "-c", SCRIPT, family, str(tmp_path / "scorer"), forbidden], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "attempts [] loaded []" in proc.stdout


def test_cli_without_the_train_extra_names_it(tmp_path) -> None:
    """With a package of the train extra missing, every verb answers one line and exit code 2."""
    script = "import sys; sys.modules['gymnasium'] = None; from policy_prune.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.run([sys.executable, "-c", script, "train", "--timesteps", "10"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "pip install 'policy-prune[train]'" in lines[0] and "missing: gymnasium" in lines[0]


def test_train_extra_is_declared_in_pyproject() -> None:
    """What the CLI checks for is what the train extra installs."""
    import tomllib

    from policy_prune.errors import TRAIN_EXTRA

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {d.split(">")[0].split("=")[0].split("[")[0] for d in project["optional-dependencies"]["train"]}
    assert set(TRAIN_EXTRA.values()) <= declared
    core = {d.split(">")[0] for d in project["dependencies"]}
    assert core == {"torch", "safetensors", "numpy"}
