#!/usr/bin/env python3
"""DullRazor-style OpenCV hair removal on an exported derm hair benchmark folder.

Reads every <id>_painted.png and <id>_orig.png written by `derm hair eval --export DIR`, and
writes into OUT, for each id: <id>_mask.png and <id>_clean.png (of the painted image) and
<id>_free_mask.png (of the unpainted hair-free original). Score them with
`derm hair eval --export DIR --score OUT` so both methods are measured by the same code.

The method (sizes at a short side of 256 px, scaled with the image): grey image, morphological
black-hat with a 17 x 17 cross kernel, threshold 10, dilation by a 3 x 3 ellipse, cv2.inpaint
TELEA with radius 3.

Usage: hair_opencv.py DIR OUT
"""
import os
import sys
import time

import cv2
import numpy as np


def hair_mask(bgr):
    s = min(bgr.shape[:2]) / 256.0
    grey = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    k = max(3, int(round(17 * s)) | 1)
    kernel = cv2.getStructuringElement(cv2.MORPH_CROSS, (k, k))
    bh = cv2.morphologyEx(grey, cv2.MORPH_BLACKHAT, kernel)
    _, mask = cv2.threshold(bh, 10, 255, cv2.THRESH_BINARY)
    d = max(3, int(round(3 * s)) | 1)
    return cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (d, d)))


def main():
    src, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    ids = sorted(f[: -len("_painted.png")] for f in os.listdir(src) if f.endswith("_painted.png"))
    secs = 0.0
    for i in ids:
        painted = cv2.imread(os.path.join(src, i + "_painted.png"), cv2.IMREAD_COLOR)
        orig = cv2.imread(os.path.join(src, i + "_orig.png"), cv2.IMREAD_COLOR)
        t0 = time.perf_counter()
        mask = hair_mask(painted)
        r = max(1, round(3 * min(painted.shape[:2]) / 256.0))
        clean = cv2.inpaint(painted, mask, r, cv2.INPAINT_TELEA)
        secs += time.perf_counter() - t0
        cv2.imwrite(os.path.join(out, i + "_mask.png"), mask)
        cv2.imwrite(os.path.join(out, i + "_clean.png"), clean)
        cv2.imwrite(os.path.join(out, i + "_free_mask.png"), hair_mask(orig))
    print(f"{len(ids)} images, {secs / max(1, len(ids)):.4f} s per image (mask + inpaint)")


if __name__ == "__main__":
    main()
