"""Preprocessing: slide QC (``qc``), tissue segmentation (``tissue``), patching + LMDB packing
(``patching``; the store format is `e2epath.store`). Each step module exposes ``cli(argv)`` for a
per-slide job and ``cli_shard(argv)`` for a shard of slides (`e2epath.shards`)."""
