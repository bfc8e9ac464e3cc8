"""How the document names the tasks, and which of the bench's methods a variant is."""

TASK_NAMES = {"cola": "CoLA", "sst2": "SST-2", "mrpc": "MRPC", "stsb": "STS-B", "qqp": "QQP", "mnli": "MNLI",
              "qnli": "QNLI", "rte": "RTE", "cb": "CB", "superglue_boolq": "BoolQ"}
# The bench's method name of a variant, for its step time relative to LoRA (same model and batch).
# A grid's "tables" name a suffix that their variants add to these names (e.g. "more-lr5e-4").
BENCH_NAME = {"lora-st": "lora", "lora-mt": "lora", "dora": "dora", "multilora": "multilora", "moelora": "moelora",
              "mixlora": "mixlora", "mtl-lora": "mtl-lora", "more": "more", "more-official": "more", "poly": "poly",
              "hydralora": "hydralora", "moslora": "moslora"}
