"""The ``policy-prune`` command line: one verb per module, each with ``add_arguments`` and ``run``."""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from policy_prune import __version__
from policy_prune.errors import PolicyPruneError, missing_train_packages

# verb -> (module, one-line help). Verb modules keep heavy imports inside run().
VERBS: dict[str, tuple[str, str]] = {
    "info": ("policy_prune.info", "show versions, shipped presets and backbone adapters (proves the install)"),
    "pretrain": ("policy_prune.training.pretrain", "fit and cache the embedded default backbone of an env"),
    "train": ("policy_prune.training.train", "train a token-pruning policy (default: digits-vit with its agent preset, ppo-small)"),
    "sweep": ("policy_prune.training.sweep", "many training runs at once on Ray Tune (seeds, budgets, agent settings)"),
    "bench": ("policy_prune.evaluation.bench", "measure wall-clock speed of pruned vs original execution"),
    "eval": ("policy_prune.evaluation.evaluate", "Pareto of a learned scorer vs baselines at equal FLOPs"),
    "export": ("policy_prune.export", "export a run's scorer (safetensors + JSON, optional ONNX)"),
}


FILE_SYSTEM_REFUSALS = frozenset({errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EROFS,
                                  errno.EEXIST, errno.ENOENT, errno.ENAMETOOLONG})
"""OSErrors that are the user's file system refusing a path they gave (a folder that is a file, no permission,
a full disk): one line, exit 2, like any user mistake."""


class OneLineParser(argparse.ArgumentParser):
    """argparse's parser whose errors are one line, as every other user mistake here (argparse printed its whole
    usage block, some 15 lines for eval, before the error). The verbs' parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="policy-prune",
        description="Learn which tokens a frozen transformer can skip.",
    )
    parser.add_argument("--version", action="version", version=f"policy-prune {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb, (module, help_text) in VERBS.items():
        p = sub.add_parser(verb, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    missing = missing_train_packages()
    if missing:  # the inference install: the verbs' modules would fail to import
        print(f"policy-prune: the command line needs the train extra: pip install 'policy-prune[train]' "
              f"(missing: {', '.join(missing)})", file=sys.stderr)
        return 2
    parser = build_parser()
    # "-inf" is a value (a per-site threshold: keep every token there), but argparse reads any word that starts with
    # "-" and is not a plain number as an option: "--threshold 0.3 -inf" stopped at it. A leading space makes it a
    # value; float() ignores the space.
    args = parser.parse_args([" -inf" if a == "-inf" else a for a in (sys.argv[1:] if argv is None else argv)])
    if args.verb is None:
        parser.print_help()
        return 2
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except (PolicyPruneError, OSError) as exc:  # UserError, ConfigError, UsageError, scorer file / mismatch errors
        if isinstance(exc, OSError) and exc.errno not in FILE_SYSTEM_REFUSALS:
            raise  # not the user's folders: a bug or a broken install keeps its traceback
        print(f"policy-prune {args.verb}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"policy-prune {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
