"""TFDS datasets stored as ArrayRecord, as a random-access source of raw examples.

Any builder readable with `builder.as_data_source(split)` works (no TensorFlow needed). The
config maps the dataset's feature names (nested ones as "a/b") to the roles we use:

    "image"     an Image feature, or a Sequence of them (multi-image, in placeholder order)
    "caption"   Text: the example is an image-caption pair
    "question"  Text, with "answer": one Q/A turn, "<image>\\n" prepended when there are images
    "answer"    Text or a Sequence of Text (VQA lists several; the first is the target, all of
                them go to meta["answers"] for evaluation)
    "id"        any scalar: kept as meta["row_id"]
e.g. features={"image": "image", "caption/text": "caption"}.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from vlm_jax.data.errors import SkipExample
from vlm_jax.errors import ConfigError

ROLES = ("image", "caption", "question", "answer", "id")


class TfdsSource:
    """Random access over one split: `len(source)`, `source[i] -> raw example`.

    Give either `name` (a registered builder, "name[/config][:version]", read from `data_dir`)
    or `builder_dir` (a prepared dataset directory, e.g. ".../coco_captions/2017/1.0.0").
    """

    def __init__(self, name: str | None = None, split: str = "train", *,
                 features: Mapping[str, str], data_dir: str | None = None,
                 builder_dir: str | None = None):
        import tensorflow_datasets as tfds  # heavy import, only for this source

        if (name is None) == (builder_dir is None):
            raise ConfigError("TfdsSource needs exactly one of name= or builder_dir=")
        builder = (tfds.builder(name, data_dir=data_dir) if name is not None
                   else tfds.builder_from_directory(builder_dir))
        self.name, self.split = builder.info.full_name, split
        self.roles = _check_roles(features, _feature_paths(builder.info.features))
        self._data = builder.as_data_source(split)

    def __len__(self) -> int:
        return len(self._data)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"{self.name}[{self.split}]: index {index} outside [0, {len(self)})")
        record = self._data[index]
        example_id = f"tfds:{self.name}:{self.split}:{index}"
        values = {role: _lookup(record, path) for role, path in self.roles.items()}
        images = _images(values.get("image"))
        example = {"id": example_id, "images": images, "conversation": None, "caption": None,
                   "meta": {"source": "tfds", "dataset": self.name}}
        if "id" in values:
            example["meta"]["row_id"] = _text(values["id"], example_id) if isinstance(
                values["id"], bytes) else np.asarray(values["id"]).item()
        if "caption" in values:
            example["caption"] = _text(values["caption"], example_id)
        if "question" in values:
            answers = [_text(a, example_id) for a in np.atleast_1d(values["answer"]).tolist()]
            if not answers or not answers[0].strip():
                raise SkipExample("no_answer", f"{example_id}: empty answer")
            question = _text(values["question"], example_id)
            prefix = "<image>\n" * len(images)
            example["conversation"] = [{"role": "user", "content": prefix + question},
                                       {"role": "assistant", "content": answers[0]}]
            example["meta"]["answers"] = answers
        return example

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, split={self.split!r}, roles={self.roles})"


def _check_roles(features: Mapping[str, str], available: list[str]) -> dict[str, str]:
    """{feature path: role} from the config -> {role: feature path}, every name checked."""
    roles = {}
    for path, role in features.items():
        if role not in ROLES:
            raise ConfigError(f"tfds features[{path!r}]={role!r}; supported roles: {ROLES}")
        if path not in available:
            raise ConfigError(f"tfds feature {path!r} not in the dataset; it has {available}")
        if role in roles:
            raise ConfigError(f"tfds features map both {roles[role]!r} and {path!r} to {role!r}")
        roles[role] = path
    if ("question" in roles) != ("answer" in roles):
        raise ConfigError("tfds features need both a 'question' and an 'answer' role, or neither")
    if "caption" not in roles and "question" not in roles:
        raise ConfigError("tfds features need a 'caption' role or 'question' + 'answer' roles")
    return roles


def _feature_paths(features, prefix: str = "") -> list[str]:
    paths = []
    for key, feature in features.items():
        path = f"{prefix}{key}"
        paths.append(path)
        nested = getattr(feature, "feature", feature)  # Sequence(FeaturesDict) -> FeaturesDict
        if hasattr(nested, "items"):
            paths += _feature_paths(nested, path + "/")
    return paths


def _lookup(record: Mapping[str, Any], path: str) -> Any:
    value = record
    for key in path.split("/"):
        value = value[key]
    return value


def _images(value) -> list[np.ndarray]:
    """u8[H, W, C] or u8[k, H, W, C] (or a list of arrays) -> list of u8[H, W, C]."""
    if value is None:
        return []
    if isinstance(value, np.ndarray) and value.ndim == 3:
        return [value]
    return [np.asarray(image) for image in value]


def _text(value, example_id: str) -> str:
    if isinstance(value, str):
        return value
    try:
        return bytes(value).decode("utf-8", errors="strict")
    except UnicodeDecodeError as error:
        raise SkipExample("text_not_utf8", f"{example_id}: {error}") from error
