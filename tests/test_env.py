"""The token-pruning env: spaces, SB3/gymnasium checks, reward accounting, batched == single-row."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3.common.vec_env import VecMonitor

from policy_prune.core.backbones import adapt
from policy_prune.errors import UserError
from policy_prune.training.env import ENV_ID, PruneVecEnv, TokenPruneEnv, task_term
from tests import tiny

SITES = [1, 2]


@pytest.fixture(scope="module")
def vit():
    return adapt(tiny.make("timm-vit-reg4"))


@pytest.fixture(scope="module")
def vit_split():
    return tiny.split("timm-vit-reg4", n=12)


def _run_episode(env: gym.Env, actions) -> tuple[float, dict]:
    total, info = 0.0, {}
    for a in actions:
        _, r, terminated, truncated, info = env.step(a)
        total += r
        assert not truncated
    assert terminated
    return total, info


@pytest.mark.parametrize("name,task", [("timm-vit-reg4", "teacher_kl"), ("timm-deit-distilled", "label_ce"),
                                       ("hf-bert", "cosine"), ("hf-vit-classifier", "teacher_agree")])
def test_check_env_passes(name: str, task: str) -> None:
    from gymnasium.utils.env_checker import check_env as gym_check
    from stable_baselines3.common.env_checker import check_env as sb3_check

    backbone = adapt(tiny.make(name))
    split = tiny.split(name, n=6)
    env = gym.make(ENV_ID, backbone=backbone, split=split, sites=SITES, task=task)
    gym_check(env.unwrapped)  # render included: it returns None, Gymnasium's convention without a render mode
    with pytest.raises(UserError, match="render_mode='human': this env draws nothing"):
        gym.make(ENV_ID, backbone=backbone, split=split, sites=SITES, task=task, render_mode="human")
    with pytest.warns(UserWarning, match="unconventional shape"):  # token features are [N, F] by design
        sb3_check(TokenPruneEnv(backbone, split, SITES, task=task))


def test_spaces_and_protected_forced(vit, vit_split) -> None:
    env = TokenPruneEnv(vit, vit_split, SITES)
    obs, _ = env.reset(seed=3)
    n = 16 + 5
    assert obs["tokens"].shape == (n, env.core.spec.dim) and obs["alive"].sum() == n
    assert np.isfinite(obs["tokens"]).all() and env.observation_space.contains(obs)
    assert obs["context"].tolist()[:2] == [1.0, 0.0]
    obs, r, *_ = env.step(np.zeros(n, dtype=np.int8))  # drop everything: protected tokens stay
    assert obs["alive"].tolist() == [1] * 5 + [0] * 16
    assert (obs["tokens"][5:] == 0).all()
    obs, r, *_ = env.step(np.ones(n, dtype=np.int8))  # dead tokens cannot come back
    assert obs["alive"].sum() == 5


@pytest.mark.parametrize("action,match", [
    (np.full(21, 0.3), "zeros and ones .*got the value 0.3"),  # a keep probability read as "keep" before
    (np.full(21, np.nan), "got the value nan"),
    (-np.ones(21), "got the value -1.0"),
    (np.ones(30, dtype=np.int8), r"21 zeros and ones per row .*got shape \(30,\)"),  # was cut to 21
    (np.ones(10, dtype=np.int8), r"got shape \(10,\)"),  # failed inside a gather
])
def test_an_action_outside_the_action_space_is_refused(vit, vit_split, action, match: str) -> None:
    env = TokenPruneEnv(vit, vit_split, SITES)
    env.reset(seed=0)
    assert not env.action_space.contains(action)
    with pytest.raises(UserError, match=match):
        env.step(action)
    _run_episode(env, [np.ones(21, dtype=bool)] * 2)  # the refused step left the episode as it was
    with pytest.raises(UserError, match="no episode is running .*call reset"):  # the head would run again
        env.step(np.ones(21, dtype=np.int8))


def test_keep_all_gives_full_flops_and_agreement(vit, vit_split) -> None:
    env = TokenPruneEnv(vit, vit_split, SITES, lam=0.25, task="teacher_kl")
    env.reset(seed=0)
    total, info = _run_episode(env, [np.ones(21, dtype=np.int8)] * 2)
    assert info["flops_ratio"] == pytest.approx(1.0, abs=1e-9)
    assert info["agreement"] == 1.0 and info["keep_ratio"] == [1.0, 1.0] and info["tokens_kept"] == 21
    assert info["task"] == pytest.approx(0.0, abs=1e-5)
    assert total == pytest.approx(-0.25, abs=1e-5)


def test_drop_all_gives_minimum_schedule_flops(vit, vit_split) -> None:
    env = TokenPruneEnv(vit, vit_split, SITES, lam=1.0)
    env.reset(seed=0)
    _, info = _run_episode(env, [np.zeros(21, dtype=np.int8)] * 2)
    expected = vit.schedule_flops(SITES, [5, 5], 21) / vit.full_flops(21)
    assert info["flops_ratio"] == pytest.approx(expected, rel=1e-9)
    assert info["tokens_kept"] == 5


@pytest.mark.parametrize("task", ["teacher_kl", "teacher_agree", "label_ce", "label_acc", "cosine"])
def test_return_equals_task_minus_lambda_flops(vit, vit_split, task: str) -> None:
    """Recompute the episode independently with forward_pruned and the analytic schedule FLOPs."""
    lam = 0.4
    env = TokenPruneEnv(vit, vit_split, SITES, lam=lam, task=task)
    _, info0 = env.reset(seed=5)
    rng = np.random.default_rng(0)
    actions = [rng.integers(0, 2, 21).astype(np.int8) for _ in SITES]
    total, info = _run_episode(env, actions)

    idx = torch.tensor([info0["sample"]])
    x = vit_split.inputs[idx]

    def keep_fn(state, i, layer):
        return torch.as_tensor(actions[i]).bool()[state.positions]

    with torch.no_grad():
        out, _, counts = vit.forward_pruned(x, SITES, keep_fn)
        teacher = vit(x)
    flops = vit.schedule_flops(SITES, [int(c) for c in counts], 21) / vit.full_flops(21)
    expected_task = float(task_term(task, out, teacher, vit_split.labels[idx]))
    assert info["flops_ratio"] == pytest.approx(flops, rel=1e-6)
    assert info["task"] == pytest.approx(expected_task, abs=1e-5)
    assert total == pytest.approx(expected_task - lam * flops, abs=1e-5)


def test_batched_equals_single_row(vit, vit_split) -> None:
    n_envs, seed = 3, 11
    vec = PruneVecEnv(vit, vit_split, n_envs, SITES, lam=0.3)
    vec.seed(seed)
    obs = vec.reset()
    singles = [TokenPruneEnv(vit, vit_split, SITES, lam=0.3) for _ in range(n_envs)]
    single_obs = [env.reset(seed=seed + i)[0] for i, env in enumerate(singles)]
    rng = np.random.default_rng(1)
    for _ in range(2 * len(SITES)):
        for i in range(n_envs):
            np.testing.assert_allclose(obs["tokens"][i], single_obs[i]["tokens"], atol=1e-4)
            assert (obs["alive"][i] == single_obs[i]["alive"]).all()
        actions = rng.integers(0, 2, (n_envs, 21)).astype(np.int8)
        obs, rewards, dones, infos = vec.step(actions)
        for i, env in enumerate(singles):
            o, r, term, _, info = env.step(actions[i])
            assert r == pytest.approx(float(rewards[i]), abs=1e-5)
            assert term == bool(dones[i])
            if term:
                assert info["sample"] == infos[i]["sample"]
                np.testing.assert_allclose(infos[i]["terminal_observation"]["alive"], o["alive"])
                o, _ = env.reset()
            single_obs[i] = o


def test_vecmonitor_and_seeding(vit, vit_split) -> None:
    def rollout(seed: int) -> list[float]:
        vec = VecMonitor(PruneVecEnv(vit, vit_split, 4, SITES))
        vec.seed(seed)
        vec.reset()
        rng = np.random.default_rng(seed)
        episodes = []
        for _ in range(2 * len(SITES)):
            _, _, dones, infos = vec.step(rng.integers(0, 2, (4, 21)))
            episodes += [info["episode"]["r"] for info in infos if "episode" in info]
        return episodes

    first = rollout(7)
    assert len(first) == 8 and first == rollout(7)
    assert first != rollout(8)


def test_teacher_is_cached_once_per_sample(vit, vit_split, monkeypatch) -> None:
    vec = PruneVecEnv(vit, vit_split, 6, SITES, sequential=True)
    calls = []
    original = type(vit).forward
    monkeypatch.setattr(type(vit), "forward", lambda self, x: calls.append(len(x)) or original(self, x))
    vec.reset()
    for _ in range(4 * len(SITES)):  # 4 episodes x 6 rows = 2 sweeps over the 12 samples
        vec.step(np.ones((6, 21)))
    assert sum(calls) == 12


def test_sequential_sweep_covers_split(vit, vit_split) -> None:
    vec = PruneVecEnv(vit, vit_split, 4, SITES, sequential=True)
    vec.reset()
    seen = []
    for _ in range(3 * len(SITES)):
        _, _, dones, infos = vec.step(np.ones((4, 21)))
        seen += [info["sample"] for info in infos if dones[0]]
    assert sorted(seen) == list(range(12))


def test_validation_runs_the_same_rows_at_every_target(vit, vit_split) -> None:
    """One sequential env validates at several targets: each target runs the first n samples, the same rows
    in the same batches, once each (the sweep used to carry on from where the previous target stopped:
    other batches, and a pass over the rest of the split before coming back to the first n)."""
    from types import SimpleNamespace

    from policy_prune.training.rollout import evaluate_policy_split, keep_all_policy

    vec = PruneVecEnv(vit, vit_split, 4, SITES, sequential=True, budget=(0.4, 0.9))
    begun: list[list[int]] = []
    begin = vec.core.begin
    vec.core.begin = lambda idx, targets: begun.append(idx.tolist()) or begin(idx, targets)  # type: ignore[method-assign]
    for n, batches in ((4, [[0, 1, 2, 3]]), (8, [[0, 1, 2, 3], [4, 5, 6, 7]])):
        for target in (0.5, 0.8, 0.5):
            begun.clear()
            result = evaluate_policy_split(keep_all_policy(), SimpleNamespace(sites=SITES), vit, vit_split, n,
                                           target=target, vec=vec)
            assert begun[:-1] == batches and result["episodes"] == n  # the last begin: the final auto-reset


def test_text_padding_is_never_alive() -> None:
    backbone = adapt(tiny.make("hf-bert"))
    split = tiny.split("hf-bert", n=3, labels=False)
    vec = PruneVecEnv(backbone, split, 3, SITES, task="cosine", sequential=True)
    obs = vec.reset()
    lengths = split.inputs["attention_mask"].sum(1)
    assert obs["alive"].sum(1).tolist() == lengths.tolist()
    _, _, _, infos = vec.step(np.ones((3, 12)))
    _, _, dones, infos = vec.step(np.ones((3, 12)))
    assert dones.all() and [i["tokens_kept"] for i in infos] == lengths.tolist()
    assert all(i["flops_ratio"] == pytest.approx(1.0) for i in infos)  # padding is not counted as work
    assert all(i["cosine"] == pytest.approx(1.0, abs=1e-5) for i in infos)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sites": [1, 4]}, "sites"),
        ({"sites": [2, 1]}, "sites"),
        ({"sites": []}, "site"),
        ({"lam": -0.1}, "lambda"),
        ({"task": "accuracy"}, "unknown task"),
        ({"task": "label_acc", "labels": False}, "needs labels"),
    ],
)
def test_bad_configuration_fails_at_construction(vit, kwargs: dict, match: str) -> None:
    split = tiny.split("timm-vit-reg4", n=4, labels=kwargs.pop("labels", True))
    args = {"sites": SITES, **kwargs}
    with pytest.raises(UserError, match=match):
        TokenPruneEnv(vit, split, **args)


def test_logit_task_on_embedding_model_is_rejected() -> None:
    backbone = adapt(tiny.make("hf-bert"))
    with pytest.raises(UserError, match="classifier"):
        PruneVecEnv(backbone, tiny.split("hf-bert", n=3, labels=False), 2, SITES, task="teacher_kl")


def test_label_ce_is_relative_to_the_unpruned_model() -> None:
    teacher = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    student = torch.tensor([[1.0, 0.5, -1.0], [0.0, 3.0, 0.0]])
    labels = torch.tensor([0, 1])
    assert torch.equal(task_term("label_ce", teacher, teacher, labels), torch.zeros(2))  # keep-all scores 0
    ce = torch.nn.functional.cross_entropy
    expected = ce(teacher, labels, reduction="none") - ce(student, labels, reduction="none")
    got = task_term("label_ce", student, teacher, labels)
    torch.testing.assert_close(got, expected)
    assert got[0] < 0 < got[1]  # worse than the unpruned model on row 0, better on row 1


def test_label_prob_is_the_true_class_probability_gained_and_bounded() -> None:
    teacher = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0], [9.0, -9.0, -9.0]])
    student = torch.tensor([[1.0, 0.5, -1.0], [0.0, 3.0, 0.0], [-9.0, 9.0, -9.0]])
    labels = torch.tensor([0, 1, 0])
    assert torch.equal(task_term("label_prob", teacher, teacher, labels), torch.zeros(3))
    expected = (student.softmax(-1) - teacher.softmax(-1))[torch.arange(3), labels]
    got = task_term("label_prob", student, teacher, labels)
    torch.testing.assert_close(got, expected)
    assert got[0] < 0 < got[1]
    assert -1.0 <= got[2] < -0.99  # a flipped confident prediction costs at most 1 (the CE would cost ~18)


def test_group_rows_share_a_sample_and_get_a_leave_one_out_baseline(vit, vit_split) -> None:
    """group_size K: K consecutive rows prune one sample; the final reward subtracts the others' mean return."""
    env = PruneVecEnv(vit, vit_split, 8, SITES, lam=0.4, group_size=4)
    env.seed(3)
    env.reset()
    idx = env.core.idx.numpy()
    assert (idx.reshape(2, 4) == idx.reshape(2, 4)[:, :1]).all(), "rows of a group share a sample"
    rng = np.random.default_rng(0)
    total = np.zeros(8)
    for _ in SITES:
        _, rewards, dones, infos = env.step(rng.integers(0, 2, (8, 21)).astype(np.int8))
        total += rewards
    assert dones.all()
    raw = np.array([i["return"] for i in infos])
    assert raw == pytest.approx([i["task"] - 0.4 * i["flops_ratio"] for i in infos], abs=1e-6)
    for g in range(2):
        rows = slice(4 * g, 4 * g + 4)
        others = (raw[rows].sum() - raw[rows]) / 3
        assert total[rows] == pytest.approx(raw[rows] - others, abs=1e-5)
        assert total[rows].sum() == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(UserError, match="group_size"):
        PruneVecEnv(vit, vit_split, 6, SITES, group_size=4)


@pytest.mark.parametrize("name", ["timm-vit-reg4", "hf-bert"])
def test_start_states_are_computed_once_per_sample(name) -> None:
    """The state before the first site is kept per sample: a later episode on it computes nothing and sees
    what a fresh computation gives (text rows padded to another batch's width included)."""
    backbone = adapt(tiny.make(name))
    split = tiny.split(name, n=12)
    task = "cosine" if backbone.output_kind == "embedding" else "teacher_kl"
    env = PruneVecEnv(backbone, split, 4, SITES, task=task)
    calls = []
    compute = env.core.starts.compute
    env.core.starts.compute = lambda idx: calls.append(idx.tolist()) or compute(idx)
    first = env.core.begin(np.array([0, 1, 2, 3]))
    again = env.core.begin(np.array([3, 0, 0, 5]))
    assert calls == [[0, 1, 2, 3], [5]]
    fresh = PruneVecEnv(backbone, split, 4, SITES, task=task, cache_bytes=0).core.begin(np.array([3, 0, 0, 5]))
    assert fresh["tokens"].shape == again["tokens"].shape
    for key in again:
        np.testing.assert_allclose(again[key], fresh[key], atol=1e-5)
    np.testing.assert_allclose(again["tokens"][1], first["tokens"][0], atol=1e-5)


def test_text_features_do_not_depend_on_padding() -> None:
    from policy_prune.core.features import FeatureSpec, make_projection, token_features

    backbone = adapt(tiny.make("hf-bert"))
    split = tiny.split("hf-bert", n=4)
    x = split.inputs
    wide = {k: torch.nn.functional.pad(v, (0, 9)) for k, v in x.items()}  # 9 more padding columns
    spec = FeatureSpec()
    proj = make_projection(backbone, spec)
    with torch.inference_mode():
        a = token_features(backbone, backbone.run_blocks(backbone.embed(x), 0, 1), 1, proj, spec)
        b = token_features(backbone, backbone.run_blocks(backbone.embed(wide), 0, 1), 1, proj, spec)
    torch.testing.assert_close(b[:, : a.shape[1]], a, atol=1e-5, rtol=1e-5)


def test_text_batches_draw_rows_of_similar_length() -> None:
    from policy_prune.training.env import SampleSampler

    lengths = np.arange(80) % 40 + 5  # 80 samples of 5..44 tokens
    sampler = SampleSampler(8, 80, sequential=False, lengths=lengths, buckets=4)
    for row in range(8):
        sampler.seed(row, row)
    counts = np.zeros(80)
    for _ in range(2000):
        idx = sampler.draw(8)
        assert np.ptp(lengths[idx]) <= 10  # one length quartile per batch
        counts[idx] += 1
    assert counts.min() > 0.6 * counts.mean() and counts.max() < 1.4 * counts.mean()  # every sample about as likely
    assert SampleSampler(8, 80, sequential=False, lengths=np.full(80, 7)).buckets is None  # images / equal lengths


def test_a_merging_env_runs_what_the_merging_pruned_model_runs(vit, vit_split) -> None:
    """merge=True: an episode's state after each site is the adapter's merging prune of the same actions (the
    plain env's is not), so the policy trains on what ``prune`` runs for a merging scorer."""
    rng = np.random.default_rng(2)
    actions = [rng.integers(0, 2, 21).astype(np.int8) for _ in SITES]
    states = {}
    for merge in (False, True):
        env = TokenPruneEnv(vit, vit_split, SITES, lam=0.3, merge=merge)
        env.reset(seed=4)
        idx = env.core.idx
        env.step(actions[0])
        states[merge] = env.core.state
    x = vit_split.inputs[torch.as_tensor(idx)]
    with torch.no_grad():
        ref = vit.run_blocks(vit.embed(x), 0, SITES[0])
        keep = torch.as_tensor(actions[0]).bool()[None]
        ref = vit.run_blocks(ref.prune(keep, merge=True), SITES[0], SITES[1])
    assert torch.allclose(states[True].tokens, ref.tokens, atol=1e-5)
    assert not torch.allclose(states[False].tokens, ref.tokens, atol=1e-3)
