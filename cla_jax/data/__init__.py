"""The data layer: documents -> tokenizer -> prepared windows (ArrayRecord) -> per-host batches.

Modules, each importing only those above it (no circle):

  splits       split names ('train' / 'validation' -> the configured ones) and the fixed held-out rule
  python_docs  the embedded default corpus, a TFDS builder
  sources      documents of a split from the default corpus, any TFDS dataset, or local .txt / .jsonl files
  reader       the prepared-split format (ArrayRecord shards of windows + index.json) and its reader
  writer       atomic files, window shards and shard sizes: what the prepare step writes with
  tokenizer    sentencepiece (trained on the data and cached) or a Hugging Face tokenizer.json
  prepare      the prepare step (parallel, resumable; `python -m cla_jax.cli.prepare`) and `open_split`
  batches      TrainBatches (step-indexed, per host, prefetched) and eval_batches; reads through `reader` only
"""
