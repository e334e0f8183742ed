"""The scorer artifact: a directory with ``scorer.safetensors`` (weights) and ``scorer.json`` (everything else).

Nothing on the load path unpickles: tensors come from ``safetensors.torch.load_file`` and the rest from
JSON. Every way an artifact can be broken (missing, truncated, edited, from another version, trained for
another backbone) is a :class:`ScorerFileError` / :class:`ScorerMismatchError` with one line that names
the file and the problem.

``scorer.json`` (format_version 1)::

    format_version  1
    feature_spec    FeatureSpec.to_json(): version, names, base, projection_dim, projection_seed, projection_kind
    sites           block indices before which the scorer prunes
    layer_sizes     {feature_dim, context_dim, hidden}: the TokenScorer's constructor arguments
    backbone        the backbone's signature() it was trained on (checked by ``prune``), with ``weights``: a
                    fingerprint of the frozen model's weights (``TokenBackbone.weights_fingerprint``; absent in
                    older artifacts, which are then not checked for it)
    default_rule    {"rule": "threshold" | "keep_ratio", "values": [one per site]} (a threshold of null: -inf,
                    every token kept at that site, no scorer run there)
    merge           true where the scorer's dropped tokens are averaged into their most similar kept token
                    (absent in older artifacts: false)
    budget          null, or the budget input of a budget-conditioned scorer (``core.budget.BudgetInput``):
                    {"input": "flops", "low", "high", "default", "calibration": [{"flops", "threshold",
                    "keep_ratio", "reached"}, ...]} ("reached" absent in older artifacts: true); its
                    TokenScorer reads one more context column (the target)
    lam             training lambda (compute penalty), or null
    metrics         headline validation metrics, e.g. {"agreement": 0.97, "flops_ratio": 0.52}
    created         {"time", "policy_prune", "torch"}
    meta            free-form extra metadata of the LearnedScorer (JSON values); a scorer train exports at the
                    end of a run records the checkpoint's steps there ("timesteps")

``scorer.safetensors`` holds ``net.<name>`` for every TokenScorer parameter and ``projection`` [D, P].
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from policy_prune.core.budget import BudgetInput
from policy_prune.core.embedded_models import DIGITS_VIT
from policy_prune.core.features import BASE_FEATURES, FEATURE_VERSION, FeatureSpec
from policy_prune.core.scorer import LearnedScorer, TokenScorer, context_width
from policy_prune.errors import UsageError, UserError
from policy_prune.version import __version__

FORMAT_VERSION = 1
WEIGHTS_FILE = "scorer.safetensors"
META_FILE = "scorer.json"
ONNX_FILE = "scorer.onnx"
EXPORT_FILE = "scorer.pt2"
ARTIFACT_FILES = frozenset({WEIGHTS_FILE, META_FILE, ONNX_FILE, f"{ONNX_FILE}.data", EXPORT_FILE})
"""What a scorer folder may hold (``scorer.onnx.data``: the weights file earlier exports wrote beside the ONNX graph)."""
REQUIRED_KEYS = ("format_version", "feature_spec", "sites", "layer_sizes", "backbone", "default_rule")
RULES = ("threshold", "keep_ratio")
# Signature keys whose mismatch makes features meaningless or shapes wrong: always an error.
STRUCTURAL_KEYS = ("family", "width", "depth", "heads", "grid", "prefix_tokens", "pooling")
WEIGHTS_KEY = "weights"
WEIGHTS_TOLERANCE = 2.0**-7
"""How far two weights fingerprints (single weight values) may differ, relative to the larger. A cast moves
a weight by at most its unit roundoff (bf16 2^-8, fp16 2^-11) times itself, so fp32, bf16 and fp16 copies
of one checkpoint always match (a device move changes nothing), while another checkpoint of the
architecture (another seed, more training) differs by far more in some of the sampled weights."""
WEIGHTS_SLACK = 1e-7
"""Absolute slack for weights that fp16 stores as subnormals (below 6e-5: spacing 6e-8)."""


class ScorerFileError(UserError):
    """A scorer artifact that is missing, corrupt, or written by an incompatible version."""


class ScorerMismatchError(UserError):
    """A scorer trained for a different backbone than the model it is applied to."""


# ---- save --------------------------------------------------------------------------------------------
def save_scorer(
    scorer: LearnedScorer,
    out_dir: str | Path,
    backbone_signature: Mapping[str, Any],
    lam: float | None = None,
    metrics: Mapping[str, Any] | None = None,
    default_rule: Mapping[str, Any] | None = None,
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``scorer`` as an artifact directory, atomically.

    Files are written to a temporary sibling directory that is renamed onto ``out_dir`` only when
    complete, so a crash never leaves a half-written artifact. An existing ``out_dir`` is replaced only
    if it holds nothing but artifact files. ``default_rule`` defaults to the policy's deterministic
    decision (threshold 0 on the keep logit at every site). ``extra(tmp_dir)`` may add files (ONNX)
    before the rename. Returns ``out_dir``.
    """
    out = Path(out_dir)
    _check_replaceable(out)
    want = context_width(len(scorer.sites), scorer.budget is not None)
    if scorer.net.context_dim != want:  # what load_scorer would refuse: never write it
        raise ValueError(f"the scorer's network reads {scorer.net.context_dim} context columns, but {len(scorer.sites)} "
                         f"sites{' with a budget input' if scorer.budget is not None else ''} give {want}"
                         f"{'' if scorer.budget is not None else ': a budget-conditioned network needs its BudgetInput'}")
    rule = normalize_rule(default_rule or {"rule": "threshold", "values": [0.0]}, len(scorer.sites))
    tensors = artifact_tensors(scorer, int(backbone_signature["width"]))
    meta = artifact_json(scorer, backbone_signature, lam, metrics, rule)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        _write_files(tmp, tensors, meta)
        if extra is not None:
            extra(tmp)
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def artifact_tensors(scorer: LearnedScorer, width: int) -> dict[str, torch.Tensor]:
    """``net.<param>`` for every TokenScorer tensor plus ``projection`` [width, P], contiguous on the CPU."""
    projection = scorer.projection
    if projection is None:
        raise ValueError("the scorer has no feature projection: build it with make_projection(backbone, spec)")
    if projection.shape[0] != width:
        raise ValueError(f"projection has {projection.shape[0]} rows for a backbone of width {width}")
    tensors = {f"net.{k}": v.detach().cpu().contiguous() for k, v in scorer.net.state_dict().items()}
    tensors["projection"] = projection.detach().cpu().float().contiguous()
    return tensors


def artifact_json(
    scorer: LearnedScorer,
    signature: Mapping[str, Any],
    lam: float | None,
    metrics: Mapping[str, Any] | None,
    rule: Mapping[str, Any],
) -> dict[str, Any]:
    """The content of ``scorer.json`` (plain JSON values only)."""
    net = scorer.net
    return {
        "format_version": FORMAT_VERSION,
        "feature_spec": scorer.spec.to_json(),
        "sites": [int(s) for s in scorer.sites],
        "layer_sizes": {"feature_dim": int(net.feature_dim), "context_dim": int(net.context_dim),
                        "hidden": [int(h) for h in net.hidden]},
        "backbone": json_safe(dict(signature)),
        "default_rule": json_safe(dict(rule)),  # a keep-all threshold (-inf) is written as null
        "budget": None if scorer.budget is None else scorer.budget.to_json(),
        "merge": bool(scorer.merge),
        "lam": None if lam is None else float(lam),
        "metrics": json_safe(dict(metrics or {})),
        "created": {"time": datetime.now(UTC).isoformat(timespec="seconds"),
                    "policy_prune": __version__, "torch": torch.__version__},
        "meta": json_safe({k: v for k, v in scorer.meta.items() if k not in _LOADED_META_KEYS}),
    }


def normalize_rule(rule: Mapping[str, Any], n_sites: int, finite: bool = True) -> dict[str, Any]:
    """Validate a decision rule {"rule", "values"} and expand its values to one per site.

    A threshold of -inf keeps every token at its site (no scorer runs there); scorer.json writes it as null.
    ``finite=False`` admits +inf thresholds too (keep nothing); NaN is never valid.
    """
    if not isinstance(rule, Mapping):
        raise UserError(f"expected an object {{rule, values}}, got {rule!r}")
    name = rule.get("rule")
    if name not in RULES:
        raise UserError(f"unknown decision rule {name!r} (threshold or keep_ratio)")
    raw = rule.get("values")
    values = [raw] if isinstance(raw, int | float) else list(raw) if isinstance(raw, Sequence) else None
    if name == "threshold" and values:
        values = [float("-inf") if v is None else v for v in values]
    if not values or len(values) not in (1, n_sites) or not all(isinstance(v, int | float) for v in values):
        raise UserError(f"decision rule values must be one number or one per site ({n_sites}), got {raw!r}")
    values = [float(v) for v in values] * (n_sites if len(values) == 1 else 1)
    if any(math.isnan(v) or (finite and v == float("inf")) for v in values):
        raise UserError(f"decision rule values must be {'finite numbers' if finite else 'numbers'}, got {values}")
    if name == "keep_ratio" and not all(0.0 <= v <= 1.0 for v in values):
        raise UserError(f"keep_ratio values must lie in [0, 1], got {values}")
    return {"rule": name, "values": values}


def json_safe(x: Any) -> Any:
    """JSON-safe copy: tensors / numpy scalars become numbers, non-finite floats become null."""
    if isinstance(x, Mapping):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [json_safe(v) for v in x]
    if hasattr(x, "tolist"):  # torch tensors and numpy arrays / scalars
        return json_safe(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if x is None or isinstance(x, bool | int | float | str):
        return x
    return str(x)


HEADLINE_METRICS = ("return", "task", "flops_ratio", "agreement", "accuracy", "cosine")
"""The numbers of a run's final validation record that its scorer artifact carries (``metrics``)."""


def learned_metrics(methods: Any) -> dict[str, Any]:
    """``metrics`` for an artifact from a run's final validation (``eval/summary.json``'s "methods"): the first
    learned method's headline numbers ("learned", or "learned@f" for a budget-conditioned run), else {}."""
    if not isinstance(methods, Mapping):
        return {}
    learned = next((m for name, m in methods.items() if str(name).startswith("learned") and isinstance(m, Mapping)), {})
    return {k: learned[k] for k in HEADLINE_METRICS if isinstance(learned.get(k), int | float)
            and not isinstance(learned[k], bool)}


def _check_replaceable(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"cannot write a scorer to {out}: it is a file, not a directory")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in ARTIFACT_FILES)
        if foreign:
            raise UserError(f"refusing to replace {out}: it holds files that are not a scorer artifact ({foreign[0]})")


def _write_files(tmp: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    # One metadata key: safetensors writes the keys in its hash map's order, which changes from process to process
    # (with two, the same scorer saved twice differed in its bytes half the time). The version is scorer.json's.
    save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "policy-prune-scorer"})
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2, allow_nan=False) + "\n")


def _swap_in(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` onto ``out``; an old ``out`` is moved aside first and restored if the rename fails. The folder
    and its files get the modes the umask gives new ones (``mkdtemp`` makes a private 0700 folder, and a scorer
    copied for another serving user must stay readable)."""
    mask = os.umask(0)
    os.umask(mask)
    for path in (tmp, *tmp.iterdir()):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


# ---- load --------------------------------------------------------------------------------------------
_LOADED_META_KEYS = ("backbone", "default_rule", "lam", "metrics", "created", "format_version", "path", "budget")


def load_scorer(path: str | Path) -> LearnedScorer:
    """Read a scorer artifact directory (or a file inside it) without unpickling anything.

    The returned scorer's ``meta`` holds ``backbone`` (signature), ``default_rule``, ``lam``,
    ``metrics``, ``created``, ``format_version`` and ``path``, plus the artifact's own ``meta``.
    """
    if not isinstance(path, str | os.PathLike):
        raise UsageError(f"load_scorer takes the path of a scorer folder (str or Path), got {type(path).__name__}")
    root = Path(path).expanduser()
    if root.is_file() and root.name in ARTIFACT_FILES:
        root = root.parent
    if not root.is_dir():
        raise ScorerFileError(f"scorer not found: {root} is not a directory")
    if not (root / META_FILE).exists() and (root / "scorer" / META_FILE).is_file():
        raise ScorerFileError(f"{root} is a run folder, not a scorer: load {root / 'scorer'}")
    meta = read_meta(root / META_FILE)
    where = root / META_FILE
    try:  # the JSON's values: a wrong type anywhere in them is the file's fault
        spec = _spec_from_json(meta["feature_spec"], where)
        sites = _sites(meta["sites"], where)
        budget = _budget(meta.get("budget"), where, len(sites))
        merge = meta.get("merge", False)
        if not isinstance(merge, bool):
            raise ScorerFileError(f"{where}: merge must be true or false, got {merge!r}")
    except ScorerFileError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
        raise ScorerFileError(f"{where}: malformed scorer file ({exc!r})") from None
    tensors = read_tensors(root / WEIGHTS_FILE)
    net = _build_net(meta["layer_sizes"], spec, len(sites), budget is not None, where, tensors)
    _load_weights(net, tensors, root / WEIGHTS_FILE)
    projection = _projection(tensors, meta["backbone"], spec, root / WEIGHTS_FILE)
    try:
        rule = normalize_rule(meta["default_rule"], len(sites))
    except UserError as exc:
        raise ScorerFileError(f"{where}: bad default_rule: {exc}") from None
    extra: dict[str, Any] = meta["meta"] if isinstance(meta.get("meta"), dict) else {}
    info = {**extra, "backbone": meta["backbone"], "default_rule": rule, "lam": meta.get("lam"),
            "metrics": meta.get("metrics") or {}, "created": meta.get("created"),
            "format_version": meta["format_version"], "path": str(root)}
    return LearnedScorer(net.eval(), sites, spec, projection, info, budget, merge=merge)


def read_meta(path: Path) -> dict[str, Any]:
    """``scorer.json`` as a dict with every required key and a known format_version."""
    if not path.is_file():
        raise ScorerFileError(f"scorer file missing: {path}")
    try:
        meta = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ScorerFileError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise ScorerFileError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise ScorerFileError(f"{path}: missing key {missing[0]!r} (required: {', '.join(REQUIRED_KEYS)})")
    if meta["format_version"] != FORMAT_VERSION:
        raise ScorerFileError(f"{path}: unknown format_version {meta['format_version']!r} "
                              f"(this policy-prune reads version {FORMAT_VERSION}; upgrade policy-prune)")
    backbone = meta["backbone"]
    if not isinstance(backbone, dict) or not isinstance(backbone.get("width"), int) or isinstance(backbone["width"], bool):
        raise ScorerFileError(f"{path}: 'backbone' must be a signature object with an integer width")
    return meta


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file (no pickle); corrupt or truncated files are ScorerFileErrors."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise ScorerFileError(f"scorer file missing: {path}")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own SafetensorError (and OSError) on bad bytes
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ScorerFileError(f"{path}: corrupt or truncated safetensors file ({first})") from None


def _spec_from_json(data: Any, where: Path) -> FeatureSpec:
    for key in ("version", "projection_dim", "projection_seed"):  # int() would truncate 16.7 without a word
        value = data.get(key) if isinstance(data, dict) else None
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ScorerFileError(f"{where}: bad feature_spec (feature_spec.{key} must be an integer, got {value!r})")
    try:
        spec = FeatureSpec(version=int(data["version"]), names=tuple(data["base"]),
                           projection_dim=int(data["projection_dim"]), projection_seed=int(data["projection_seed"]),
                           projection_kind=str(data["projection_kind"]))
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise ScorerFileError(f"{where}: bad feature_spec ({exc!r})") from None
    if spec.version != FEATURE_VERSION:
        raise ScorerFileError(f"{where}: feature spec version {spec.version}, but this policy-prune computes "
                              f"version {FEATURE_VERSION} features; re-export the scorer with a matching version")
    if spec.names != BASE_FEATURES or list(data.get("names", [])) != spec.all_names():
        raise ScorerFileError(f"{where}: feature names {list(data.get('names', data['base']))} differ from "
                              f"this policy-prune's version {FEATURE_VERSION} features {spec.all_names()}")
    return spec


def _sites(data: Any, where: Path) -> list[int]:
    ok = isinstance(data, list) and data and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in data)
    if not ok or data != sorted(set(data)):
        raise ScorerFileError(f"{where}: sites must be a non-empty increasing list of block indices, got {data!r}")
    return list(data)


def _budget(data: Any, where: Path, n_sites: int) -> BudgetInput | None:
    if data is None:
        return None
    try:
        return BudgetInput.from_json(data, n_sites)
    except ValueError as exc:
        raise ScorerFileError(f"{where}: bad budget ({exc})") from None


def _build_net(sizes: Any, spec: FeatureSpec, n_sites: int, budgeted: bool, where: Path,
               tensors: Mapping[str, torch.Tensor]) -> TokenScorer:
    try:
        feature_dim, context_dim = int(sizes["feature_dim"]), int(sizes["context_dim"])
        hidden = [int(h) for h in sizes["hidden"]]
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise ScorerFileError(f"{where}: bad layer_sizes ({exc!r})") from None
    # Widths are checked against the weights file before anything is allocated (a typo of 10**12 would
    # otherwise try to allocate terabytes): each hidden layer's bias has its width.
    stored = [int(tensors[k].numel()) if k in tensors else None for k in _hidden_biases(len(hidden))]
    if any(h < 1 for h in hidden) or stored != hidden:
        raise ScorerFileError(f"{where}: layer_sizes hidden {hidden} do not match the weights file's hidden layers "
                              f"{[w for w in stored if w is not None]}")
    want = context_width(n_sites, budgeted)
    if feature_dim != spec.dim or context_dim != want:
        raise ScorerFileError(f"{where}: layer_sizes feature_dim={feature_dim}, context_dim={context_dim} do not "
                              f"match the feature spec ({spec.dim}) and {n_sites} sites"
                              f"{' with a budget input' if budgeted else ''} ({want})")
    return TokenScorer(feature_dim, context_dim, hidden)


def _hidden_biases(n_hidden: int) -> list[str]:
    """The weights file's names of a TokenScorer's hidden-layer biases (Linear and Tanh alternate in its body)."""
    return [f"net.body.{2 * i}.bias" for i in range(n_hidden)]


def _load_weights(net: TokenScorer, tensors: Mapping[str, torch.Tensor], where: Path) -> None:
    expected = net.state_dict()
    got = {k.removeprefix("net."): v for k, v in tensors.items() if k.startswith("net.")}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    if missing or unexpected:
        what = f"missing tensor net.{missing[0]}" if missing else f"unexpected tensor net.{unexpected[0]}"
        raise ScorerFileError(f"{where}: {what} for the layer sizes in {META_FILE}")
    for k, v in expected.items():
        if got[k].shape != v.shape:
            raise ScorerFileError(f"{where}: tensor net.{k} has shape {list(got[k].shape)}, "
                                  f"but {META_FILE} layer sizes need {list(v.shape)}")
    _check_finite({f"net.{k}": v for k, v in got.items()}, where)
    net.load_state_dict({k: v.float() for k, v in got.items()})


def _check_finite(tensors: Mapping[str, torch.Tensor], where: Path) -> None:
    """Weights must be finite floating-point numbers: a NaN would give NaN logits, and every token would then be
    dropped or kept without a word (a silent wrong answer)."""
    for name, t in tensors.items():
        if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
            raise ScorerFileError(f"{where}: tensor {name} must hold finite floating-point numbers "
                                  f"({t.dtype}{'' if not t.is_floating_point() else ', with NaN or inf'})")


def _projection(tensors: Mapping[str, torch.Tensor], signature: Mapping[str, Any], spec: FeatureSpec,
                where: Path) -> torch.Tensor:
    if "projection" not in tensors:
        raise ScorerFileError(f"{where}: missing tensor 'projection'")
    _check_finite({"projection": tensors["projection"]}, where)
    projection = tensors["projection"].float()
    want = [int(signature["width"]), spec.projection_dim]
    if list(projection.shape) != want:
        raise ScorerFileError(f"{where}: projection has shape {list(projection.shape)}, but backbone width and "
                              f"projection_dim in {META_FILE} need {want}")
    return projection


# ---- signature check (used by ``prune``) ------------------------------------------------------------------
def check_signature(scorer: LearnedScorer, signature: Mapping[str, Any], strict: bool = True,
                    weights: bool | None = None) -> list[str]:
    """Compare the scorer's stored backbone signature with ``signature``; returns the differing keys.

    Structural keys (width, depth, grid, ...) always raise ScorerMismatchError; other keys
    (architecture name, class count, vocabulary) raise only when ``strict``; the weights fingerprint
    (another checkpoint of the same architecture) raises when ``weights`` (default: as ``strict``). A
    fingerprint missing on either side (an older artifact) is not compared. The message names each
    differing value and what to do about it.
    """
    stored = scorer.meta.get("backbone")
    if not isinstance(stored, Mapping):
        return []  # an in-memory scorer that was never exported: nothing to check against
    differ = [k for k in stored if k != WEIGHTS_KEY and _norm(stored[k]) != _norm(signature.get(k))]
    if not same_weights(stored.get(WEIGHTS_KEY), signature.get(WEIGHTS_KEY)):
        differ.append(WEIGHTS_KEY)
    check_weights = strict if weights is None else weights
    refused = [k for k in differ if k in STRUCTURAL_KEYS or (check_weights if k == WEIGHTS_KEY else strict)]
    if refused:
        structural = [k for k in refused if k in STRUCTURAL_KEYS]
        what = "; ".join(_difference(k, stored, signature) for k in (structural or refused))
        raise ScorerMismatchError(f"scorer was trained for {_describe(stored)}, not this {_describe(signature)} "
                                  f"(scorer vs model: {what}); {_advice(stored, structural, refused)}")
    return differ


def same_weights(a: Any, b: Any, tol: float = WEIGHTS_TOLERANCE) -> bool:
    """Whether two weights fingerprints come from one checkpoint, whatever the dtype or device of each copy
    (see WEIGHTS_TOLERANCE); True when either is missing or empty (an older artifact: nothing to compare)."""
    if not a or not b:
        return True
    if not isinstance(a, Sequence) or not isinstance(b, Sequence) or len(a) != len(b):
        return False
    return all(abs(x - y) <= tol * max(abs(x), abs(y)) + WEIGHTS_SLACK for x, y in zip(a, b, strict=True))


def _difference(key: str, stored: Mapping[str, Any], signature: Mapping[str, Any]) -> str:
    if key == WEIGHTS_KEY:
        return "same shapes, different weights (another checkpoint)"
    return f"{key} {stored[key]!r} vs {signature.get(key)!r}"


def _advice(stored: Mapping[str, Any], structural: Sequence[str], refused: Sequence[str]) -> str:
    if not structural and WEIGHTS_KEY in refused:
        model = "policy_prune.load_backbone('digits-vit') with its pretrain seed" \
            if stored.get("architecture") == DIGITS_VIT else "the checkpoint it was trained on"
        return f"prune {model}, or train a scorer for this one (strict=False uses it anyway)"
    if not structural:
        return "every shape matches: if it is the same model under another name, pass strict=False to prune()"
    arch = stored.get("architecture")
    if arch == DIGITS_VIT:
        return "prune the model it was trained for, policy_prune.load_backbone('digits-vit'), or train a scorer for this one"
    return f"prune the model it was trained for ({arch}), or train a scorer for this one (policy-prune train)"


def _norm(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def _describe(sig: Mapping[str, Any]) -> str:
    shape = ", ".join(f"{k} {sig[k]}" for k in ("width", "depth", "grid") if k in sig)
    return f"{sig.get('family', '?')} {sig.get('architecture', '?')} ({shape})"
