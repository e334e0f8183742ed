"""The whole PrunedModel as one ONNX graph and one ``torch.export`` program, dynamic in batch size.

Embedding, blocks, token features, scorer, top-k, gathers and head all live in the graph, so a service
that runs onnxruntime (or TensorRT) needs no Python at inference. It takes the keep_ratio rule, whose
shapes are static: on images its counts are a function of the input size; on text the graph takes
``input_ids`` and ``attention_mask`` [B, L] of a fixed L (right-padded) and derives each row's keep
counts from its real length inside the graph (``PrunedModel``'s static text path), gathering to a width
planned from L.

    export_onnx(fast, example_inputs, "model.onnx")   # verified with onnxruntime against PyTorch

Needs ``onnx``, ``onnxscript`` and ``onnxruntime`` (``pip install 'policy-prune[onnx]'``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from policy_prune.core.backbones import HFEncoderBackbone, TokenState
from policy_prune.core.inference import PrunedModel, kept_mask
from policy_prune.errors import UserError

MAX_BATCH = 4096
INSTALL = "pip install 'policy-prune[onnx]'"
INSTEAD = ("use the torch.export program (program_path / model.pt2, load with torch.export.load) or export "
           "the scorer alone (policy-prune export RUN_DIR --onnx)")


class ExportError(UserError):
    """A model or rule that cannot become one graph, or a graph that disagrees with PyTorch."""


class GraphModel(nn.Module):
    """A PrunedModel with tensor inputs and outputs, as the exported graph sees it.

    Images [B, C, H, W] -> head output [B, K]. Text ``input_ids``, ``attention_mask`` [B, L] ->
    (``sentence_embedding`` [B, D], ``kept_mask`` [B, L] bool). ``pruned=False`` runs the same model
    unpruned through its adapter (the model's own modules, no sites): the baseline graph.
    """

    def __init__(self, fast: PrunedModel, pruned: bool = True) -> None:
        super().__init__()
        self.fast = fast
        self.pruned = pruned
        b = fast.backbone
        self.text = isinstance(b, HFEncoderBackbone) and not b.is_vision

    @property
    def input_names(self) -> list[str]:
        return ["input_ids", "attention_mask"] if self.text else ["pixel_values"]

    @property
    def output_names(self) -> list[str]:
        return ["sentence_embedding", "kept_mask"] if self.text else ["logits"]

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Any:
        inputs = {"input_ids": x, "attention_mask": attention_mask} if self.text else x
        if self.pruned:
            out, state, _ = self.fast.run(inputs)
        else:
            out, state, _ = self.fast.backbone.forward_sites(inputs, [], _unchanged, static=True)
        return (out, kept_mask(state)) if self.text else out


def _unchanged(state: TokenState, site_index: int, layer: int) -> TokenState:
    return state


def graph_args(module: GraphModel, example_inputs: Any) -> tuple[torch.Tensor, ...]:
    """The graph's positional inputs from images [B, C, H, W] or a tokenizer output (checked); a tuple of
    them, as ``torch.onnx.export`` takes its args, works too: ``(images,)`` or ``(input_ids, attention_mask)``."""
    if isinstance(example_inputs, tuple | list) and 1 <= len(example_inputs) <= (2 if module.text else 1):
        example_inputs = dict(zip(("input_ids", "attention_mask"), example_inputs, strict=False)) if module.text \
            else example_inputs[0]
    if not module.text:
        if not isinstance(example_inputs, torch.Tensor) or example_inputs.dim() != 4:
            raise ExportError("example_inputs of an image model: one tensor [B, C, H, W] (or a tuple of it)")
        return (example_inputs,)
    if not isinstance(example_inputs, Mapping) or "input_ids" not in example_inputs:
        raise ExportError("example_inputs of a text model: a mapping with input_ids and attention_mask [B, L] (or "
                          "the tuple (input_ids, attention_mask))")
    extra = sorted(set(example_inputs) - {"input_ids", "attention_mask", "token_type_ids"})
    types = example_inputs.get("token_type_ids")
    if extra or (types is not None and bool(types.any())):
        raise ExportError(f"the text graph takes input_ids and attention_mask only (single-segment text); got "
                          f"{extra or ['token_type_ids with a second segment']}")
    ids = example_inputs["input_ids"]
    mask = example_inputs.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    if not bool((mask[:, :-1] >= mask[:, 1:]).all()) or not bool(mask[:, 0].all()):
        raise ExportError("text rows must be right-padded with [CLS] first (BERT-family tokenizers' default)")
    return ids.long(), mask.long()


def export_program(module: GraphModel, args: tuple[torch.Tensor, ...]) -> torch.export.ExportedProgram:
    """``torch.export`` of ``module`` with a dynamic batch dimension (traced at batch >= 2: batch 1
    would be specialised)."""
    if args[0].shape[0] == 1:
        args = tuple(a.expand(2, *a.shape[1:]).contiguous() for a in args)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    shapes = ({0: batch}, {0: batch} if len(args) > 1 else None)
    with torch.no_grad():
        module(*args)  # eager once: the backbone's caches (positions, folded queries) hold real tensors
        try:
            return torch.export.export(module, args + (None,) * (2 - len(args)), dynamic_shapes=shapes)
        except Exception as exc:  # the exporter raises many types; all end here with their first line
            raise ExportError(f"torch.export cannot capture {_describe(module)}: {_reason(exc)}; supported: "
                              "timm ViTs and Hugging Face BERT-family / ViT encoders under keep_ratio") from exc


def to_onnx(module: GraphModel, program: torch.export.ExportedProgram, path: Path) -> None:
    """Translate ``program`` to ONNX at ``path`` (dynamo exporter; a stable sort becomes TopK, whose ties
    go to the lower index as in a stable sort)."""
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter's translation library)
        from onnxscript.function_libs.torch_lib.ops.core import aten_sort
    except ImportError:
        raise ExportError(f"ONNX export of a whole model needs onnxscript: {INSTALL}") from None
    quiet = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir")]
    levels = [log.level for log in quiet]
    try:
        for log in quiet:  # the optimizer's constant folding warns about shapes it leaves symbolic (harmless)
            log.setLevel(logging.ERROR)
        onnx_program = torch.onnx.export(
            program, dynamo=True, verbose=False, input_names=module.input_names, output_names=module.output_names,
            custom_translation_table={torch.ops.aten.sort.stable: aten_sort})
        assert onnx_program is not None
        onnx_program.save(str(path))
        _name_batch_axis(path)
    except Exception as exc:
        raise ExportError(f"cannot write {_describe(module)} as ONNX: {_reason(exc)}; {INSTEAD}") from exc
    finally:
        for log, level in zip(quiet, levels, strict=True):
            log.setLevel(level)


def _name_batch_axis(path: Path) -> None:
    """The exporter names the dynamic batch dimension after its internal symbol (``s77``): call it ``batch``, as
    ``Dim("batch")`` did, everywhere that symbol stands (inputs, outputs, intermediate shapes)."""
    import onnx

    model = onnx.load(str(path))
    symbol = model.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    if not symbol or symbol == "batch":
        return
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param == symbol:
                dim.dim_param = "batch"
    onnx.save(model, str(path))


def onnx_session(path: str | Path, threads: int | None = None) -> Any:
    """An onnxruntime CPU session for ``path`` (``threads``: intra-op threads, default onnxruntime's)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ExportError(f"running the ONNX model needs onnxruntime: {INSTALL}") from None
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(session: Any, args: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
    """The session's outputs for the graph's positional inputs."""
    return session.run(None, {i.name: a.numpy() for i, a in zip(session.get_inputs(), args, strict=True)})


def verify(session: Any, module: GraphModel, args: tuple[torch.Tensor, ...], atol: float = 1e-4) -> float:
    """Max |onnxruntime - PyTorch| over the float outputs (kept masks must be equal); raises above ``atol``."""
    with torch.no_grad():
        expected = module(*args)
    expected = expected if isinstance(expected, tuple) else (expected,)
    worst = 0.0
    for name, got, want in zip(module.output_names, run_onnx(session, args), expected, strict=True):
        if want.dtype == torch.bool:
            if not np.array_equal(got, want.numpy()):
                raise ExportError(f"the ONNX graph keeps other tokens than PyTorch ({name} differs)")
            continue
        worst = max(worst, float(np.abs(got - want.numpy()).max()))
    if not worst <= atol:
        raise ExportError(f"the ONNX graph disagrees with PyTorch: max |difference| {worst:.3g} > {atol:g}")
    return worst


def export_onnx(fast: PrunedModel, example_inputs: Any, path: str | Path, program_path: str | Path | None = None,
                pruned: bool = True, atol: float = 1e-4) -> float:
    """Write ``fast`` as one ONNX graph at ``path`` (dynamic batch), checked with onnxruntime on
    ``example_inputs``; returns the max |onnxruntime - PyTorch| (an ExportError above ``atol``).

    ``example_inputs``: images [B, C, H, W], or ``{"input_ids", "attention_mask"}`` [B, L] right-padded
    to the length L the graph will take (or, as ``torch.onnx.export`` takes args, ``(images,)`` or
    ``(input_ids, attention_mask)``). ``program_path`` also saves the ``torch.export`` program.
    ``pruned=False`` exports the same model unpruned (the baseline).
    """
    if not isinstance(fast, PrunedModel):
        raise ExportError(f"export_onnx takes a PrunedModel (from policy_prune.prune), got {type(fast).__name__}")
    if pruned and fast.rule != "keep_ratio":
        raise ExportError(f"the {fast.rule} rule keeps a data-dependent number of tokens, which no graph can "
                          "shape statically: prune(model, scorer, keep_ratio=...) (CLI: --keep-ratio or --flops)")
    module = GraphModel(fast, pruned).eval()
    args = graph_args(module, example_inputs)
    program = export_program(module, args)
    if program_path is not None:
        torch.export.save(program, str(program_path))
    to_onnx(module, program, Path(path))
    return verify(onnx_session(path), module, args, atol)


def _describe(module: GraphModel) -> str:
    b = module.fast.backbone
    return f"{getattr(b, 'name', type(b.model).__name__)} ({'pruned' if module.pruned else 'unpruned'})"


def _reason(exc: BaseException) -> str:
    """The unsupported ops named in an exporter error, else its first line."""
    text = "\n".join(str(e) for e in (exc, exc.__cause__) if e is not None)
    ops = sorted(set(re.findall(r"OpOverload\(op='([\w.]+)'", text)) | set(re.findall(r"\baten\.\w+\.\w+", text)))
    if ops:
        return f"unsupported operator {', '.join(ops[:3])}"
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


# ---- policy-prune export RUN_DIR --onnx-model ------------------------------------------------------------
MODEL_FILES = ("model.onnx", "model.pt2", "export.json")


def compare_on_split(session: Any, module: GraphModel, inputs: torch.Tensor, labels: torch.Tensor,
                     batch_size: int = 256, atol: float = 1e-4) -> dict[str, float]:
    """Accuracy of the ONNX graph and of PyTorch (the same model) on labelled images [M, C, H, W], the
    agreement of their predictions, the max |difference| of their logits and how many rows differ by
    more than ``atol`` (a near-tie between two tokens' scores can flip under float rounding)."""
    onnx_pred, torch_pred, diffs = [], [], []
    for start in range(0, len(labels), batch_size):
        args = (inputs[start:start + batch_size],)
        got = torch.from_numpy(run_onnx(session, args)[0])
        with torch.no_grad():
            want = module(*args)
        diffs.append((got - want).abs().amax(dim=1))
        onnx_pred.append(got.argmax(dim=1))
        torch_pred.append(want.argmax(dim=1))
    a, b, d = torch.cat(onnx_pred), torch.cat(torch_pred), torch.cat(diffs)
    return {"samples": len(labels), "onnx_accuracy": float((a == labels).float().mean()),
            "torch_accuracy": float((b == labels).float().mean()), "agreement": float((a == b).float().mean()),
            "max_abs_diff": float(d.max()), "rows_over_atol": int((d > atol).sum())}


@dataclass
class RunModel:
    """What ``export RUN_DIR --onnx-model`` needs besides the scorer, resolved before anything is written."""

    backbone: Any
    split: tuple[torch.Tensor, torch.Tensor] | None
    length: int | None
    example: Any
    out: Path


def prepare_run_model(env: Any, args: Any) -> RunModel:
    """Load ``--model`` (default the run's backbone) and ``--check-split``, make the example inputs and check
    the output folder: these mistakes are refused before ``export`` calibrates or writes anything (then
    :func:`check_run_model`, before the scorer folder is rewritten)."""
    from policy_prune.embedded import model_inputs

    backbone, tokenizer = _run_backbone(env, args.model, args.seed)
    if tokenizer is None and args.length is not None:  # it was ignored without a word
        raise UserError(f"--length is a text graph's token length; {backbone.name} takes images")
    out = Path(args.model_out or Path(args.run_dir) / "onnx")
    _check_model_out(out)
    split = _labelled_split(env, backbone, tokenizer, args.check_split) if args.check_split else None
    length = (args.length or env.data.max_length) if tokenizer is not None else None
    example = model_inputs(backbone.model, tokenizer, args.seed, length)(args.batch)
    return RunModel(backbone, split, length, example, out)


def check_run_model(prepared: RunModel, scorer: Any, signature: Mapping[str, Any], args: Any) -> None:
    """Whether ``scorer`` (as it will be written, with the run's backbone ``signature``) prunes the prepared
    model at the asked schedule: a scorer of another model, or a budget it cannot meet, is refused here,
    before the run's scorer folder is rewritten (``load_scorer`` of the written artifact checks the same)."""
    import dataclasses

    _pruned(prepared.backbone, dataclasses.replace(scorer, meta={**scorer.meta, "backbone": dict(signature)}), args)


def _pruned(backbone: Any, scorer: Any, args: Any) -> Any:
    """``prune`` at the command's schedule: ``--keep-ratio`` or ``--flops``."""
    from policy_prune.core.inference import prune

    return prune(backbone, scorer, keep_ratio=args.keep_ratio) if args.keep_ratio else \
        prune(backbone, scorer, rule="keep_ratio", flops=args.flops)


def export_run_model(env: Any, prepared: RunModel, scorer_dir: Path, args: Any, log: Any = print) -> list[Path]:
    """``export RUN_DIR --onnx-model``: the run's scorer (artifact in ``scorer_dir``) with the prepared model
    (:func:`prepare_run_model`) at ``--keep-ratio`` or ``--flops`` as one verified ONNX graph + torch.export
    program in ``--model-out`` (default RUN_DIR/onnx, replaced whole or not at all), with ``export.json``."""
    import json
    import shutil
    import tempfile

    from policy_prune.core.artifact import _swap_in, load_scorer
    from policy_prune.core.executed import executed_schedule

    split, length, example, out = prepared.split, prepared.length, prepared.example, prepared.out
    # The artifact as written (what users load); the adapter itself carries the preset name it was trained on.
    fast = _pruned(prepared.backbone, load_scorer(scorer_dir), args)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        diff = export_onnx(fast, example, tmp / MODEL_FILES[0], tmp / MODEL_FILES[1])
        record = {"model": args.model or env.backbone.spec, "sites": fast.sites, "rule": fast.rule,
                  "values": fast.values, "flops_target": args.flops, "flops_ratio": executed_schedule(fast, example)[1],
                  "inputs": GraphModel(fast).input_names, "length": length, "example_batch": args.batch,
                  "max_abs_diff": diff}
        log(f"ONNX graph verified on {args.batch} example rows: max |onnxruntime - PyTorch| = {diff:.2e}")
        if split is not None:
            check = compare_on_split(onnx_session(tmp / MODEL_FILES[0]), GraphModel(fast).eval(), *split)
            record["check"] = {"split": args.check_split, **check}
            log("on {split} ({samples} samples): ONNX accuracy {onnx_accuracy:.4f}, PyTorch PrunedModel "
                "{torch_accuracy:.4f}, agreement {agreement:.4f}, max |diff| {max_abs_diff:.2e} ({rows_over_atol} rows "
                "over 1e-4)".format(**record["check"]))
        (tmp / MODEL_FILES[2]).write_text(json.dumps(record, indent=2) + "\n")
        _swap_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [out / name for name in MODEL_FILES]


def _run_backbone(env: Any, spec: str | None, seed: int) -> tuple[Any, Any]:
    """(backbone, tokenizer or None): the run's own backbone, or ``spec``."""
    from policy_prune.core.backbones import adapt
    from policy_prune.embedded import load_model, resolve_backbone

    if spec is None or spec == env.backbone.spec:
        return resolve_backbone(env)
    model, tokenizer = load_model(spec, seed)
    return adapt(model), tokenizer


def _labelled_split(env: Any, backbone: Any, tokenizer: Any, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images [M, C, H, W], labels [M]) of the run's env split ``name``."""
    from policy_prune.data import load_splits

    splits = load_splits(env, seed=0, backbone=backbone, tokenizer=tokenizer)
    split = splits.get(name)
    if split is None:
        raise UserError(f"--check-split: no split {name!r} (choose from {', '.join(splits)})")
    if split.labels is None or not isinstance(split.inputs, torch.Tensor):
        raise UserError(f"--check-split needs labelled images; {env.data.dataset} {name} has none")
    return split.inputs, split.labels


def _check_model_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(p.name not in MODEL_FILES for p in out.iterdir())):
        raise UserError(f"refusing to replace {out}: it holds files that are not an exported model")
