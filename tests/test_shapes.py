"""Tests for the shapes world: determinism, answers checked against rendered pixels, unambiguous
questions (re-read by an independent little interpreter), holdout, answer balance, vocabulary."""
import collections
import re

import numpy as np
import pytest

from vlm_jax.data.sources import shapes
from vlm_jax.data.sources.shapes import COLORS, POSITIONS, SHAPES, SIZES, ShapesSource

PLURAL_TO_SHAPE = {"circles": "circle", "squares": "square", "triangles": "triangle",
                   "crosses": "cross"}
FILL_RATIO = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5, "cross": 0.64}


def _object_mask(image, obj):
    """Pixels of the object's cell whose colour is (nearly) the object's colour."""
    size = image.shape[0]
    row, col = divmod(POSITIONS.index(obj["position"]), 3)
    cell = np.zeros(image.shape[:2], bool)
    cell[row * size // 3:(row + 1) * size // 3 + 1, col * size // 3:(col + 1) * size // 3 + 1] = True
    distance = np.abs(image.astype(int) - np.array(COLORS[obj["color"]])).max(axis=-1)
    return cell & (distance < 40)


def _check_objects_against_pixels(image, objects, check_shape: bool):
    size = image.shape[0]
    for obj in objects:
        mask = _object_mask(image, obj)
        assert mask.any(), obj
        x0, y0, x1, y1 = (v * size / 1000 for v in obj["box"])
        center = image[int((y0 + y1) / 2), int((x0 + x1) / 2)].astype(int)
        nearest = min(COLORS, key=lambda name: np.abs(center - COLORS[name]).max())
        assert nearest == obj["color"], (obj, center)
        # Small objects at 32 px are ~4 px wide: their centre pixel is partly anti-aliased.
        assert np.abs(center - COLORS[obj["color"]]).max() < (12 if size >= 128 else 60), obj
        ys, xs = np.nonzero(mask)
        tolerance = max(1.5, size / 100)
        assert xs.min() + 0.5 >= x0 - tolerance and xs.max() + 0.5 <= x1 + tolerance, obj
        assert ys.min() + 0.5 >= y0 - tolerance and ys.max() + 0.5 <= y1 + tolerance, obj
        assert xs.min() - x0 < 2 * tolerance and x1 - xs.max() - 1 < 2 * tolerance, obj  # tight
        if check_shape:
            fill = mask.sum() / ((x1 - x0) * (y1 - y0))
            nearest = min(FILL_RATIO, key=lambda s: abs(FILL_RATIO[s] - fill))
            assert nearest == obj["shape"], (obj, fill)


def _parse_np(phrase: str) -> dict:
    words = phrase.split()
    attributes = {}
    noun = words[-1]
    if noun in SHAPES:
        attributes["shape"] = noun
    elif noun in PLURAL_TO_SHAPE:
        attributes["shape"] = PLURAL_TO_SHAPE[noun]
    else:
        assert noun in ("object", "objects"), phrase
    for word in words[:-1]:
        key = "size" if word in SIZES else "color"
        assert word in SIZES or word in COLORS, phrase
        attributes[key] = word
    return attributes


def _matching(objects, attributes):
    return [o for o in objects if all(o[k] == v for k, v in attributes.items())]


def _the(objects, phrase):
    """The referent of a definite description; it must be unique."""
    position = re.fullmatch(r"object (?:in the center|at the (.+))", phrase)
    if position:
        name = position.group(1) or "center"
        found = [o for o in objects if o["position"] == name]
    else:
        found = _matching(objects, _parse_np(phrase))
    assert len(found) == 1, f"ambiguous or empty reference {phrase!r}: {found}"
    return found[0]


def _answer(question: str, objects) -> str:
    """An independent reading of every question template."""
    if m := re.fullmatch(r"what color is the (.+)\?", question):
        return _the(objects, m.group(1))["color"]
    if m := re.fullmatch(r"what shape is (?:in the center|at the (.+))\?", question):
        return _the(objects, f"object at the {m.group(1)}" if m.group(1) else "object in the center")["shape"]
    if m := re.fullmatch(r"what shape is the (.+)\?", question):
        return _the(objects, m.group(1))["shape"]
    if m := re.fullmatch(r"how many (.+) are there\?", question):
        return str(len(_matching(objects, _parse_np(m.group(1)))))
    if m := re.fullmatch(r"is there a (.+)\?", question):
        return "yes" if _matching(objects, _parse_np(m.group(1))) else "no"
    if m := re.fullmatch(r"where is the (.+)\?", question):
        return _the(objects, m.group(1))["position"]
    if m := re.fullmatch(r"is the (.+) (left of|right of|above|below) the (.+)\?", question):
        a, b = _the(objects, m.group(1)), _the(objects, m.group(3))
        (ra, ca), (rb, cb) = (divmod(POSITIONS.index(o["position"]), 3) for o in (a, b))
        holds = {"left of": ca < cb, "right of": ca > cb, "above": ra < rb, "below": ra > rb}
        return "yes" if holds[m.group(2)] else "no"
    if m := re.fullmatch(r"give the box of the (.+)", question):
        return "[" + ", ".join(map(str, _the(objects, m.group(1))["box"])) + "]"
    raise AssertionError(f"unknown question form {question!r}")


def _questions(example):
    turns = example["conversation"]
    return [(turns[i]["content"].removeprefix("<image>\n"), turns[i + 1]["content"])
            for i in range(0, len(turns), 2)]


def test_same_seed_and_index_is_identical_and_seeds_differ():
    first, again = ShapesSource(seed=3, image_size=48)[17], ShapesSource(seed=3, image_size=48)[17]
    np.testing.assert_array_equal(first["images"][0], again["images"][0])
    assert first["conversation"] == again["conversation"] and first["meta"] == again["meta"]
    other_seed = ShapesSource(seed=4, image_size=48)[17]
    assert not np.array_equal(first["images"][0], other_seed["images"][0])
    train, validation = ShapesSource(split="train")[0], ShapesSource(split="validation")[0]
    assert train["meta"]["objects"] != validation["meta"]["objects"]


@pytest.mark.parametrize("image_size", [32, 224])
def test_rendered_pixels_agree_with_the_scene(image_size):
    source = ShapesSource(seed=1, image_size=image_size)
    for index in range(40):
        example = source[index]
        image = example["images"][0]
        assert image.shape == (image_size, image_size, 3) and image.dtype == np.uint8
        # At 32 px a small object is ~4 px wide: colour and box hold, shape is not measurable.
        _check_objects_against_pixels(image, example["meta"]["objects"],
                                      check_shape=image_size >= 128)


def test_every_answer_is_correct_and_every_reference_unambiguous():
    source = ShapesSource(seed=2, image_size=32, turns_per_example=5)
    seen_types = set()
    for index in range(300):
        scene, turns = source.sample(index)
        objects = [dict(shape=o.shape, color=o.color, size=o.size, position=o.position,
                        box=o.box_1000) for o in scene.objects]
        assert len({o["position"] for o in objects}) == len(objects)  # one object per cell
        for question_type, question, answer in turns:
            assert _answer(question, objects) == answer, (index, question, answer)
            seen_types.add(question_type)
    assert seen_types == set(shapes.QUESTION_TYPES)


def test_a_smaller_world_uses_only_its_values_and_never_names_a_fixed_attribute():
    # The shapes recipe's world: 3 shapes, 4 colours, one size.
    world = dict(shapes=("circle", "square", "triangle"),
                 colors=("red", "green", "blue", "yellow"), sizes=("large",))
    source = ShapesSource(seed=2, image_size=32, turns_per_example=5, **world)
    assert source.attributes == ("color", "shape")
    seen_types, answers = set(), collections.Counter()
    for index in range(300):
        scene, turns = source.sample(index)
        for obj in scene.objects:
            assert (obj.shape in world["shapes"] and obj.color in world["colors"]
                    and obj.size == "large"), obj
        objects = [dict(shape=o.shape, color=o.color, size=o.size, position=o.position,
                        box=o.box_1000) for o in scene.objects]
        texts = [source.caption(scene)] + [q for _, q, _ in turns]
        assert not any(word in text.split() for text in texts for word in SIZES), texts
        for question_type, question, answer in turns:
            assert _answer(question, objects) == answer, (index, question, answer)
            seen_types.add(question_type)
            answers[question_type, answer] += 1
    assert seen_types == set(shapes.QUESTION_TYPES)
    assert {a for (t, a) in answers if t == "shape"} == set(world["shapes"])
    assert {a for (t, a) in answers if t == "color"} == set(world["colors"])
    with pytest.raises(ValueError, match="unsupported shapes entry 'hexagon'"):
        ShapesSource(shapes=("circle", "hexagon"))
    with pytest.raises(ValueError, match="colors must be a non-empty list"):
        ShapesSource(colors=())
    with pytest.raises(ValueError, match="holdout shape 'cross'"):
        ShapesSource(shapes=("circle", "square"), holdout=(("red", "cross"),))


def test_answers_are_balanced_over_2000_examples():
    source = ShapesSource(seed=5, turns_per_example=3)
    answers = collections.defaultdict(collections.Counter)
    for index in range(2000):
        for question_type, _, answer in source.sample(index)[1]:
            answers[question_type][answer] += 1
    for question_type in ("exists", "relation"):
        counts = answers[question_type]
        assert set(counts) == {"yes", "no"}
        assert 0.4 < counts["yes"] / sum(counts.values()) < 0.6, (question_type, counts)
    for question_type, values in (("color", COLORS), ("shape", SHAPES), ("position", POSITIONS)):
        counts = answers[question_type]
        expected = sum(counts.values()) / len(values)
        assert set(counts) == set(values)
        assert all(0.6 * expected < counts[v] < 1.4 * expected for v in values), counts
    counts = answers["count"]
    assert all(counts[str(n)] > 0.03 * sum(counts.values()) for n in range(5)), counts


def test_holdout_never_in_train_and_always_in_compositional_test():
    holdout = (("purple", "triangle"), ("red", "circle"))
    train = ShapesSource(split="train", holdout=holdout, task="text", turns_per_example=5)
    for index in range(400):
        scene, turns = train.sample(index)
        assert not any((o.color, o.shape) in holdout for o in scene.objects)
        text = " ".join(shapes.caption(scene).split() + [q for _, q, _ in turns])
        assert "purple triangle" not in text and "red circle" not in text
    test = ShapesSource(split="test", holdout=holdout, compositional=True, image_size=32)
    for index in range(100):
        objects = test[index]["meta"]["objects"]
        assert any((o["color"], o["shape"]) in holdout for o in objects)


def _objects(caption):
    """A caption's objects as a multiset of (noun phrase, position phrase)."""
    parts = re.split(r", | and ", caption)
    return collections.Counter(tuple(re.match(r"a (.+?) ((?:at the|in the) .+)$", p).groups())
                               for p in parts)


def test_negative_captions_change_exactly_one_object_and_cycle_the_change():
    holdout = (("red", "circle"),)
    source = ShapesSource(task="caption", image_size=8, negative_captions=3, holdout=holdout)
    for index in range(150):
        example = source[index]
        assert source[index]["negative_captions"] == example["negative_captions"]  # determined
        assert example["caption"] == ShapesSource(task="caption", image_size=8,
                                                  holdout=holdout)[index]["caption"]
        true = _objects(example["caption"])
        seen = set()
        for negative in example["negative_captions"]:
            assert "red circle" not in negative
            changed = _objects(negative)
            removed, added = true - changed, changed - true
            assert sum(removed.values()) == 1 and sum(added.values()) == 1, negative
            (noun, where), = removed
            (new_noun, new_where), = added
            if where != new_where:
                assert noun == new_noun
                seen.add("position")
            else:  # one word of the noun phrase: its colour or its shape
                diff = [i for i, (a, b) in enumerate(zip(noun.split(), new_noun.split())) if a != b]
                assert len(diff) == 1
                seen.add("color" if noun.split()[diff[0]] in COLORS else "shape")
        assert seen == {"color", "shape", "position"}  # three negatives: each change once
    # a world of one colour never changes (or says) a colour
    one_colour = ShapesSource(task="caption", image_size=8, negative_captions=2, colors=("red",))
    for negative in one_colour[0]["negative_captions"]:
        assert "red" not in negative and negative != one_colour[0]["caption"]
    with pytest.raises(ValueError, match="negative_captions"):
        ShapesSource(task="qa", negative_captions=1)


def test_tasks_caption_and_text():
    caption_example = ShapesSource(task="caption", image_size=32)[7]
    assert caption_example["conversation"] is None and len(caption_example["images"]) == 1
    for obj in caption_example["meta"]["objects"]:
        where = "in the center" if obj["position"] == "center" else f"at the {obj['position']}"
        assert f"a {obj['size']} {obj['color']} {obj['shape']} {where}" in caption_example["caption"]
    text_example = ShapesSource(task="text", turns_per_example=4)[7]
    assert text_example["images"] == [] and "<image>" not in str(text_example["conversation"])
    assert "grounding" not in text_example["meta"]["question_types"]
    first_turn = text_example["conversation"][0]["content"]
    assert first_turn.startswith(shapes.caption(ShapesSource(task="text").sample(7)[0]))
    qa_example = ShapesSource(image_size=32)[7]
    assert qa_example["conversation"][0]["content"].startswith("<image>\n")
    assert [t["content"] for t in qa_example["conversation"][1::2]] == qa_example["meta"]["answers"]


def test_vocabulary_covers_all_text():
    vocabulary = set(shapes.vocabulary())
    words = {w for text in shapes.corpus(300) for w in shapes.split_words(text)}
    for task in ("qa", "caption", "text"):
        for index in range(100):
            example = ShapesSource(task=task, image_size=8)[index]
            texts = [t["content"] for t in example["conversation"] or []] + [example["caption"] or ""]
            words |= {w for text in texts for w in shapes.split_words(text)} - {"<image>"}
    assert words <= vocabulary, words - vocabulary
    assert len(vocabulary) < 1100


def test_split_sizes_and_bad_options():
    assert len(ShapesSource(split="train")) == 2**31
    assert len(ShapesSource(split="validation")) == 2000
    with pytest.raises(IndexError):
        ShapesSource(split="test")[2000]
    for bad in (dict(split="dev"), dict(task="vqa"), dict(question_types=("size",)),
                dict(holdout=(("pink", "circle"),)), dict(compositional=True)):
        with pytest.raises(ValueError, match="supported|compositional"):
            ShapesSource(**bad)


def test_codes_style_shows_each_objects_attributes_in_its_cell():
    """style='codes' (the diagnostic rendering): the same scenes, questions and answers; each
    object's cell holds its colour / a grey per shape / a grey per size / black in its quarters,
    everything else stays pale."""
    scene_source = ShapesSource(seed=5, image_size=48, turns_per_example=3)
    codes_source = ShapesSource(seed=5, image_size=48, turns_per_example=3, style="codes")
    shape_greys, size_greys = {}, {}
    for index in range(30):
        drawn, coded = scene_source[index], codes_source[index]
        assert coded["conversation"] == drawn["conversation"]
        assert coded["meta"] == drawn["meta"]
        image = coded["images"][0]
        occupied = set()
        for obj in coded["meta"]["objects"]:
            cell = POSITIONS.index(obj["position"])
            occupied.add(cell)
            row, col = divmod(cell, 3)
            quarters = image[16 * row:16 * row + 16, 16 * col:16 * col + 16].reshape(2, 8, 2, 8, 3)
            quarters = quarters.transpose(0, 2, 1, 3, 4).reshape(4, 64, 3)
            assert all((q == q[0]).all() for q in quarters), "every quarter is one flat colour"
            np.testing.assert_array_equal(quarters[0, 0], COLORS[obj["color"]])
            shape_greys.setdefault(obj["shape"], set()).add(int(quarters[1, 0, 0]))
            size_greys.setdefault(obj["size"], set()).add(int(quarters[2, 0, 0]))
            np.testing.assert_array_equal(quarters[3, 0], [0, 0, 0])
        for cell in set(range(9)) - occupied:
            row, col = divmod(cell, 3)
            assert (image[16 * row:16 * row + 16, 16 * col:16 * col + 16] == 240).all()
    assert len(shape_greys) == len(SHAPES) and all(len(v) == 1 for v in shape_greys.values())
    assert len({next(iter(v)) for v in shape_greys.values()}) == len(SHAPES)
    assert len(size_greys) == len(SIZES) and len({next(iter(v)) for v in size_greys.values()}) == 2
    with pytest.raises(ValueError, match="divisible by 6"):
        ShapesSource(image_size=32, style="codes")[0]
    with pytest.raises(ValueError, match="supported"):
        ShapesSource(style="sketch")
