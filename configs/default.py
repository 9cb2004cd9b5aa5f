"""Default config: a small MQA+CLA2 model that trains on a laptop CPU in minutes.

Every other config starts from this one. Load with `--config=configs/default.py` and override any
field on the command line, e.g. `--config.model.num_layers=8 --config.train.steps=50`.
"""

import dataclasses

import ml_collections

from cla_jax import model as model_lib


def get_config() -> ml_collections.ConfigDict:
  """The default, locked so that a mistyped override fails loudly."""
  config = ml_collections.ConfigDict()
  config.name = "default"

  # Model fields, their defaults and what each means live in one place: cla_jax.model.ModelConfig.
  config.model = ml_collections.ConfigDict(dataclasses.asdict(model_lib.ModelConfig()))

  config.data = data = ml_collections.ConfigDict()
  data.source = "python_docs"  # python_docs (embedded default: Debian's python3.11-doc reST) | tfds | text
  data.tfds_name = ""  # for source=tfds, e.g. "lm1b", "c4/en", "wiki40b/en" (prepared as array_record)
  data.train_split = "train"  # split names; TFDS slicing like "train[:10%]" works for source=tfds
  data.eval_split = "validation"
  data.text_key = "text"  # feature (tfds) or field (.jsonl) holding the text
  data.text_glob = ""  # for source=text: a glob of .txt (one document each) / .jsonl (one per line) files
  data.eval_fraction = 0.05  # source=text: share of documents held out for validation (fixed, by name hash)
  data.data_dir = "~/.cache/cla_jax"  # TFDS data dir and default cache dir (a gs:// path works for TFDS on pods)
  data.cache_dir = ""  # tokenizers and auto-prepared splits; "" = data_dir (~/.cache/cla_jax if remote)
  data.max_cache_tokens = 0  # cap on tokens prepared per split (0: whole split); bounds disk/time for big TFDS sets
  data.prepared_dir = ""  # `python -m cla_jax.cli.prepare --output` dir (or gs://); "": prepare in cache_dir
  data.tokenizer = (
      "sentencepiece"  # sentencepiece (trained on the train split) | path to .model | path to tokenizer.json
  )
  data.tokenizer_train_chars = 3_000_000  # characters of the train split sentencepiece trains on (0: all)
  data.pad_vocab = False  # True: set model.vocab_size to the tokenizer's, rounded up to a multiple of 128
  data.packing = False  # True: segment ids and positions keep attention inside each document
  data.seed = 0  # shuffling seed (data order is a pure function of seed and step)
  data.prefetch = 2  # batches read ahead of the step (background thread)

  config.train = train = ml_collections.ConfigDict()
  train.steps = 300
  train.batch_size = 16  # global batch, in sequences
  train.seq_len = 128  # tokens per sequence
  train.grad_accum_steps = 1  # micro-batches per step (batch_size must divide by it)
  train.lr = 3e-3  # peak learning rate
  train.warmup_frac = 0.05  # linear warmup over this share of steps (paper: 5%)
  train.min_lr_ratio = 0.1  # cosine decays to this share of the peak (paper: 10%)
  train.b1 = 0.9
  train.b2 = 0.95
  train.weight_decay = 0.1  # not applied to norms
  train.clip_norm = 1.0  # global-norm gradient clipping
  train.seed = 0  # parameter init seed
  train.log_every = 10
  train.eval_every = 100  # validation loss every N steps (0: never)
  train.eval_batches = 4  # batches per periodic validation
  # Divergence guard (docs/training.md): a NaN/inf loss or gradient always stops the run before saving;
  # with divergence_check, so do a loss spike, a gradient norm above a bound and a dead model (zero
  # gradients, loss at ln(vocab_size)). The newest checkpoint whose next step passed is never rotated away.
  train.divergence_check = True
  train.divergence_spike_factor = 5.0  # spike: loss above this x its running median (0: off)
  train.divergence_window = 50  # steps in that running median
  train.divergence_max_grad_norm = 0.0  # stop when the (pre-clip) gradient norm exceeds this (0: no bound)
  # Distillation (uptraining a converted model, docs/convert_hf.md): the loss becomes (1 - w) * LM loss +
  # w * T^2 * KL(teacher || student) at temperature T. The teacher (same tokenizer) is never trained or saved.
  train.teacher = ""  # a workdir or Hugging Face model dir ("": no distillation)
  train.distill_weight = 0.5  # w in [0, 1]: the KL's share of the loss
  train.distill_temperature = 1.0  # T > 0: softens both distributions (1: as predicted)
  train.peak_flops_per_device = 0.0  # MFU denominator; 0: bf16 table per device kind (TPU/GPU), measured on CPU

  config.checkpoint = ckpt = ml_collections.ConfigDict()
  ckpt.every_steps = 100
  ckpt.keep = 3  # keep the newest N checkpoints
  ckpt.async_save = True

  config.eval = ev = ml_collections.ConfigDict()
  ev.batch_size = 8  # sequences per eval batch
  ev.max_tokens = 262144  # validation tokens scored by eval.py

  config.mesh = mesh = ml_collections.ConfigDict()
  mesh.data = -1  # -1: all devices not used by the other axes
  mesh.fsdp = 1
  mesh.tensor = 1
  mesh.num_devices = -1  # -1: all devices; N: only the first N (single-process debugging and tests)

  config.lock()
  return config
