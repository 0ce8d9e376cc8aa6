"""View geometry of the equivariance (ET) loss: flips, transpose, patch-aligned crops, mosaics.

Every view of an image is described by one float32 vector of length 7 (a *ViewParams*):

    [flip_lr, flip_ud, transpose, crop_flag, crop_y, crop_x, crop_cells]

Flags are 0 or 1. ``crop_y``/``crop_x`` are the crop's top-left corner in patch cells of the
full (canonical) G x G grid and ``crop_cells`` its side in cells; they only matter when
``crop_flag`` is 1 (an uncropped view is encoded as the box (0, 0, G)). A view is made from the
canonical image by cropping, resizing, then :func:`apply_flips` (transpose first, then flip
left-right, then flip up-down). The main view uses the same encoding with ``crop_flag`` = 0.

Everything here is plain TensorFlow (no Python branching on tensor values), so it runs eagerly,
under ``tf.function`` and inside ``tf.data`` map functions. Inverses are direct ops, never
gradient tricks (METHOD.md, "Known flaws").
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf

from vitpcm.errors import ConfigError

# Positions inside a ViewParams vector.
FLIP_LR = 0
FLIP_UD = 1
TRANSPOSE = 2
CROP_FLAG = 3
CROP_Y = 4
CROP_X = 5
CROP_CELLS = 6

# A ViewParams is just a float32 tensor, (7,) for one image or (B, 7) for a batch.
ViewParams = tf.Tensor


def view_params(
    flip_lr: bool = False,
    flip_ud: bool = False,
    transpose: bool = False,
    crop: tuple[int, int, int] | None = None,
    grid: int = 0,
) -> tf.Tensor:
    """Builds one ViewParams vector from Python values (tests, evaluation, fixed views).

    Args:
        flip_lr: Flip left-right.
        flip_ud: Flip up-down.
        transpose: Swap rows and columns (applied before the flips).
        crop: ``(crop_y, crop_x, crop_cells)`` in patch cells of the full grid, or None.
        grid: Side of the full grid in cells, stored as ``crop_cells`` of an uncropped view.

    Returns:
        float32 tensor of shape (7,).
    """
    crop_values = [0.0, 0.0, 0.0, float(grid)] if crop is None else [1.0, *map(float, crop)]
    flags = [float(flip_lr), float(flip_ud), float(transpose)]
    return tf.constant(flags + crop_values, dtype=tf.float32)


def sample_view_params(
    seed: tf.Tensor,
    grid: int | tf.Tensor,
    crop_cells: int | tf.Tensor,
    crop_prob: float | tf.Tensor,
    allow_flip: bool | tf.Tensor = True,
    allow_transpose: bool | tf.Tensor = True,
) -> tf.Tensor:
    """Draws a random view with stateless ops (reproducible per seed, usable in ``tf.data``).

    Each flip and the transpose happen with probability 0.5 when allowed; the crop with
    probability ``crop_prob``, at a patch-aligned position drawn uniformly among those that keep
    the ``crop_cells`` x ``crop_cells`` box inside the grid. Pass ``crop_prob=0`` for the main view.

    Args:
        seed: Stateless seed, int32/int64 tensor of shape (2,).
        grid: Side of the full patch grid G (image size // patch size).
        crop_cells: Side of the crop in cells (crop size // patch size), 1..G.
        crop_prob: Probability of cropping.
        allow_flip: Whether the two flips may happen.
        allow_transpose: Whether the transpose may happen.

    Returns:
        float32 ViewParams of shape (7,).

    Raises:
        ConfigError: ``crop_cells`` is not within 1..``grid`` (checked when both are Python ints).
    """
    if isinstance(grid, int) and isinstance(crop_cells, int) and not 1 <= crop_cells <= grid:
        raise ConfigError(
            f"equivariance crop of {crop_cells} patch cells does not fit the {grid}x{grid} patch "
            "grid: set train.et.crop_size to at most data.image_size (and at least one patch)"
        )
    grid_f = tf.cast(grid, tf.float32)
    cells_f = tf.cast(crop_cells, tf.float32)
    flip_p = tf.where(tf.cast(allow_flip, tf.bool), 0.5, 0.0)
    transpose_p = tf.where(tf.cast(allow_transpose, tf.bool), 0.5, 0.0)

    # One draw of six uniforms: each gets its own decision, and the whole vector is a pure
    # function of the seed.
    u = tf.random.stateless_uniform([6], seed=seed, dtype=tf.float32)
    flip_lr = tf.cast(u[0] < flip_p, tf.float32)
    flip_ud = tf.cast(u[1] < flip_p, tf.float32)
    transpose = tf.cast(u[2] < transpose_p, tf.float32)
    crop_flag = tf.cast(u[3] < tf.cast(crop_prob, tf.float32), tf.float32)

    positions = grid_f - cells_f + 1.0  # valid top-left cells per axis
    crop_y = tf.minimum(tf.floor(u[4] * positions), positions - 1.0) * crop_flag
    crop_x = tf.minimum(tf.floor(u[5] * positions), positions - 1.0) * crop_flag
    side = crop_flag * cells_f + (1.0 - crop_flag) * grid_f
    return tf.stack([flip_lr, flip_ud, transpose, crop_flag, crop_y, crop_x, side])


def _flag(params: tf.Tensor, index: int) -> tf.Tensor:
    return params[..., index] > 0.5


def _single_flips(x: tf.Tensor, params: tf.Tensor, inverse: bool) -> tf.Tensor:
    # tf.cond rather than tf.where so that non-square images can be transposed too.
    rank = x.shape.rank
    if rank is None or rank < 3:
        raise ValueError(f"apply_flips needs a tensor of shape (..., H, W, C), got {x.shape}")
    perm = [*range(rank - 3), rank - 2, rank - 3, rank - 1]

    def transpose(t: tf.Tensor) -> tf.Tensor:
        return tf.cond(_flag(params, TRANSPOSE), lambda: tf.transpose(t, perm), lambda: t)

    def flip(t: tf.Tensor, index: int, axis: int) -> tf.Tensor:
        return tf.cond(_flag(params, index), lambda: tf.reverse(t, [axis]), lambda: t)

    if inverse:
        return transpose(flip(flip(x, FLIP_UD, -3), FLIP_LR, -2))
    return flip(flip(transpose(x), FLIP_LR, -2), FLIP_UD, -3)


def _batch_flips(x: tf.Tensor, params: tf.Tensor, inverse: bool) -> tf.Tensor:
    # Per-image choices through tf.where: both branches are computed (cheap for these sizes)
    # and the graph has no data-dependent control flow.
    if x.shape.rank != 4:
        raise ValueError(f"batched apply_flips needs (B, H, W, C) images, got {x.shape}")
    height, width = x.shape[1], x.shape[2]
    if height is not None and width is not None and height != width:
        raise ValueError(
            f"batched apply_flips needs square images because a transpose changes the shape, "
            f"got {height}x{width}"
        )

    def select(index: int, changed: tf.Tensor, t: tf.Tensor) -> tf.Tensor:
        return tf.where(_flag(params, index)[:, None, None, None], changed, t)

    def transpose(t: tf.Tensor) -> tf.Tensor:
        return select(TRANSPOSE, tf.transpose(t, [0, 2, 1, 3]), t)

    def flip_lr(t: tf.Tensor) -> tf.Tensor:
        return select(FLIP_LR, tf.reverse(t, [2]), t)

    def flip_ud(t: tf.Tensor) -> tf.Tensor:
        return select(FLIP_UD, tf.reverse(t, [1]), t)

    if inverse:
        return transpose(flip_lr(flip_ud(x)))
    return flip_ud(flip_lr(transpose(x)))


def _flips(x: tf.Tensor, params: tf.Tensor, inverse: bool) -> tf.Tensor:
    params = tf.convert_to_tensor(params, dtype=tf.float32)
    if params.shape.rank == 1:
        return _single_flips(x, params, inverse)
    if params.shape.rank == 2:
        return _batch_flips(x, params, inverse)
    raise ValueError(f"view params must have shape (7,) or (B, 7), got {params.shape}")


def apply_flips(x: tf.Tensor, params: tf.Tensor) -> tf.Tensor:
    """Applies a view's transpose, then left-right flip, then up-down flip.

    Args:
        x: One image or grid (..., H, W, C) with params (7,), or a batch (B, H, W, C) with
            per-image params (B, 7) (square H == W in that case).
        params: ViewParams; the crop fields are ignored here.

    Returns:
        The transformed tensor (H and W swapped when transposed).
    """
    return _flips(x, params, inverse=False)


def invert_flips(x: tf.Tensor, params: tf.Tensor) -> tf.Tensor:
    """Undoes :func:`apply_flips` with the same params (up-down, left-right, then transpose)."""
    return _flips(x, params, inverse=True)


def make_second_view(
    canonical_image: tf.Tensor, params: tf.Tensor, patch_size: int, view_size: int
) -> tf.Tensor:
    """Makes a view of an image: patch-aligned crop (if any), bilinear resize, flips.

    Args:
        canonical_image: (H, W, C) image on the canonical grid (H = W = G * patch_size).
        params: ViewParams (7,); the crop box is in patch cells.
        patch_size: Patch side in pixels.
        view_size: Side of the returned view in pixels.

    Returns:
        float32 (view_size, view_size, C).
    """
    image = tf.cast(canonical_image, tf.float32)
    params = tf.convert_to_tensor(params, dtype=tf.float32)
    shape = tf.shape(image)
    crop = _flag(params, CROP_FLAG)
    to_pixels = tf.cast(tf.round(params[CROP_Y:] * patch_size), tf.int32)
    top = tf.where(crop, to_pixels[0], 0)
    left = tf.where(crop, to_pixels[1], 0)
    height = tf.where(crop, to_pixels[2], shape[0])
    width = tf.where(crop, to_pixels[2], shape[1])
    box = tf.slice(image, tf.stack([top, left, 0]), tf.stack([height, width, shape[2]]))
    # Bilinear with half-pixel centres, the same convention map_target uses on the patch grid.
    view = tf.image.resize(box, (view_size, view_size), method="bilinear")
    return apply_flips(view, params)


def tile_mosaic(views: tf.Tensor) -> tf.Tensor:
    """Tiles groups of four views into 2x2 mosaics.

    Views 4i, 4i+1, 4i+2, 4i+3 go top-left, top-right, bottom-left, bottom-right of mosaic i.

    Args:
        views: (B, v, v, C) with B a multiple of 4.

    Returns:
        (B / 4, 2v, 2v, C).
    """
    views = tf.convert_to_tensor(views)
    batch, height, width, channels = _check_batch_of_four(views, "tile_mosaic")
    grouped = tf.reshape(views, tf.stack([batch // 4, 2, 2, height, width, channels]))
    # (mosaic, row, col, y, x, c) -> (mosaic, row, y, col, x, c)
    rows = tf.transpose(grouped, [0, 1, 3, 2, 4, 5])
    mosaic = tf.reshape(rows, tf.stack([batch // 4, 2 * height, 2 * width, channels]))
    return _with_static_shape(mosaic, views, lambda b, h, w: (_div(b, 4), _mul(h, 2), _mul(w, 2)))


def split_mosaic(grids: tf.Tensor) -> tf.Tensor:
    """Splits 2x2 mosaics back into their four parts, the exact inverse of :func:`tile_mosaic`.

    Args:
        grids: (M, 2g, 2g, K) with even sides.

    Returns:
        (4M, g, g, K), mosaic i's quadrants at 4i (top-left) .. 4i+3 (bottom-right).
    """
    grids = tf.convert_to_tensor(grids)
    if grids.shape.rank != 4:
        raise ValueError(f"split_mosaic needs (M, 2g, 2g, K) grids, got {grids.shape}")
    for side in grids.shape[1:3]:
        if side is not None and side % 2:
            raise ValueError(f"split_mosaic needs even grid sides, got {grids.shape}")
    shape = tf.shape(grids)
    count, half_h, half_w, channels = shape[0], shape[1] // 2, shape[2] // 2, shape[3]
    parts = tf.reshape(grids, tf.stack([count, 2, half_h, 2, half_w, channels]))
    parts = tf.transpose(parts, [0, 1, 3, 2, 4, 5])
    views = tf.reshape(parts, tf.stack([4 * count, half_h, half_w, channels]))
    return _with_static_shape(views, grids, lambda b, h, w: (_mul(b, 4), _div(h, 2), _div(w, 2)))


def map_target(
    view1_patch_probs: tf.Tensor, params1: tf.Tensor, params2: tf.Tensor, out_grid: int
) -> tf.Tensor:
    """Maps the main view's patch predictions into the second view's geometry.

    Undoes view 1's flips/transpose (back to the canonical orientation), crops the cells of
    view 2's box, resizes them to ``out_grid`` x ``out_grid`` and applies view 2's flips/transpose,
    mirroring :func:`make_second_view` at the patch level. The resize is bilinear with half-pixel
    centres, like ``tf.image.resize`` on the image: cell centres then land where the image resize
    puts them, so a halving (24 -> 12 cells, the uncropped view) is an exact 2x2 average and an
    enlargement (an 8-cell crop -> 12 cells) interpolates between neighbouring cells. It is done as
    two per-image interpolation matrices so each image can have its own box in one batched op.

    Args:
        view1_patch_probs: (B, G, G, K) patch probabilities of the main views.
        params1: (B, 7) ViewParams of the main views (their crop fields are ignored: the main
            view is the whole image).
        params2: (B, 7) ViewParams of the second views; the crop box must lie inside the grid.
        out_grid: Side g of the second view's patch grid.

    Returns:
        float32 (B, g, g, K).
    """
    probs = tf.cast(view1_patch_probs, tf.float32)
    params1 = tf.convert_to_tensor(params1, dtype=tf.float32)
    params2 = tf.convert_to_tensor(params2, dtype=tf.float32)
    canonical = invert_flips(probs, params1)

    grid = canonical.shape[1] if canonical.shape[1] is not None else tf.shape(canonical)[1]
    grid_f = tf.cast(grid, tf.float32)
    crop = _flag(params2, CROP_FLAG)
    top = tf.where(crop, params2[:, CROP_Y], 0.0)
    left = tf.where(crop, params2[:, CROP_X], 0.0)
    side = tf.where(crop, params2[:, CROP_CELLS], grid_f)
    rows = _interpolation_matrix(top, side, out_grid, grid)  # (B, g, G)
    cols = _interpolation_matrix(left, side, out_grid, grid)  # (B, g, G)
    target = tf.einsum("byi,bijk,bxj->byxk", rows, canonical, cols)
    return apply_flips(target, params2)


def _interpolation_matrix(
    start: tf.Tensor, size: tf.Tensor, out: int | tf.Tensor, full: int | tf.Tensor
) -> tf.Tensor:
    """(B, out, full) weights of a half-pixel bilinear resize of cells [start, start + size).

    Row i holds the weights of output cell i: its centre maps to input coordinate
    ``start + (i + 0.5) * size / out - 0.5``, clamped to the box so edges repeat (as
    ``tf.image.resize`` does on a cropped tensor), split between the two nearest cells.
    """
    index = tf.range(out, dtype=tf.float32)
    start = start[:, None]
    last = start + size[:, None] - 1.0
    coord = start + (index[None, :] + 0.5) * (size[:, None] / tf.cast(out, tf.float32)) - 0.5
    coord = tf.clip_by_value(coord, start, last)
    low = tf.floor(coord)
    weight = (coord - low)[..., None]
    high = tf.minimum(low + 1.0, last)
    return (1.0 - weight) * tf.one_hot(tf.cast(low, tf.int32), full) + weight * tf.one_hot(
        tf.cast(high, tf.int32), full
    )


def _check_batch_of_four(views: tf.Tensor, what: str) -> list[tf.Tensor]:
    if views.shape.rank != 4:
        raise ValueError(f"{what} needs (B, v, v, C) views, got {views.shape}")
    static_batch = views.shape[0]
    if static_batch is not None and static_batch % 4:
        raise ConfigError(
            f"the equivariance mosaic tiles views in groups of 4, but the batch has "
            f"{static_batch} images: set train.batch_size to a multiple of 4"
        )
    shape = tf.shape(views)
    if static_batch is None:
        # Unknown until run time (e.g. a tf.function traced with a None batch).
        with tf.control_dependencies(
            [
                tf.debugging.assert_equal(
                    shape[0] % 4,
                    0,
                    message="the equivariance mosaic needs a batch that is a multiple of 4: "
                    "set train.batch_size to a multiple of 4 and drop the last partial batch",
                )
            ]
        ):
            shape = tf.identity(shape)
    return [shape[0], shape[1], shape[2], shape[3]]


def _mul(value: int | None, factor: int) -> int | None:
    return None if value is None else value * factor


def _div(value: int | None, factor: int) -> int | None:
    return None if value is None else value // factor


def _with_static_shape(
    result: tf.Tensor,
    source: tf.Tensor,
    dims: Callable[[int | None, int | None, int | None], tuple[int | None, ...]],
) -> tf.Tensor:
    # tf.reshape with a computed shape loses static sizes; restore what is known.
    batch, height, width = dims(source.shape[0], source.shape[1], source.shape[2])
    result.set_shape([batch, height, width, source.shape[3]])
    return result
