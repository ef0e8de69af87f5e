"""Chat templates render exactly what each family's official HF jinja template renders (checked
with transformers' `apply_chat_template`), flag exactly the answers + end-of-turn as targets, and
their own jinja twins (rendered by transformers) give the same text and generation prompts."""
import jinja2
import pytest

from vlm_jax.data.templates import TEMPLATES, TemplateError, get_template
from vlm_jax.data.tokenizer import train_word_tokenizer

SYSTEM = "You answer briefly."
CONVERSATION = [
    {"role": "user", "content": "<image>\nWhat color is the circle?"},
    {"role": "assistant", "content": "red"},
    {"role": "user", "content": "How many objects are there? "},
    {"role": "assistant", "content": " 2"},
]
WITH_SYSTEM = [{"role": "system", "content": SYSTEM}] + CONVERSATION

# Official chat templates as shipped in each model's tokenizer_config.json.
LLAMA2_JINJA = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}")
LLAMA3_JINJA = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}")
QWEN2_JINJA = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
GEMMA3_JINJA = (
    "{{ bos_token }}\n{%- if messages[0]['role'] == 'system' -%}\n"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n"
    "{%- set loop_messages = messages[1:] -%}\n{%- else -%}\n"
    "{%- set first_user_prefix = \"\" -%}\n{%- set loop_messages = messages -%}\n{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "{{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "{%- endif -%}\n{%- if (message['role'] == 'assistant') -%}\n{%- set role = \"model\" -%}\n"
    "{%- else -%}\n{%- set role = message['role'] -%}\n{%- endif -%}\n"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "{{- message['content'] | trim -}}\n{{ '<end_of_turn>\n' }}\n{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n{{'<start_of_turn>model\n'}}\n{%- endif -%}\n")
OFFICIAL = {"llama2": LLAMA2_JINJA, "llama3": LLAMA3_JINJA, "qwen2": QWEN2_JINJA,
            "gemma": GEMMA3_JINJA}


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer
    directory = tmp_path_factory.mktemp("tok")
    train_word_tokenizer(["what color is the circle red"]).save(str(directory))
    return AutoTokenizer.from_pretrained(str(directory))


@pytest.mark.parametrize("name", sorted(OFFICIAL))
@pytest.mark.parametrize("messages", [CONVERSATION, WITH_SYSTEM], ids=["plain", "system"])
def test_matches_official_jinja(hf_tokenizer, name, messages):
    expected = hf_tokenizer.apply_chat_template(messages, chat_template=OFFICIAL[name],
                                                tokenize=False)
    assert get_template(name).text(messages, "<bos>", "<eos>") == expected


def test_expected_strings_written_out():
    """The same renders spelled out, so a reader sees the formats (and the jinja is not the only
    reference)."""
    assert get_template("llama2").text(WITH_SYSTEM, "<s>", "</s>") == (
        "<s>[INST] <<SYS>>\nYou answer briefly.\n<</SYS>>\n\n<image>\nWhat color is the circle?"
        " [/INST] red </s><s>[INST] How many objects are there? [/INST] 2 </s>")
    assert get_template("qwen2").text(CONVERSATION) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<image>\nWhat color is the circle?<|im_end|>\n"
        "<|im_start|>assistant\nred<|im_end|>\n"
        "<|im_start|>user\nHow many objects are there? <|im_end|>\n"
        "<|im_start|>assistant\n 2<|im_end|>\n")
    assert get_template("gemma").text(WITH_SYSTEM, "<bos>") == (
        "<bos><start_of_turn>user\nYou answer briefly.\n\n<image>\nWhat color is the circle?"
        "<end_of_turn>\n<start_of_turn>model\nred<end_of_turn>\n"
        "<start_of_turn>user\nHow many objects are there?<end_of_turn>\n"
        "<start_of_turn>model\n2<end_of_turn>\n")
    assert get_template("llama3").text(CONVERSATION, "<|begin_of_text|>") == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat color is the"
        " circle?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nred<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHow many objects are there?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n2<|eot_id|>")


def _llava_conv_vicuna_v1(messages, bos, eos):
    """LLaVA's Conversation.get_prompt for SeparatorStyle.TWO (sep=" ", sep2="</s>"), re-typed."""
    system = ("A chat between a curious human and an artificial intelligence assistant. The "
              "assistant gives helpful, detailed, and polite answers to the human's questions.")
    if messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    seps = [" ", eos]
    ret = system + seps[0]
    for i, message in enumerate(messages):
        role = {"user": "USER", "assistant": "ASSISTANT"}[message["role"]]
        ret += role + ": " + message["content"] + seps[i % 2]
    return bos + ret


@pytest.mark.parametrize("messages", [CONVERSATION, WITH_SYSTEM], ids=["plain", "system"])
def test_vicuna_matches_llava(messages):
    assert get_template("vicuna").text(messages, "<s>", "</s>") == _llava_conv_vicuna_v1(
        messages, "<s>", "</s>")


@pytest.mark.parametrize("name", sorted(set(TEMPLATES) - {"plain", "paligemma"}))
def test_targets_are_answers_and_end_of_turn(name):
    pieces = get_template(name).render(WITH_SYSTEM if name != "gemma" else CONVERSATION,
                                       "<bos>", "<eos>")
    targets = [text for text, is_target in pieces if is_target]
    end_of_turn = {"llama2": " <eos>", "llama3": "<|eot_id|>", "qwen2": "<|im_end|>",
                   "chatml": "<|im_end|>", "gemma": "<end_of_turn>", "vicuna": "<eos>",
                   "minimal": "<eos>"}[name]
    assert len(targets) == 2
    for target, answer in zip(targets, ["red", "2"]):
        assert target.endswith(end_of_turn)
        assert target[:-len(end_of_turn)].strip() == answer
    prompt = "".join(text for text, is_target in pieces if not is_target)
    assert "What color is the circle?" in prompt and "red" not in prompt


def test_plain_is_images_then_caption():
    messages = [{"role": "user", "content": "<image>\nDescribe the image briefly."},
                {"role": "assistant", "content": "a red circle "}]
    assert get_template("plain").render(messages, "<bos>", "<eos>") == [
        ("<bos><image>\n", False), ("a red circle<eos>", True)]


def test_minimal_is_questions_then_answers():
    pieces = get_template("minimal").render(CONVERSATION, "<bos>", "<eos>")
    assert pieces == [("<bos>", False), ("<image>\nWhat color is the circle?\n", False),
                      ("red<eos>", True), ("How many objects are there? \n", False),
                      (" 2<eos>", True)]
    with_system = get_template("minimal").text(WITH_SYSTEM, "<bos>", "<eos>")
    assert with_system.startswith(f"<bos>{SYSTEM}\n<image>\n")


def test_paligemma_is_images_bos_prefix_newline_then_suffix():
    """transformers' PaliGemmaProcessor: images first wherever the prompt has them, BOS, the
    prefix and "\n" (bidirectional under prefix_lm), then the suffix and EOS (learned)."""
    template = get_template("paligemma")
    messages = [{"role": "user", "content": "Which colour? <image>\n<image>"},
                {"role": "assistant", "content": "red"}]
    assert template.render(messages, "<bos>", "<eos>") == [
        ("<image><image><bos>Which colour? \n", False), ("red<eos>", True)]
    assert template.render(SINGLE_TURN[:1] + [{"role": "assistant", "content": ""}], "<bos>",
                           "<eos>") == [("<image><bos>What color is the circle?\n", False),
                                        ("<eos>", True)]
    for refused in (CONVERSATION, [{"role": "system", "content": SYSTEM}] + SINGLE_TURN):
        with pytest.raises(TemplateError, match="one user turn and its answer"):
            template.render(refused, "<bos>", "<eos>")


def test_bad_conversations_raise():
    with pytest.raises(TemplateError, match="expected 'user'"):
        get_template("qwen2").render([{"role": "assistant", "content": "hi"}])
    with pytest.raises(TemplateError, match="expected 'assistant'"):
        get_template("llama3").render([{"role": "user", "content": "a"},
                                       {"role": "user", "content": "b"}])
    with pytest.raises(TemplateError, match="exactly one caption"):
        get_template("plain").render(CONVERSATION)
    with pytest.raises(ValueError, match="supported: .*llama3"):
        get_template("chatml2")


# ---------------------------------------------------------------------- the templates' own jinja

def _hf_items(content):
    """Our string content as HF multimodal items: each "<image>\n" an image item."""
    parts = content.split("<image>\n")
    items = [{"type": "text", "text": parts[0]}] if parts[0] else []
    for part in parts[1:]:
        items.append({"type": "image"})
        if part:
            items.append({"type": "text", "text": part})
    return items


def _with_items(messages):
    return [dict(m, content=_hf_items(m["content"])) for m in messages]


SINGLE_TURN = CONVERSATION[:2]
TEXT_ONLY = [{"role": "user", "content": " Name a colour. "},
             {"role": "assistant", "content": "red"}]
TWO_IMAGES = [{"role": "user", "content": "<image>\n<image>\nSame shape?"},
              {"role": "assistant", "content": "yes"}]
# (messages as our renderers take them, the same as transformers users write them)
JINJA_CASES = {
    "single_turn": (SINGLE_TURN, SINGLE_TURN),
    "multi_turn": (CONVERSATION, CONVERSATION),
    "system": (WITH_SYSTEM, WITH_SYSTEM),
    "text_only": (TEXT_ONLY, TEXT_ONLY),
    "items_single_turn": (SINGLE_TURN, _with_items(SINGLE_TURN)),
    "items_system": (WITH_SYSTEM, _with_items(WITH_SYSTEM)),
    "items_two_images": (TWO_IMAGES, _with_items(TWO_IMAGES)),
}


def _render_jinja(template, messages, add_generation_prompt, bos="<bos>", eos="<eos>"):
    from transformers.utils.chat_template_utils import render_jinja_template
    rendered, _ = render_jinja_template([messages], chat_template=template.jinja,
                                        add_generation_prompt=add_generation_prompt,
                                        bos_token=bos, eos_token=eos)
    return rendered[0]


def _our_prompt(template, messages, bos="<bos>", eos="<eos>"):
    """The text before the answer, as evaluate.conversation_prompt_ids cuts it."""
    pieces = template.render(list(messages) + [{"role": "assistant", "content": ""}], bos, eos)
    last_target = max(i for i, (_, is_target) in enumerate(pieces) if is_target)
    return "".join(text for text, _ in pieces[:last_target])


def test_hf_items_helper():
    assert _hf_items("<image>\nWhat?") == [{"type": "image"}, {"type": "text", "text": "What?"}]


@pytest.mark.parametrize("case", sorted(JINJA_CASES))
@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_jinja_renders_our_text(name, case):
    ours, theirs = JINJA_CASES[case]
    template = get_template(name)
    try:
        expected = template.text(ours, "<bos>", "<eos>")
    except TemplateError:  # plain takes one caption: the jinja refuses the same conversations
        # plain takes one caption, paligemma one question: the jinja refuses the same
        with pytest.raises(jinja2.exceptions.TemplateError, match="exactly one caption|one user turn"):
            _render_jinja(template, theirs, add_generation_prompt=False)
        return
    assert _render_jinja(template, theirs, add_generation_prompt=False) == expected


@pytest.mark.parametrize("case", sorted(JINJA_CASES))
@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_jinja_generation_prompt_is_our_prompt(name, case):
    ours, theirs = JINJA_CASES[case]
    ours, theirs = ours[:-1], theirs[:-1]  # ends with the user turn to answer
    template = get_template(name)
    try:
        expected = _our_prompt(template, ours)
    except TemplateError:
        # plain takes one caption, paligemma one question: the jinja refuses the same
        with pytest.raises(jinja2.exceptions.TemplateError, match="exactly one caption|one user turn"):
            _render_jinja(template, theirs, add_generation_prompt=True)
        return
    assert _render_jinja(template, theirs, add_generation_prompt=True) == expected
    if name != "plain":  # without the generation prompt: the user-ended conversation as is
        assert _render_jinja(template, theirs, add_generation_prompt=False) == template.text(
            ours, "<bos>", "<eos>")


def test_jinja_prompts_written_out():
    """Two generation prompts spelled out: image items render as our training format."""
    question = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}]
    assert _render_jinja(get_template("vicuna"), question, True, "<s>", "</s>") == (
        "<s>A chat between a curious human and an artificial intelligence assistant. The assistant"
        " gives helpful, detailed, and polite answers to the human's questions. USER: <image>\n"
        "What? ASSISTANT:")
    assert _render_jinja(get_template("plain"), question, True, "<s>", "</s>") == "<s><image>\n"


def test_jinja_without_bos_token():
    """A tokenizer without BOS (Qwen2) passes none: the jinja writes nothing, as we do."""
    assert _render_jinja(get_template("minimal"), SINGLE_TURN, False, None, "<eos>") == (
        get_template("minimal").text(SINGLE_TURN, None, "<eos>"))


@pytest.mark.parametrize("messages, match", [
    ([{"role": "assistant", "content": "hi"}], "expected an optional system turn"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "turn 1 has role user"),
    ([{"role": "system", "content": "s"}], "no user turn"),
    ([{"role": "user", "content": [{"type": "video"}]}], "video is not supported"),
])
@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_jinja_refuses_what_we_refuse(name, messages, match):
    with pytest.raises(jinja2.exceptions.TemplateError, match=match):
        _render_jinja(get_template(name), messages, add_generation_prompt=True)
