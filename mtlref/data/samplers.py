"""Which task, and which of its examples, fills each slot of a batch.

task_probabilities(sizes, scheme) gives the mixing distribution over tasks:
    proportional  p_t ∝ n_t               (concatenate and shuffle)
    uniform       p_t = 1 / T
    temperature   p_t ∝ n_t^(1/T)         (T = 1: proportional; T -> inf: uniform)
    more          p_t ∝ exp(n_t / Σ_i n_i) (MoRE Eq. 7, as printed; its official code too)
    more_inverse  p_t ∝ exp(-n_t / Σ_i n_i) (Eq. 7's prose: "inversely proportional to its size")
MultiTaskSampler draws batches of (task, index) pairs from it, deterministically under a seed,
resumable from state_dict(), and split across data-parallel ranks.
"""
from __future__ import annotations

import zlib

import numpy as np

SCHEMES = ("proportional", "uniform", "temperature", "more", "more_inverse")


def task_probabilities(sizes: dict[str, int], scheme: str = "proportional",
                       temperature: float = 2.0) -> dict[str, float]:
    """{task: probability}, in the order of `sizes`; sizes are the training-set sizes n_t."""
    if not sizes:
        raise ValueError("no tasks: sizes is empty")
    bad = {t: n for t, n in sizes.items() if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0}
    if bad:
        raise ValueError(f"task sizes must be positive integers (a task needs training examples); got {bad}")
    n = np.array(list(sizes.values()), dtype=np.float64)
    if scheme == "proportional":
        w = n
    elif scheme == "uniform":
        w = np.ones_like(n)
    elif scheme == "temperature":
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        w = n ** (1.0 / temperature)
    elif scheme == "more":
        # MoRE Eq. 7: φ_t = exp(|D_t| / Σ_i |D_i|), normalised to sum to 1 for Sampling(D, Φ).
        # The text calls φ_t "inversely proportional" to |D_t|, but the printed formula grows with
        # |D_t| (mildly: every φ_t lies in (1, e], so the mixture is near uniform). We implement
        # the formula as printed, which is also what MoRE's official code computes
        # (np.exp(n / sum n), normalised); "more_inverse" is the prose reading.
        w = np.exp(n / n.sum())
    elif scheme == "more_inverse":
        # Eq. 7 read by its prose ("inversely proportional to its size"): the printed formula with
        # the sign of the exponent flipped, so smaller tasks weigh more (every φ_t in [1/e, 1)).
        w = np.exp(-n / n.sum())
    else:
        raise ValueError(f"unknown sampling scheme {scheme!r}; choose one of {SCHEMES}")
    return dict(zip(sizes, (w / w.sum()).tolist()))


class MultiTaskSampler:
    """An iterator of batches, each a list of `batch_size` (task, index) pairs for this rank.

    Every rank builds the same global batch of batch_size * num_replicas pairs and keeps items
    rank, rank + num_replicas, ... of it, so the ranks see distinct samples of one global batch.
    mixed=True draws each slot's task from task_probabilities (a batch mixes tasks); mixed=False
    draws one task per global batch (single-task batches, as MoRE's contrastive loss, Eq. 8,
    assumes). Within a task, indices follow a permutation of range(n_t) drawn for each pass over
    it from (seed, task, pass); the next pass reshuffles. The randomness is counter-based (the
    task draws of batch k come from a generator seeded by (seed, k)), so the whole state is k and
    each task's (pass, position): state_dict() / load_state_dict() resume exactly, on any rank.
    num_batches=None iterates forever; otherwise iteration stops after num_batches batches in all.
    """

    def __init__(self, sizes: dict[str, int], scheme: str = "proportional", batch_size: int = 8,
                 seed: int = 0, mixed: bool = True, num_replicas: int = 1, rank: int = 0,
                 temperature: float = 2.0, num_batches: int | None = None):
        if batch_size < 1 or num_replicas < 1:
            raise ValueError(f"batch_size ({batch_size}) and num_replicas ({num_replicas}) must be >= 1")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is out of range for num_replicas={num_replicas}")
        if num_batches is not None and num_batches < 0:
            raise ValueError(f"num_batches must be >= 0 or None (endless), got {num_batches}")
        probs = task_probabilities(sizes, scheme, temperature)
        self.tasks = list(sizes)
        self.sizes = {t: int(n) for t, n in sizes.items()}
        self.probs = np.array([probs[t] for t in self.tasks])
        self.scheme, self.temperature, self.seed, self.mixed = scheme, temperature, seed, mixed
        self.batch_size, self.num_replicas, self.rank, self.num_batches = batch_size, num_replicas, rank, num_batches
        self.batch = 0                                        # global batches drawn so far
        self.cursor = {t: (0, 0) for t in self.tasks}         # task -> (pass, position in its permutation)
        self._perm: dict[str, tuple[int, np.ndarray]] = {}    # cache: task -> (pass, permutation)

    def _permutation(self, task: str, epoch: int) -> np.ndarray:
        cached = self._perm.get(task)
        if cached is None or cached[0] != epoch:
            rng = np.random.default_rng([self.seed, 1, zlib.crc32(task.encode()), epoch])
            self._perm[task] = (epoch, rng.permutation(self.sizes[task]))
        return self._perm[task][1]

    def _next_index(self, task: str) -> int:
        epoch, pos = self.cursor[task]
        index = int(self._permutation(task, epoch)[pos])
        self.cursor[task] = (epoch + 1, 0) if pos + 1 == self.sizes[task] else (epoch, pos + 1)
        return index

    def global_batch(self) -> list[tuple[str, int]]:
        """The next global batch (every rank's samples, batch_size * num_replicas), advancing the state."""
        rng = np.random.default_rng([self.seed, 0, self.batch])
        n = self.batch_size * self.num_replicas
        if self.mixed:
            picks = rng.choice(len(self.tasks), size=n, p=self.probs)
        else:
            picks = np.full(n, rng.choice(len(self.tasks), p=self.probs))
        self.batch += 1
        return [(self.tasks[i], self._next_index(self.tasks[i])) for i in picks]

    def __iter__(self):
        while self.num_batches is None or self.batch < self.num_batches:
            yield self.global_batch()[self.rank::self.num_replicas]

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("an endless MultiTaskSampler has no length; pass num_batches")
        return self.num_batches

    def _config(self) -> dict:
        return {"tasks": self.tasks, "sizes": self.sizes, "scheme": self.scheme, "temperature": self.temperature,
                "seed": self.seed, "mixed": self.mixed, "batch_size": self.batch_size,
                "num_replicas": self.num_replicas}

    def state_dict(self) -> dict:
        """Plain Python values (JSON-safe): the configuration, for checking, and the position."""
        return {**self._config(), "batch": self.batch, "cursor": {t: list(c) for t, c in self.cursor.items()}}

    def load_state_dict(self, state: dict) -> None:
        differ = {k: (state.get(k), v) for k, v in self._config().items() if state.get(k) != v}
        if differ:
            raise ValueError(f"sampler state was saved with other settings {{key: (saved, now)}}: {differ}; "
                             "build the sampler with the saved settings to resume")
        self.batch = int(state["batch"])
        self.cursor = {t: (int(e), int(p)) for t, (e, p) in state["cursor"].items()}
