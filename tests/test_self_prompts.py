"""Self-Prompt-SAM's automatic prompts (Sec. 2.4, App. A): a box, a distance-transform point and a mask
prompt for every class of the auxiliary masks, the background (class 0) included."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import distance_transform_edt

from samunet.modules.self_prompts import (PROMPT_KINDS, ClassPrompts, encode_class_prompts,
                                          positive_point_tokens, prompts_from_auxiliary_logits)
from samunet.sam_import import sam_modeling


def logits_from_labels(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """(N, H, W) integer label maps -> (N, K, H, W) logits whose argmax is the label map."""
    one_hot = F.one_hot(torch.from_numpy(labels).long(), num_classes).permute(0, 3, 1, 2).float()
    return 10.0 * one_hot + 0.1 * torch.randn(one_hot.shape)


def tiny_prompt_encoder() -> torch.nn.Module:
    torch.manual_seed(0)
    return sam_modeling().PromptEncoder(embed_dim=32, image_embedding_size=(8, 8), input_image_size=(32, 32),
                                        mask_in_chans=4).eval()


def random_prompts(batch: int = 2, num_classes: int = 4) -> ClassPrompts:
    torch.manual_seed(1)
    labels = np.zeros((batch, 32, 32), dtype=np.int64)
    labels[0, 2:10, 3:12] = 1
    labels[0, 15:30, 20:28] = 2
    labels[1, 5:20, 5:9] = 1
    labels[1, 25:31, 1:30] = 3
    return prompts_from_auxiliary_logits(logits_from_labels(labels, num_classes), image_size=32, mask_size=(32, 32))


def test_point_is_the_distance_transform_argmax_inside_an_irregular_mask():
    torch.manual_seed(0)
    labels = np.zeros((1, 16, 16), dtype=np.int64)
    labels[0, 1:14, 1:5] = 1  # vertical bar of an L
    labels[0, 10:14, 1:15] = 1  # horizontal bar: box centre (7.5, 7.5) falls outside the L
    prompts = prompts_from_auxiliary_logits(logits_from_labels(labels, 2), image_size=16, mask_size=(8, 8))
    mask = labels[0] == 1
    distance = distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    row, col = np.unravel_index(np.argmax(distance), mask.shape)
    x, y = prompts.points[0, 1].tolist()
    assert (x, y) == (col, row)
    assert mask[int(y), int(x)]
    x_min, y_min, x_max, y_max = prompts.boxes[0, 1].tolist()
    assert not mask[int((y_min + y_max) / 2), int((x_min + x_max) / 2)]
    assert distance[int(y), int(x)] == distance.max()


def test_image_border_counts_as_boundary_for_the_farthest_point():
    torch.manual_seed(0)
    labels = np.zeros((1, 9, 9), dtype=np.int64)
    labels[0, 2:7, :5] = 1  # 5 x 5 square touching the left border
    prompts = prompts_from_auxiliary_logits(logits_from_labels(labels, 2), image_size=9, mask_size=(4, 4))
    unpadded = distance_transform_edt(labels[0] == 1)
    assert np.unravel_index(np.argmax(unpadded), (9, 9)) == (4, 0)  # scipy alone picks a border pixel
    assert prompts.points[0, 1].tolist() == [2.0, 4.0]  # the square's centre


def scipy_reference_prompts(labels: np.ndarray, num_classes: int, image_size: int) -> tuple[np.ndarray, ...]:
    """samunet's former prompt geometry (SciPy, one class mask at a time on the host): boxes (N, K, 4),
    points (N, K, 2) (x, y) scaled to ``image_size``, present (N, K). The point is the argmax of the
    distance transform of the mask's bounding box padded by one background pixel (numpy's argmax: the
    first maximum in row-major order)."""
    batch, height, width = labels.shape
    scale = np.array([image_size / width, image_size / height], dtype=np.float32)
    boxes = np.zeros((batch, num_classes, 4), np.float32)
    points = np.zeros((batch, num_classes, 2), np.float32)
    present = np.zeros((batch, num_classes), bool)
    for n, k in itertools.product(range(batch), range(num_classes)):
        mask = labels[n] == k
        if not mask.any():
            continue
        present[n, k] = True
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        boxes[n, k] = np.array([cols[0], rows[0], cols[-1], rows[-1]], np.float32) * np.tile(scale, 2)
        crop = mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
        distance = distance_transform_edt(np.pad(crop, 1))[1:-1, 1:-1]
        row, col = np.unravel_index(int(np.argmax(distance)), crop.shape)
        points[n, k] = np.array([cols[0] + col, rows[0] + row], np.float32) * scale
    return boxes, points, present


def fixed_label_maps() -> np.ndarray:
    """(6, 20, 28) label maps of 5 classes: random blobs, ties of the farthest point (squares, a
    one-pixel line, an even-sided square), classes touching the border, one-pixel classes, absent
    classes, a slice of one class only."""
    generator = np.random.default_rng(0)
    labels = np.zeros((6, 20, 28), dtype=np.int64)
    for image in labels[:2]:
        for k in range(1, 5):
            y, x = generator.integers(0, 14), generator.integers(0, 22)
            image[y:y + generator.integers(2, 9), x:x + generator.integers(2, 11)] = k
    labels[2, 2:6, 2:6] = 1  # even-sided square: four tied centre pixels
    labels[2, 10:16, 20:26] = 1  # a second component, tied with the first
    labels[2, 8, 3:20] = 2  # a line: every pixel at distance 1
    labels[2, 0, 0] = 3  # one pixel in the corner
    labels[3, :, :9] = 4  # touching three borders
    labels[3, 15:, 9:] = 2
    labels[4] = 3  # one class only: the border is its boundary
    labels[5] = generator.integers(0, 5, size=(20, 28))  # noise: many ties at distance 1
    return labels


@pytest.mark.parametrize("image_size", [28, 56])
def test_prompt_geometry_equals_the_former_scipy_implementation_on_fixed_masks(image_size):
    labels = fixed_label_maps()
    prompts = prompts_from_auxiliary_logits(logits_from_labels(labels, 5), image_size=image_size, mask_size=(8, 8))
    boxes, points, present = scipy_reference_prompts(labels, 5, image_size)
    assert np.array_equal(prompts.present.numpy(), present)
    assert np.array_equal(prompts.boxes.numpy(), boxes)
    assert np.array_equal(prompts.points.numpy(), points)


def test_box_is_tight_around_all_pixels_of_the_class():
    torch.manual_seed(0)
    labels = np.zeros((1, 20, 20), dtype=np.int64)
    labels[0, 3:8, 4:10] = 1  # rectangle rows 3..7, columns 4..9
    assert prompts_from_auxiliary_logits(logits_from_labels(labels, 2), image_size=20,
                                         mask_size=(8, 8)).boxes[0, 1].tolist() == [4.0, 3.0, 9.0, 7.0]
    labels[0, 15:17, 12:18] = 1  # a second blob of the same class
    prompts = prompts_from_auxiliary_logits(logits_from_labels(labels, 2), image_size=20, mask_size=(8, 8))
    assert prompts.boxes[0, 1].tolist() == [4.0, 3.0, 17.0, 16.0]


def test_absent_class_gets_zero_box_and_zero_point():
    torch.manual_seed(0)
    labels = np.zeros((2, 12, 12), dtype=np.int64)
    labels[0, 2:6, 2:6] = 1
    labels[1, 4:9, 3:10] = 2
    prompts = prompts_from_auxiliary_logits(logits_from_labels(labels, 3), image_size=12, mask_size=(8, 8))
    assert prompts.present.dtype == torch.bool
    assert prompts.present.tolist() == [[True, True, False], [True, False, True]]
    for n, k in ((0, 2), (1, 1)):
        assert torch.equal(prompts.boxes[n, k], torch.zeros(4))
        assert torch.equal(prompts.points[n, k], torch.zeros(2))
    assert prompts.boxes[0, 1].tolist() == [2.0, 2.0, 5.0, 5.0]


def test_the_background_is_prompted_like_every_other_class():
    """Class 0 has its own binary mask (argmax == 0, one channel of the one-hot auxiliary mask): its box
    is the tight box of the background pixels, its point the background's distance-transform argmax,
    its mask prompt channel 0 of the auxiliary logits; a slice without background gets zero prompts."""
    torch.manual_seed(0)
    labels = np.ones((2, 16, 16), dtype=np.int64)
    labels[0, 3:9, 5:14] = 0  # the background is a 6 x 9 block: rows 3..8, columns 5..13
    logits = logits_from_labels(labels, 2)
    prompts = prompts_from_auxiliary_logits(logits, image_size=16, mask_size=(16, 16))
    assert prompts.boxes.shape == (2, 2, 4) and prompts.points.shape == (2, 2, 2)
    assert prompts.boxes[0, 0].tolist() == [5.0, 3.0, 13.0, 8.0]
    distance = distance_transform_edt(np.pad(labels[0] == 0, 1))[1:-1, 1:-1]
    row, col = np.unravel_index(np.argmax(distance), distance.shape)
    assert prompts.points[0, 0].tolist() == [col, row]
    assert prompts.present.tolist() == [[True, True], [False, True]]  # slice 1 is all foreground
    assert not prompts.boxes[1, 0].any() and not prompts.points[1, 0].any()
    assert torch.equal(prompts.mask_logits[:, 0], logits[:, 0])


def test_low_resolution_generator_prompts_are_scaled_to_the_encoder_input():
    torch.manual_seed(0)
    labels = np.zeros((1, 8, 8), dtype=np.int64)
    labels[0, 1:4, 2:5] = 1  # rows 1..3, columns 2..4, centre (x=3, y=2)
    logits = logits_from_labels(labels, 2)
    native = prompts_from_auxiliary_logits(logits, image_size=8, mask_size=(8, 8))
    scaled = prompts_from_auxiliary_logits(logits, image_size=32, mask_size=(8, 8))
    assert native.boxes[0, 1].tolist() == [2.0, 1.0, 4.0, 3.0]
    assert native.points[0, 1].tolist() == [3.0, 2.0]
    assert torch.equal(scaled.boxes, 4 * native.boxes)
    assert torch.equal(scaled.points, 4 * native.points)
    wide = torch.cat([logits, logits], dim=-1)  # H=8, W=16 (blob repeated at columns 10..12): x by 2, y by 4
    wide_prompts = prompts_from_auxiliary_logits(wide, image_size=32, mask_size=(8, 8))
    assert wide_prompts.boxes[0, 1].tolist() == [4.0, 4.0, 24.0, 12.0]
    assert wide_prompts.points[0, 1].tolist() == [6.0, 8.0]


def test_mask_prompt_is_each_classs_logits_resized_and_passes_gradients_to_the_generator():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    prompts = prompts_from_auxiliary_logits(logits, image_size=32, mask_size=(16, 12))
    assert prompts.mask_logits.shape == (2, 3, 16, 12)
    expected = F.interpolate(logits, size=(16, 12), mode="bilinear", align_corners=False)
    assert torch.allclose(prompts.mask_logits, expected)
    for k in range(3):  # class k's mask prompt reaches class k's logits only
        grad, = torch.autograd.grad(prompts.mask_logits[:, k].sum(), logits, retain_graph=True)
        assert grad[:, k].abs().sum() > 0
        assert not torch.cat([grad[:, :k], grad[:, k + 1:]], dim=1).any()


def test_encoding_is_class_major_and_matches_each_class_encoded_alone():
    encoder, prompts = tiny_prompt_encoder(), random_prompts(batch=2, num_classes=4)
    with torch.no_grad():
        sparse, dense = encode_class_prompts(encoder, prompts)
        assert sparse.shape == (8, 3, 32) and dense.shape == (8, 32, 8, 8)  # K = 4 classes x 2 images
        for k, n in itertools.product(range(4), range(2)):
            alone = ClassPrompts(*(field[n:n + 1, k:k + 1] for field in prompts))
            sparse_alone, dense_alone = encode_class_prompts(encoder, alone)
            assert torch.allclose(sparse[k * 2 + n], sparse_alone[0], atol=1e-6)
            assert torch.allclose(dense[k * 2 + n], dense_alone[0], atol=1e-5)


@pytest.mark.parametrize("use_box,use_point,use_mask",
                         [combo for combo in itertools.product([True, False], repeat=3) if any(combo)])
def test_each_prompt_combination_of_the_ablation_encodes_with_sam_token_counts(use_box, use_point, use_mask):
    encoder, prompts = tiny_prompt_encoder(), random_prompts(batch=2, num_classes=4)
    with torch.no_grad():
        sparse, dense = encode_class_prompts(encoder, prompts, use_box=use_box, use_point=use_point,
                                             use_mask=use_mask)
    # box: 2 corner tokens; point: 1 token, plus SAM's "not a point" padding token when there is no box
    tokens = 2 * use_box + use_point + (use_point and not use_box)
    assert sparse.shape == (8, tokens, 32)
    assert dense.shape == (8, 32, 8, 8)
    if use_point and not use_box:
        assert torch.equal(sparse[:, 1], encoder.not_a_point_embed.weight.expand(8, -1))
    no_mask = encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand_as(dense)
    assert torch.equal(dense, no_mask) != use_mask


@pytest.mark.parametrize("use_box,use_mask", list(itertools.product([True, False], repeat=2)))
def test_point_tokens_equal_segment_anythings_own_point_encoding(use_box, use_mask):
    """The point tokens, built without SAM's boolean indexing by label, equal what SAM's PromptEncoder
    gives for the same positive points (with the padding token when no box follows)."""
    encoder, prompts = tiny_prompt_encoder(), random_prompts(batch=2, num_classes=4)
    coords = prompts.points.transpose(0, 1).reshape(-1, 1, 2)
    boxes = prompts.boxes.transpose(0, 1).reshape(-1, 4) if use_box else None
    masks = prompts.mask_logits.transpose(0, 1).reshape(-1, 1, 32, 32) if use_mask else None
    with torch.no_grad():
        sparse, dense = encode_class_prompts(encoder, prompts, use_box=use_box, use_mask=use_mask)
        reference_sparse, reference_dense = encoder(points=(coords, torch.ones(8, 1, dtype=torch.int64)),
                                                    boxes=boxes, masks=masks)
        tokens = positive_point_tokens(encoder, coords, pad=not use_box)
    assert torch.equal(sparse, reference_sparse) and torch.equal(dense, reference_dense)
    assert torch.equal(tokens, reference_sparse[:, :tokens.shape[1]])


def test_no_prompt_kind_raises():
    encoder, prompts = tiny_prompt_encoder(), random_prompts()
    assert PROMPT_KINDS == ("box", "point", "mask")
    with pytest.raises(ValueError):
        encode_class_prompts(encoder, prompts, use_box=False, use_point=False, use_mask=False)
