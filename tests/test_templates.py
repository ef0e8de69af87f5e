"""Chat templates render exactly what each family's official HF jinja template renders (checked
with transformers' `apply_chat_template`), and flag exactly the answers + end-of-turn as targets."""
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


@pytest.mark.parametrize("name", sorted(set(TEMPLATES) - {"plain"}))
def test_targets_are_answers_and_end_of_turn(name):
    pieces = get_template(name).render(WITH_SYSTEM if name != "gemma" else CONVERSATION,
                                       "<bos>", "<eos>")
    targets = [text for text, is_target in pieces if is_target]
    end_of_turn = {"llama2": " <eos>", "llama3": "<|eot_id|>", "qwen2": "<|im_end|>",
                   "gemma": "<end_of_turn>", "vicuna": "<eos>",
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


def test_bad_conversations_raise():
    with pytest.raises(TemplateError, match="expected 'user'"):
        get_template("qwen2").render([{"role": "assistant", "content": "hi"}])
    with pytest.raises(TemplateError, match="expected 'assistant'"):
        get_template("llama3").render([{"role": "user", "content": "a"},
                                       {"role": "user", "content": "b"}])
    with pytest.raises(TemplateError, match="exactly one caption"):
        get_template("plain").render(CONVERSATION)
    with pytest.raises(ValueError, match="supported: .*llama3"):
        get_template("chatml")
