"""What each adapter method costs, measured side by side (the timing harness behind bench.py).

Every method trains on the same backbone, batch and sequence length, one training step =
forward + loss (+ the adapters' auxiliary losses, losses.total_loss) + backward + AdamW step
on the trainable tensors, on a mixed-task batch (task_ids cycle over num_tasks). Two
reference points:
- "floor": the frozen base with no adapter, made to run its backward by adding a trainable
  scalar (initialised 0) to the input embeddings' output, so the gradient flows back through
  every activation of every layer. That is the work no adapter method can avoid; the AdamW
  step on one scalar costs nothing.
- "lora": the ratio the papers report training time against.
All models share the one copy of the frozen base weights (deepcopy with a memo), so a 7B
base is held once. Methods are timed round-robin (each repeat runs every method once, in a
rotated order), so drift in the machine's load falls on all of them alike; a method's ratio
is the median of the per-repeat ratios (paired samples), with their quartiles.

Peak memory runs each method in a fresh subprocess: on CPU the peak resident set size
(VmHWM, reset through /proc/self/clear_refs just before the first step; getrusage's maxrss
where that reset is not allowed) minus the resident size before it; on CUDA
torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus memory_allocated.
The memory subprocesses keep the system allocator; the timing process may call
machine.keep_freed_memory() first (bench.py does on CPU), which its docstring explains.

    settings.py   BenchConfig, the methods as the papers run them, our targets
    machine.py    what the run ran on; keep_freed_memory
    models.py     the batch, the loss, the floor and each method's model on the shared base, one step
    timing.py     round-robin timing, paired ratios, training and inference tables, the floor's MFU
    memory.py     peak memory per method, each in its own subprocess
    peer.py       the same LoRA step in transformers + peft, where both are importable
    report.py     a run's Markdown tables and figure, from its JSON alone (bench.py --report)

Shapes: B batch, T tokens, C hidden, V vocabulary.
"""
