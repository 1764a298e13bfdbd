"""Prompt files (one caption a line, clear errors) and the CLIP score on a tiny random local CLIP model."""

import pytest
import torch

from lightning_reg.data.prompts import read_prompts
from lightning_reg.errors import ConfigError
from lightning_reg.metrics.clip_score import clip_score


def test_read_prompts_strips_and_keeps_order(tmp_path):
    path = tmp_path / "captions.txt"
    path.write_text("a seven\r\n  two dogs on a sofa \nA red dot\n", encoding="utf-8")
    assert read_prompts(path) == ["a seven", "two dogs on a sofa", "A red dot"]


def test_read_prompts_splits_lines_at_newlines_only(tmp_path):
    path = tmp_path / "captions.txt"
    path.write_text("a cat\x85on a mat\u2028at noon\x0c\nthe end\r\n", encoding="utf-8")
    assert read_prompts(path) == ["a cat\x85on a mat\u2028at noon", "the end"]  # \x0c is surrounding space


def test_read_prompts_refuses_a_caption_longer_than_the_limit(tmp_path):
    path = tmp_path / "captions.txt"
    path.write_text("fine\n" + "x" * 2_000 + "\n" + "y" * 2_001 + "\n")
    with pytest.raises(ConfigError, match="line 3 has 2,001 characters; a caption may have at most 2,000"):
        read_prompts(path)


@pytest.mark.parametrize("text, message", [
    ("", "is empty: give one caption a line"),
    ("\n  \n", "is empty: give one caption a line"),
    ("one\n\nthree\n \nfive\n", r"line\(s\) 2, 4 are empty; give one caption a line, no blank lines"),
    ("".join(f"c{i}\n\n" for i in range(7)), r"line\(s\) 2, 4, 6, 8, 10 and 2 more are empty"),
])
def test_read_prompts_refuses_empty_files_and_blank_lines(tmp_path, text, message):
    path = tmp_path / "captions.txt"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as err:
        read_prompts(path)
    assert "\n" not in str(err.value)


def test_read_prompts_missing_and_binary(tmp_path):
    with pytest.raises(ConfigError, match="--prompts .*nothing.txt does not exist"):
        read_prompts(tmp_path / "nothing.txt")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\x00caption")
    with pytest.raises(ConfigError, match="is not a caption file \\(not UTF-8 text"):
        read_prompts(tmp_path / "bad.txt")


def test_clip_score_is_100_times_the_mean_cosine_clipped_at_0(clip_folder, one_thread):
    from transformers import CLIPModel, CLIPProcessor

    images = torch.randint(0, 256, (5, 16, 16, 3), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    prompts = ["a seven", "a red dot", "two", "cat", "a b c"]
    score = clip_score(images, prompts, clip_folder, batch_size=2)
    model, processor = CLIPModel.from_pretrained(clip_folder), CLIPProcessor.from_pretrained(clip_folder)
    with torch.no_grad():
        inputs = processor(text=prompts, images=list(images.permute(0, 3, 1, 2)), return_tensors="pt", padding=True)
        e_image = model.get_image_features(pixel_values=inputs["pixel_values"])
        e_text = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    e_image, e_text = (getattr(e, "pooler_output", e) for e in (e_image, e_text))
    cos = torch.nn.functional.cosine_similarity(e_image, e_text, dim=-1)
    assert score == pytest.approx(max(float(100 * cos.mean()), 0.0), rel=1e-4, abs=1e-4)
    assert score > 0  # (this random model and seed: a positive mean, so the clip at 0 is not what we compare)
    assert clip_score(images, prompts, clip_folder, batch_size=100) == pytest.approx(score, rel=1e-5)
    assert 0 <= score <= 100


def test_clip_score_bad_inputs(clip_folder, tmp_path):
    images = torch.zeros(2, 16, 16, 3, dtype=torch.uint8)
    with pytest.raises(ConfigError, match="--clip-model .* is not a folder: give a folder written by CLIPModel"):
        clip_score(images, ["a", "b"], tmp_path / "missing")
    with pytest.raises(ConfigError, match="one caption per image, got 2 images and 1 captions"):
        clip_score(images, ["a"], clip_folder)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text((clip_folder / "config.json").read_text())
    with pytest.raises(ConfigError, match="is not a loadable CLIP model and processor folder"):
        clip_score(images, ["a", "b"], tmp_path / "half")
