"""The paper's Figure 1 on a 2-core CPU: MQA vs MQA+CLA2 at equal KV bytes, plus GQA and MHA points.

    python -m cla_jax.cli.sweep --sweep=configs/sweeps/tiny_pareto.py --workdir=runs/tiny_pareto [--seeds=3]
        [--config.train.steps=400]

Every row keeps the query width equal to d_model (heads x d_head = 128, as in the paper's Table 1), so rows
differ only in how keys and values are cached. MQA at d_head 64/32/16 and MQA+CLA2 at d_head 128/64/32 pair
up at equal KV bytes per token (CLA2 halves the KV layers, so it can afford heads twice as large). Each row
trains at each learning rate with several init seeds (same data order) on the embedded Python-docs corpus.

Budget: 8 rows x 2 learning rates x 3 seeds = 48 runs of 100 steps (205k tokens each), about 70 s per run
(training ~45 s + process start, compile and evaluation on 64k validation tokens) on an idle 2-core CPU:
about an hour in all (estimated from FLOPs per token; a loaded shared VM took 5-6 min per run).
More steps or seeds: --config.train.steps=300 --seeds=5 (with a new --workdir).
"""

from cla_jax.sweep import Run, grid

CONFIG = "configs/default.py"
D_MODEL = 128
# The same small model for every row: 4 layers, width 128, SwiGLU 344 (~2.7x), 2k vocabulary.
BASE = {
    "model.num_layers": 4,
    "model.d_model": D_MODEL,
    "model.mlp_dim": 344,
    "train.steps": 100,
    "train.batch_size": 16,
    "train.seq_len": 128,
    "train.eval_every": 0,
    "train.log_every": 20,
    "checkpoint.every_steps": 50,
    "eval.max_tokens": 65536,
    # A fixed MFU denominator: measuring the CPU peak at every run start costs seconds and changes nothing.
    "train.peak_flops_per_device": 1e11,
}
# (row name, d_head, KV heads, pattern); query heads = D_MODEL // d_head.
ROWS = [
    ("H64-MQA", 64, 1, "none"),
    ("H32-MQA", 32, 1, "none"),
    ("H16-MQA", 16, 1, "none"),
    ("H128-MQA-CLA2", 128, 1, "cla2"),
    ("H64-MQA-CLA2", 64, 1, "cla2"),
    ("H32-MQA-CLA2", 32, 1, "cla2"),
    ("H32-GQA2", 32, 2, "none"),
    ("H32-MHA", 32, 4, "none"),
]
# A first pass at 4e-3 / 8e-3 put H64-MQA's best at the low edge (perplexity 251 vs 289 after 100 steps), so
# the grid is 2e-3 / 4e-3.
LRS = [2e-3, 4e-3]


def get_runs(seeds: int = 3) -> list[Run]:
  """Every row at every learning rate, for seeds 0..seeds-1."""
  runs = []
  for name, d_head, kv_heads, pattern in ROWS:
    model = {
        "model.head_dim": d_head,
        "model.num_heads": D_MODEL // d_head,
        "model.num_kv_heads": kv_heads,
        "model.pattern": pattern,
    }
    runs += grid(name, CONFIG, {**BASE, **model}, LRS, seeds)
  # Seed-major order: a sweep cut short still has every row at every learning rate.
  return sorted(runs, key=lambda run: run.seed)
