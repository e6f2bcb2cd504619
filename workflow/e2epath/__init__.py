"""e2epath: from raw whole-slide images to end-to-end trained MIL models, honest metrics and figures.

The method is that of W. Tang, R. Qin, H. Fang, F. Zhou, H. Chen, X. Li, M.-M. Cheng, "Revisiting
End-to-End Learning with Slide-level Supervision in Computational Pathology", NeurIPS 2025,
arXiv:2506.02408 ("the paper" in this package; docs/method.md). How the package is organised — the
stages and the order of imports, who owns which piece of knowledge — is docs/architecture.md.
"""
__version__ = "0.1.0"
