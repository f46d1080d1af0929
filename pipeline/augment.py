"""The one crop-and-flip augmentation of every classifier the pipeline trains (teacher, robust model).

A random 32x32 crop of the image zero-padded by 4 pixels on each side, then a horizontal flip with
probability 1/2: the references' augmentation (deepmind-research adversarial_robustness/jax/datasets.py
L44-L45 and L151-L154, `tf.pad` with zeros then `random_crop`; the PyTorch port's
`transforms.RandomCrop(32, padding=4)`, which pads with zeros too). It works on uint8 NHWC arrays, as
stored in image sets, so it runs in DataLoader workers before anything reaches the device, and its
randomness is an explicit numpy Generator: the same (seed, step) always gives the same crops.
"""

from __future__ import annotations

import numpy as np

PAD = 4   # crop padding in pixels (CIFAR standard)


def crop_flip_params(rng: np.random.Generator, n: int, pad: int = PAD) -> np.ndarray:
    """n x 3 int array (dy, dx, flip) of random crop offsets in [0, 2 * pad] and flips."""
    return np.stack([rng.integers(0, 2 * pad + 1, size=n), rng.integers(0, 2 * pad + 1, size=n),
                     rng.random(n) < 0.5], axis=1).astype(np.int64)


def crop_flip(images: np.ndarray, params: np.ndarray, pad: int = PAD) -> np.ndarray:
    """Crop (zero padding `pad`) and flip each uint8 NHWC image as its row of `params` says."""
    n, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="constant")
    out = np.empty_like(images)
    for i, (dy, dx, flip) in enumerate(params):
        crop = padded[i, dy:dy + h, dx:dx + w]
        out[i] = crop[:, ::-1] if flip else crop
    return out


def random_crop_flip(images: np.ndarray, rng: np.random.Generator, pad: int = PAD) -> np.ndarray:
    """crop_flip with parameters drawn from `rng`."""
    return crop_flip(images, crop_flip_params(rng, len(images), pad), pad)
