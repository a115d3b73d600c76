"""The text of a result card, as Debian's tesseract (``tesseract-ocr``) reads it."""

from __future__ import annotations

import io
import os
import shutil
import subprocess

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image

from dicom_ai.results.card import KEY_IMAGE_BOX
from tests.markers import uses

__all__ = ["card_text"]


def card_text(pixels: npt.NDArray[np.uint8], *, blank_key_image: bool = True) -> list[str]:
    """The card's text as tesseract reads it: lower case, one string per line, runs of
    spaces as one.

    Given as black ink on white: the light, colourless text on the dark card and the dark
    text on a coloured band (rows mostly saturated) become ink, colour swatches do not, so
    tesseract need not try each line inverted too (half its time). The key image is
    blanked first: it holds no text but box numbers.
    """
    uses("tesseract", "tesseract")
    tesseract = shutil.which("tesseract")
    if tesseract is None:
        pytest.fail("tesseract (Debian package tesseract-ocr) is not on PATH; ./install.sh")
    rgb = pixels.astype(np.int16)
    luminance = rgb.mean(axis=2)
    chroma = rgb.max(axis=2) - rgb.min(axis=2)
    ink = (luminance > 110) & (chroma < 60)
    band = (chroma > 100).mean(axis=1) > 0.5
    ink[band] = luminance[band] < 90
    if blank_key_image:
        left, top, right, bottom = KEY_IMAGE_BOX
        ink[top:bottom, left:right] = False
    buffer = io.BytesIO()
    Image.fromarray(np.where(ink, 0, 255).astype(np.uint8)).save(buffer, format="PNG")
    completed = subprocess.run(
        [tesseract, "stdin", "stdout", "--psm", "3", "-c", "tessedit_do_invert=0"],
        input=buffer.getvalue(),
        capture_output=True,
        timeout=60,
        check=True,
        # One thread: OpenMP's spinning threads make a small page several times slower
        # on a busy machine.
        env={**os.environ, "OMP_THREAD_LIMIT": "1"},
    )
    text = completed.stdout.decode("utf-8", "replace").lower()
    return [" ".join(line.split()) for line in text.splitlines() if line.strip()]
