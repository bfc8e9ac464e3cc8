"""Task mixing distributions and the multi-task batch sampler."""
import json
import math
from collections import Counter

import pytest

from mtlref.data.samplers import SCHEMES, MultiTaskSampler, task_probabilities

SIZES = {"rte": 50, "mrpc": 400, "mnli": 3000}


def test_probabilities_by_hand():
    sizes = {"a": 1, "b": 3}
    assert task_probabilities(sizes, "proportional") == pytest.approx({"a": 0.25, "b": 0.75})
    assert task_probabilities(sizes, "uniform") == pytest.approx({"a": 0.5, "b": 0.5})
    r3 = math.sqrt(3)                                          # T = 2: n^(1/2)
    assert task_probabilities(sizes, "temperature", 2.0) == pytest.approx({"a": 1 / (1 + r3), "b": r3 / (1 + r3)})
    ea, eb = math.exp(1 / 4), math.exp(3 / 4)                  # MoRE Eq. 7: exp(n_t / sum n)
    assert task_probabilities(sizes, "more") == pytest.approx({"a": ea / (ea + eb), "b": eb / (ea + eb)})
    assert task_probabilities(sizes, "temperature", 1.0) == pytest.approx(task_probabilities(sizes, "proportional"))
    ia, ib = math.exp(-1 / 4), math.exp(-3 / 4)                # Eq. 7's prose reading: exp(-n_t / sum n)
    assert task_probabilities(sizes, "more_inverse") == pytest.approx({"a": ia / (ia + ib), "b": ib / (ia + ib)})


def test_more_grows_with_size_as_printed():
    p = task_probabilities(SIZES, "more")
    assert p["rte"] < p["mrpc"] < p["mnli"]
    assert max(p.values()) / min(p.values()) < math.e           # every φ_t lies in (1, e]
    q = task_probabilities(SIZES, "more_inverse")              # "inversely proportional": the other way
    assert q["rte"] > q["mrpc"] > q["mnli"] and max(q.values()) / min(q.values()) < math.e


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown sampling scheme"):
        task_probabilities(SIZES, "inverse")
    with pytest.raises(ValueError, match="positive integers"):
        task_probabilities({"a": 0, "b": 3}, "uniform")
    with pytest.raises(ValueError, match="rank 2 is out of range"):
        MultiTaskSampler(SIZES, num_replicas=2, rank=2)


def take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("mixed", [True, False])
def test_empirical_frequencies_match_formula(scheme, mixed):
    p = task_probabilities(SIZES, scheme)
    if mixed:            # every slot is a draw
        batches = take(MultiTaskSampler(SIZES, scheme, batch_size=64, seed=3), 400)
        counts = Counter(t for b in batches for t, _ in b)
    else:                # one draw per batch
        batches = take(MultiTaskSampler(SIZES, scheme, batch_size=4, seed=3, mixed=False), 6000)
        counts = Counter(b[0][0] for b in batches)
    n = sum(counts.values())
    for t, pt in p.items():
        sigma = math.sqrt(pt * (1 - pt) / n)
        assert abs(counts[t] / n - pt) <= 5 * sigma, (t, counts[t] / n, pt)


def test_single_task_batches():
    for batch in take(MultiTaskSampler(SIZES, "uniform", batch_size=8, seed=0, mixed=False), 50):
        assert len(batch) == 8 and len({t for t, _ in batch}) == 1


def test_deterministic_under_seed():
    a = take(MultiTaskSampler(SIZES, "temperature", batch_size=8, seed=11), 30)
    b = take(MultiTaskSampler(SIZES, "temperature", batch_size=8, seed=11), 30)
    c = take(MultiTaskSampler(SIZES, "temperature", batch_size=8, seed=12), 30)
    assert a == b and a != c


def test_each_pass_is_a_fresh_permutation():
    batches = take(MultiTaskSampler({"only": 10}, batch_size=5, seed=0), 8)      # 4 passes over 10 examples
    passes = [[i for b in batches[k:k + 2] for _, i in b] for k in range(0, 8, 2)]
    assert all(sorted(p) == list(range(10)) for p in passes)
    assert len({tuple(p) for p in passes}) > 1                                    # reshuffled between passes


def test_resume_from_state_dict_equals_uninterrupted():
    kwargs = dict(sizes={"a": 7, "b": 13, "c": 40}, scheme="more", batch_size=6, seed=5)
    full = take(MultiTaskSampler(**kwargs), 25)
    first = MultiTaskSampler(**kwargs)
    assert take(first, 9) == full[:9]
    state = json.loads(json.dumps(first.state_dict()))                           # survives a checkpoint file
    resumed = MultiTaskSampler(**kwargs)
    resumed.load_state_dict(state)
    assert take(resumed, 16) == full[9:]
    with pytest.raises(ValueError, match="other settings"):
        MultiTaskSampler(**{**kwargs, "seed": 6}).load_state_dict(state)


def test_replicas_partition_the_global_batch():
    replicas, per_rank = 3, 4
    one = take(MultiTaskSampler(SIZES, "uniform", batch_size=replicas * per_rank, seed=2), 20)
    ranks = [take(MultiTaskSampler(SIZES, "uniform", batch_size=per_rank, seed=2, num_replicas=replicas, rank=r), 20)
             for r in range(replicas)]
    for k, global_batch in enumerate(one):
        parts = [ranks[r][k] for r in range(replicas)]
        assert all(len(p) == per_rank for p in parts)
        assert [x for r in range(replicas) for x in global_batch[r::replicas]] == [x for p in parts for x in p]
        assert sorted(x for p in parts for x in p) == sorted(global_batch)
        assert len(set(global_batch)) == len(global_batch)                        # distinct samples


def test_num_batches_bounds_iteration():
    sampler = MultiTaskSampler(SIZES, batch_size=2, seed=0, num_batches=5)
    assert len(sampler) == 5 and len(list(sampler)) == 5 and list(sampler) == []
    with pytest.raises(TypeError, match="no length"):
        len(MultiTaskSampler(SIZES))
