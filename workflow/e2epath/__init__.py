"""e2epath: from raw whole-slide images to end-to-end trained MIL models, honest metrics and figures."""
__version__ = "0.1.0"
