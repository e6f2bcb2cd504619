"""Preprocessing: slide QC (``qc``), tissue segmentation (``tissue``), patching + LMDB packing
(``patching``) and the patch store format (``store``). Each step module exposes ``cli(argv)``."""
