"""The one crop-and-flip: zero padding as the references, known crops, every classifier uses it."""

from __future__ import annotations

import numpy as np

from pipeline import augment, loader, teacher


def test_corner_crop_shows_the_zero_padding():
    images = np.full((1, 32, 32, 3), 255, dtype=np.uint8)
    out = augment.crop_flip(images, np.array([[0, 0, 0]]))
    assert (out[0, :4] == 0).all() and (out[0, :, :4] == 0).all()        # zeros, not reflected pixels
    assert (out[0, 4:, 4:] == 255).all()


def test_centre_crop_is_the_image_and_flip_mirrors_it():
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    out = augment.crop_flip(images, np.array([[4, 4, 0], [4, 4, 1]]))
    assert np.array_equal(out[0], images[0]) and np.array_equal(out[1], images[1][:, ::-1])


def test_params_cover_every_offset_and_both_flips():
    params = augment.crop_flip_params(np.random.default_rng(0), 4000)
    assert set(params[:, 0]) == set(params[:, 1]) == set(range(9)) and set(params[:, 2]) == {0, 1}


def test_teacher_and_robust_training_share_it():
    assert teacher.random_crop_flip is augment.random_crop_flip
    assert loader.augment is augment and not hasattr(loader, "crop_flip_params")
