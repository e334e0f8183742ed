"""``policy-prune bench``: wall-clock speed of the original model vs pruned execution, measured in one run.

Every variant is timed round-robin (warm-up first, then one call of each per repeat) so that drift in
machine load hits all of them alike; the median is reported and ratios are taken between medians.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from policy_prune.cli_args import non_negative, positive, ratio
from policy_prune.core.artifact import json_safe
from policy_prune.core.backbones import TokenBackbone, TokenState, adapt
from policy_prune.core.executed import executed_schedule
from policy_prune.core.inference import PrunedModel, prune
from policy_prune.core.schedule import TokenCounts, keep_ratio_for
from policy_prune.core.scorer import LearnedScorer, random_scorer
from policy_prune.embedded import DTYPE_NAMES, DTYPES, check_device, load_backbone, load_model, model_inputs
from policy_prune.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--what", nargs="+", choices=("exec", "model", "onnx", "env", "flops", "budget", "encode"),
                   default=["exec"],
                   help="exec: original vs pruned forward of --model (random keep); model: original vs "
                        "PrunedModel with a scorer (--scorer, else random weights) at --flops; onnx: the same two "
                        "exported as ONNX graphs and run in onnxruntime (CPU); env: batched-env samples/s vs plain "
                        "forward on --env; flops: analytic FLOPs of --model vs FlopCounterMode; budget: the FLOPs "
                        "that prune(model, --scorer, flops=f) really runs (FlopCounterMode) on --env's test split, "
                        "for each of --targets and both rules; encode: SentenceTransformer.encode of all-MiniLM-L6-v2 (what a user "
                        "calls: tokenizing and pooling included) unpruned vs prune(model, --scorer, flops=f) for each of "
                        "--targets, ms per text at each --batch on --samples test passages")
    p.add_argument("--model", default="deit_small_patch16_224",
                   help="timm name (random init), hf:<id>, model folder, digits-vit (the cached embedded backbone) or "
                        "minilm (all-MiniLM-L6-v2, real weights, on padded python-docs test passages)")
    p.add_argument("--scorer", type=Path, default=None, help="scorer folder for --what model (default: random weights)")
    p.add_argument("--flops", type=ratio, default=0.5,
                   help="--what model and onnx: the FLOPs ratio asked of prune(model, scorer, flops=F) (a trained "
                        "--scorer: its calibrated plan; the random scorer: one keep_ratio at every site)")
    p.add_argument("--sites", type=non_negative, nargs="+", default=None,
                   help="pruning sites of the random scorer (--what model and onnx, without --scorer; default 0)")
    p.add_argument("--targets", type=ratio, nargs="+", default=[0.7, 0.5, 0.35],
                   help="--what budget: the FLOPs ratios asked of prune(model, scorer, flops=f)")
    p.add_argument("--samples", type=positive, default=256, help="--what budget: test samples the FLOPs are counted on; --what encode: test passages encoded")
    p.add_argument("--length", type=positive, default=128,
                   help="--what onnx, text models: the fixed input length of both graphs (rows padded to it)")
    p.add_argument("--env", default="digits-vit", help="env preset (name or YAML path) for --what env")
    p.add_argument("--agent", default="ppo", help="agent preset whose rollout buffer size is measured (--what env)")
    p.add_argument("--episodes", type=positive, default=20, help="batched episodes timed per repeat (--what env)")
    p.add_argument("--batch", type=positive, nargs="+", default=[32], help="batch sizes to measure")
    p.add_argument("--keep", type=ratio, default=0.5, help="fraction of prunable tokens kept at the site")
    p.add_argument("--site", type=non_negative, default=0, help="block index before which tokens are dropped")
    p.add_argument("--warmup", type=non_negative, default=3, help="untimed calls before timing (default 3)")
    p.add_argument("--repeats", type=positive, default=15, help="timed calls per measurement; the median is reported (default 15)")
    p.add_argument("--threads", type=positive, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--compile", nargs="?", const="", default=None, metavar="OPTIONS",
                   help="--what model: time torch.compile'd original and pruned models (inductor, static shapes); "
                        "OPTIONS: inductor options for both, comma-separated, e.g. freezing,cpp_wrapper (CPU "
                        "inference) or max_autotune=true")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32", help="dtype of the model (the scorer stays fp32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random scorers, example inputs and sampled rows (default 0)")
    p.add_argument("--out", type=Path, default=None, help="write the measurements as JSON here")


def time_round_robin(fns: Mapping[str, Callable[..., Any]], warmup: int, repeats: int, device: str) -> dict[str, float]:
    """Median seconds per call of each function, timed interleaved."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync()
            samples[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in samples.items()}


def on_device(x: Any, device: str, dtype: str = "fp32") -> Any:
    """Model inputs (a tensor or a dict of them) on ``device``, floating ones in ``dtype`` (a DTYPES name):
    what the original model itself accepts (the adapters cast, a timm model does not)."""
    if isinstance(x, dict):
        return {k: on_device(v, device, dtype) for k, v in x.items()}
    return x.to(device, DTYPES[dtype]) if x.is_floating_point() else x.to(device)


def random_keep_fn(keep: float, seed: int) -> Callable[..., torch.Tensor]:
    """Keep a fixed fraction of the prunable alive tokens of every row, chosen at random (seeded)."""

    def keep_fn(state: Any, site_index: int, layer: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed + site_index)
        prunable = state.valid & ~state.protected
        n_keep = int(round(keep * int(prunable[0].sum())))
        noise = torch.rand(state.valid.shape, generator=g).to(state.valid.device)
        noise = noise.masked_fill(~prunable, -1.0)
        idx = noise.topk(n_keep, dim=1).indices
        return torch.zeros_like(state.valid).scatter(1, idx, True)

    return keep_fn


def bench_pruned_execution(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Original vs adapter (keep-all) vs pruned, per batch size."""
    # The --model names every verb takes (digits-vit, minilm too); a timm name gets weights seeded by --seed.
    torch.manual_seed(args.seed)
    backbone = adapt(load_backbone(args.model)).to(args.device, DTYPES[args.dtype])
    model = backbone.model
    call_original = (lambda x: model(**x)) if backbone.output_kind == "embedding" else model
    keep_fn = random_keep_fn(args.keep, args.seed)
    rows = []
    for batch in args.batch:
        x = on_device(backbone.example_inputs(batch, torch.Generator().manual_seed(args.seed)), args.device, args.dtype)
        with torch.inference_mode():
            _, _, counts = backbone.forward_pruned(x, [args.site], keep_fn)
            fns = {
                "original": lambda x=x: call_original(x),
                "adapter_keep_all": lambda x=x: backbone(x),
                "pruned": lambda x=x: backbone.forward_pruned(x, [args.site], keep_fn),
            }
            t = time_round_robin(fns, args.warmup, args.repeats, args.device)
        n = backbone.embed(x).n_full
        flops_ratio = backbone.schedule_flops([args.site], [int(counts[0][0])], n) / backbone.full_flops(n)
        rows.append(
            {
                "batch": batch,
                "tokens_full": n,
                "tokens_kept": int(counts[0][0]),
                "flops_ratio": float(flops_ratio),
                "ms_original": 1e3 * t["original"],
                "ms_adapter_keep_all": 1e3 * t["adapter_keep_all"],
                "ms_pruned": 1e3 * t["pruned"],
                "adapter_overhead": t["adapter_keep_all"] / t["original"] - 1.0,
                "speedup_pruned": t["original"] / t["pruned"],
            }
        )
    return rows


def bench_env(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Batched-env samples/s with random keep actions vs plain forward samples/s, same batch size."""
    from policy_prune.config import load_agent_config, load_env_config
    from policy_prune.embedded import resolve

    env_cfg = load_env_config(args.env)
    agent_cfg = load_agent_config(args.agent)
    backbone, splits = resolve(env_cfg, seed=args.seed, device=args.device, dtype=args.dtype)
    return [_bench_env_batch(args, env_cfg, agent_cfg, backbone, splits["train"], b) for b in args.batch]


def _bench_env_batch(args: argparse.Namespace, env_cfg: Any, agent_cfg: Any, backbone: Any, split: Any, batch: int) -> dict[str, Any]:
    from policy_prune.training.factory import make_vec_env

    vec = make_vec_env(env_cfg, backbone, split, batch, device=args.device)
    vec.seed(args.seed)
    with torch.inference_mode():
        t0 = time.perf_counter()
        vec.core.teacher(torch.arange(len(split)))  # one-time cost, amortised over training
        teacher_s = time.perf_counter() - t0
    rng = np.random.default_rng(args.seed)
    x = split.select(torch.arange(batch) % len(split)).inputs
    x = on_device(x, args.device, args.dtype)
    model = backbone.model

    def forward() -> None:
        with torch.inference_mode():
            model(**x) if isinstance(x, dict) else model(x)

    def episodes() -> None:
        vec.reset()
        for _ in range(args.episodes * len(env_cfg.sites)):
            vec.step(rng.integers(0, 2, (batch, vec.core.n_tokens)))

    t = time_round_robin({"forward": forward, "env": episodes}, args.warmup, args.repeats, args.device)
    forward_sps = batch / t["forward"]
    env_sps = batch * args.episodes / t["env"]
    return {
        "batch": batch,
        "forward_samples_per_s": forward_sps,
        "env_samples_per_s": env_sps,
        "env_vs_forward": env_sps / forward_sps,
        "teacher_cache_s": teacher_s,
        "rollout_buffer_mib": rollout_buffer_mib(vec, agent_cfg),
    }


def flops_agreement(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Analytic block / schedule FLOPs vs FlopCounterMode on the real shapes, several token counts.

    CPU flash attention is invisible to FlopCounterMode, so SDPA runs on its math backend here: the two
    N^2 attention matmuls are then counted rather than assumed.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(args.seed)
    backbone = adapt(load_backbone(args.model))
    x = backbone.example_inputs(1, torch.Generator().manual_seed(args.seed))
    state = backbone.embed(x)
    n_full = state.n_full
    rows = []
    for frac in (1.0, 0.75, 0.5, 0.25):
        kept = state.prune(torch.arange(n_full)[None] < max(1, round(frac * n_full)))
        n = int(kept.alive_counts[0])  # protected tokens ([SEP] at the end) are kept too
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            backbone.run_blocks(kept, 0, backbone.depth)
        counted = counter.get_total_flops()
        analytic = backbone.depth * backbone.block_flops(n)
        rows.append({"tokens": n, "analytic_gflops": analytic / 1e9, "counted_gflops": counted / 1e9,
                     "rel_error": abs(analytic - counted) / counted})
    return rows


def counted_flops(fn: Callable[[Any], Any], batches: Sequence[Any]) -> int:
    """Matmul FLOPs ``fn`` really runs over ``batches`` (FlopCounterMode; SDPA on its math backend, since
    CPU flash attention is invisible to the counter)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        for x in batches:
            fn(x)
    return int(counter.get_total_flops())


def bench_budget(args: argparse.Namespace) -> list[dict[str, Any]]:
    """``prune(model, scorer, flops=f)`` for every target and rule: the FLOPs ratio that really runs
    (pruned model, scorer included, over the unpruned model on the same test samples), at each batch size."""
    from policy_prune.config import load_env_config
    from policy_prune.core.artifact import ScorerMismatchError, check_signature, load_scorer
    from policy_prune.embedded import resolve

    if args.scorer is None:
        raise UserError("--what budget needs --scorer SCORER_DIR (a trained scorer)")
    scorer = load_scorer(args.scorer)
    backbone, splits = resolve(load_env_config(args.env), seed=args.seed)
    try:
        check_signature(scorer, backbone.signature(), strict=False)
    except ScorerMismatchError:  # --model does not apply here: the model is --env's
        trained_for = (scorer.meta.get("backbone") or {}).get("architecture", "another model")
        raise UserError(f"--what budget counts on --env {args.env}'s model and test split (not --model's), and "
                        f"{args.scorer} was trained for {trained_for}: give --env the env it was trained in "
                        "(e.g. --env minilm-text)") from None
    test = splits["test"].select(torch.arange(min(args.samples, len(splits["test"]))))
    model = backbone.model
    rows = []
    for asked in args.batch:
        batch = min(asked, len(test))  # what runs: --samples below the batch size make one smaller batch
        batches = [test.select(i).inputs for i in torch.arange(len(test)).split(batch)]
        call = (lambda m: (lambda x: m(**x))) if isinstance(test.inputs, dict) else (lambda m: m)
        full = counted_flops(call(model), batches)
        for target in args.targets:
            for rule in ("keep_ratio", "threshold") if scorer.budget is not None else ("keep_ratio",):
                fast = prune(model, scorer, flops=target, rule=rule, strict=False)
                ratio = counted_flops(call(fast), batches) / full
                rows.append({"batch": batch, "target": target, "rule": rule, "flops_ratio": ratio,
                             "relative_error": ratio / target - 1.0, "samples": len(test)})
    return rows


def bench_encode(args: argparse.Namespace) -> list[dict[str, Any]]:
    """``SentenceTransformer.encode`` as a user calls it: all-MiniLM-L6-v2 unpruned vs
    ``prune(model, scorer, flops=f)`` for each target, on ``--samples`` minilm-text test passages drawn with
    ``--seed``, at each ``--batch`` (ST's own batching: length-sorted). Per pass every model encodes all the
    passages; passes run round-robin (``--warmup``, ``--repeats``), the median pass over the passages is ms per
    text. The encoder call is most of it, but not all: tokenizing, pooling and normalizing cost the same pruned
    or not, so at batch 1 the speed-up is below the encoder's own."""
    from policy_prune.core.artifact import load_scorer
    from policy_prune.core.embedded_models import minilm_path
    from policy_prune.embedded import test_passages

    if args.scorer is None:
        raise UserError("--what encode needs --scorer SCORER_DIR (a minilm-text scorer)")
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise UserError("--what encode needs sentence-transformers: pip install 'policy-prune[st]'") from None
    scorer = load_scorer(args.scorer)
    model = SentenceTransformer(str(minilm_path()), device=args.device)
    texts = test_passages(args.samples, args.seed)
    models = {"unpruned": model, **{f"{t:g}": prune(model, scorer, flops=t) for t in args.targets}}
    rows = []
    for batch in args.batch:
        fns = {name: functools.partial(m.encode, texts, batch_size=batch, convert_to_tensor=True, show_progress_bar=False)
               for name, m in models.items()}
        with torch.inference_mode():
            t = time_round_robin(fns, args.warmup, args.repeats, args.device)
        rows += [{"batch": batch, "target": float(name), "texts": len(texts), "ms_unpruned": 1000 * t["unpruned"] / len(texts),
                  "ms_pruned": 1000 * t[name] / len(texts), "speedup": t["unpruned"] / t[name]}
                 for name in models if name != "unpruned"]
    return rows


def print_encode(args: argparse.Namespace, console: Any) -> list[dict[str, Any]]:
    rows = bench_encode(args)
    print_table(console, f"SentenceTransformer.encode, all-MiniLM-L6-v2: unpruned vs prune(model, {args.scorer}, flops=f) "
                         f"(ms per text, median of {args.repeats}, threads={torch.get_num_threads()})",
                ("batch", "f", "texts", "unpruned ms", "pruned ms", "speed-up"),
                [(str(r["batch"]), f"{r['target']:g}", str(r["texts"]), f"{r['ms_unpruned']:.2f}", f"{r['ms_pruned']:.2f}",
                  f"{r['speedup']:.2f}x") for r in rows])
    return rows


def print_table(console: Any, title: str, columns: Sequence[str], body: Sequence[Sequence[str]]) -> None:
    """One right-aligned rich table of a benchmark's rows."""
    from rich.table import Table

    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="right")
    for row in body:
        table.add_row(*row)
    console.print(table)


def print_budget(args: argparse.Namespace, console: Any) -> list[dict[str, Any]]:
    rows = bench_budget(args)
    print_table(console, f"prune(model, scorer, flops=f): FLOPs that run (FlopCounterMode), {args.env} test split",
                ("batch", "f", "rule", "FLOPs ratio", "vs f"),
                [(str(r["batch"]), f"{r['target']:g}", r["rule"], f"{r['flops_ratio']:.4f}",
                  f"{100 * r['relative_error']:+.1f}%") for r in rows])
    return rows


def rollout_buffer_mib(vec: Any, agent_cfg: Any) -> float:
    """Bytes of SB3's DictRolloutBuffer for the agent preset's n_steps x n_envs on this env's spaces."""
    from stable_baselines3.common.buffers import DictRolloutBuffer

    n_steps = int(agent_cfg.hyperparams.get("n_steps", 2048))
    buf = DictRolloutBuffer(n_steps, vec.observation_space, vec.action_space, device="cpu", n_envs=agent_cfg.n_envs)
    arrays = list(buf.observations.values()) + [v for v in vars(buf).values() if isinstance(v, np.ndarray)]
    return sum(a.nbytes for a in arrays) / 2**20


def run(args: argparse.Namespace) -> int:
    from policy_prune.console import make_console

    if args.out is not None and args.out.is_dir():  # checked before the benchmark, not when writing after it
        raise UserError(f"--out {args.out} is a folder; give the JSON file to write")
    check_device(args.device)  # every --what, before a model is loaded
    if args.threads:
        torch.set_num_threads(args.threads)
    console = make_console()
    payload: dict[str, Any] = {}
    if "env" in args.what:
        payload["env"] = bench_env(args)
        print_table(console, f"{args.env}: batched env vs plain forward (median of {args.repeats})",
                    ("batch", "forward samples/s", "env samples/s", "env/forward", "rollout buffer MiB"),
                    [(str(r["batch"]), f"{r['forward_samples_per_s']:.0f}", f"{r['env_samples_per_s']:.0f}",
                      f"{r['env_vs_forward']:.2f}", f"{r['rollout_buffer_mib']:.0f}") for r in payload["env"]])
    if "flops" in args.what:
        payload["flops"] = flops_agreement(args)
        print_table(console, f"{args.model}: analytic FLOPs of all blocks vs FlopCounterMode (per sample)",
                    ("tokens", "analytic GFLOPs", "counted GFLOPs", "relative error"),
                    [(str(r["tokens"]), f"{r['analytic_gflops']:.4f}", f"{r['counted_gflops']:.4f}",
                      f"{r['rel_error']:.2e}") for r in payload["flops"]])
    if "budget" in args.what:
        payload["budget"] = print_budget(args, console)
    if "exec" in args.what:
        payload["pruned_execution"] = print_exec(args, console)
    if "model" in args.what:
        payload["pruned_model"] = print_model(args, console)
    if "onnx" in args.what:
        payload["onnx"] = print_onnx(args, console)
    if "encode" in args.what:
        payload["encode"] = print_encode(args, console)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if not k.startswith("_")}
        args.out.write_text(json.dumps(json_safe({"config": config, **payload}), indent=2, allow_nan=False))
    return 0


def print_exec(args: argparse.Namespace, console: Any) -> list[dict[str, Any]]:
    console.print(f"[bold]bench[/] {args.model} keep={args.keep} at site {args.site}, threads={torch.get_num_threads()}")
    rows = bench_pruned_execution(args)
    print_table(console, f"{args.model}: original vs pruned (median of {args.repeats})",
                ("batch", "tokens", "FLOPs ratio", "original ms", "adapter ms", "overhead", "pruned ms", "speed-up"),
                [(str(r["batch"]), f"{r['tokens_kept']}/{r['tokens_full']}", f"{r['flops_ratio']:.3f}",
                  f"{r['ms_original']:.1f}", f"{r['ms_adapter_keep_all']:.1f}", f"{100 * r['adapter_overhead']:+.1f}%",
                  f"{r['ms_pruned']:.1f}", f"{r['speedup_pruned']:.2f}x") for r in rows])
    return rows


def bench_model(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Original model vs PrunedModel (``load_scorer`` + ``prune(model, scorer, flops=--flops)``: a trained scorer's
    calibrated rule; the random scorer: one keep_ratio at every site), per batch size."""

    options = None if args.compile is None else compile_options(args.compile)  # a typo fails before any loading
    scorer = _scorer_arg(args)
    model, tokenizer = load_model(args.model, args.seed)
    sites = scorer.sites if scorer is not None else args.sites or [0]
    return bench_pruned_model(model, scorer, args.batch, sites, args.flops, args.warmup, args.repeats, args.seed,
                              args.threads, compile=options is not None, compile_options=options,
                              device=args.device, dtype=args.dtype, inputs=model_inputs(model, tokenizer, args.seed))


def compile_options(text: str) -> dict[str, Any]:
    """Inductor options from ``name[=value],...`` (a bare name is True; values are read as YAML scalars)."""
    import torch._inductor.config as inductor
    from torch._inductor import list_options

    from policy_prune.config import ConfigError, load_yaml

    known = set(list_options())
    options: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, raw = item.partition("=")
        if name not in known:
            raise ConfigError(f"--compile: {name!r} is not an inductor option (see torch._inductor.list_options())")
        value = load_yaml(raw) if raw else True
        # A switch takes true / false only: inductor reads any other value ("banana") as on.
        if isinstance(getattr(inductor, name, None), bool) and not isinstance(value, bool):
            raise ConfigError(f"--compile: {name} is a switch (true or false), got {raw!r}")
        options[name] = value
    return options


def print_model(args: argparse.Namespace, console: Any) -> list[dict[str, Any]]:
    rows = bench_model(args)
    source = args.scorer or "random scorer"
    mode = "" if args.compile is None else f"torch.compile'd{' with ' + args.compile if args.compile else ''}, "
    print_table(console, f"{args.model}: original vs PrunedModel ({mode}{source}, {args.device} {args.dtype}, median "
                         f"of {args.repeats}, {rows[0]['threads'] if rows else '?'} threads)",
                ("batch", "sites", "tokens kept", "FLOPs ratio", "original ms", "pruned ms", "speed-up", "scorer share",
                 "free-scorer speed-up"),
                [(str(r["batch"]), " ".join(map(str, r["sites"])), " ".join(map(str, r["tokens_kept"])) + f" /{r['tokens_full']}",
                  f"{r['flops_ratio']:.3f}", f"{r['ms_original']:.2f}", f"{r['ms_pruned']:.2f}", f"{r['speedup']:.2f}x",
                  f"{100 * r['scorer_share']:.1f}%", f"{r['speedup_free']:.2f}x") for r in rows])
    return rows


# ---- PrunedModel speed (--what model) ---------------------------------------------------------------
def bench_pruned_model(
    model: str | nn.Module = "deit_small_patch16_224",
    scorer: LearnedScorer | None = None,
    batch_sizes: Sequence[int] = (64, 1),
    sites: Sequence[int] = (0,),
    flops_target: float = 0.5,
    warmup: int = 2,
    repeats: int = 9,
    seed: int = 0,
    threads: int | None = None,
    compile: bool = False,
    compile_options: Mapping[str, Any] | None = None,
    device: str = "cpu",
    dtype: str = "fp32",
    inputs: Callable[[int], Any] | None = None,
) -> list[dict[str, Any]]:
    """Original model vs ``PrunedModel`` at ~``flops_target`` of the FLOPs, per batch size: a budget-conditioned
    scorer runs ``prune(model, scorer, flops=flops_target)`` (its calibrated default rule and plan, as users call it),
    any other one keep_ratio at every site.

    ``model`` is a timm name (random init, no download) or a module; ``scorer`` defaults to random
    weights. Variants are timed interleaved after warm-up; medians are reported. ``scorer_share`` is
    the fraction of a pruned forward spent in its pruning steps (features + context + MLP + rule +
    gather): timed inside the forward in eager mode; with ``compile`` (original and pruned both
    ``torch.compile``'d, static shapes) it is 1 - t(free)/t(pruned). "free" is the same schedule
    keeping each site's first tokens without scoring them (compiled too under ``compile``): its
    speed-up is the most pruning can give at this schedule on this machine. ``compile_options`` are
    inductor options set while all three compile and run (e.g. ``{"freezing": True, "cpp_wrapper": True}``).
    ``threads`` sets torch's intra-op threads for the run (restored after): on a shared CPU, fewer
    threads than busy cores avoids OpenMP spin-wait collapse and gives steadier ratios. ``model`` is
    moved to ``device`` in ``dtype`` (a DTYPES name; the scorer's MLP stays fp32). ``inputs(batch)``
    gives the batches (default: the adapter's random example inputs). On padded text the schedule's
    counts follow each row's length; ``tokens_kept`` and the FLOPs ratio are those of the padded width
    that runs.
    """
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        options = dict(compile_options or {}) if compile else None
        return _bench_batches(model, scorer, batch_sizes, sites, flops_target, warmup, repeats, seed, options,
                              device, dtype, inputs)
    finally:
        torch.set_num_threads(previous)


def _bench_batches(model: str | nn.Module, scorer: LearnedScorer | None, batch_sizes: Sequence[int],
                   sites: Sequence[int], flops_target: float, warmup: int, repeats: int, seed: int,
                   options: dict[str, Any] | None, device: str = "cpu", dtype: str = "fp32",
                   inputs: Callable[[int], Any] | None = None) -> list[dict[str, Any]]:
    if isinstance(model, str):
        import timm

        model = timm.create_model(model, pretrained=False)
    model = model.eval().to(device, DTYPES[dtype])
    backbone = adapt(model)
    scorer = scorer or random_scorer(backbone, sites, seed)
    gen = torch.Generator().manual_seed(seed)
    make = inputs or (lambda b: backbone.example_inputs(b, gen))
    return [_bench_batch(model, backbone, scorer, on_device(make(b), device, dtype), flops_target, warmup, repeats,
                         options, device) for b in batch_sizes]


@torch.inference_mode()
def _bench_batch(model: nn.Module, backbone: TokenBackbone, scorer: LearnedScorer, x: Any, flops_target: float,
                 warmup: int, repeats: int, options: dict[str, Any] | None, device: str = "cpu") -> dict[str, Any]:
    """One batch size; ``options`` None = eager, else the inductor options of torch.compile (may be empty)."""
    state = backbone.embed(x)
    n = state.n_full
    if scorer.budget is not None:  # a trained scorer: what prune(model, scorer, flops=f) runs, its calibrated rule and plan
        pruned = prune(model, scorer, flops=flops_target, strict=False)
        ratio: Any = pruned.values
    else:
        ratio = keep_ratio_for(backbone, scorer.sites, TokenCounts.dense(n, int(state.protected[0].sum())), flops_target)
        pruned = prune(model, scorer, keep_ratio=ratio, strict=False)
    kept, flops, _ = executed_schedule(pruned, x)
    shares: list[float] = []
    compile = options is not None
    if compile:
        torch.compiler.reset()
        fns = {"original": _caller(torch.compile(model, dynamic=False), x),
               "pruned": _caller(torch.compile(pruned, dynamic=False), x),
               "free": _free_schedule(pruned, x, kept, compile=True)}
    else:
        fns = {"original": _caller(model, x), "pruned": _caller(pruned, x), "free": _free_schedule(pruned, x, kept),
               "pruned_timed": lambda: shares.append(_scorer_share(pruned, x, device))}
    # Set globally while compiling and running, not as torch.compile(options=...): Dynamo reads some of
    # them (freezing) from the global config, so per-call options were silently ignored.
    from torch._inductor import config as inductor_config

    with inductor_config.patch(options or {}):
        t = time_round_robin(fns, warmup, repeats, device)
    share = 1.0 - t["free"] / t["pruned"] if compile else statistics.median(shares[warmup:])
    return {"batch": int(state.tokens.shape[0]), "sites": list(scorer.sites), "keep_ratio": ratio, "tokens_full": n,
            "tokens_kept": kept, "flops_ratio": flops, "ms_original": 1e3 * t["original"],
            "ms_pruned": 1e3 * t["pruned"], "speedup": t["original"] / t["pruned"], "scorer_share": share,
            "ms_free": 1e3 * t["free"], "speedup_free": t["original"] / t["free"],
            "share_method": "1 - free/pruned (compiled)" if compile else "timed steps", "compiled": compile,
            "compile_options": options, "threads": torch.get_num_threads(), "device": device,
            "dtype": str(state.tokens.dtype).removeprefix("torch.")}


def selection_ratio(pruned: PrunedModel, kept: Sequence[int], n: int) -> float:
    """What choosing the tokens costs (scorer features and MLP at every site, on the slots alive before it),
    as a fraction of the unpruned model's FLOPs on n tokens."""
    from policy_prune.core.selection import learned_flops, model_has_cls

    b = pruned.backbone
    has_cls = model_has_cls(b)
    before = [n, *kept[:-1]]
    spent = sum(learned_flops(b, pruned.scorer, site, int(m), has_cls=has_cls)
                for site, m, idle in zip(pruned.sites, before, pruned.idle_sites(), strict=True) if not idle)
    return float(spent) / b.full_flops(n)


def _free_schedule(pruned: PrunedModel, x: Any, kept: Sequence[int], compile: bool = False) -> Callable[[], Any]:
    """The pruned model's schedule with free decisions: keep each site's first ``kept[i]`` slots (views,
    no scoring, no gather). Its time is what pruning could give at this schedule with a free scorer."""
    from dataclasses import replace

    def step(state: TokenState, site_index: int, layer: int) -> TokenState:
        c = kept[site_index]
        return replace(state, tokens=state.tokens[:, :c], protected=state.protected[:, :c], valid=state.valid[:, :c],
                       positions=state.positions[:, :c])

    def forward(inputs: Any) -> torch.Tensor:
        return pruned.backbone.forward_sites(inputs, pruned.run_sites(), step, static=pruned.static_text(inputs))[0]

    run = torch.compile(forward, dynamic=False) if compile else forward
    return lambda: run(x)


def _caller(model: Callable[..., Any], x: Any) -> Callable[[], Any]:
    return (lambda: model(**x)) if isinstance(x, dict) else (lambda: model(x))


def _scorer_share(pruned: PrunedModel, x: Any, device: str = "cpu") -> float:
    """Fraction of one pruned forward's wall time spent in its pruning steps (features, scorer, rule, gather).

    On CUDA each step is bracketed by synchronisations (so the kernels are timed, not their launches).
    """
    inner = pruned.step_fn()
    spent = [0.0]
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def timed(state: TokenState, site_index: int, layer: int) -> TokenState:
        sync()
        t0 = time.perf_counter()
        out = inner(state, site_index, layer)
        sync()
        spent[0] += time.perf_counter() - t0
        return out

    sync()
    t0 = time.perf_counter()
    pruned.backbone.forward_sites(x, pruned.run_sites(), timed, static=pruned.static_text(x))
    sync()
    total = time.perf_counter() - t0
    return spent[0] / total if total > 0 and math.isfinite(total) else 0.0


# ---- onnxruntime speed (--what onnx) ------------------------------------------------------------------
def bench_onnx(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Unpruned vs pruned model, both exported as ONNX (dynamic batch, keep_ratio at ``--flops``) and run in
    onnxruntime on the CPU on the same inputs (text: padded to ``--length``), per batch size; with the max
    |onnxruntime - PyTorch| of each graph on those inputs."""
    import tempfile

    from policy_prune.model_export import GraphModel, export_onnx, onnx_session

    saved = _scorer_arg(args)  # a bad --scorer or --sites is said before the model loads
    model, tokenizer = load_model(args.model, args.seed)
    backbone = adapt(model)
    scorer = saved or random_scorer(backbone, args.sites or [0], args.seed)
    make = model_inputs(model, tokenizer, args.seed, args.length if tokenizer is not None else None)
    example = make(2)
    fast = prune(model, scorer, rule="keep_ratio", flops=args.flops, strict=False)
    graphs = {"unpruned": GraphModel(fast, pruned=False), "pruned": GraphModel(fast)}
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {}
        for name, graph in graphs.items():
            export_onnx(fast, example, Path(tmp) / f"{name}.onnx", pruned=graph.pruned)
            sessions[name] = onnx_session(Path(tmp) / f"{name}.onnx", args.threads)
        return [_bench_onnx_batch(sessions, graphs, make(b), args) | {"keep_ratio": fast.values} for b in args.batch]


def _scorer_arg(args: argparse.Namespace) -> LearnedScorer | None:
    """The ``--scorer`` artifact, or None (then benchmarks use a random scorer at ``--sites``)."""
    if args.scorer is None:
        return None
    from policy_prune.core.artifact import load_scorer

    scorer = load_scorer(args.scorer)
    if args.sites is not None and list(args.sites) != list(scorer.sites):
        raise UserError(f"--sites sets the random scorer's sites; {args.scorer} prunes at its own, "
                        f"{' '.join(map(str, scorer.sites))} (leave --sites out)")
    return scorer


def _bench_onnx_batch(sessions: Mapping[str, Any], graphs: Mapping[str, Any], x: Any,
                      args: argparse.Namespace) -> dict[str, Any]:
    from policy_prune.model_export import graph_args, run_onnx, verify

    fast = graphs["pruned"].fast
    a = graph_args(graphs["pruned"], x)
    fns = {name: (lambda s=s: run_onnx(s, a)) for name, s in sessions.items()}
    t = time_round_robin(fns, args.warmup, args.repeats, "cpu")
    kept, flops, n = executed_schedule(fast, x)
    selection = selection_ratio(fast, kept, n)
    diffs = {name: verify(sessions[name], graphs[name], a, atol=math.inf) for name in sessions}
    return {"batch": int(a[0].shape[0]), "sites": fast.sites, "tokens_full": n,
            "tokens_kept": kept, "flops_ratio": flops, "selection_flops_ratio": selection,
            "ms_unpruned": 1e3 * t["unpruned"],
            "ms_pruned": 1e3 * t["pruned"], "speedup": t["unpruned"] / t["pruned"],
            "max_abs_diff_pruned": diffs["pruned"], "max_abs_diff_unpruned": diffs["unpruned"],
            "threads": args.threads}


def print_onnx(args: argparse.Namespace, console: Any) -> list[dict[str, Any]]:
    rows = bench_onnx(args)
    print_table(console, f"{args.model}: unpruned vs pruned, both in onnxruntime (CPU, {args.scorer or 'random scorer'}, "
                         f"median of {args.repeats})",
                ("batch", "sites", "tokens kept", "FLOPs ratio", "selection", "unpruned ms", "pruned ms", "speed-up",
                 "max |ORT - torch|"),
                [(str(r["batch"]), " ".join(map(str, r["sites"])), " ".join(map(str, r["tokens_kept"])) + f" /{r['tokens_full']}",
                  f"{r['flops_ratio']:.3f}", f"{r['selection_flops_ratio']:.3f}", f"{r['ms_unpruned']:.2f}",
                  f"{r['ms_pruned']:.2f}", f"{r['speedup']:.2f}x", f"{r['max_abs_diff_pruned']:.1e}") for r in rows])
    return rows
