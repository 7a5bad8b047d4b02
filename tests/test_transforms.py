"""Letterbox: aspect kept, grey padding, boxes move with the pixels, exact round trip."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hvd_yolo.data.augment import AugmentedDataset
from hvd_yolo.data.transforms import letterbox
from hvd_yolo.model.postprocess import unletterbox_boxes

torch.set_num_threads(1)


def _image_with_block(h: int, w: int, box: tuple[int, int, int, int]) -> torch.Tensor:
    """A dark uint8 image with a white block covering ``box`` (x1, y1, x2, y2 exclusive)."""
    img = torch.full((3, h, w), 20, dtype=torch.uint8)
    x1, y1, x2, y2 = box
    img[:, y1:y2, x1:x2] = 255
    return img


def test_wide_image_is_scaled_and_padded_top_and_bottom():
    img = _image_with_block(200, 400, (100, 50, 300, 150))
    out, boxes, meta = letterbox(img, torch.tensor([[100.0, 50, 300, 150]]), 416)
    assert out.shape == (3, 416, 416) and out.dtype == torch.uint8
    assert meta == {"scale": 1.04, "pad": (0, 104), "orig_hw": (200, 400),
                    "input_hw": (416, 416)}
    assert torch.allclose(boxes, torch.tensor([[104.0, 156, 312, 260]]))
    assert (out[:, :104] == 114).all() and (out[:, 104 + 208:] == 114).all()
    # The pixels moved with the box: white inside (away from the resampled edge), dark outside.
    x1, y1, x2, y2 = boxes[0].round().int().tolist()
    assert (out[:, y1 + 2:y2 - 2, x1 + 2:x2 - 2] == 255).all()
    assert (out[:, 104 + 2:y1 - 2, 2:x1 - 2] <= 30).all()


def test_tall_image_non_square_target_and_downscale():
    img = _image_with_block(640, 320, (40, 320, 200, 480))
    out, boxes, meta = letterbox(img, torch.tensor([[40.0, 320, 200, 480]]), (320, 480))
    assert out.shape == (3, 320, 480)
    assert meta["scale"] == 0.5 and meta["pad"] == (160, 0) and meta["input_hw"] == (320, 480)
    assert torch.allclose(boxes, torch.tensor([[180.0, 160, 260, 240]]))
    assert (out[:, :, :160] == 114).all() and (out[:, :, 160 + 160:] == 114).all()
    assert (out[:, 162:238, 182:258] == 255).all()


def test_float_image_pads_with_114_over_255_and_no_boxes():
    img = torch.rand(3, 100, 50)
    out, boxes, meta = letterbox(img, None, 64)
    assert out.dtype == torch.float32 and out.shape == (3, 64, 64)
    assert torch.allclose(out[:, :, :meta["pad"][0]], torch.tensor(114 / 255))
    assert boxes.shape == (0, 4)


def test_same_size_is_untouched():
    img = torch.randint(0, 255, (3, 96, 128), dtype=torch.uint8)
    out, _, meta = letterbox(img, None, (96, 128))
    assert torch.equal(out, img) and meta["scale"] == 1.0 and meta["pad"] == (0, 0)


@settings(max_examples=60, deadline=None)
@given(h=st.integers(8, 900), w=st.integers(8, 900),
       th=st.integers(1, 20).map(lambda k: 32 * k), tw=st.integers(1, 20).map(lambda k: 32 * k),
       fx=st.floats(0, 0.9), fy=st.floats(0, 0.9), fw=st.floats(0.05, 1), fh=st.floats(0.05, 1))
def test_round_trip_returns_the_original_boxes(h, w, th, tw, fx, fy, fw, fh):
    x1, y1 = fx * w, fy * h
    box = torch.tensor([[x1, y1, min(w, x1 + fw * (w - x1)), min(h, y1 + fh * (h - y1))]])
    _, moved, meta = letterbox(torch.zeros(3, h, w, dtype=torch.uint8), box, (th, tw))
    assert (moved >= -1e-3).all() and (moved[:, 0::2] <= tw + 1e-3).all()
    assert (moved[:, 1::2] <= th + 1e-3).all()
    back = unletterbox_boxes(moved, meta)
    assert torch.allclose(back, box, atol=1e-3 * max(h, w))


def test_unletterbox_clips_and_keeps_extra_columns():
    meta = {"scale": 0.5, "pad": (10, 20), "orig_hw": (100, 200), "input_hw": (96, 128)}
    det = torch.tensor([[0.0, 0.0, 40.0, 30.0, 0.9, 2.0], [100.0, 60.0, 128.0, 96.0, 0.5, 0.0]])
    back = unletterbox_boxes(det, meta)
    assert torch.allclose(back, torch.tensor([[0.0, 0.0, 60.0, 20.0, 0.9, 2.0],
                                              [180.0, 80.0, 200.0, 100.0, 0.5, 0.0]]))
    assert torch.equal(det[0], torch.tensor([0.0, 0.0, 40.0, 30.0, 0.9, 2.0]))  # not in place
    with pytest.raises(ValueError, match=r"\[k, 4\+\]"):
        unletterbox_boxes(torch.zeros(3), meta)


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match=r"image \[3, H, W\]"):
        letterbox(torch.zeros(10, 10, 3, dtype=torch.uint8), None, 32)
    with pytest.raises(ValueError, match="size must be positive"):
        letterbox(torch.zeros(3, 10, 10, dtype=torch.uint8), None, (0, 32))


def test_evaluation_samples_are_letterboxed_with_their_meta():
    sample = {"image": _image_with_block(50, 100, (10, 10, 30, 40)),
              "boxes": torch.tensor([[10.0, 10, 30, 40]]), "classes": torch.tensor([1]),
              "image_id": 7, "name": "x.jpg", "hw": (50, 100)}
    out = AugmentedDataset([sample], 64, train=False)[(0, 0)]  # the evaluation loader's dataset
    assert out["image"].shape == (3, 64, 64) and out["classes"].tolist() == [1]
    assert out["meta"]["image_id"] == 7 and out["meta"]["pad"] == (0, 16)
    assert torch.allclose(out["boxes"], torch.tensor([[6.4, 22.4, 19.2, 41.6]]))
