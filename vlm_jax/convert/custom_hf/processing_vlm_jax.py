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


class VlmJaxTiledProcessor(VlmJaxProcessor):
    """A model trained on tiles (vlm_jax data.tiling): transformers' Idefics3 image processor
    cuts each image into tiles + a global view (Idefics3's longest-edge rule, which vlm_jax
    implements), each `<image>` becomes Idefics3's layout (row / column markers, a newline per
    row, the global view last), and pixel_values come out as [num_tiles, 3, S, S], every tile of
    every image in order, which is what the model takes."""

    images_kwargs = {"return_row_col_info": True}

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        rows = [r for per_sample in image_inputs["rows"] for r in per_sample][image_idx]
        cols = [c for per_sample in image_inputs["cols"] for c in per_sample][image_idx]
        run = self.image_token * self.image_seq_length
        global_block = f"<fake_token_around_image><global-img>{run}<fake_token_around_image>"
        if rows == 0 and cols == 0:
            return global_block
        grid = "".join("".join(f"<fake_token_around_image><row_{r + 1}_col_{c + 1}>{run}"
                               for c in range(cols)) + "\n" for r in range(rows))
        return f"{grid}\n{global_block}"

    def __call__(self, *args, **kwargs):
        out = super().__call__(*args, **kwargs)
        mask = out.pop("pixel_attention_mask", None)
        out.pop("rows", None)
        out.pop("cols", None)
        if "pixel_values" in out and mask is not None:
            pixels = out["pixel_values"]
            flat = pixels.reshape((-1,) + tuple(pixels.shape[2:]))
            keep = mask.reshape(flat.shape[0], -1).any(-1)  # the batch's padding images: none
            out["pixel_values"] = flat[keep]
        return out


__all__ = ["VlmJaxProcessor", "VlmJaxTiledProcessor"]
