"""The paper's 1B design space (Table 1) at its learning-rate grid, for a pod: 20 rows x 7 learning rates.

    python -m cla_jax.cli.sweep --sweep=configs/sweeps/paper_1b.py --workdir=gs://BUCKET/paper_1b --dry_run
    python -m cla_jax.cli.sweep --sweep=configs/sweeps/paper_1b.py --workdir=DIR --only='^H128-MQA(-CLA2)?_'

Each row is `configs/paper_1b.py:<ROW>` (20 layers, d_model 2048, 30B tokens of 2048 x 2048-token batches).
The paper trains the design space at 3e-4 and tunes by stepping the learning rate up x1.5 from 3e-4 until
validation perplexity stops improving (its best: 1.5e-3 for H128-MQA, 2.25e-3 for H128-MQA-CLA2 and H64-MQA);
this grid covers 3e-4 .. 3.375e-3, one step past the largest best. Point `data` at your SlimPajama copy and
tokenizer with --config.data.* overrides (see README "The paper's models, by name").
"""

from cla_jax import paper
from cla_jax.sweep import Run, grid

# x1.5 steps from the design-space 3e-4, rounded where the paper rounds (1e-3, not 1.0125e-3).
LRS = [paper.DESIGN_SPACE_LR, 4.5e-4, 6.75e-4, 1e-3, 1.5e-3, 2.25e-3, 3.375e-3]


def get_runs(seeds: int = 1) -> list[Run]:
  """Every Table 1 row at every learning rate of the grid (one seed: the paper reports single runs)."""
  runs = []
  for row in paper.TABLE1:
    runs += grid(row, f"configs/paper_1b.py:{row}", {}, LRS, seeds)
  return runs
