"""Processors with a video part load for images where torchvision cannot be imported."""

from __future__ import annotations

import json
import warnings

import PIL.Image
import pytest
import transformers

from tests.tiny import word_tokenizer
from vlens.adapters._processors import (
    VideoProcessorUnavailableWarning,
    _warn_images_only,
    images_only,
    load_family_processor,
    torchvision_problem,
)

needs_no_torchvision = pytest.mark.skipif(torchvision_problem() is None, reason="torchvision imports here")


@pytest.fixture(scope="module")
def qwen_processor_folder(tmp_path_factory):
    tokenizer = word_tokenizer(
        specials=["<|vision_start|>", "<|vision_end|>", "<|video_pad|>"], image_token="<|image_pad|>",
        video_token="<|video_pad|>", vision_bos_token="<|vision_start|>", vision_eos_token="<|vision_end|>",
    )
    image_processor = transformers.Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 64)
    processor = images_only(transformers.Qwen2VLProcessor)(
        image_processor=image_processor, tokenizer=tokenizer, chat_template="{{ messages[0]['content'] }}",
    )
    out = tmp_path_factory.mktemp("qwen_processor")
    processor.save_pretrained(out)
    return out


def test_saved_folder_names_the_real_processor_class(qwen_processor_folder):
    saved = json.loads((qwen_processor_folder / "processor_config.json").read_text())
    assert saved["processor_class"] == "Qwen2VLProcessor"


def test_a_class_without_a_video_part_is_its_own_images_only_class():
    assert images_only(transformers.LlavaProcessor) is transformers.LlavaProcessor


@needs_no_torchvision
def test_auto_processor_fails_here_and_vlens_loads_images_only(qwen_processor_folder):
    with pytest.raises(Exception):
        transformers.AutoProcessor.from_pretrained(qwen_processor_folder)
    _warn_images_only.cache_clear()
    with pytest.warns(VideoProcessorUnavailableWarning, match="torchvision cannot be imported"):
        processor = load_family_processor(str(qwen_processor_folder), "Qwen2VLProcessor")
    assert isinstance(processor, transformers.Qwen2VLProcessor)
    assert not hasattr(processor, "video_processor")
    assert isinstance(processor.image_processor, transformers.Qwen2VLImageProcessorPil)
    assert processor.chat_template == "{{ messages[0]['content'] }}"
    out = processor(
        text=["<|vision_start|><|image_pad|><|vision_end|> what"], images=[PIL.Image.new("RGB", (56, 84))],
        return_tensors="pt",
    )
    # 56 px wide and 84 px high in 14 px patches: (t, h, w) = (1, 6, 4), merged 2 x 2 into 3 x 2 = 6 tokens.
    assert out["image_grid_thw"].tolist() == [[1, 6, 4]]
    assert int((out["input_ids"] == processor.image_token_id).sum()) == 6
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_family_processor(str(qwen_processor_folder), "Qwen2VLProcessor")  # said once per process
