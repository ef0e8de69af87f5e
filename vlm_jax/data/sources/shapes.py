"""The `shapes` world: procedural scenes with captions and unambiguous Q/A, deterministic from
(seed, split, index), no files. The embedded default's data.

A scene holds 1-4 objects (shape x colour x size), at most one per cell of a 3x3 grid, on a pale
background. Everything said about a scene is true and unambiguous: an object is only ever named
by an attribute combination (or grid position) that no other object in the scene shares.
Answers are short and canonical ("red", "circle", "2", "yes", "top left", "[x0, y0, x1, y1]" with
integers in 0-1000 relative to the image). The language is small and regular so a word-level
tokenizer trained on `vocabulary()` / `corpus(n)` covers it exactly.
"""
from __future__ import annotations

import dataclasses
import itertools
import re

import numpy as np
from PIL import Image, ImageDraw

from vlm_jax.errors import ConfigError

SHAPES = ("circle", "square", "triangle", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
COLORS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220),
          "yellow": (235, 190, 0), "purple": (140, 50, 180)}
SIZES = ("small", "large")
POSITIONS = ("top left", "top middle", "top right", "middle left", "center", "middle right",
             "bottom left", "bottom middle", "bottom right")  # grid cells, row-major
RELATIONS = ("left of", "right of", "above", "below")
QUESTION_TYPES = ("color", "shape", "count", "exists", "position", "relation", "grounding")
TASKS = ("qa", "caption", "text")
CHANGES = ("color", "shape", "position")  # what `changed_caption` can change
STYLES = ("scene", "codes")
SPLITS = ("train", "validation", "test")
ATTRIBUTES = ("size", "color", "shape")  # what names an object, in the order a phrase says it

# Half the side of an object's bounding box, in units of the grid cell (cell = 1/3 of the image).
# A small object is then 9 px wide in the recipe's 48 px images: at 0.2 (6 px) a per-cell probe
# of the recipe's encoder, trained with direct supervision, told small shapes apart only 50% of
# the time (98% for large ones); at 0.27 it reaches 90%.
_RADIUS = {"small": 0.27, "large": 0.4}
_CELL = 1.0 / 3.0
_MARGIN = 0.04  # of a cell: objects never touch their cell's border, so cells stay unambiguous
_CROSS_ARM = 0.4  # arm width of the cross relative to its box: fill 0.64, between triangle/circle
# train spans 2**31 indices; validation and test take disjoint ranges after it.
_SPLIT_OFFSET = {"train": 0, "validation": 2**31, "test": 2**31 + 2**24}
_SPLIT_SIZE = {"train": 2**31, "validation": 2000, "test": 2000}


@dataclasses.dataclass(frozen=True)
class ShapeObject:
    shape: str
    color: str
    size: str
    cell: int                   # 0..8, row-major over the 3x3 grid
    center: tuple[float, float]  # (x, y) in [0, 1] image coordinates
    radius: float               # half the side of the bounding box, image units

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]

    @property
    def box(self) -> tuple[float, float, float, float]:
        x, y = self.center
        return (x - self.radius, y - self.radius, x + self.radius, y + self.radius)

    @property
    def box_1000(self) -> list[int]:
        return [int(round(v * 1000)) for v in self.box]


@dataclasses.dataclass(frozen=True)
class Scene:
    objects: tuple[ShapeObject, ...]
    background: str                        # "solid" | "gradient" | "noise"
    background_colors: tuple[tuple[int, int, int], tuple[int, int, int]]
    background_angle: float
    noise_seed: int


def position_phrase(cell: int) -> str:
    return "in the center" if POSITIONS[cell] == "center" else f"at the {POSITIONS[cell]}"


def noun_phrase(attributes: dict) -> str:
    """{"size": "large", "color": "red"} -> "large red object"; with a shape -> "large red circle"."""
    words = [attributes[key] for key in ("size", "color") if key in attributes]
    return " ".join(words + [attributes.get("shape", "object")])


def caption(scene: Scene, attributes: tuple[str, ...] = ATTRIBUTES) -> str:
    """Every object, in grid order, named by `attributes` (the ones its world varies)."""
    parts = [f"a {noun_phrase({k: getattr(o, k) for k in attributes})} {position_phrase(o.cell)}"
             for o in sorted(scene.objects, key=lambda o: o.cell)]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def split_words(text: str) -> list[str]:
    """The word-level segmentation `vocabulary()` is complete for: words, numbers, punctuation."""
    return re.findall(r"<image>|\w+|[^\w\s]", text)


def vocabulary() -> list[str]:
    """Every word `split_words` can produce from any text of this world (sorted)."""
    template_words = ("a the and at in of is there are what color shape where how many give "
                      "box object objects yes no")
    words = set(template_words.split()) | set(SHAPES) | set(PLURALS.values()) | set(COLORS)
    words |= set(SIZES) | {w for phrase in POSITIONS + RELATIONS for w in phrase.split()}
    words |= {str(number) for number in range(1001)} | set(",.?[]")
    return sorted(words)


def corpus(num_examples: int, seed: int = 0) -> list[str]:
    """num_examples texts (caption + every question and answer of a train example) for fitting
    a tokenizer; no images are rendered."""
    source = ShapesSource(split="train", seed=seed, turns_per_example=4)
    texts = []
    for index in range(num_examples):
        scene, turns = source.sample(index)
        texts.append(" ".join([caption(scene) + "."] + [f"{q} {a}" for _, q, a in turns]))
    return texts


class ShapesSource:
    """Random access over the shapes world: `len(source)`, `source[i] -> raw example`.

    task: "qa" (image + Q/A turns), "caption" (image + caption) or "text" (no image: the caption
      then Q/A answerable from it; grounding excluded since a caption has no coordinates).
    holdout: (colour, shape) pairs that never appear in train or validation scenes or text.
    compositional: test split only; every test scene then contains a held-out object and
      questions about an object target it when they can.
    style: "scene" (drawn shapes) or "codes" (a diagnostic: each object's cell shows its colour,
      shape and size as flat codes, see `render_codes`; same scenes, questions and answers).
    shapes / colors / sizes: the world's vocabulary, subsets of SHAPES / COLORS / SIZES (default:
      all). An attribute with a single value is never said: with sizes=("large",) captions,
      questions and answers say "red circle", never "large red circle".
    negative_captions: task "caption" only: each example also carries this many hard-negative
      captions (`negative_captions` field), each the caption with one object's colour, shape or
      position changed (`changed_caption`; the changes taken in turn from a random start), for
      image-text matching (data.negative_captions).
    """

    def __init__(self, split: str = "train", seed: int = 0, image_size: int = 224,
                 task: str = "qa", turns_per_example: int = 3,
                 question_types: tuple[str, ...] = QUESTION_TYPES,
                 holdout: tuple[tuple[str, str], ...] = (), compositional: bool = False,
                 num_examples: int | None = None, style: str = "scene",
                 shapes: tuple[str, ...] = SHAPES, colors: tuple[str, ...] = tuple(COLORS),
                 sizes: tuple[str, ...] = SIZES, negative_captions: int = 0):
        _check_choice("split", split, SPLITS)
        self.values = {"size": _check_subset("sizes", sizes, SIZES),
                       "color": _check_subset("colors", colors, tuple(COLORS)),
                       "shape": _check_subset("shapes", shapes, SHAPES)}
        # Attributes that tell objects apart here; a single-valued one is never mentioned.
        self.attributes = tuple(k for k in ATTRIBUTES if len(self.values[k]) > 1)
        self._subsets = [keys for n in range(1, len(self.attributes) + 1)
                         for keys in itertools.combinations(self.attributes, n)]
        _check_choice("style", style, STYLES)
        _check_choice("task", task, TASKS)
        for question_type in question_types:
            _check_choice("question_types entry", question_type, QUESTION_TYPES)
        for color, shape in holdout:
            _check_choice("holdout colour", color, self.values["color"])
            _check_choice("holdout shape", shape, self.values["shape"])
        if compositional and (split != "test" or not holdout):
            raise ConfigError("compositional=True needs split='test' and a non-empty holdout")
        if task == "text":
            question_types = tuple(t for t in question_types if t != "grounding")
        if task != "caption" and (not question_types or turns_per_example < 1):
            raise ConfigError(f"task {task!r} needs turns_per_example >= 1 and question types "
                              f"from {QUESTION_TYPES} (grounding is not available for 'text')")
        if negative_captions < 0 or (negative_captions and task != "caption"):
            raise ConfigError(f"negative_captions={negative_captions}: a count >= 0, for task "
                              f"'caption' only (got task {task!r})")
        if seed < 0 or image_size < 1:
            raise ConfigError(f"seed must be >= 0 and image_size >= 1, got {seed}, {image_size}")
        self.split, self.seed, self.image_size, self.task = split, seed, image_size, task
        self.turns_per_example, self.question_types = turns_per_example, tuple(question_types)
        self.holdout = frozenset(tuple(pair) for pair in holdout)
        self.compositional = compositional
        self.style = style
        self.negative_captions = negative_captions
        # What a negative caption can change here: colour / shape need two values of it.
        self._changes = tuple(c for c in CHANGES if c == "position" or len(self.values[c]) > 1)
        # Every count query this world can ask ({} = "objects"), fixed per source.
        self._count_queries = [
            q for q in [{}] + [dict(zip(keys, values)) for keys in self._subsets
                               for values in itertools.product(*(self.values[k] for k in keys))]
            if not self._mentions_holdout(q)]
        self.num_examples = _SPLIT_SIZE[split] if num_examples is None else num_examples
        if not 0 < self.num_examples <= _SPLIT_SIZE[split]:
            raise ConfigError(f"num_examples must be in [1, {_SPLIT_SIZE[split]}] for {split}")

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_examples:
            raise IndexError(f"shapes {self.split}: index {index} outside [0, {self.num_examples})")
        scene, turns = self.sample(index)
        meta = {"source": "shapes", "split": self.split, "index": index,
                "question_types": [t for t, _, _ in turns], "answers": [a for _, _, a in turns],
                "objects": [dict(shape=o.shape, color=o.color, size=o.size, position=o.position,
                                 box=o.box_1000) for o in scene.objects]}
        example = {"id": f"shapes:{self.split}:{self.seed}:{index}", "images": [],
                   "conversation": None, "caption": None, "meta": meta}
        if self.task == "caption":
            example["caption"] = self.caption(scene)
            if self.negative_captions:
                example["negative_captions"] = self._negative_captions(scene, index)
        else:
            conversation = []
            for _, question, answer in turns:
                conversation += [{"role": "user", "content": question},
                                 {"role": "assistant", "content": answer}]
            prefix = "<image>\n" if self.task == "qa" else self.caption(scene) + ". "
            conversation[0]["content"] = prefix + conversation[0]["content"]
            example["conversation"] = conversation
        if self.task != "text":
            example["images"] = [self.render(scene)]
        return example

    def caption(self, scene: Scene) -> str:
        return caption(scene, self.attributes)

    def changed_caption(self, scene: Scene, change: str, rng: np.random.Generator) -> str:
        """The caption of `scene` with exactly one object's colour, shape or position (`change`)
        made different (a position moves it to an empty cell): a hard negative for image-text
        matching that differs from the true caption in one attribute of one object."""
        _check_choice("change", change, CHANGES)
        if change in ("color", "shape") and len(self.values[change]) < 2:
            raise ConfigError(f"change={change!r}: this world has one {change} only")
        target = int(rng.integers(len(scene.objects)))
        obj = scene.objects[target]
        if change == "position":
            free = [c for c in range(9) if c not in {o.cell for o in scene.objects}]
            changed = dataclasses.replace(obj, cell=int(free[int(rng.integers(len(free)))]))
        else:
            others = [v for v in self.values[change] if v != getattr(obj, change)]
            changed = dataclasses.replace(obj, **{change: others[int(rng.integers(len(others)))]})
        objects = scene.objects[:target] + (changed,) + scene.objects[target + 1:]
        return self.caption(dataclasses.replace(scene, objects=objects))

    def _negative_captions(self, scene: Scene, index: int) -> list[str]:
        """`negative_captions` one-change captions of example `index` (its own random stream, so
        the scene, its questions and any resume are unchanged); outside the compositional test
        split a change never names a held-out (colour, shape) pair."""
        global_index = _SPLIT_OFFSET[self.split] + index
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, global_index, 1]))
        start = int(rng.integers(len(self._changes)))
        out = []
        for k in range(self.negative_captions):
            change = self._changes[(start + k) % len(self._changes)]
            for _ in range(100):  # a held-out pair is redrawn
                text = self.changed_caption(scene, change, rng)
                if self.compositional or not any(f"{c} {s}" in text for c, s in self.holdout):
                    break
            else:  # no colour / shape change avoids one: move an object instead
                text = self.changed_caption(scene, "position", rng)
            out.append(text)
        return out

    def render(self, scene: Scene) -> np.ndarray:
        """u8[S, S, 3]: `scene` drawn in this source's style at its image size."""
        draw = render_codes if self.style == "codes" else render
        return draw(scene, self.image_size)

    def sample(self, index: int) -> tuple[Scene, list[tuple[str, str, str]]]:
        """(scene, [(question_type, question, answer), ...]) for `index`, without rendering."""
        global_index = _SPLIT_OFFSET[self.split] + index
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, global_index]))
        while True:  # a scene that admits no question of the requested types is redrawn
            scene = self._sample_scene(rng)
            turns = [] if self.task == "caption" else self._sample_turns(scene, rng)
            if self.task == "caption" or turns:
                return scene, turns

    def _sample_scene(self, rng: np.random.Generator) -> Scene:
        num_objects = int(rng.integers(1, 5))
        cells = rng.choice(9, size=num_objects, replace=False)
        allowed = [(c, s) for c in self.values["color"] for s in self.values["shape"]
                   if (c, s) not in self.holdout]
        held_out = sorted(self.holdout)
        objects = []
        for slot, cell in enumerate(cells):
            pool = held_out if (self.compositional and slot == 0) else allowed
            color, shape = pool[int(rng.integers(len(pool)))]
            size = self.values["size"][int(rng.integers(len(self.values["size"])))]
            radius = _RADIUS[size] * _CELL
            slack = 0.5 * _CELL - radius - _MARGIN * _CELL
            row, col = divmod(int(cell), 3)
            center = ((col + 0.5) * _CELL + rng.uniform(-slack, slack),
                      (row + 0.5) * _CELL + rng.uniform(-slack, slack))
            objects.append(ShapeObject(shape, color, size, int(cell), center, radius))
        pale = [tuple(int(v) for v in 255 - rng.uniform(5, 40, 3)) for _ in range(2)]
        background = ("solid", "gradient", "noise")[int(rng.integers(3))]
        return Scene(tuple(objects), background, (pale[0], pale[1]),
                     float(rng.uniform(0, 2 * np.pi)), int(rng.integers(2**31)))

    def _sample_turns(self, scene: Scene, rng: np.random.Generator) -> list[tuple[str, str, str]]:
        turns, asked = [], set()
        for _ in range(self.turns_per_example * 8):
            if len(turns) == self.turns_per_example:
                break
            question_type = self.question_types[int(rng.integers(len(self.question_types)))]
            turn = _GENERATORS[question_type](self, scene, rng)
            if turn is not None and turn[0] not in asked:
                asked.add(turn[0])
                turns.append((question_type, *turn))
        return turns

    def _unique_references(self, scene: Scene, target: ShapeObject,
                           exclude: str | None = None) -> list[dict]:
        """Attribute combinations (not using `exclude`) that pick out `target` alone."""
        references = []
        for keys in self._subsets:
            if exclude in keys:
                continue
            attributes = {k: getattr(target, k) for k in keys}
            if sum(_matches(o, attributes) for o in scene.objects) == 1:
                references.append(attributes)
        return references

    # ----- question generators: each returns (question, answer) or None when infeasible -----

    def _target(self, candidates: list[ShapeObject], rng) -> ShapeObject:
        if self.compositional:
            held = [o for o in candidates if (o.color, o.shape) in self.holdout]
            candidates = held or candidates
        return candidates[int(rng.integers(len(candidates)))]

    def _mentions_holdout(self, attributes: dict) -> bool:
        return not self.compositional and (attributes.get("color"), attributes.get("shape")) in self.holdout

    def _ask_attribute(self, scene, rng, asked: str):
        target = self._target(list(scene.objects), rng)
        references = self._unique_references(scene, target, exclude=asked)
        choice = int(rng.integers(len(references) + 1))
        if asked == "color":
            subject = (f"the object {position_phrase(target.cell)}" if choice == len(references)
                       else f"the {noun_phrase(references[choice])}")
            return f"what color is {subject}?", target.color
        if choice == len(references):
            return f"what shape is {position_phrase(target.cell)}?", target.shape
        return f"what shape is the {noun_phrase(references[choice])}?", target.shape

    def _ask_color(self, scene, rng):
        return self._ask_attribute(scene, rng, "color")

    def _ask_shape(self, scene, rng):
        return self._ask_attribute(scene, rng, "shape")

    def _ask_count(self, scene, rng):
        # Draw the answer first (uniform over the counts this scene can produce), then a query
        # with that answer: otherwise "0" and "1" would dominate.
        by_answer: dict[int, list[dict]] = {}
        for query in self._count_queries:
            by_answer.setdefault(sum(_matches(o, query) for o in scene.objects), []).append(query)
        answers = sorted(by_answer)
        query_pool = by_answer[answers[int(rng.integers(len(answers)))]]
        query = query_pool[int(rng.integers(len(query_pool)))]
        count = sum(_matches(o, query) for o in scene.objects)
        words = [query[k] for k in ("size", "color") if k in query]
        noun = PLURALS[query["shape"]] if "shape" in query else "objects"
        return f"how many {' '.join(words + [noun])} are there?", str(count)

    def _ask_exists(self, scene, rng):
        if rng.random() < 0.5:
            target = self._target(list(scene.objects), rng)
            keys = self._subsets[int(rng.integers(len(self._subsets)))]
            attributes = {k: getattr(target, k) for k in keys}
        elif not self._subsets:  # a world of one kind of object: nothing absent to ask about
            return None
        else:
            for _ in range(50):
                keys = self._subsets[int(rng.integers(len(self._subsets)))]
                attributes = {k: self.values[k][int(rng.integers(len(self.values[k])))]
                              for k in keys}
                if not any(_matches(o, attributes) for o in scene.objects) and \
                        not self._mentions_holdout(attributes):
                    break
            else:
                return None
        present = any(_matches(o, attributes) for o in scene.objects)
        return f"is there a {noun_phrase(attributes)}?", "yes" if present else "no"

    def _ask_position(self, scene, rng):
        target = self._target(list(scene.objects), rng)
        references = self._unique_references(scene, target)
        if not references:
            return None
        reference = references[int(rng.integers(len(references)))]
        return f"where is the {noun_phrase(reference)}?", target.position

    def _ask_relation(self, scene, rng):
        want_yes = rng.random() < 0.5
        references = {o.cell: self._unique_references(scene, o) for o in scene.objects}
        options = []
        for first, second in itertools.permutations(scene.objects, 2):
            if references[first.cell] and references[second.cell]:
                options += [(first, second, r) for r in RELATIONS
                            if _holds(first, second, r) == want_yes]
        if not options:
            return None
        if self.compositional:
            held = [o for o in options if (o[0].color, o[0].shape) in self.holdout]
            options = held or options
        first, second, relation = options[int(rng.integers(len(options)))]
        first_refs, second_refs = references[first.cell], references[second.cell]
        first_ref = first_refs[int(rng.integers(len(first_refs)))]
        second_ref = second_refs[int(rng.integers(len(second_refs)))]
        question = f"is the {noun_phrase(first_ref)} {relation} the {noun_phrase(second_ref)}?"
        return question, "yes" if want_yes else "no"

    def _ask_grounding(self, scene, rng):
        references = {o.cell: self._unique_references(scene, o) for o in scene.objects}
        candidates = [o for o in scene.objects if references[o.cell]]
        if not candidates:
            return None
        target = self._target(candidates, rng)
        reference = references[target.cell][int(rng.integers(len(references[target.cell])))]
        x0, y0, x1, y1 = target.box_1000
        return f"give the box of the {noun_phrase(reference)}", f"[{x0}, {y0}, {x1}, {y1}]"


_GENERATORS = {"color": ShapesSource._ask_color, "shape": ShapesSource._ask_shape,
               "count": ShapesSource._ask_count, "exists": ShapesSource._ask_exists,
               "position": ShapesSource._ask_position, "relation": ShapesSource._ask_relation,
               "grounding": ShapesSource._ask_grounding}


def _matches(obj: ShapeObject, attributes: dict) -> bool:
    return all(getattr(obj, key) == value for key, value in attributes.items())


def _holds(first: ShapeObject, second: ShapeObject, relation: str) -> bool:
    (row_a, col_a), (row_b, col_b) = divmod(first.cell, 3), divmod(second.cell, 3)
    return {"left of": col_a < col_b, "right of": col_a > col_b,
            "above": row_a < row_b, "below": row_a > row_b}[relation]


def render(scene: Scene, image_size: int) -> np.ndarray:
    """u8[S, S, 3]: background at S, objects drawn at up to 4x supersampling then box-filtered."""
    supersample = max(1, min(4, 512 // image_size))
    canvas_size = image_size * supersample
    background = Image.fromarray(_background(scene, image_size))
    canvas = background.resize((canvas_size, canvas_size), Image.NEAREST)
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        x0, y0, x1, y1 = (v * canvas_size for v in obj.box)
        fill = COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif obj.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        elif obj.shape == "triangle":
            draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
        else:  # cross
            arm = (x1 - x0) * _CROSS_ARM / 2
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            draw.rectangle((cx - arm, y0, cx + arm, y1), fill=fill)
            draw.rectangle((x0, cy - arm, x1, cy + arm), fill=fill)
    if supersample > 1:
        canvas = canvas.resize((image_size, image_size), Image.BOX)
    return np.asarray(canvas, dtype=np.uint8).copy()


def render_codes(scene: Scene, image_size: int) -> np.ndarray:
    """u8[S, S, 3], S divisible by 6: the scene as flat codes instead of drawn shapes, a
    diagnostic that separates what the vision side sees from what the LLM learns. Each object's
    grid cell is split in 2x2 quarters: top-left its colour, top-right a grey level per shape,
    bottom-left a grey level per size, bottom-right black; empty cells and the rest are pale grey.
    With 48 px images and 8 px patches each quarter is exactly one patch."""
    if image_size % 6:
        raise ConfigError(f"style 'codes' needs an image size divisible by 6, got {image_size}")
    quarter = image_size // 6
    image = np.full((image_size, image_size, 3), 240, np.uint8)
    for obj in scene.objects:
        row, col = divmod(obj.cell, 3)
        y, x = 2 * quarter * row, 2 * quarter * col
        image[y:y + quarter, x:x + quarter] = COLORS[obj.color]
        image[y:y + quarter, x + quarter:x + 2 * quarter] = 40 + 50 * SHAPES.index(obj.shape)
        image[y + quarter:y + 2 * quarter, x:x + quarter] = 60 if obj.size == "small" else 180
        image[y + quarter:y + 2 * quarter, x + quarter:x + 2 * quarter] = 0
    return image


def _background(scene: Scene, image_size: int) -> np.ndarray:
    first, second = (np.array(c, np.float32) for c in scene.background_colors)
    if scene.background == "solid":
        pixels = np.broadcast_to(first, (image_size, image_size, 3))
    elif scene.background == "gradient":
        ys, xs = np.mgrid[0:image_size, 0:image_size] / max(image_size - 1, 1)
        along = xs * np.cos(scene.background_angle) + ys * np.sin(scene.background_angle)
        along = (along - along.min()) / max(float(np.ptp(along)), 1e-6)
        pixels = first * (1 - along[..., None]) + second * along[..., None]
    else:
        noise = np.random.default_rng(scene.noise_seed).normal(0, 4, (image_size, image_size, 3))
        pixels = first + noise
    return np.clip(np.round(pixels), 0, 255).astype(np.uint8)


def _check_subset(name: str, values, supported: tuple) -> tuple:
    values = tuple(values)
    if not values or len(set(values)) != len(values):
        raise ConfigError(f"shapes: {name} must be a non-empty list without repeats, got {values}")
    for value in values:
        _check_choice(f"{name} entry", value, supported)
    return values


def _check_choice(name: str, value, supported: tuple) -> None:
    if value not in supported:
        raise ConfigError(f"unsupported {name} {value!r}; supported: {', '.join(map(str, supported))}")
