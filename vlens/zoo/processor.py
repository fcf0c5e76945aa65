"""The toy model's word-level tokenizer, chat template and `LlavaProcessor`.

The prompt contract other code relies on: a user turn with one image and a question renders as
``"<s> USER : <image> {question} ASSISTANT :"``; a training example appends
``" " + answer + " </s>"``. The processor expands ``<image>`` into one placeholder per patch.
"""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

from vlens.data.scenes import VOCABULARY

PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<s>", "</s>", "<unk>", "<image>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK, IMAGE)
TEMPLATE_WORDS: tuple[str, ...] = ("USER", "ASSISTANT", ":")

# Renders "<s> USER : <image> {text} ASSISTANT : {answer} </s> ..." with single spaces, so the
# whitespace pre-tokenizer sees exactly the words of the prompt.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ ' USER :' }}"
    "{% else %}{{ ' ASSISTANT :' }}{% endif %}"
    "{% if message['content'] is string %}{{ ' ' + message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ ' <image>' }}"
    "{% elif item['type'] == 'text' %}{{ ' ' + item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] != 'user' %}{{ ' </s>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ ' ASSISTANT :' }}{% endif %}"
)


def vocabulary() -> list[str]:
    """All tokens, in id order: special tokens, template words, then scene words."""
    return list(SPECIAL_TOKENS) + list(TEMPLATE_WORDS) + list(VOCABULARY)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over `vocabulary` (no bos/eos added automatically).

    The bos comes from the chat template, so ``processor(text=rendered_prompt)`` starts with
    exactly one ``<s>``.
    """
    vocab = {word: i for i, word in enumerate(vocabulary())}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE},
        model_max_length=512,
        padding_side="left",  # batched generation pads on the left
        clean_up_tokenization_spaces=False,
    )


def build_processor(image_size: int, patch_size: int) -> LlavaProcessor:
    """The `LlavaProcessor` of the toy model.

    Args:
        image_size: Side of the square input image the vision tower expects.
        patch_size: The vision tower's patch size.

    Returns:
        A processor whose image processor rescales to [0, 1] and normalises with mean 0.5 and
        std 0.5 (images of another size are resized and centre-cropped to ``image_size``).
    """
    image_processor = CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": image_size},
        do_center_crop=True,
        crop_size={"height": image_size, "width": image_size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,  # the CLS token, dropped by the "default" strategy
    )


def prompt_text(processor: LlavaProcessor, question: str) -> str:
    """The rendered generation prompt for one image and ``question`` (the contract above)."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
