"""Errors policy-prune raises on purpose. They subclass ``ValueError`` / ``TypeError`` so a caller catches
them the usual way; the CLI prints any :class:`PolicyPruneError` on one line and exits with code 2."""


class PolicyPruneError(Exception):
    """Base of every error policy-prune raises for a mistake in what it was asked to do."""


class UserError(PolicyPruneError, ValueError):
    """A wrong value: bad preset or setting, missing file, mismatched scorer, out-of-range budget, ..."""


class UsageError(PolicyPruneError, TypeError):
    """A wrong kind of argument: a model no adapter supports, a call the wrapped model does not take."""


TRAIN_EXTRA = {"yaml": "pyyaml", "rich": "rich", "gymnasium": "gymnasium", "stable_baselines3": "stable-baselines3",
               "sklearn": "scikit-learn", "matplotlib": "matplotlib", "wandb": "wandb", "timm": "timm",
               "transformers": "transformers"}
"""Import name -> distribution of what ``pip install 'policy-prune[train]'`` adds to the inference install."""


def missing_train_packages() -> list[str]:
    """Distributions of the train extra that are not installed (found without importing them)."""
    from importlib.util import find_spec

    return [dist for module, dist in TRAIN_EXTRA.items() if find_spec(module) is None]


def require_train_extra(what: str) -> None:
    """One-line UserError naming the train extra when any of its packages is missing."""
    missing = missing_train_packages()
    if missing:
        raise UserError(f"{what} needs the train extra: pip install 'policy-prune[train]' (missing: {', '.join(missing)})")
