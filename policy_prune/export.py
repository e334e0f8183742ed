"""``policy-prune export RUN_DIR``: a run's trained scorer as a standalone artifact (+ optional ONNX).

The artifact (see ``core.artifact``) is what ``policy_prune.load_scorer`` reads; ``--onnx`` adds
``scorer.onnx``: the TokenScorer MLP alone (tokens [B, N, F] + context [B, G] -> logits [B, N], with
dynamic batch and token dimensions), checked against torch with onnxruntime. Token features are still
computed by ``policy_prune.core.features`` (they need the backbone's own q/k).

``--onnx-model`` writes the whole pruned model instead (``policy_prune.model_export``): embedding,
blocks, features, scorer, top-k, gathers and head as one ONNX graph plus its ``torch.export`` program,
dynamic in batch size, at a keep_ratio schedule (``--keep-ratio`` or ``--flops``), verified with
onnxruntime; ``--check-split`` runs it over a labelled split of the run's env next to the PyTorch model.
"""

from __future__ import annotations

import argparse
import json
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from policy_prune.cli_args import fraction, positive, ratio, threshold
from policy_prune.config import read_run_config
from policy_prune.core.artifact import EXPORT_FILE, META_FILE, ONNX_FILE, learned_metrics, save_scorer
from policy_prune.core.scorer import LearnedScorer, TokenScorer
from policy_prune.errors import UserError

Log = Callable[[str], None]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", type=Path, help="run folder (runs/<env>__<agent>__<seed>__<time>)")
    p.add_argument("--out", type=Path, default=None, help="artifact directory (default: RUN_DIR/scorer)")
    p.add_argument("--checkpoint", default="last", help="checkpoint name in RUN_DIR/checkpoints (default: last)")
    rule = p.add_mutually_exclusive_group()
    rule.add_argument("--threshold", type=threshold, nargs="+", default=None,
                      help="default rule: keep tokens whose logit exceeds this (one value or one per site, -inf: keep every "
                           "token there; default 0)")
    rule.add_argument("--keep-ratio", type=fraction, nargs="+", default=None,
                      help="default rule: keep this fraction of prunable tokens at each site (static shapes); with "
                           "--onnx-model, the pruned graph's schedule only (not the scorer's default rule)")
    rule.add_argument("--flops", type=ratio, default=None,
                      help="--onnx-model: the schedule prune(model, scorer, flops=F, rule='keep_ratio') runs (a trained "
                           "scorer's calibrated plan; one keep_ratio at every site for a scorer without a budget input)")
    p.add_argument("--calibrate", action="store_true",
                   help="budget-conditioned runs: calibrate the budget input again on the run's val split, as train does "
                        "at its end (for another --checkpoint, or an artifact calibrated by an older version)")
    p.add_argument("--onnx", action="store_true", help="also write scorer.onnx (the scorer MLP, dynamic B and N)")
    p.add_argument("--onnx-model", action="store_true",
                   help="also write the whole pruned model as one ONNX graph + torch.export program (dynamic batch; "
                        "keep_ratio rule from --keep-ratio or --flops), verified with onnxruntime")
    p.add_argument("--model", default=None, help="--onnx-model: the model to prune (default: the run's backbone); "
                                                 "digits-vit, minilm, a timm name, hf:<id> or a folder")
    p.add_argument("--model-out", type=Path, default=None, help="--onnx-model: output folder (default RUN_DIR/onnx)")
    p.add_argument("--batch", type=positive, default=2, help="--onnx-model: rows of the example inputs it is checked on")
    p.add_argument("--length", type=positive, default=None,
                   help="--onnx-model, text: the graph's fixed input length L (default: the env's data.max_length)")
    p.add_argument("--check-split", default=None, metavar="SPLIT",
                   help="--onnx-model: run the ONNX model over this labelled split of the run's env (e.g. test) and "
                        "compare its accuracy with the PyTorch PrunedModel's")
    p.add_argument("--seed", type=int, default=0, help="seed of the example inputs")
    p.add_argument("--threads", type=positive, default=None,
                   help="torch intra-op threads while exporting and calibrating (default: torch's choice; on a busy "
                        "machine fewer threads than free cores is faster); onnxruntime picks its own")


def run(args: argparse.Namespace) -> int:
    previous = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(previous)


def _run(args: argparse.Namespace) -> int:
    run_dir: Path = args.run_dir
    if not run_dir.is_dir():
        raise UserError(f"run folder not found: {run_dir}")
    if args.flops is not None and not args.onnx_model:
        raise UserError("--flops sets the schedule of --onnx-model; for the artifact's default rule use --keep-ratio")
    model_flags = {"--model": args.model, "--model-out": args.model_out, "--length": args.length,
                   "--check-split": args.check_split}
    if not args.onnx_model and (given := [flag for flag, value in model_flags.items() if value is not None]):
        raise UserError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to --onnx-model only")
    if args.onnx_model and args.keep_ratio is None and args.flops is None:
        raise UserError("--onnx-model needs a keep_ratio schedule: --keep-ratio R [R ...] or --flops F")
    config = read_run_config(run_dir)
    scorer = read_run_scorer(run_dir, config, args.checkpoint)
    if args.onnx_model:  # the model, data and output folder are checked before calibrating or writing anything
        from policy_prune.config import run_env_config
        from policy_prune.model_export import check_run_model, export_run_model, prepare_run_model

        env = run_env_config(config, run_dir)
        prepared = prepare_run_model(env, args)
    own_rule: dict[str, Any] | None
    if args.calibrate:
        scorer, own_rule = calibrate_run_scorer(run_dir, scorer, run_signature(run_dir, config, scorer), log=print)
    else:
        scorer, own_rule = with_run_budget(scorer, run_dir, config, log=print)
    # With --onnx-model, --keep-ratio is the graph's schedule, not the artifact's default rule.
    rule = {"rule": "keep_ratio", "values": args.keep_ratio} if args.keep_ratio and not args.onnx_model else \
        {"rule": "threshold", "values": args.threshold} if args.threshold else \
        own_rule or {"rule": "threshold", "values": [0.0]}
    out = args.out or run_dir / "scorer"
    signature = run_signature(run_dir, config, scorer)
    if args.onnx_model:
        check_run_model(prepared, scorer, signature, args)
    # A budget-conditioned scorer was trained at no one lambda: none recorded, as train writes it.
    lam = None if scorer.budget is not None else _lookup(config, ("env", "reward", "lam"), ("reward", "lam"), ("lam",))
    files = export_scorer(scorer, out, signature, lam=lam, metrics=validation_metrics(run_dir), default_rule=rule,
                          onnx=args.onnx, log=print)
    if args.onnx_model:
        files += export_run_model(env, prepared, out, args, log=print)
    for f in files:
        print(f"wrote {f}")
    return 0


def export_scorer(
    scorer: LearnedScorer,
    out_dir: str | Path,
    backbone_signature: Mapping[str, Any],
    lam: float | None = None,
    metrics: Mapping[str, Any] | None = None,
    default_rule: Mapping[str, Any] | None = None,
    onnx: bool = False,
    log: Log | None = None,
) -> list[Path]:
    """Write the artifact atomically (ONNX included when asked); returns the files written."""
    written: list[str] = []

    def add_onnx(tmp: Path) -> None:
        written.append(export_compiled(scorer.net, tmp, log).name)

    out = save_scorer(scorer, out_dir, backbone_signature, lam=lam, metrics=metrics, default_rule=default_rule,
                      extra=add_onnx if onnx else None)
    return [out / "scorer.safetensors", out / "scorer.json", *(out / name for name in written)]


# ---- ONNX / torch.export --------------------------------------------------------------------------------
def export_compiled(net: TokenScorer, out_dir: Path, log: Log | None = None) -> Path:
    """``scorer.onnx`` (verified with onnxruntime), or ``scorer.pt2`` via torch.export if ONNX export fails."""
    net = net.eval()
    example = (torch.randn(2, 5, net.feature_dim), torch.randn(2, net.context_dim))
    path = out_dir / ONNX_FILE
    try:
        export_scorer_onnx(net, example, path)
    except Exception as exc:  # exporter failures come in many types across torch versions
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        path.unlink(missing_ok=True)
        fallback = export_program(net, example, out_dir / EXPORT_FILE)
        if log:
            log(f"ONNX export failed ({reason}); wrote a torch.export program ({fallback.name}) instead")
        return fallback
    check_onnx(net, path, log)
    return path


def export_scorer_onnx(net: TokenScorer, example: tuple[torch.Tensor, torch.Tensor], path: Path) -> None:
    """ONNX with dynamic batch and token dims: the dynamo exporter if onnxscript is installed, else TorchScript's."""
    inputs, outputs = ["tokens", "context"], ["logits"]
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter's dependency)
    except ImportError:
        axes = {"tokens": {0: "batch", 1: "tokens"}, "context": {0: "batch"}, "logits": {0: "batch", 1: "tokens"}}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated, still correct here
            torch.onnx.export(net, example, str(path), dynamo=False, dynamic_axes=axes, opset_version=17,
                              input_names=inputs, output_names=outputs)
        return
    batch, tokens = torch.export.Dim("batch"), torch.export.Dim("tokens")
    shapes = ({0: batch, 1: tokens}, {0: batch})
    # One file: the weights inside (a scorer is a few kB), no scorer.onnx.data beside it. Quiet: the exporter printed
    # its progress and a warning about the batch axis shared by both inputs (named "batch" either way).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*axis name: batch will not be used")
        torch.onnx.export(net, example, str(path), dynamo=True, dynamic_shapes=shapes, input_names=inputs,
                          output_names=outputs, external_data=False, verbose=False)


def export_program(net: TokenScorer, example: tuple[torch.Tensor, torch.Tensor], path: Path) -> Path:
    """A ``torch.export`` program with dynamic batch and token dims (load with ``torch.export.load``)."""
    batch, tokens = torch.export.Dim("batch"), torch.export.Dim("tokens")
    program = torch.export.export(net, example, dynamic_shapes=({0: batch, 1: tokens}, {0: batch}))
    torch.export.save(program, str(path))
    return path


def check_onnx(net: TokenScorer, path: Path, log: Log | None = None, shapes: Sequence[tuple[int, int]] = ((1, 7), (3, 50))) -> float:
    """Max |onnxruntime - torch| over inputs of two (B, N) shapes; raises if they disagree."""
    try:
        import onnxruntime as ort
    except ImportError:
        if log:
            log("onnxruntime is not installed: scorer.onnx was not verified")
        return float("nan")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for b, n in shapes:
        tokens, context = torch.randn(b, n, net.feature_dim, generator=g), torch.rand(b, net.context_dim, generator=g)
        got = session.run(None, {"tokens": tokens.numpy(), "context": context.numpy()})[0]
        with torch.no_grad():
            want = net(tokens, context).numpy()
        worst = max(worst, float(abs(got - want).max()))
    if not worst <= 1e-4:
        raise RuntimeError(f"scorer.onnx disagrees with torch (max abs diff {worst:.3g})")
    return worst


# ---- reading a run folder ----------------------------------------------------------------------------------
def read_run_scorer(run_dir: Path, config: Mapping[str, Any], checkpoint: str) -> LearnedScorer:
    """The actor of the run's SB3 checkpoint as a LearnedScorer (read without unpickling), with the steps it was
    saved at in its meta, as ``train`` records them (so a finished run whose scorer was exported again still refuses
    a resume that would only redo its end)."""
    from policy_prune.training.policy import load_learned_scorer
    from policy_prune.training.train import checkpoint_timesteps

    sites = _lookup(config, ("env", "sites"), ("sites",))
    if not isinstance(sites, list) or not sites:
        raise UserError(f"{run_dir / 'config.yaml'}: no pruning sites (env.sites)")
    path = run_dir / "checkpoints" / f"{checkpoint.removesuffix('.zip')}.zip"
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    scorer = load_learned_scorer(path, [int(s) for s in sites])
    if (steps := checkpoint_timesteps(path)) is not None:
        scorer.meta["timesteps"] = steps
    merge = _lookup(config, ("env", "merge"))
    scorer.merge = merge is True
    if scorer.projection is None:
        raise UserError(f"{path}: no feature projection in this checkpoint (written by an older policy-prune "
                        "with other features); train the run again to export it")
    return scorer


def with_run_budget(scorer: LearnedScorer, run_dir: Path, config: Mapping[str, Any],
                    log: Log | None = None) -> tuple[LearnedScorer, dict[str, Any] | None]:
    """(scorer, default rule) with the budget input of a budget-conditioned checkpoint.

    Its calibration (and calibrated default rule) come from the run's own artifact when that artifact
    holds these very weights (``train`` wrote it from the final policy); otherwise (another checkpoint,
    or a run stopped before its export) the budget range of the run's config, uncalibrated: then
    ``prune(flops=f)`` solves per-site counts from a flat profile and the threshold rule starts at 0.
    """
    import dataclasses

    from policy_prune.core.artifact import ScorerFileError, load_scorer
    from policy_prune.core.budget import BudgetInput
    from policy_prune.core.scorer import context_width

    if scorer.net.context_dim != context_width(len(scorer.sites), True):
        return scorer, None
    try:
        own = load_scorer(run_dir / "scorer")
    except (ScorerFileError, UserError):
        own = None
    same = own is not None and own.budget is not None and own.sites == scorer.sites and all(
        torch.equal(a, b) for a, b in zip(own.net.state_dict().values(), scorer.net.state_dict().values(), strict=True))
    if same:
        assert own is not None
        return dataclasses.replace(scorer, budget=own.budget), own.meta.get("default_rule")
    budget = _lookup(config, ("env", "reward", "budget"), ("reward", "budget"))
    if not (isinstance(budget, list) and len(budget) == 2):
        raise UserError(f"{run_dir}: a budget-conditioned checkpoint, but the run's config has no env.reward.budget")
    low, high = float(budget[0]), float(budget[1])
    if log is not None:
        log(f"{run_dir / 'scorer'} does not hold this checkpoint's calibration: its budget input is uncalibrated "
            f"({low:g}-{high:g})")
    return dataclasses.replace(scorer, budget=BudgetInput.over(low, high)), None


def calibrate_run_scorer(run_dir: Path, scorer: LearnedScorer, signature: Mapping[str, Any],
                         log: Log | None = None) -> tuple[LearnedScorer, dict[str, Any]]:
    """(scorer, default rule) calibrated as ``train`` calibrates at its end: on the run's val split, with
    its calibration settings, on the run's backbone in fp32 (refused if its weights are not the ones the
    scorer was trained on)."""
    from policy_prune.core.scorer import context_width
    from policy_prune.training.train import calibrated_scorer, load_run_config

    if scorer.net.context_dim != context_width(len(scorer.sites), True):
        raise UserError(f"--calibrate: {run_dir}'s scorer has no budget input (trained at one lambda): nothing to calibrate")
    cfg = load_run_config(run_dir)
    if cfg.env.reward.budget is None:
        raise UserError(f"--calibrate: {run_dir}'s config has no env.reward.budget")
    backbone, splits = run_backbone(cfg, scorer, signature)
    if log is not None:
        log(f"calibrating on {cfg.train.calibration_samples} val samples of {cfg.env.name} ...")
    return calibrated_scorer(cfg, scorer, backbone, splits["val"])


def run_backbone(cfg: Any, scorer: LearnedScorer, signature: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    """(backbone, splits) of a run's config, built as ``train`` built them (seeded first: a random-init model is the
    same), refused if the backbone's weights are not the ones ``scorer`` was trained on (``signature``)."""
    import dataclasses

    from policy_prune.core.artifact import check_signature
    from policy_prune.embedded import resolve

    torch.manual_seed(cfg.train.seed)
    backbone, splits = resolve(cfg.env, seed=cfg.train.seed, device=cfg.train.device)
    check_signature(dataclasses.replace(scorer, meta={**scorer.meta, "backbone": dict(signature)}),
                    backbone.signature(), strict=False, weights=True)
    return backbone, splits


def run_signature(run_dir: Path, config: Mapping[str, Any], scorer: LearnedScorer) -> dict[str, Any]:
    """The trained-on backbone's signature: from the scorer, the run's own artifact, or rebuilt from config."""
    recorded = scorer.meta.get("backbone") or _artifact_signature(run_dir / "scorer" / META_FILE) \
        or _lookup(config, ("backbone_signature",))
    if isinstance(recorded, Mapping):
        return dict(recorded)
    from policy_prune.config import run_env_config

    env = run_env_config(config, run_dir)
    return _backbone_for(env, _lookup(config, ("train", "seed")) or 0).signature()


def _artifact_signature(path: Path) -> Any:
    try:
        return json.loads(path.read_text()).get("backbone")
    except (OSError, ValueError, AttributeError):
        return None  # no (readable) artifact yet: fall back to rebuilding the backbone


def _backbone_for(env: Any, seed: int) -> Any:
    """The run's backbone as train built it: seeded first (a random-init model has the run's weights)."""
    from policy_prune.embedded import resolve_backbone

    torch.manual_seed(seed)
    return resolve_backbone(env)[0]


def validation_metrics(run_dir: Path) -> dict[str, Any]:
    """Headline metrics: what train writes (the learned policy's in eval/summary.json, "learned" or a budget run's
    first "learned@f"), else the last validation record ("eval/x", "val/x" keys) of metrics.jsonl, else {}."""
    summary = _read_json(run_dir / "eval" / "summary.json")
    found = learned_metrics(summary.get("methods")) if isinstance(summary, dict) else {}
    if found:
        return found
    path = run_dir / "metrics.jsonl"
    last: dict[str, Any] = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        record = _loads(line)  # a line cut short by an interrupted run reads as None
        found = {_strip_val(k): v for k, v in record.items() if _strip_val(k) != k and isinstance(v, int | float)} \
            if isinstance(record, dict) else {}
        if found:
            last = found
    return last


def _read_json(path: Path) -> Any:
    return _loads(path.read_text()) if path.is_file() else None


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _strip_val(key: str) -> str:
    for prefix in ("eval/", "val/", "val_", "validation/"):
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def _lookup(config: Mapping[str, Any], *paths: tuple[str, ...]) -> Any:
    """The first value found along any of ``paths`` in a nested mapping, else None."""
    for path in paths:
        node: Any = config
        for key in path:
            node = node.get(key) if isinstance(node, Mapping) else None
        if node is not None:
            return node
    return None
