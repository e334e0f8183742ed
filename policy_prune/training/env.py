"""Token selection as a Gymnasium environment, and the batched SB3 VecEnv that training uses.

One episode = one sample passing through the frozen backbone. At each pruning site the agent sees
per-token features and returns a keep mask over the embedded token positions; kept tokens are
gathered and the next blocks run on them. Rewards:

    step t:  -lam * FLOPs(segment run after site t) / FLOPs(full model)   (site 0 also pays the
             embedding and the blocks before it, the last site the head)
    end:     + task term against the cached full-model (teacher) output

so the compute penalties of an episode sum to exactly lam * (FLOPs used / full FLOPs).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.utils import seeding
from stable_baselines3.common.vec_env.base_vec_env import VecEnv, VecEnvIndices, VecEnvStepReturn

from policy_prune.core import ops
from policy_prune.core.backbones.base import TokenBackbone, TokenState
from policy_prune.core.features import FEATURE_BOUND, FeatureSpec, make_projection, token_features
from policy_prune.core.scorer import context_width, row_full_flops, site_context, spent_fraction
from policy_prune.errors import UserError
from policy_prune.training.budget import BudgetController

ENV_ID = "PolicyPrune/TokenPrune-v0"
TASKS = ("teacher_kl", "teacher_agree", "label_ce", "label_prob", "label_acc", "cosine", "retrieval")
LOGIT_TASKS = ("teacher_kl", "teacher_agree", "label_ce", "label_prob", "label_acc")
LABEL_TASKS = ("label_ce", "label_prob", "label_acc")
EMBEDDING_TASKS = ("cosine", "retrieval")
TASK_FLOOR = -10.0  # KL / CE terms are clipped here so one bad episode cannot dominate a PPO batch
RETRIEVAL_BANK = 1024
"""Task ``retrieval``: passages of the split a query's relevant ones compete with (a seeded sample)."""
RETRIEVAL_TEMPERATURE = 0.05
"""Task ``retrieval``: the softmax temperature over cosine similarities (a contrastive encoder's usual one)."""


def task_term(task: str, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """Per-row task reward [B] of the pruned output against the teacher (or the label)."""
    if task == "teacher_kl":
        kl = (teacher.log_softmax(-1).exp() * (teacher.log_softmax(-1) - student.log_softmax(-1))).sum(-1)
        return (-kl).clamp_min(TASK_FLOOR)
    if task == "teacher_agree":
        return (student.argmax(-1) == teacher.argmax(-1)).float()
    if task == "label_ce":
        # The cross-entropy gained over the unpruned model: its own CE is a per-sample baseline that does
        # not depend on the actions (the same policy gradient as -CE, without the variance of sample
        # difficulty). Positive where pruning helps, e.g. by dropping distractors.
        assert labels is not None
        ce = torch.nn.functional.cross_entropy(student, labels, reduction="none")
        ref = torch.nn.functional.cross_entropy(teacher, labels, reduction="none")
        return (ref - ce).clamp_min(TASK_FLOOR)
    if task == "label_prob":
        # The true class's probability gained over the unpruned model, in [-1, 1]: a smooth stand-in
        # for accuracy. Bounded, unlike the CE: an episode that flips a confident prediction costs at
        # most 1, so a few catastrophic episodes no longer drown the small effects of single tokens
        # (on digits-vit it doubles the t-statistic of a clutter fragment's effect on the return).
        assert labels is not None
        return (student.softmax(-1) - teacher.softmax(-1)).gather(1, labels.unsqueeze(1)).squeeze(1)
    if task == "label_acc":
        assert labels is not None
        return (student.argmax(-1) == labels).float()
    return torch.nn.functional.cosine_similarity(student, teacher, dim=-1)


class PruneCore:
    """The episode mechanics for B rows in lockstep; both env classes delegate here."""

    def __init__(
        self,
        backbone: TokenBackbone,
        split: Any,
        sites: Sequence[int],
        lam: float = 0.3,
        task: str = "teacher_kl",
        feature_spec: FeatureSpec | None = None,
        device: str = "cpu",
        budget: Sequence[float] | None = None,
        controller: BudgetController | None = None,
        cache_bytes: int = 4 << 30,
        merge: bool = False,
    ) -> None:
        sites = [int(s) for s in sites]
        if not sites:
            raise UserError("at least one pruning site is required")
        if any(s < 0 or s >= backbone.depth for s in sites) or sites != sorted(set(sites)):
            raise UserError(f"pruning sites {sites} must be strictly increasing block indices in [0, {backbone.depth - 1}]")
        if not lam >= 0 and budget is None:
            raise UserError(f"lambda must be >= 0, got {lam}")
        if budget is not None and not (len(budget) == 2 and 0.0 < budget[0] <= budget[1] <= 1.0):
            raise UserError(f"budget must be [low, high] FLOPs ratios with 0 < low <= high <= 1, got {list(budget)}")
        if task not in TASKS:
            raise UserError(f"unknown task term {task!r} (choose from {', '.join(TASKS)})")
        if task in LABEL_TASKS and getattr(split, "labels", None) is None:
            raise UserError(f"task {task!r} needs labels but dataset split {getattr(split, 'name', '?')!r} has none")
        if task in LOGIT_TASKS and backbone.output_kind != "logits":
            raise UserError(f"task {task!r} needs a classifier; this backbone outputs embeddings (use 'cosine')")
        if len(split) == 0:
            raise UserError("the dataset split is empty")
        self.retrieval = RetrievalTerm(split) if task == "retrieval" else None
        self.backbone = backbone.to(device)
        self.merge = merge
        self.split = split
        self.sites = sites
        self.lam = float(lam)
        self.budget = None if budget is None else (float(budget[0]), float(budget[1]))
        if self.budget is not None and controller is None:
            controller = BudgetController(*self.budget, init_lam=self.lam)
        if controller is not None and (self.budget is None or (controller.low, controller.high) != self.budget):
            raise UserError(f"the budget controller's range [{controller.low:g}, {controller.high:g}] must be the env's "
                            f"budget, {None if self.budget is None else list(self.budget)}")
        self.controller = controller
        self.task = task
        self.device = device
        self.spec = feature_spec or FeatureSpec()
        self.projection = make_projection(backbone, self.spec).to(device)
        with torch.inference_mode():
            # The observation grid spans the split's full (padded) width: every row's positions fit in it.
            self.n_tokens = backbone.embed(ops.to_device(split.select(torch.tensor([0])).inputs, device)).n_full
        self._teacher: torch.Tensor | None = None
        self.over = True  # no episode yet: begin() starts one
        self._cached = torch.zeros(len(split), dtype=torch.bool)
        # The blocks before the first site do not depend on any action: each sample's state there is
        # computed once and reused by every later episode on it (and by every row of a group).
        self.starts = StartCache(self._start, len(split), cache_bytes)
        self.observation_space = spaces.Dict(
            {
                "tokens": spaces.Box(-FEATURE_BOUND, FEATURE_BOUND, (self.n_tokens, self.spec.dim), np.float32),
                "alive": spaces.MultiBinary(self.n_tokens),
                "context": spaces.Box(0.0, 1.0, (context_width(len(sites), self.budget is not None),), np.float32),
            }
        )
        self.action_space = spaces.MultiBinary(self.n_tokens)

    # ---- data and teacher -----------------------------------------------------------------------
    def _inputs(self, idx: torch.Tensor) -> Any:
        """Adapter inputs of samples ``idx``; text is cut after its longest row (padding is not work)."""
        return ops.to_device(ops.trim_padding(self.split.select(idx).inputs), self.device)

    def _start(self, idx: torch.Tensor) -> tuple[TokenState, torch.Tensor]:
        """The state before the first site and its features, computed for samples ``idx``."""
        state = self.backbone.run_blocks(self.backbone.embed(self._inputs(idx)), 0, self.sites[0])
        return state, token_features(self.backbone, state, self.sites[0], self.projection, self.spec)

    def teacher(self, idx: torch.Tensor) -> torch.Tensor:
        """Full-model outputs for samples ``idx``, each computed once and cached."""
        missing = idx[~self._cached[idx]].unique()
        if len(missing):
            out = self.backbone(self._inputs(missing)).float()  # rewards in fp32 whatever the backbone's dtype
            if self._teacher is None:
                self._teacher = out.new_zeros(len(self.split), out.shape[-1])
            self._teacher[missing] = out
            self._cached[missing] = True
        assert self._teacher is not None
        return self._teacher[idx]

    # ---- episode --------------------------------------------------------------------------------
    @torch.inference_mode()
    def begin(self, indices: np.ndarray, targets: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Start B episodes on samples ``indices``: the state at the first site and its features.

        ``targets`` [B]: the target FLOPs ratio of each row (budget-conditioned envs only).
        """
        self.idx = torch.as_tensor(indices, dtype=torch.long)
        b = len(self.idx)
        self._set_budget(targets, b)
        state, feats = self.starts.get(self.idx)
        # Each row's own full cost: text rows differ in length, and padding is not work.
        self.full = row_full_flops(self.backbone, state.alive_counts, self.n_tokens)
        # The part before the first site runs whatever the policy does; site 0's reward pays for it.
        self.pending = spent_fraction(self.backbone, self.sites, state.alive_counts, [], self.n_tokens)
        self.spent = torch.zeros(b, dtype=torch.float64)
        self.n0 = state.alive_counts  # each row's own tokens: the context's alive fraction is relative to them
        self.t = 0
        self.over = False  # set at the last site: an action after it would run the head again
        self.keep_ratios: list[torch.Tensor] = []
        self.state = state
        return self.observe(feats=feats)

    def _set_budget(self, targets: np.ndarray | None, b: int) -> None:
        """Each row's target (budget-conditioned) and the multiplier its compute is charged at."""
        if self.budget is None or self.controller is None:
            self.targets: torch.Tensor | None = None
            self.lam_rows = torch.full((b,), self.lam, dtype=torch.float64)
            return
        if targets is None or len(targets) != b:
            raise ValueError("a budget-conditioned env needs one target FLOPs ratio per row")
        self.targets = torch.as_tensor(np.asarray(targets, dtype=np.float64))
        self.lam_rows = torch.as_tensor(self.controller.lam_at(np.asarray(targets)), dtype=torch.float64)

    def observe(self, final: bool = False, feats: torch.Tensor | None = None) -> dict[str, np.ndarray]:
        """Observation of the current state in embedded-token coordinates (``feats``: given, not computed)."""
        s = self.state
        b, n = s.valid.shape[0], self.n_tokens
        if final:  # no decision left: features are not used (terminated episodes are not bootstrapped)
            feats = torch.zeros(b, s.valid.shape[1], self.spec.dim, device=s.tokens.device)
        elif feats is None:
            feats = token_features(self.backbone, s, self.sites[self.t], self.projection, self.spec)
        tokens = ops.scatter_to_grid(feats, s.positions, s.valid, n)
        alive = ops.scatter_to_grid(s.valid.float(), s.positions, s.valid, n)
        context = site_context(s, self.t, len(self.sites), self.spent + self.pending, self.n0, self.targets)
        if final:
            context[:, self.t] = 0.0  # no site left to decide at
        return {
            "tokens": tokens.cpu().numpy().astype(np.float32),
            "alive": alive.cpu().numpy().astype(np.int8),
            "context": context.cpu().numpy(),
        }

    def check_actions(self, actions: Any) -> np.ndarray:
        """``actions`` as keep masks [B, N] of the action space (MultiBinary(N) per row), else one UserError:
        a keep probability or a NaN read as "keep" and a mask of the wrong length was cut or failed inside."""
        if self.over:
            raise UserError("no episode is running (one ends at the last pruning site): call reset() first")
        masks = np.asarray(actions)
        want = (len(self.idx), self.n_tokens)
        if masks.shape != want:
            raise UserError(f"an action is a keep mask of {self.n_tokens} zeros and ones per row (MultiBinary("
                            f"{self.n_tokens})): got shape {masks.shape[1:] if masks.shape[:1] == (1,) == want[:1] else masks.shape}")
        if masks.dtype != bool and not np.isin(masks, (0, 1)).all():
            bad = masks[~np.isin(masks, (0, 1))].ravel()[0]
            raise UserError(f"an action is a keep mask of zeros and ones (MultiBinary({self.n_tokens})): got the value {bad}")
        return masks

    @torch.inference_mode()
    def advance(self, actions: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray, bool, list[dict[str, Any]]]:
        """Apply keep masks [B, N] at the current site and run to the next one (or to the head)."""
        keep_grid = torch.as_tensor(self.check_actions(actions), device=self.device).bool()
        before = self.state.alive_counts
        keep_slots = ops.gather_rows(keep_grid, self.state.positions) & self.state.valid
        self.state = self.state.prune(keep_slots, merge=self.merge)
        counts = self.state.alive_counts
        self.keep_ratios.append((counts.float() / before.float()).cpu())
        site = self.sites[self.t]
        last = self.t == len(self.sites) - 1
        stop = self.backbone.depth if last else self.sites[self.t + 1]
        self.state = self.backbone.run_blocks(self.state, site, stop)
        seg = (stop - site) * self.backbone.block_flops(counts.double().cpu())
        if last:
            seg = seg + self.backbone.head_flops()
        cost = self.pending + torch.as_tensor(seg, dtype=torch.float64) / self.full
        self.pending = torch.zeros_like(self.pending)
        self.spent = self.spent + cost
        rewards = -self.lam_rows * cost
        infos: list[dict[str, Any]] = [{} for _ in range(len(self.idx))]
        if last:
            self.over = True
            rewards = rewards + self._finish(infos)
            obs = self.observe(final=True)
        else:
            self.t += 1
            obs = self.observe()
        return obs, rewards.numpy().astype(np.float32), last, infos

    def _finish(self, infos: list[dict[str, Any]]) -> torch.Tensor:
        out = self.backbone.head(self.state).float()
        teacher = self.teacher(self.idx)
        labels = None if self.split.labels is None else self.split.labels[self.idx].to(self.device)
        task = task_term(self.task, out, teacher, labels)
        if self.retrieval is not None:
            task = self.retrieval.apply(self.idx, out, teacher, task, self.teacher)
        task = task.double().cpu()
        agree = (out.argmax(-1) == teacher.argmax(-1)).cpu() if self.backbone.output_kind == "logits" else None
        correct = (out.argmax(-1).cpu() == labels.cpu()) if labels is not None and agree is not None else None
        cosine = torch.nn.functional.cosine_similarity(out, teacher, dim=-1).cpu()
        keep = torch.stack(self.keep_ratios, dim=1)
        for i, info in enumerate(infos):
            info.update(
                {
                    "task": float(task[i]),
                    "return": float(task[i] - self.lam_rows[i] * self.spent[i]),
                    "flops_ratio": float(self.spent[i]),
                    "keep_ratio": keep[i].tolist(),
                    "tokens_kept": int(self.state.alive_counts[i]),
                    "cosine": float(cosine[i]),
                    "sample": int(self.idx[i]),
                }
            )
            if self.targets is not None:
                info["target"] = float(self.targets[i])
                info["lam"] = float(self.lam_rows[i])
            if agree is not None:
                info["agreement"] = float(agree[i])
            if correct is not None:
                info["accuracy"] = float(correct[i])
        return task


class RetrievalTerm:
    """Task ``retrieval``: the query rows' reward is the probability of their relevant passages gained over the
    unpruned query (softmax over cosine similarities to the unpruned embeddings of the relevant passages and of
    a seeded bank of the split's passages, at RETRIEVAL_TEMPERATURE); passage rows keep the cosine.

    The split holds its retrieval queries as rows after its passages (``data.options.train_queries``), ``kinds``
    naming them, and ``relevant`` pairs (query, passage row). Cosine to the unpruned embedding weighs every
    direction alike; retrieval needs the directions that tell one passage from another.
    """

    def __init__(self, split: Any, bank: int = RETRIEVAL_BANK, seed: int = 0) -> None:
        kinds, relevant = getattr(split, "kinds", None), getattr(split, "relevant", None)
        if relevant is None:
            raise UserError(f"task 'retrieval' needs a dataset with a retrieval task (queries and their relevant "
                            f"passages); split {getattr(split, 'name', '?')!r} has none")
        # A split whose rows are all passages (val, test: their queries are a task of their own) scores cosine.
        queries = [i for i, k in enumerate(kinds or []) if k != "passage"]
        passages = torch.tensor([i for i, k in enumerate(kinds or []) if k == "passage"], dtype=torch.long)
        self.query_of = torch.full((len(split),), -1, dtype=torch.long)
        self.query_of[torch.tensor(queries, dtype=torch.long)] = torch.arange(len(queries))
        order = relevant[:, 0].argsort(stable=True)
        self.pairs = relevant[order]
        self.starts = torch.searchsorted(self.pairs[:, 0].contiguous(), torch.arange(len(queries) + 1))
        g = torch.Generator().manual_seed(seed)
        self.bank = passages[torch.randperm(len(passages), generator=g)[:bank]].sort().values

    def apply(self, idx: torch.Tensor, out: torch.Tensor, teacher: torch.Tensor, task: torch.Tensor,
              embed: Any) -> torch.Tensor:
        """``task`` [B] with its query rows' terms replaced; ``embed(rows)``: the unpruned embeddings of rows."""
        q = self.query_of[idx.cpu()]
        if not bool((q >= 0).any()):
            return task
        unit = functools.partial(torch.nn.functional.normalize, dim=-1)
        bank = unit(embed(self.bank).float())
        task = task.clone()
        for i in (q >= 0).nonzero().squeeze(1).tolist():
            rel = self.pairs[self.starts[q[i]]:self.starts[q[i] + 1], 1]
            rival = bank[~torch.isin(self.bank, rel).to(bank.device)]
            keys = torch.cat([unit(embed(rel).float()), rival])
            pair = unit(torch.stack([out[i].float(), teacher[i].float()]))
            prob = ((pair @ keys.T) / RETRIEVAL_TEMPERATURE).softmax(-1)[:, : len(rel)].sum(-1)
            task[i] = prob[0] - prob[1]
        return task


class StartCache:
    """Each sample's token state before the first pruning site and its features there, kept once computed.

    Rows are stored without their padding ([n_i, ...] for the n_i real tokens of sample i) and padded
    again to the batch's longest row when assembled, so a batch costs what its rows need. Above
    ``max_bytes`` for the whole split nothing is kept (every batch is computed afresh).
    """

    def __init__(self, compute: Any, n_samples: int, max_bytes: int) -> None:
        self.compute = compute
        self.rows: list[tuple[torch.Tensor, ...] | None] = [None] * n_samples
        self.max_bytes = max_bytes
        self.keep: bool | None = None  # decided on the first batch, from its size per sample

    def get(self, idx: torch.Tensor) -> tuple[TokenState, torch.Tensor]:
        """(state [B, W, D], features [B, W, F]) of samples ``idx`` (repeats allowed)."""
        if self.keep is False:
            return self.compute(idx)
        missing = [i for i in dict.fromkeys(idx.tolist()) if self.rows[i] is None]
        if missing:
            state, feats = self.compute(torch.tensor(missing))
            parts = (state.tokens, state.protected, state.positions, feats)
            if self.keep is None:
                per_sample = sum(p[0].numel() * p.element_size() for p in parts)
                self.keep = per_sample * len(self.rows) <= self.max_bytes
                if not self.keep:
                    return self.compute(idx)
            for j, i in enumerate(missing):
                valid = state.valid[j]
                self.rows[i] = tuple(p[j][valid].clone() for p in parts)
                self.n_full = state.n_full
                self.dense = state.dense
        return self._assemble([self.rows[i] for i in idx.tolist()])  # type: ignore[misc]

    def _assemble(self, rows: list[tuple[torch.Tensor, ...]]) -> tuple[TokenState, torch.Tensor]:
        lengths = torch.tensor([r[0].shape[0] for r in rows])
        width = int(lengths.max())
        padded = [torch.nn.utils.rnn.pad_sequence([r[k] for r in rows], batch_first=True) for k in range(4)]
        valid = torch.arange(width) < lengths.unsqueeze(1)
        dense = self.dense and bool((lengths == width).all())
        state = TokenState(padded[0], padded[1], valid.to(padded[0].device), padded[2], self.n_full if dense else
                           max(width, int(padded[2].max()) + 1), dense=dense)
        return state, padded[3]


def leave_one_out_mean(returns: np.ndarray, group_size: int) -> np.ndarray:
    """[B] mean of the other rows' returns within each group of ``group_size`` consecutive rows."""
    groups = returns.reshape(-1, group_size)
    return ((groups.sum(axis=1, keepdims=True) - groups) / (group_size - 1)).reshape(-1).astype(np.float32)


def sample_lengths(split: Any) -> np.ndarray | None:
    """[M] real tokens of each text sample (its attention mask's sum); None for images."""
    inputs = getattr(split, "inputs", None)
    if not isinstance(inputs, dict) or inputs.get("attention_mask") is None:
        return None
    return inputs["attention_mask"].sum(dim=1).cpu().numpy()


class SampleSampler:
    """Which sample each row takes next: random (seeded per row) or a sequential sweep (evaluation).

    ``lengths`` (text: each sample's token count) buckets the random draws by length: every batch takes
    its rows from one of ``buckets`` length quantiles (chosen in proportion to its size, so every sample
    stays equally likely), since a batch runs at its longest row's width. On python-docs (mean 46
    tokens, batches of 64 padded to about 100) this halves what the blocks compute.
    """

    def __init__(self, n_rows: int, n_samples: int, sequential: bool, lengths: np.ndarray | None = None,
                 buckets: int = 8) -> None:
        self.n_samples = n_samples
        self.sequential = sequential
        self.cursor = 0
        self.rngs = [seeding.np_random(None)[0] for _ in range(n_rows)]
        self.buckets: list[np.ndarray] | None = None
        if lengths is not None and n_samples >= 2 * buckets and len(np.unique(lengths)) > 1:
            order = np.argsort(lengths, kind="stable")
            self.buckets = [b for b in np.array_split(order, buckets) if len(b)]

    def seed(self, row: int, seed: int | None) -> None:
        self.rngs[row] = seeding.np_random(seed)[0]
        self.cursor = 0

    def draw(self, rows: int) -> np.ndarray:
        if self.sequential:
            idx = (self.cursor + np.arange(rows)) % self.n_samples
            self.cursor += rows
            return idx
        if self.buckets is None:
            return np.array([int(self.rngs[i].integers(self.n_samples)) for i in range(rows)])
        sizes = np.array([len(b) for b in self.buckets], dtype=float)
        bucket = self.buckets[int(self.rngs[0].choice(len(self.buckets), p=sizes / sizes.sum()))]
        return np.array([int(bucket[self.rngs[i].integers(len(bucket))]) for i in range(rows)])

    def draw_targets(self, rows: int, controller: BudgetController) -> np.ndarray:
        """[rows] target FLOPs ratios drawn from the controller's range (each row's own generator)."""
        return np.array([controller.draw(self.rngs[i]) for i in range(rows)])


class TokenPruneEnv(gym.Env[dict[str, Any], np.ndarray]):
    """Single-row view: one sample per episode, one step per pruning site."""

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(
        self,
        backbone: TokenBackbone,
        split: Any,
        sites: Sequence[int],
        lam: float = 0.3,
        task: str = "teacher_kl",
        feature_spec: FeatureSpec | None = None,
        sequential: bool = False,
        device: str = "cpu",
        budget: Sequence[float] | None = None,
        controller: BudgetController | None = None,
        merge: bool = False,
        render_mode: str | None = None,
    ) -> None:
        if render_mode is not None:  # gym.make passes it: one line, not a TypeError
            raise UserError(f"render_mode={render_mode!r}: this env draws nothing (render modes: none)")
        self.render_mode = None
        self.core = PruneCore(backbone, split, sites, lam, task, feature_spec, device, budget, controller, merge=merge)
        self.observation_space = self.core.observation_space  # type: ignore[assignment]
        self.action_space = self.core.action_space
        self.sequential = sequential
        self._cursor = 0

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        super().reset(seed=seed)
        if self.sequential:
            if seed is not None:
                self._cursor = 0
            idx = self._cursor % len(self.core.split)
            self._cursor += 1
        else:
            idx = int(self.np_random.integers(len(self.core.split)))
        targets = None
        target = self._target_option(options)
        if self.core.budget is not None:  # options={"target": f} fixes the budget of this episode
            assert self.core.controller is not None
            targets = np.array([self.core.controller.draw(self.np_random) if target is None else target])
        obs = self.core.begin(np.array([idx]), targets)
        info: dict[str, Any] = {"sample": idx} if targets is None else {"sample": idx, "target": float(targets[0])}
        return {k: v[0] for k, v in obs.items()}, info

    def _target_option(self, options: dict[str, Any] | None) -> float | None:
        """``reset(options={"target": f})``: f checked against the env's budget range (a target outside it put the
        observation outside its space, NaN failed deep in the multipliers, an unknown key was ignored)."""
        unknown = sorted(set(options or {}) - {"target"})
        if unknown:
            raise UserError(f"reset options: unknown {', '.join(map(repr, unknown))} (this env takes 'target')")
        target = (options or {}).get("target")
        if target is None:
            return None
        if self.core.budget is None:
            raise UserError("reset options 'target': this env has no budget range (env.reward.budget, or budget=[low, high])")
        low, high = self.core.budget
        if isinstance(target, bool) or not isinstance(target, int | float | np.floating | np.integer) \
                or not low <= float(target) <= high:
            raise UserError(f"reset options 'target' must be a FLOPs ratio in the env's budget range [{low:g}, {high:g}], "
                            f"got {target!r}")
        return float(target)

    def render(self) -> None:
        """Nothing to draw (``render_mode`` None, Gymnasium's convention: render returns None)."""
        return None

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        obs, rewards, done, infos = self.core.advance(np.asarray(action)[None])
        return {k: v[0] for k, v in obs.items()}, float(rewards[0]), done, False, infos[0]


class PruneVecEnv(VecEnv):
    """B rows that advance in lockstep: one transformer call per step serves every row.

    Follows SB3's VecEnv contract: numpy observations, auto-reset with ``terminal_observation`` in the
    info of the finishing step, seeds from ``seed()`` applied at the next ``reset()``.
    """

    def __init__(
        self,
        backbone: TokenBackbone,
        split: Any,
        n_envs: int,
        sites: Sequence[int],
        lam: float = 0.3,
        task: str = "teacher_kl",
        feature_spec: FeatureSpec | None = None,
        sequential: bool = False,
        device: str = "cpu",
        group_size: int = 1,
        budget: Sequence[float] | None = None,
        target: float | None = None,
        controller: BudgetController | None = None,
        cache_bytes: int = 4 << 30,
        merge: bool = False,
    ) -> None:
        if group_size < 1 or n_envs % group_size:
            raise UserError(f"group_size {group_size} must be a positive divisor of n_envs {n_envs}")
        self.core = PruneCore(backbone, split, sites, lam, task, feature_spec, device, budget, controller, cache_bytes,
                              merge)
        self.target = target
        """Fixed target FLOPs ratio of every row (evaluation); None draws one per group (training)."""
        self.group_size = group_size
        self.sampler = SampleSampler(n_envs // group_size, len(split), sequential, sample_lengths(split))
        self.render_mode = None
        self._actions: np.ndarray | None = None
        super().__init__(n_envs, self.core.observation_space, self.core.action_space)

    def reset(self) -> dict[str, np.ndarray]:
        """New episodes on every row; a sequential sweep starts again at sample 0, so validating at several
        targets (one reset each) runs the same rows in the same batches at each (issue 25)."""
        for row, seed in enumerate(self._seeds[: self.num_envs // self.group_size]):  # one sampler per group
            if seed is not None:
                self.sampler.seed(row, seed)
        self.sampler.cursor = 0
        self._reset_seeds()
        self._reset_options()
        return self._begin()

    def _begin(self) -> dict[str, np.ndarray]:
        """New episodes: groups of ``group_size`` consecutive rows share a sample (and a target)."""
        groups = self.num_envs // self.group_size
        idx = np.repeat(self.sampler.draw(groups), self.group_size)
        targets = None
        if self.core.budget is not None:
            assert self.core.controller is not None
            drawn = self.sampler.draw_targets(groups, self.core.controller) if self.target is None \
                else np.full(groups, float(self.target))
            targets = np.repeat(drawn, self.group_size)
        return self.core.begin(idx, targets)

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = actions

    def step_wait(self) -> VecEnvStepReturn:
        assert self._actions is not None, "step_async must be called first"
        obs, rewards, done, infos = self.core.advance(self._actions)
        if done:
            if self.group_size > 1:
                rewards = rewards - leave_one_out_mean(np.array([i["return"] for i in infos]), self.group_size)
            for i, info in enumerate(infos):
                info["terminal_observation"] = {k: v[i] for k, v in obs.items()}
                info["TimeLimit.truncated"] = False
            obs = self._begin()
        return obs, rewards, np.full(self.num_envs, done), infos

    def close(self) -> None:
        return None

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        return [getattr(self, attr_name) for _ in self._get_indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        setattr(self, attr_name, value)

    def env_method(self, method_name: str, *method_args: Any, indices: VecEnvIndices = None, **method_kwargs: Any) -> list[Any]:
        return [getattr(self, method_name)(*method_args, **method_kwargs) for _ in self._get_indices(indices)]

    def env_is_wrapped(self, wrapper_class: type[gym.Wrapper], indices: VecEnvIndices = None) -> list[bool]:
        return [False for _ in self._get_indices(indices)]


def register_envs() -> None:
    """Register the single-row env with gymnasium (idempotent)."""
    if ENV_ID not in gym.registry:
        # make_env: an env preset by name (preset="digits-vit"), or TokenPruneEnv's own arguments.
        gym.register(id=ENV_ID, entry_point="policy_prune.training.factory:make_env")


register_envs()
__all__ = ["ENV_ID", "PruneCore", "PruneVecEnv", "TokenPruneEnv", "TokenState", "register_envs", "task_term"]
