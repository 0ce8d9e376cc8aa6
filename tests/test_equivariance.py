"""View geometry of the ET loss: flips, crops, mosaics and the patch-level target mapping."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import tensorflow as tf

from vitpcm.errors import ConfigError
from vitpcm.model.equivariance import (
    CROP_CELLS,
    CROP_FLAG,
    CROP_X,
    CROP_Y,
    FLIP_LR,
    FLIP_UD,
    TRANSPOSE,
    apply_flips,
    invert_flips,
    make_second_view,
    map_target,
    sample_view_params,
    split_mosaic,
    tile_mosaic,
    view_params,
)

ALL_FLIPS = list(itertools.product([False, True], repeat=3))  # (flip_lr, flip_ud, transpose)


def numpy_flips(x: np.ndarray, flip_lr: bool, flip_ud: bool, transpose: bool) -> np.ndarray:
    """The documented order, written independently: transpose, then left-right, then up-down."""
    if transpose:
        x = np.swapaxes(x, 0, 1)
    if flip_lr:
        x = x[:, ::-1]
    if flip_ud:
        x = x[::-1]
    return x


def numbered_grid(grid: int) -> np.ndarray:
    """(G, G, 1) grid whose cell (r, c) holds r * G + c, so any misplacement shows."""
    return np.arange(grid * grid, dtype=np.float32).reshape(grid, grid, 1)


def cells_to_pixels(grid: np.ndarray, patch: int) -> np.ndarray:
    """Image whose every patch is filled with its cell's value."""
    return np.repeat(np.repeat(grid, patch, axis=0), patch, axis=1)


def patch_means(image: np.ndarray, patch: int) -> np.ndarray:
    """(..., H, W, C) image -> (..., H/p, W/p, C) mean of every patch."""
    *lead, height, width, channels = image.shape
    blocks = image.reshape(*lead, height // patch, patch, width // patch, patch, channels)
    return blocks.mean(axis=(-4, -2))


@pytest.mark.parametrize(("flip_lr", "flip_ud", "transpose"), ALL_FLIPS)
def test_apply_flips_matches_documented_order_and_inverts(flip_lr, flip_ud, transpose):
    image = np.random.default_rng(0).random((5, 5, 2)).astype(np.float32)
    params = view_params(flip_lr, flip_ud, transpose)
    flipped = apply_flips(tf.constant(image), params).numpy()
    np.testing.assert_array_equal(flipped, numpy_flips(image, flip_lr, flip_ud, transpose))
    np.testing.assert_array_equal(invert_flips(tf.constant(flipped), params).numpy(), image)


def test_single_apply_flips_transposes_non_square_images():
    image = tf.reshape(tf.range(6.0), (2, 3, 1))
    params = view_params(flip_lr=True, transpose=True)
    flipped = apply_flips(image, params)
    assert flipped.shape == (3, 2, 1)
    np.testing.assert_array_equal(flipped.numpy(), numpy_flips(image.numpy(), True, False, True))
    np.testing.assert_array_equal(invert_flips(flipped, params).numpy(), image.numpy())


def test_batched_flips_use_each_images_own_params():
    images = np.random.default_rng(1).random((8, 4, 4, 3)).astype(np.float32)
    params = tf.stack([view_params(*flags) for flags in ALL_FLIPS])
    flipped = apply_flips(tf.constant(images), params).numpy()
    for i, flags in enumerate(ALL_FLIPS):
        np.testing.assert_array_equal(flipped[i], numpy_flips(images[i], *flags))
    np.testing.assert_array_equal(invert_flips(tf.constant(flipped), params).numpy(), images)


def test_batched_flips_refuse_non_square_images():
    with pytest.raises(ValueError, match="square"):
        apply_flips(tf.zeros((2, 3, 4, 1)), tf.zeros((2, 7)))


def test_flips_work_inside_tf_data_and_tf_function():
    image = tf.reshape(tf.range(16.0), (4, 4, 1))
    params = tf.stack([view_params(*flags) for flags in ALL_FLIPS])
    dataset = tf.data.Dataset.from_tensor_slices(params).map(lambda p: apply_flips(image, p))
    from_data = np.stack(list(dataset.as_numpy_iterator()))
    batched = tf.function(apply_flips)(tf.repeat(image[None], 8, axis=0), params).numpy()
    for i, flags in enumerate(ALL_FLIPS):
        expected = numpy_flips(image.numpy(), *flags)
        np.testing.assert_array_equal(from_data[i], expected)
        np.testing.assert_array_equal(batched[i], expected)


def test_sample_view_params_are_patch_aligned_inside_the_grid_and_reproducible():
    grid, cells, crop_prob = 6, 4, 0.5

    def sample(i):
        return sample_view_params(tf.stack([i, 7]), grid, cells, crop_prob)

    params = np.stack(list(tf.data.Dataset.range(400).map(sample).as_numpy_iterator()))
    assert params.shape == (400, 7)
    assert params.dtype == np.float32
    for index in (FLIP_LR, FLIP_UD, TRANSPOSE, CROP_FLAG):
        assert set(np.unique(params[:, index])) == {0.0, 1.0}
        assert 0.35 < params[:, index].mean() < 0.65
    cropped = params[params[:, CROP_FLAG] == 1]
    uncropped = params[params[:, CROP_FLAG] == 0]
    for index in (CROP_Y, CROP_X):
        positions = cropped[:, index]
        np.testing.assert_array_equal(positions, np.round(positions))
        # Every top-left cell that keeps the box inside the grid is drawn, and no other.
        assert set(positions) == set(range(grid - cells + 1))
    assert np.all(cropped[:, CROP_CELLS] == cells)
    np.testing.assert_array_equal(uncropped[:, CROP_Y:], np.tile([0, 0, grid], (len(uncropped), 1)))
    again = sample_view_params(tf.constant([3, 7], tf.int64), grid, cells, crop_prob)
    np.testing.assert_array_equal(again.numpy(), params[3])


def test_sample_view_params_respects_switches():
    seeds = [tf.constant([i, 1]) for i in range(50)]
    main = np.stack([sample_view_params(s, 24, 8, 0.0).numpy() for s in seeds])
    assert not main[:, CROP_FLAG].any()
    fixed = np.stack(
        [sample_view_params(s, 24, 8, 1.0, allow_flip=False, allow_transpose=False) for s in seeds]
    )
    assert not fixed[:, [FLIP_LR, FLIP_UD, TRANSPOSE]].any()
    assert fixed[:, CROP_FLAG].all()
    assert np.all(fixed[:, CROP_Y] + fixed[:, CROP_CELLS] <= 24)


def test_sample_view_params_rejects_a_crop_larger_than_the_grid():
    with pytest.raises(ConfigError, match="crop_size"):
        sample_view_params(tf.constant([0, 0]), 4, 5, 0.5)


def _pairs(crop: tuple[int, int, int] | None, grid: int) -> tuple[tf.Tensor, tf.Tensor, list]:
    """Every (view-1 flips) x (view-2 flips) pair, with the given view-2 crop."""
    combos = list(itertools.product(ALL_FLIPS, ALL_FLIPS))
    params1 = tf.stack([view_params(*f1, grid=grid) for f1, _ in combos])
    params2 = tf.stack([view_params(*f2, crop=crop, grid=grid) for _, f2 in combos])
    return params1, params2, combos


@pytest.mark.parametrize("crop", [None, (1, 2, 3)], ids=["full", "crop"])
def test_map_target_equals_the_second_views_patch_grid_exactly(crop):
    """Resize-free cases: crop_cells == out_grid (or no crop and out_grid == G)."""
    grid, patch = 6, 2
    out_grid = grid if crop is None else crop[2]
    canonical_grid = numbered_grid(grid)
    canonical_image = tf.constant(cells_to_pixels(canonical_grid, patch))
    params1, params2, combos = _pairs(crop, grid)

    view1_grids = apply_flips(tf.repeat(canonical_grid[None], len(combos), axis=0), params1)
    mapped = map_target(view1_grids, params1, params2, out_grid).numpy()
    assert mapped.shape == (len(combos), out_grid, out_grid, 1)
    for i in range(len(combos)):
        view2 = make_second_view(canonical_image, params2[i], patch, out_grid * patch).numpy()
        np.testing.assert_array_equal(mapped[i], patch_means(view2, patch))
        # The view-1 input really differed per pair: the mapping undid it.
        np.testing.assert_array_equal(
            view1_grids[i].numpy(), numpy_flips(canonical_grid, *combos[i][0])
        )


def _reference_target(canonical: np.ndarray, crop, out_grid: int, flags) -> np.ndarray:
    """Slice + tf.image.resize + flips, one image at a time."""
    if crop is not None:
        top, left, cells = crop
        canonical = canonical[top : top + cells, left : left + cells]
    resized = tf.image.resize(canonical, (out_grid, out_grid), method="bilinear").numpy()
    return numpy_flips(resized, *flags)


@pytest.mark.parametrize(
    ("crop", "out_grid"),
    [(None, 4), ((2, 3, 4), 6), ((0, 5, 3), 5), ((1, 0, 7), 3)],
    ids=["halve", "enlarge", "enlarge-odd", "shrink-odd"],
)
def test_map_target_resizes_like_tf_image_resize(crop, out_grid):
    grid = 8
    canonical = np.random.default_rng(2).random((grid, grid, 3)).astype(np.float32)
    params1, params2, combos = _pairs(crop, grid)
    view1 = apply_flips(tf.repeat(canonical[None], len(combos), axis=0), params1)
    mapped = map_target(view1, params1, params2, out_grid).numpy()
    for i, (_, flags2) in enumerate(combos):
        expected = _reference_target(canonical, crop, out_grid, flags2)
        np.testing.assert_allclose(mapped[i], expected, atol=1e-6)


@pytest.mark.parametrize(
    ("crop", "out_grid"), [(None, 4), ((2, 3, 4), 6)], ids=["halve", "enlarge"]
)
def test_map_target_agrees_with_the_resized_second_view(crop, out_grid):
    """With a resize, image-level and patch-level resampling agree up to interpolation error.

    On a linear ramp both are exact away from the crop border (where edge clamping differs
    between pixels and cells); halving is exact everywhere (a 2x2 average at both levels).
    """
    grid, patch = 8, 4
    ys, xs = np.meshgrid(np.arange(grid * patch), np.arange(grid * patch), indexing="ij")
    ramp = (3.0 * ys + xs).astype(np.float32)[..., None]
    canonical_grid = patch_means(ramp, patch)
    params1, params2, combos = _pairs(crop, grid)
    view1 = apply_flips(tf.repeat(canonical_grid[None], len(combos), axis=0), params1)
    mapped = map_target(view1, params1, params2, out_grid).numpy()
    for i, (_, flags2) in enumerate(combos):
        view2 = make_second_view(tf.constant(ramp), params2[i], patch, out_grid * patch).numpy()
        expected = patch_means(view2, patch)
        interior = numpy_flips(np.pad(np.ones((out_grid - 2, out_grid - 2)), 1), *flags2) > 0
        if crop is None:
            interior[:] = True
        np.testing.assert_allclose(mapped[i][interior], expected[interior], atol=1e-3)
        # Border cells differ by under a quarter of the ramp's step between cells (3 * patch).
        np.testing.assert_allclose(mapped[i], expected, atol=0.25 * 3.0 * patch)


def test_views_and_targets_agree_through_a_tf_data_pipeline():
    """The reader's path: stateless params and views inside tf.data, targets in the loss."""
    grid, patch, cells = 6, 2, 3
    canonical_grid = numbered_grid(grid)
    image = tf.constant(cells_to_pixels(canonical_grid, patch))

    def make(i):
        params1 = sample_view_params(tf.stack([i, 0]), grid, cells, 0.0)
        params2 = sample_view_params(tf.stack([i, 1]), grid, cells, 1.0)
        view1 = apply_flips(image, params1)
        view2 = make_second_view(image, params2, patch, cells * patch)
        return view1, view2, params1, params2

    dataset = tf.data.Dataset.range(16).map(make).batch(16)
    view1, view2, params1, params2 = next(iter(dataset))
    assert view2.shape == (16, cells * patch, cells * patch, 1)
    view1_grid = patch_means(view1.numpy(), patch)
    mapped = map_target(tf.constant(view1_grid), params1, params2, cells).numpy()
    np.testing.assert_array_equal(mapped, patch_means(view2.numpy(), patch))
    assert len({tuple(p) for p in params2.numpy()}) > 4  # really random views


def test_make_second_view_crops_whole_patches_and_resizes():
    grid, patch = 4, 3
    image = tf.constant(cells_to_pixels(numbered_grid(grid), patch))
    view = make_second_view(image, view_params(crop=(1, 2, 2)), patch, 12)
    assert view.shape == (12, 12, 1)
    assert view.dtype == tf.float32
    # Cells (1, 2), (1, 3), (2, 2), (2, 3) = 6, 7, 10, 11, each now 6x6 pixels (bilinear blends
    # only inside a one-pixel seam between them).
    view = view.numpy()[..., 0]
    assert view[0, 0] == 6 and view[0, 11] == 7 and view[11, 0] == 10 and view[11, 11] == 11
    full = make_second_view(image, view_params(transpose=True, grid=grid), patch, 6).numpy()
    np.testing.assert_allclose(patch_means(full, 3)[..., 0], [[2.5, 10.5], [4.5, 12.5]])


def test_tile_mosaic_places_views_in_reading_order_and_split_inverts_it():
    views = tf.constant(np.arange(8 * 2 * 2 * 3, dtype=np.float32).reshape(8, 2, 2, 3))
    mosaic = tile_mosaic(views)
    assert mosaic.shape == (2, 4, 4, 3)
    m = mosaic.numpy()
    for i in range(2):
        np.testing.assert_array_equal(m[i, :2, :2], views[4 * i])
        np.testing.assert_array_equal(m[i, :2, 2:], views[4 * i + 1])
        np.testing.assert_array_equal(m[i, 2:, :2], views[4 * i + 2])
        np.testing.assert_array_equal(m[i, 2:, 2:], views[4 * i + 3])
    np.testing.assert_array_equal(split_mosaic(mosaic).numpy(), views.numpy())
    grids = tf.random.uniform((3, 6, 6, 5))
    np.testing.assert_array_equal(tile_mosaic(split_mosaic(grids)).numpy(), grids.numpy())


def test_split_mosaic_of_a_patch_grid_returns_each_views_patch_grid():
    """Tiling images then pooling patches == pooling each view: the split finds every view."""
    patch = 2
    views = np.random.default_rng(3).random((8, 6, 6, 1)).astype(np.float32)
    mosaic = tile_mosaic(tf.constant(views)).numpy()
    mosaic_grid = patch_means(mosaic, patch)
    np.testing.assert_allclose(
        split_mosaic(tf.constant(mosaic_grid)).numpy(), patch_means(views, patch), atol=1e-6
    )


def test_mosaic_needs_a_batch_multiple_of_four():
    with pytest.raises(ConfigError, match="multiple of 4"):
        tile_mosaic(tf.zeros((6, 2, 2, 3)))
    traced = tf.function(tile_mosaic, input_signature=[tf.TensorSpec([None, 2, 2, 3])])
    assert traced(tf.zeros((4, 2, 2, 3))).shape == (1, 4, 4, 3)
    with pytest.raises(tf.errors.InvalidArgumentError, match="multiple of 4"):
        traced(tf.zeros((6, 2, 2, 3)))
    with pytest.raises(ValueError, match="even"):
        split_mosaic(tf.zeros((1, 5, 5, 2)))
