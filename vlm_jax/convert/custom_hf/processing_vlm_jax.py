"""Processor of a vlm_jax VLM exported as transformers remote code: the tokenizer, transformers'
LLaVA image processor (set up as vlm_jax preprocesses: optional pad to a square, bicubic resize,
x / 127.5 - 1) and the expansion of each `<image>` in the text to `image_seq_length` image tokens,
the number the projector emits per image. Written by `vlm-jax export-hf --format custom`; imports
transformers only. Load it with `AutoProcessor.from_pretrained(directory, trust_remote_code=True)`.
"""
from transformers import ProcessorMixin


class VlmJaxProcessor(ProcessorMixin):
    def __init__(self, image_processor=None, tokenizer=None, image_seq_length=None,
                 image_token="<image>", chat_template=None):
        if image_seq_length is None:
            raise ValueError("VlmJaxProcessor needs image_seq_length (image tokens per image)")
        self.image_seq_length = image_seq_length
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        # Every image is resized to the vision tower's size: the count never depends on the image.
        return self.image_token * self.image_seq_length


__all__ = ["VlmJaxProcessor"]
