"""Under which protocol a claim was tested, from its cells' result files: the backbone and
objective, the batches and sampler, MoRE's h and τ, MTL-LoRA's τ, n and w_t init, the budget,
the epochs each task saw, the tasks at or below the best constant, and the cells run from a
dirty tree; each beside what the claim's paper used (papers.PAPER_PROTOCOL).

The epochs a task saw are the examples of it drawn in training over its training-set size. The
draws are replayed with the library's own sampler and length pooling (MultiTaskSampler,
LengthGroupedBatches) from the cell's recorded settings and seed, over the steps it ran; the
training-set sizes are the result file's metrics.train_sizes where train.py records them, else
the library's data loading under the cell's flags (data/ as it is here). That is exact,
but for mixed batches whose step count is not a multiple of --length-pool: the last, partial
pool trains the items its length sort puts first, so its share is an expectation (the line says
"expected"). One Protocols object per document holds the caches."""
from __future__ import annotations

import contextlib
import io
from collections import Counter
from pathlib import Path

from experiments import ROOT
from experiments.replication.names import TASK_NAMES
from experiments.replication.papers import PAPER_PROTOCOL
from experiments.summary import dirty, init_label, method_options
from mtlref.commands import train_args
from mtlref.data.collate import LengthGroupedBatches
from mtlref.data.loading import k_shot, load_data
from mtlref.data.samplers import MultiTaskSampler
from mtlref.pretrained import minilm_dir, read_config

OBJECTIVE = {"head": "per-task heads", "gen": "L_gen (text-to-text)", "lm": "the LM loss"}
SAMPLER = {"more": "Eq. 7 sampler"}


class _Items:
    """LengthGroupedBatches' encoder when only the tasks are counted: every example has one
    length (the pool's sort keeps the sampler's order) and a batch is its list of items."""
    def get(self, key, example):
        return ((),)

    def collate(self, items):
        return items


def lr_text(lr: float) -> str:
    """5e-4, not 0.0005: as the grids and the papers write a learning rate."""
    m, e = f"{lr:e}".split("e")
    return f"{m.rstrip('0').rstrip('.')}e{int(e)}"


def epochs_text(epochs: dict[str, float]) -> str:
    def fmt(x: float) -> str:
        return f"{x:.0f}" if x >= 10 else f"{x:.1f}" if x >= 1 else f"{x:.2f}"
    return ", ".join(f"{TASK_NAMES.get(t, t)} {fmt(x)}" for t, x in epochs.items())


class Protocols:
    """The protocol lines of one document (its result records, for the probe's runs)."""

    def __init__(self, records: list[dict]):
        self.records = records
        self._sizes: dict = {}
        self._draws: dict = {}
        self._flags: dict = {}

    # ------------------------------------------------------------------ what a cell ran with
    def flags(self, record: dict):
        """train.py's parsed flags of the cell (its recorded argv), or None."""
        argv = tuple(record.get("argv") or ())
        if argv not in self._flags:
            try:
                with contextlib.redirect_stderr(io.StringIO()):
                    self._flags[argv] = train_args(list(argv[1:])) if argv else None
            except SystemExit:                         # a flag this train.py no longer has
                self._flags[argv] = None
        return self._flags[argv]

    def sizes(self, record: dict, a) -> dict[str, int] | None:
        """{task: training-set size} as the cell's run loaded it; None without its data. Cached
        without the seed: a seed draws which examples each split holds, never how many (the paper
        split's 1,000 or half, the k of --train-examples, a held-out fraction)."""
        split = record["metrics"]["settings"]["split"]
        key = (a.bench, a.tasks, a.data_dir, split, a.jsonl, a.jsonl_dev, a.train_examples)
        if key not in self._sizes:
            root = lambda p: str(p if p is None or Path(p).is_absolute() else ROOT / p)  # noqa: E731
            try:
                specs, splits = load_data(a.bench, a.tasks, root(a.data_dir), split, a.seed, root(a.jsonl),
                                          root(a.jsonl_dev))
                if a.train_examples:
                    splits = k_shot(splits, a.train_examples, a.seed)
                self._sizes[key] = {sp.name: len(splits[sp.name]["train"]) for sp in specs}
            except (OSError, ValueError, KeyError):
                self._sizes[key] = None
        return self._sizes[key]

    def draws(self, sizes: dict[str, int], s: dict, seed: int, n: int, pool: int) -> tuple[dict, bool]:
        """({task: examples drawn in n batches}, exact): the sampler and length pooling replayed."""
        key = (tuple(sizes.items()), s["sampler"], s["batch_size"], s["batches"], seed, n, pool)
        if key not in self._draws:
            sampler = MultiTaskSampler(sizes, s["sampler"], s["batch_size"], seed=seed, mixed=s["batches"] == "mixed")
            grouped = iter(LengthGroupedBatches(sampler, _Items(), {t: range(k) for t, k in sizes.items()},
                                                {t: t for t in sizes}, pool=pool, seed=seed))
            whole = n if not sampler.mixed or len(sizes) == 1 or n % pool == 0 else n - n % pool
            counts: Counter = Counter()
            for _ in range(whole):
                counts.update(t for t, _, _ in next(grouped))
            if whole < n:                              # the partial pool: its share, as expected
                part = Counter(t for _ in range(pool) for t, _ in sampler.global_batch())
                counts.update({t: c * (n - whole) / pool for t, c in part.items()})
            self._draws[key] = (dict(counts), whole == n)
        return self._draws[key]

    def epochs(self, record: dict) -> tuple[dict[str, float], bool] | None:
        """({task: epochs seen}, exact) of one cell, or None where its flags or data are missing."""
        s, a = record["metrics"].get("settings") or {}, self.flags(record)
        if a is None or not {"split", "sampler", "batches", "batch_size"} <= set(s):
            return None
        sizes = record["metrics"].get("train_sizes") or self.sizes(record, a)
        if not sizes:
            return None
        steps, accum = record["metrics"]["steps"], s.get("grad_accum") or 1
        if isinstance(steps, dict):                    # LoRA-ST: each task alone
            return {t: steps[t] * s["batch_size"] * accum / sizes[t] for t in sizes if t in steps}, True
        counts, exact = self.draws(sizes, s, a.seed, steps * accum, a.length_pool)
        return {t: counts.get(t, 0) / n for t, n in sizes.items()}, exact

    # ------------------------------------------------------------------ one side of a claim
    def side(self, cells: list[dict]) -> dict[str, str]:
        """What the protocol line says of one variant's cells (the first cell's settings; the
        epochs averaged over the cells)."""
        r = cells[0]
        m, a = r["metrics"], self.flags(r)
        s = m.get("settings") or {}
        out = {"backbone": f"{Path(a.model).name if a and a.model else 'MiniLM' if a else m.get('model', '?')} with "
                           f"{OBJECTIVE.get(m.get('objective'), m.get('objective') or '?')}"}
        trained = [t for t in m.get("train_sizes") or m.get("tasks", {}) if t != "mnli_mm"]
        if isinstance(m.get("steps"), dict) or len(trained) == 1:
            out["batches"] = "one task at a time, every batch single-task"
        elif s.get("batches"):
            sampler = SAMPLER.get(s.get("sampler"), f"{s.get('sampler')} sampler")
            out["batches"] = f"{s['batches']} batches, {sampler}"
        if "batch_size" in s:
            steps = m.get("steps")
            per = (f"each task alone, {', '.join(sorted({str(v) for v in steps.values()}))} steps"
                   if isinstance(steps, dict) else f"{steps:,} steps")
            out["budget"] = (f"{per} of {s['batch_size']}" + (f" × {s['grad_accum']}" if s.get("grad_accum", 1) > 1
                                                              else "") + f", lr {lr_text(s.get('lr') or 0)}")
        out["options"] = self.options(r)
        eps = [e for c in cells if (e := self.epochs(c))]
        if eps and len(eps) == len(cells):
            tasks = list(eps[0][0])
            mean = {t: sum(e[t] for e, _ in eps) / len(eps) for t in tasks}
            out["epochs"] = (f"epochs seen per task ({'exact' if all(x for _, x in eps) else 'expected'}"
                             f"{f', mean of {len(eps)} cells' if len(eps) > 1 else ''}): {epochs_text(mean)}")
        return out

    def options(self, record: dict) -> str:
        """MoRE's h and τ, MTL-LoRA's τ, n and w_t init; "" for the other methods."""
        method, o = record.get("method") or record["metrics"].get("method"), method_options(record)
        if method == "more":
            h = o.get("task_dim")
            if h is None:
                h = "each module's input size" + self.input_sizes(record)
            off = [k for k in ("linear_scaling", "task_embedding", "contrastive") if o.get(k) is False]
            return (f"MoRE h = {h}, τ = {o.get('tau', 0.05):g}" + (", the official code's mode" if o.get("official")
                                                                  else "")
                    + "".join(f", no {k.replace('_', ' ')}" for k in off)
                    + (f", {o['selection']} selection" if o.get("selection", "ste") != "ste" else ""))
        if method == "mtl-lora":
            init = init_label(record) or f"w_t init {o.get('weights_init')}"
            return (f"MTL-LoRA τ = {o.get('tau', 0.5):g}, n = {o.get('num_up', 3)}, {init}"
                    + (", no Λ_t" if o.get("task_lambda") is False else ""))
        return ""

    def input_sizes(self, record: dict) -> str:
        """" (384, 1536)": the adapted modules' input sizes from the model's config, or ""."""
        a, s = self.flags(record), record["metrics"].get("settings") or {}
        try:
            cfg = read_config(Path(a.model) if a and a.model else minilm_dir())
        except (OSError, ValueError, AttributeError):
            return ""
        dims = [cfg.get("hidden_size") or cfg.get("d_model")]
        if "ffn" in str(s.get("targets", "")):
            dims.append(cfg.get("intermediate_size") or cfg.get("d_ff"))
        return f" ({', '.join(str(d) for d in dims if d)})" if any(dims) else ""

    # ------------------------------------------------------------------ the line
    def line(self, paper: str, sides: list[tuple[str, list[dict]]], at_constant: dict[str, set[str]]) -> str:
        """One line: how the claim's cells (sides: (variant, cells)) ran, beside its paper's protocol."""
        sides = [(v, cells) for v, cells in sides if cells]
        if not sides:
            return "Protocol: no result file of these runs"
        if not any(c["metrics"].get("settings") for _, cells in sides for c in cells):
            return "Protocol: not recorded (no settings in these result files)"
        each = [(v, self.side(cells)) for v, cells in sides]
        ref = PAPER_PROTOCOL.get(paper, {})

        def field(key: str, against: str | None = None) -> str:
            vals = [(v, d.get(key, "")) for v, d in each if d.get(key)]
            if not vals:
                return ""
            text = (vals[0][1] if len({x for _, x in vals}) == 1 else
                    "; ".join(f"`{v}`: {x}" for v, x in vals))
            return text + (f" (the paper: {against})" if against else "")

        batches = field("batches")
        if paper == "more" and batches:
            batches += (" (MoRE's Eq. 8 assumes single-task ones)" if "mixed" in batches else
                        " (as MoRE's Eq. 8 assumes)")
        backbone = field("backbone")
        parts = [f"{backbone}, not {ref['backbone']}" if ref else backbone, batches]
        parts.append(field("options", {"more": f"h = {ref.get('h')}, τ = {ref.get('tau')}",
                                       "mtl-lora": f"τ = {ref.get('tau')}, n = {ref.get('n')}"}.get(paper)))
        alone = any(d.get("budget", "").startswith("each task alone") for _, d in each)
        parts += [field("budget", ref.get("budget_st" if alone else "budget")), field("epochs")]
        order = {t: i for i, t in enumerate(TASK_NAMES)}
        low = sorted({t for v, _ in sides for t in at_constant.get(v, set()) if t != "mnli_mm"},
                     key=lambda t: (order.get(t, len(order)), t))

        def who(t: str) -> str:
            under = [v for v, _ in sides if t in at_constant.get(v, set())]
            return "both" if len(under) == len(sides) > 1 else ", ".join(f"`{v}`" for v in under)
        if low:
            parts.append("at or below the best constant: " + ", ".join(f"{TASK_NAMES.get(t, t)} ({who(t)})"
                                                                       for t in low))
        marked = [f"`{v}` " + ", ".join(f"s{c['seed']}" for c in cells if dirty(c))
                  for v, cells in sides if any(dirty(c) for c in cells)]
        if marked:
            parts.append("dirty tree ‡: " + ", ".join(marked))
        return "Protocol: " + "; ".join(p for p in parts if p)

    def cells_of_run(self, run: str) -> list[dict]:
        """The result records whose train.py --out is `run` (an analysis' run directory)."""
        return [r for r in self.records if (a := self.flags(r)) is not None and a.out == run]
