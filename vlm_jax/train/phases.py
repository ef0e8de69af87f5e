"""Training phases: which params train (and at what lr multiplier), as param-group rules per phase.

    phase        trains                                        step kind    needs model.
    contrastive  vision_tower, text_tower, contrastive         contrastive  vision (use_head), text_tower
    lm           llm (or LoRA adapters on it)                  next_token   llm
    align        projector (+ cross_attention blocks)          next_token   vision, projector, llm
    instruct     projector (+ cross_attention) + llm (or LoRA  next_token   vision, projector, llm
                 adapters on it), optionally vision_tower at vision_lr_mult
    itm          itm_head, projector (+ cross_attention), llm  itm          vision (use_head),
    contrastive+itm  what contrastive and itm train            itm          text_tower, projector,
                                                                            llm, itm_head

The cross-attention blocks of a `model.fusion='cross_attention'` model are new, like the
projector, and train with it (Flamingo / Llama 3.2 Vision: the LLM stays frozen in alignment).

Image-text matching (BLIP; the `itm` step kind, train/step.py): on image-caption pairs (data
task "contrastive"), the LLM reads image + caption and `model.itm_head` says whether they match,
trained on the positives and on hard negatives drawn from the contrastive towers' similarities
(`losses.hard_negatives`; in `itm` those towers are frozen and only choose the negatives), and
on the captions the data gives as negatives (`data.negative_captions`, e.g. the shapes
source's one-change captions). `contrastive+itm` adds the sigmoid loss: loss = contrastive_weight * sigmoid + itm_weight * ITM.

A rule's value is an lr multiplier (float) or None = frozen. `PhaseConfig.param_groups` rules are
prepended to the phase's defaults, so a config can freeze or re-weight any part. Frozen params are
split off the trainable tree: they get no gradient and no optimizer state.

The full tree the rules see is the model params plus, with LoRA, the adapters under 'lora/'
(e.g. 'lora/llm/layers/attention/q/kernel/a').
"""
from __future__ import annotations

import dataclasses
from typing import Any

from vlm_jax.errors import ConfigError
from vlm_jax.models.vlm import VLMConfig
from vlm_jax.train import param_groups
from vlm_jax.train.lora import LoraConfig

PHASES = ("contrastive", "lm", "align", "instruct", "itm", "contrastive+itm")
ITM_PHASES = ("itm", "contrastive+itm")
LORA_KEY = "lora"


@dataclasses.dataclass(frozen=True)
class PhaseConfig:
    name: str = "instruct"
    # (regex, lr multiplier or None) pairs prepended to the phase's default rules.
    param_groups: tuple = ()
    # instruct only: also train the vision tower at this lr multiplier (None = frozen).
    vision_lr_mult: float | None = None
    # lm / instruct: train the LLM through LoRA adapters only (the base LLM stays frozen).
    lora: LoraConfig | None = None
    # contrastive+itm: the weights of its two losses (itm: itm_weight scales its one loss).
    itm_weight: float = 1.0
    contrastive_weight: float = 1.0

    def __post_init__(self):
        if self.name not in PHASES:
            raise ConfigError(f"train.phase.name={self.name!r}; supported: {PHASES}")
        if self.vision_lr_mult is not None and self.name != "instruct":
            raise ConfigError(f"train.phase.vision_lr_mult is an option of the 'instruct' phase, "
                              f"not of {self.name!r}")
        if self.lora is not None and self.name not in ("lm", "instruct"):
            raise ConfigError(f"train.phase.lora works in the 'lm' and 'instruct' phases, "
                              f"not in {self.name!r}")
        if self.contrastive_weight != 1.0 and self.name != "contrastive+itm":
            raise ConfigError(f"train.phase.contrastive_weight weighs the sigmoid loss of the "
                              f"'contrastive+itm' phase, not of {self.name!r}")
        if self.itm_weight != 1.0 and self.name not in ITM_PHASES:
            raise ConfigError(f"train.phase.itm_weight is an option of {ITM_PHASES}, "
                              f"not of {self.name!r}")
        object.__setattr__(self, "param_groups",
                           param_groups.normalize_rules(self.param_groups, "train.phase.param_groups"))
        for pattern, value in self.param_groups:
            if value is not None and not isinstance(value, (int, float)):
                raise ConfigError(f"train.phase.param_groups rule {pattern!r}: value {value!r} must "
                                  f"be an lr multiplier (number) or None (frozen)")

    @property
    def step_kind(self) -> str:
        if self.name in ITM_PHASES:
            return "itm"
        return "contrastive" if self.name == "contrastive" else "next_token"

    @property
    def reads_pairs(self) -> bool:
        """Whether the phase's batches are image-caption pairs (images + text_ids)."""
        return self.step_kind in ("contrastive", "itm")


def check_model_fits(phase: PhaseConfig, model: VLMConfig) -> None:
    """Raise a ValueError naming the missing model field when the phase cannot run on `model`."""
    needs = {"contrastive": ("vision", "text_tower"), "lm": ("llm",),
             "align": ("vision", "projector", "llm"), "instruct": ("vision", "projector", "llm")}
    for name in ITM_PHASES:
        needs[name] = ("vision", "text_tower", "projector", "llm")
    for field in needs[phase.name]:
        if getattr(model, field) is None:
            raise ConfigError(f"phase {phase.name!r} needs model.{field}, which is not set")
    if phase.reads_pairs and not model.vision.use_head:
        raise ConfigError(f"phase {phase.name!r} needs model.vision.use_head=True (the pooled "
                          f"image embedding comes from the MAP head)")
    if phase.name in ITM_PHASES and not model.itm_head:
        raise ConfigError(f"phase {phase.name!r} needs model.itm_head=True (the matching head)")


def default_rules(phase: PhaseConfig) -> tuple[tuple[str, Any], ...]:
    """The phase's own rules (before the config's `param_groups`)."""
    towers = [("vision_tower/.*", 1.0), ("text_tower/.*", 1.0), ("contrastive/.*", 1.0)]
    matching = [("itm_head/.*", 1.0), ("projector/.*", 1.0), ("cross_attention/.*", 1.0),
                ("llm/.*", 1.0)]
    if phase.name == "contrastive":
        rules = towers
    elif phase.name == "itm":
        rules = matching
    elif phase.name == "contrastive+itm":
        rules = towers + matching
    elif phase.name == "lm":
        rules = [("llm/.*", 1.0)]
    elif phase.name == "align":
        rules = [("projector/.*", 1.0), ("cross_attention/.*", 1.0)]
    else:
        rules = [("projector/.*", 1.0), ("cross_attention/.*", 1.0), ("llm/.*", 1.0)]
        if phase.vision_lr_mult is not None:
            rules.insert(0, ("vision_tower/.*", float(phase.vision_lr_mult)))
    if phase.lora is not None:
        # Adapters train; the LLM they sit on is frozen.
        rules = [(f"{LORA_KEY}/.*", 1.0), ("llm/.*", None)] + [r for r in rules if r[0] != "llm/.*"]
    return tuple(rules) + ((".*", None),)


def phase_rules(phase: PhaseConfig) -> tuple[tuple[str, Any], ...]:
    return tuple(phase.param_groups) + default_rules(phase)


def lr_multipliers(full_params: Any, phase: PhaseConfig) -> Any:
    """Per-leaf lr multiplier (None = frozen) over the full tree (params + 'lora' adapters)."""
    return param_groups.match_groups(full_params, phase_rules(phase))


def split_trainable(full_params: Any, multipliers: Any) -> tuple[dict, dict]:
    """(trainable, frozen) nested dicts; `multipliers` from `lr_multipliers`."""
    flat = param_groups.flatten(multipliers)
    return param_groups.split_tree(full_params, lambda path: flat[path] is not None)
