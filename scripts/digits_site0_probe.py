"""What site 0 could do on digits-vit, and what a trained scorer does there (issue #24's tight budgets).

digits-cluttered knows where each canvas's digit is (its 3 x 3 patches), so site 0's choices can be scored
against that. On a held-out split (default val) this prints, at a few keep ratios of site 0 alone (every
later site keeps everything):

- ``similarity-pre``: the seed paper's score (as the baseline of that name ranks);
- ``oracle+similarity`` / ``oracle+random`` / ``oracle+clutter``: the digit's 9 patches first, the rest filled
  by that score, at random (mostly blank: a canvas holds about 11 clutter patches and 124 blank ones), or
  with the clutter first;
- ``probe``: a one-hidden-layer MLP of the scorer's width trained (with labels of which token is the digit's,
  which the policy never gets) on the site-0 features the scorer sees, on the train canvases;
- ``teacher-attention`` / ``teacher-gradient``: what the frozen, unpruned model itself points at, the attention
  its [CLS] pays each token in the last block and the norm of the gradient of the true class's log-probability
  with respect to each embedded token (labels the policy never gets): a denser training signal could come from
  these only if they single out the digit;
- with ``--occlusion``, ``teacher-occlusion``: what each token is worth at the tight end, with no label: around S,
  [CLS] and the 20 patches similarity-pre keeps, the unpruned model's predicted class's probability with the
  token added to S (or removed, for one of S), the model run on those tokens alone; and ``probe-occlusion``, the
  probe's MLP fitted on the train canvases to the top 20 of that value instead of the digit's location (the
  target ``agent.warm_start`` trains the scorer on; about 3 minutes more); with ``--run`` too, the run's
  deployed call (``prune(model, scorer, flops=f)``'s rule and values at a few targets) with site 0 ranked by
  ``probe-occlusion`` instead of the scorer, its later sites unchanged: what a warm start of site 0 on that
  target could give the deployed call;
- ``learned`` (with ``--run``): the run's scorer told ``--flops``;
- the critic's keep gains (with ``--run``, from its last checkpoint): what keeping a token adds to the return,
  as the per-token credit (training/token_ppo.py) models it, averaged over the digit's, the clutter and the
  blank patches at site 0, in the units of the returns the critic was trained on.

and, for the probe and the learned scorer, how many of the digit's patches and of the clutter patches their
top k holds. Accuracy is the model's on the split's labels; FLOPs as ``eval`` counts them (the selection's
own cost left out: the oracle has none to count).

    python scripts/digits_site0_probe.py --run runs/digits-s0 --flops 0.15

Everything is fitted and drawn from ``--seed``; the embedded backbone is fitted on first use as ``train`` does.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch

from policy_prune.config import load_env_config
from policy_prune.core.artifact import load_scorer
from policy_prune.core.backbones.base import TokenBackbone, TokenState
from policy_prune.core.calibration import measure
from policy_prune.core.features import FeatureSpec, make_projection, token_features
from policy_prune.core.inference import prune
from policy_prune.core.scorer import LearnedScorer
from policy_prune.data import digits as D
from policy_prune.embedded import resolve
from policy_prune.evaluation.baselines import redundancy
from policy_prune.training.warm_start import occlusion_values

PATCH, GRID = 4, 12
RATIOS = (0.1, 0.125, 0.15, 0.2, 0.25)
TOP_K = (9, 12, 17, 21, 28, 35)


def canvases(cfg: Any, backbone: TokenBackbone | None, split: str, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images as the backbone reads them, labels, digit token mask [M, 145], clutter token mask [M, 145])."""
    opts = D.parse_options(cfg.data.options)
    glyphs, labels = D.load_glyphs()
    idx = D.split_sources(labels, opts)[split]
    src = D.sources_for(split, idx, opts)
    images, corners = D.make_canvases(glyphs, src, idx, opts, D.split_seed(split, seed, opts))
    digit = torch.zeros(len(src), 1 + GRID * GRID, dtype=torch.bool)
    for i, (cx, cy) in enumerate(corners):
        rows = torch.arange(cy // PATCH, cy // PATCH + opts.digit_size // PATCH)
        cols = torch.arange(cx // PATCH, cx // PATCH + opts.digit_size // PATCH)
        digit[i, 1 + (rows[:, None] * GRID + cols[None, :]).flatten()] = True
    pixels = images[:, 0] * D.STD + D.MEAN
    ink = pixels.unfold(1, PATCH, PATCH).unfold(2, PATCH, PATCH).amax((-1, -2)).reshape(len(src), -1) > 0.3
    clutter = torch.cat([torch.zeros(len(src), 1, dtype=torch.bool), ink], dim=1) & ~digit
    return D.match_backbone(images, backbone), torch.from_numpy(labels[src]), digit, clutter


class Fixed:
    """Scores a batch's tokens by its rows of a fixed [M, 145] table."""

    def __init__(self, rows: torch.Tensor) -> None:
        self.rows = rows

    def scores(self, backbone: TokenBackbone, state: TokenState, site_index: int, layer: int) -> torch.Tensor:
        return self.rows.gather(1, state.positions)


def accuracy(backbone: TokenBackbone, scorer_for: Callable[[slice], Any], x: torch.Tensor, y: torch.Tensor, rule: str,
             values: Sequence[float], sites: Sequence[int] | None = None) -> tuple[float, float]:
    """(accuracy, FLOPs ratio as ``eval`` counts them) of ``rule`` / ``values`` with the scorer ``scorer_for(rows)`` of
    each batch of 64 rows."""
    correct, flops = 0, 0.0
    for start in range(0, len(x), 64):
        rows = slice(start, start + 64)
        m = measure(backbone, scorer_for(rows), [x[rows]], rule, values, sites=sites, executed=True, outputs=True)
        correct += int((m.outputs.argmax(1) == y[rows]).sum())  # type: ignore[union-attr]
        flops += m.flops_ratio * len(x[rows])
    return correct / len(x), flops / len(x)


def site0_accuracy(backbone: TokenBackbone, scorer_for: Callable[[slice], Any], x: torch.Tensor, y: torch.Tensor,
                   ratio: float, n_sites: int = 1) -> tuple[float, float]:
    """(accuracy, FLOPs ratio) keeping ``ratio`` of the tokens at site 0 by ``scorer_for(rows)`` (the scorer of the
    batch of rows ``rows``), every other site idle."""
    return accuracy(backbone, scorer_for, x, y, "keep_ratio", [ratio] + [1.0] * (n_sites - 1),
                    sites=None if n_sites > 1 else [0])


@torch.inference_mode()
def predictions(backbone: TokenBackbone, x: torch.Tensor) -> torch.Tensor:
    """[M] the unpruned model's predicted classes, in chunks of 256 canvases."""
    return torch.cat([backbone(x[i:i + 256]).argmax(1) for i in range(0, len(x), 256)])


def top_k_shares(scores: torch.Tensor, digit: torch.Tensor, clutter: torch.Tensor) -> list[str]:
    """Per k: the share of the digit's patches and of the clutter patches among each canvas's top k (CLS aside)."""
    out = []
    for k in TOP_K:
        top = scores[:, 1:].topk(k, dim=1).indices + 1
        d = digit.gather(1, top).sum(1).float() / digit.sum(1)
        c = clutter.gather(1, top).sum(1).float() / clutter.sum(1).clamp_min(1)
        out.append(f"k={k}: digit {d.mean():.3f} (all 9: {(d == 1).float().mean():.3f}), clutter {c.mean():.3f}")
    return out


def teacher_tables(backbone: TokenBackbone, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """[M, 145] site-0 rankings from the unpruned model: its last block's [CLS] attention, and the norm of the
    gradient of the true class's log-probability with respect to each embedded token."""
    attention, gradient = [], []
    last = backbone.depth - 1
    for i in range(0, len(x), 256):  # one forward serves both: the attention is read before the last block
        state = backbone.embed(x[i:i + 256])
        tokens = state.tokens.detach().requires_grad_(True)
        before_last = backbone.run_blocks(state.with_tokens(tokens), 0, last)
        with torch.no_grad():
            attention.append(backbone.attention_from_cls(before_last, last).float())
        logits = backbone.head(backbone.run_blocks(before_last, last, backbone.depth))
        (grad,) = torch.autograd.grad(logits.log_softmax(1).gather(1, y[i:i + 256, None]).sum(), tokens)
        gradient.append(grad.norm(dim=-1))
    return {"teacher-attention": torch.cat(attention), "teacher-gradient": torch.cat(gradient)}


OCCLUSION_BASE = 20


def occlusion_table(backbone: TokenBackbone, x: torch.Tensor, target: torch.Tensor,
                    base: int = OCCLUSION_BASE) -> torch.Tensor:
    """[M, N] what each patch token is worth to class ``target`` [M] at the tight end: with S the ``base`` patches
    similarity-pre keeps, p(S + i) - p(S) for a patch i outside S and p(S) - p(S - i) for one of S, p the class's
    probability from the frozen model run on [CLS] and those patches alone (``occlusion_values``, what
    ``agent.warm_start`` fits the scorer to, with the unpruned prediction's class). [CLS] gets +inf."""
    tables, done = [], 0
    for state in embedded(backbone, x):
        eligible = state.valid & ~state.protected
        classes = target[done:done + len(state.tokens)]

        def value(out: torch.Tensor, row: int, classes: torch.Tensor = classes) -> torch.Tensor:
            return out.float().softmax(-1)[:, int(classes[row])]

        keep = base / eligible.sum(1).min().item()
        tables.append(occlusion_values(backbone, state, 0, -redundancy(state.tokens, eligible), value, keep))
        done += len(state.tokens)
    return torch.cat(tables)


@dataclasses.dataclass
class Site0Table(LearnedScorer):
    """A learned scorer whose site-0 scores are a fixed [M, N] table's rows (one per canvas of the batch); its later
    sites score as the scorer does."""

    table: torch.Tensor | None = None

    def scores_in_episode(self, backbone: TokenBackbone, state: TokenState, site_index: int, layer: int,
                          n0: torch.Tensor, kept: Sequence[torch.Tensor]) -> torch.Tensor:
        if site_index == 0 and self.table is not None:
            return self.table.gather(1, state.positions)
        return super().scores_in_episode(backbone, state, site_index, layer, n0, kept)


DEPLOYED_TARGETS = (0.25, 0.15, 0.1)


def deployed_accuracy(backbone: TokenBackbone, scorer: LearnedScorer, x: torch.Tensor, y: torch.Tensor, flops: float,
                      site0: torch.Tensor | None = None) -> tuple[float, float, list[float]]:
    """(accuracy, FLOPs ratio, keep ratios) of ``prune(model, scorer, flops=flops)``'s rule and values, with site 0
    ranked by ``site0`` [M, N] when given."""
    pruned = prune(backbone.model, scorer, flops=flops)
    told = Site0Table(**{f.name: getattr(pruned.scorer, f.name) for f in dataclasses.fields(LearnedScorer)})
    acc, spent = accuracy(backbone, lambda rows: dataclasses.replace(told, table=None if site0 is None else site0[rows]),
                          x, y, pruned.rule, pruned.values)
    return acc, spent, pruned.values


def critic_gains(run: str, told: Any, backbone: TokenBackbone, states: Sequence[TokenState],
                 groups: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean keep gain of the run's critic (its last checkpoint) at site 0 over each group's tokens [M, 145]."""
    from policy_prune.training.token_ppo import TokenCreditPPO

    policy = TokenCreditPPO.load(f"{run}/checkpoints/last.zip", device="cpu").policy
    gains = []
    with torch.inference_mode():
        for s in states:
            obs = {"tokens": token_features(backbone, s, 0, told.projection, told.spec), "alive": s.valid.float(),
                   "context": told.episode_context(backbone, s, 0, s.alive_counts, [])}
            gains.append(policy.token_terms(obs)[2])
    g = torch.cat(gains)
    return {name: float(g[mask].mean()) for name, mask in groups.items()}


@torch.inference_mode()
def embedded(backbone: TokenBackbone, x: torch.Tensor) -> list[TokenState]:
    """The states before block 0 (site 0's input), in chunks of 256 canvases."""
    return [backbone.embed(x[i:i + 256]) for i in range(0, len(x), 256)]


@torch.inference_mode()
def site0_features(backbone: TokenBackbone, states: Sequence[TokenState], spec: FeatureSpec,
                   projection: torch.Tensor) -> torch.Tensor:
    return torch.cat([token_features(backbone, s, 0, projection, spec) for s in states])


def fit_probe(features: torch.Tensor, digit: torch.Tensor, hidden: int, seed: int, epochs: int = 30) -> torch.nn.Module:
    """A [hidden] MLP predicting which patch tokens are the digit's (binary cross-entropy)."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(features.shape[-1], hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    xs, ys = features[:, 1:].reshape(-1, features.shape[-1]), digit[:, 1:].reshape(-1).float()
    for _ in range(epochs):
        for b in torch.randperm(len(xs)).split(4096):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(net(xs[b]).squeeze(-1), ys[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", default=None, help="a digits-vit run folder: its scorer's site-0 ranking too")
    p.add_argument("--flops", type=float, default=0.15, help="the budget the run's scorer is told (default 0.15)")
    p.add_argument("--split", default="val", choices=("val", "test"))
    p.add_argument("--hidden", type=int, default=16, help="probe width (default 16, the digits-vit scorer's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--occlusion", action="store_true", help="the occlusion teacher and a probe fitted to it")
    args = p.parse_args()
    torch.manual_seed(args.seed)
    cfg = load_env_config("digits-vit", [])
    backbone, _ = resolve(cfg, seed=args.seed, device="cpu")
    x, y, digit, clutter = canvases(cfg, backbone, args.split, args.seed)
    full = predictions(backbone, x)
    print(f"{args.split}: {len(x)} canvases, unpruned accuracy {(full == y).float().mean():.4f}, "
          f"{clutter.sum(1).float().mean():.1f} clutter patches per canvas")
    states = embedded(backbone, x)
    with torch.inference_mode():
        similarity = torch.cat([-redundancy(s.tokens, s.valid & ~s.protected) for s in states])
    g = torch.Generator().manual_seed(args.seed)
    noise = torch.rand(digit.shape, generator=g)
    tables = {"similarity-pre": similarity, "oracle+similarity": similarity + 100.0 * digit,
              "oracle+random": noise + 100.0 * digit, "oracle+clutter": noise + 100.0 * digit + 50.0 * clutter}
    for name, table in teacher_tables(backbone, x, y).items():
        tables[name] = table
        print(f"{name} top k:", *top_k_shares(table, digit, clutter), sep="\n  ")
    spec = FeatureSpec()
    projection = make_projection(backbone, spec)
    x_train, _, digit_train, _ = canvases(cfg, backbone, "train", args.seed)
    train_features = site0_features(backbone, embedded(backbone, x_train), spec, projection)
    probe = fit_probe(train_features, digit_train, args.hidden, args.seed)
    features = site0_features(backbone, states, spec, projection)
    with torch.no_grad():
        tables["probe"] = probe(features).squeeze(-1)
    print("probe's top k:", *top_k_shares(tables["probe"], digit, clutter), sep="\n  ")
    if args.occlusion:  # the unpruned model's own prediction as the class: no label
        tables["teacher-occlusion"] = occlusion_table(backbone, x, full)
        value = occlusion_table(backbone, x_train, predictions(backbone, x_train))
        top = torch.zeros_like(digit_train).scatter_(1, value[:, 1:].topk(OCCLUSION_BASE, dim=1).indices + 1, True)
        fitted = fit_probe(train_features, top, args.hidden, args.seed)
        with torch.no_grad():
            tables["probe-occlusion"] = fitted(features).squeeze(-1)
        for name in ("teacher-occlusion", "probe-occlusion"):
            print(f"{name} top k:", *top_k_shares(tables[name], digit, clutter), sep="\n  ")
    for name, table in tables.items():
        table = table.clone()
        table[:, 0] = 1e9  # [CLS] is protected anyway
        for r in RATIOS:
            acc, flops = site0_accuracy(backbone, lambda rows, table=table: Fixed(table[rows]), x, y, r)
            print(f"{name:18s} keep {r:.3f} at site 0: FLOPs {flops:.3f}, accuracy {acc:.4f}")
    if args.run:
        told = load_scorer(f"{args.run}/scorer").at(args.flops)
        with torch.inference_mode():
            learned = torch.cat([told.scores_in_episode(backbone, s, 0, 0, s.alive_counts, []).float() for s in states])
        print(f"learned (told {args.flops}) top k:", *top_k_shares(learned, digit, clutter), sep="\n  ")
        blank = ~digit & ~clutter
        blank[:, 0] = False  # [CLS]
        gains = critic_gains(args.run, told, backbone, states, {"digit": digit, "clutter": clutter, "blank": blank})
        print(f"critic's keep gains at site 0 (told {args.flops}): " + ", ".join(f"{k} {v:+.4f}" for k, v in gains.items()))
        for r in RATIOS:
            acc, flops = site0_accuracy(backbone, lambda rows: told, x, y, r, n_sites=len(told.sites))
            print(f"{'learned':18s} keep {r:.3f} at site 0: FLOPs {flops:.3f}, accuracy {acc:.4f}")
        if args.occlusion:
            scorer = load_scorer(f"{args.run}/scorer")
            for f in DEPLOYED_TARGETS:
                for name, site0 in (("deployed", None), ("deployed, site 0 by probe-occlusion", tables["probe-occlusion"])):
                    acc, flops, values = deployed_accuracy(backbone, scorer, x, y, f, site0)
                    print(f"{name} at {f}: keep ratios {', '.join(f'{v:.3f}' for v in values)}, FLOPs {flops:.3f}, "
                          f"accuracy {acc:.4f}")


if __name__ == "__main__":
    main()
