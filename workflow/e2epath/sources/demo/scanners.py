"""The demo's scanners: what each cohort's lab and scanner decide — stain colours, pyramid layouts,
JPEG quality, and the cohort's random streams.

The demo cohort's scanner (``DEMO_SCANNER``) writes Aperio-SVS-like slides with levels 1/4/16 and
generic TIFFs with levels 1/2/4/8, JPEG quality 90. The external cohort's, "another scanner"
(``EXTERNAL_SCANNER``), shows another H&E (hematoxylin bluer and darker, eosin paler and pinker, a
cooler background), writes Aperio-SVS-like slides with levels 1/2/8 and generic TIFFs with levels
1/3/9, JPEG quality 80. Its random streams are its own, so the external cohort shares no slide with
the demo cohort even at the same seed.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BACKGROUND = 242.0
EOSIN = np.array([234.0, 158.0, 196.0])  # stroma
HEMATOXYLIN = np.array([92.0, 58.0, 148.0])  # ordinary nuclei
TUMOUR_CYTOPLASM = np.array([196.0, 148.0, 214.0])  # lavender
TUMOUR_NUCLEI = np.array([48.0, 18.0, 92.0])  # very dark purple


@dataclass(frozen=True, eq=False)
class Stain:
    """The colours (RGB, 0–255) one lab's H&E shows through one scanner's optics."""

    background: np.ndarray  # glass
    eosin: np.ndarray  # stroma
    hematoxylin: np.ndarray  # ordinary nuclei
    tumour_cytoplasm: np.ndarray  # under the signal's nuclei
    tumour_nuclei: np.ndarray  # the signal's crowded large nuclei


DEMO_STAIN = Stain(np.full(3, BACKGROUND), EOSIN, HEMATOXYLIN, TUMOUR_CYTOPLASM, TUMOUR_NUCLEI)
# Another lab and scanner: hematoxylin bluer and darker, eosin paler and pinker, cooler glass; the
# signal stays what it is (crowded, large, dark blue-purple nuclei on lavender), only shifted.
EXTERNAL_STAIN = Stain(
    background=np.array([238.0, 239.0, 244.0]),
    eosin=np.array([244.0, 172.0, 190.0]),
    hematoxylin=np.array([62.0, 54.0, 156.0]),
    tumour_cytoplasm=np.array([186.0, 150.0, 222.0]),
    tumour_nuclei=np.array([30.0, 20.0, 96.0]),
)


@dataclass(frozen=True)
class Scanner:
    """What a cohort's scanner decides: stain colours, pyramid layouts, JPEG quality.

    ``stream`` offsets the cohort's random streams (0: the demo cohort's), so two cohorts with
    the same seed still get different cases, labels and pixels.
    """

    name: str
    stain: Stain
    svs_downsamples: tuple[int, ...]
    tiff_downsamples: tuple[int, ...]
    jpeg_quality: int
    stream: int


DEMO_SCANNER = Scanner("demo", DEMO_STAIN, (1, 4, 16), (1, 2, 4, 8), 90, 0)
EXTERNAL_SCANNER = Scanner("external", EXTERNAL_STAIN, (1, 2, 8), (1, 3, 9), 80, 10)
SCANNERS = {s.name: s for s in (DEMO_SCANNER, EXTERNAL_SCANNER)}
