"""Chat templates: the strings transformers' apply_chat_template renders, template loading and the jinja environment."""

from __future__ import annotations

import json

import pytest

import processing_fixtures as pf
from smolvlm.errors import PromptError
from smolvlm.processing import ChatTemplate, Processor, load_chat_template, message_images, normalize_messages

# transformers' own SmolVLM template for video-era checkpoints (handles string content too).
from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE as SMOLVLM2_TEMPLATE  # noqa: E402

CHATML_TEMPLATE = (  # SmolLM2-Instruct's template, with its default system prompt
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def text(t):
    return {"type": "text", "text": t}


IMAGE = {"type": "image"}

CONVERSATIONS = {
    "single_turn": [{"role": "user", "content": [IMAGE, text("What is in this image?")]}],
    "text_first": [{"role": "user", "content": [text("Look: "), IMAGE, text(" what is it?")]}],
    "multi_turn": [
        {"role": "user", "content": [IMAGE, text("Describe it.")]},
        {"role": "assistant", "content": [text("A cat on a sofa.")]},
        {"role": "user", "content": [text("What colour is the cat?")]},
    ],
    "system": [
        {"role": "system", "content": [text("You are a careful assistant.")]},
        {"role": "user", "content": [IMAGE, text("Count the coins.")]},
    ],
    "multi_image": [
        {"role": "user", "content": [IMAGE, IMAGE, text("Which one is bigger?"), IMAGE]},
        {"role": "assistant", "content": [text("The second.")]},
        {"role": "user", "content": [IMAGE, text("And this?")]},
    ],
    "text_only": [{"role": "user", "content": [text("Hello! 1 + 1 = ?")]}],
    "unicode": [{"role": "user", "content": [text("Qu'est-ce que c'est ? 日本語 🙂 <b>&amp;</b>")]}],
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return pf.write_processor_folder(tmp_path_factory.mktemp("chat"), "512", "v4")


@pytest.fixture(scope="module")
def ours(folder):
    return Processor.from_pretrained(folder)


@pytest.fixture(scope="module")
def reference(folder):
    return pf.reference_processor(folder)


@pytest.mark.parametrize("generation_prompt", [True, False])
@pytest.mark.parametrize("name", CONVERSATIONS)
def test_official_template_matches_transformers(ours, reference, name, generation_prompt):
    conversation = CONVERSATIONS[name]
    expected = reference.apply_chat_template(conversation, add_generation_prompt=generation_prompt)
    assert ours.render_chat(conversation, add_generation_prompt=generation_prompt) == expected
    if name == "single_turn" and generation_prompt:
        assert expected == "<|im_start|>User:<image>What is in this image?<end_of_utterance>\nAssistant:"


def test_batch_of_conversations(ours, reference):
    batch = [CONVERSATIONS["single_turn"], CONVERSATIONS["multi_turn"]]
    assert ours.render_chat(batch, add_generation_prompt=True) == reference.apply_chat_template(
        batch, add_generation_prompt=True
    )


@pytest.mark.parametrize("template", [SMOLVLM2_TEMPLATE, CHATML_TEMPLATE], ids=["smolvlm2", "chatml"])
def test_string_content_templates_match_transformers(reference, template):
    conversation = [
        {"role": "system", "content": "You answer in French."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
    ]
    for generation_prompt in (True, False):
        expected = reference.tokenizer.apply_chat_template(
            conversation, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
        )
        assert ChatTemplate(template).render(conversation, generation_prompt) == expected
    chatml = ChatTemplate(CHATML_TEMPLATE).render(conversation[1:2], add_generation_prompt=True)
    assert chatml.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_string_content_is_kept_with_the_v1_template(ours):
    """The v1 SmolVLM template only reads lists of parts and would drop a plain string; we wrap it as one part."""
    as_string = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [IMAGE, text("Hi")]}]
    as_parts = [{"role": "system", "content": [text("Be brief.")]}, as_string[1]]
    assert not ChatTemplate(pf.SMOLVLM_CHAT_TEMPLATE).renders_string_content
    assert ChatTemplate(SMOLVLM2_TEMPLATE).renders_string_content
    assert ours.render_chat(as_string) == ours.render_chat(as_parts) == (
        "<|im_start|>System: Be brief.<end_of_utterance>\nUser:<image>Hi<end_of_utterance>\n"
    )


def test_openai_image_url_parts(ours, reference):
    openai = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                                           text("What is it?")]}]  # fmt: skip
    assert ours.render_chat(openai, True) == reference.apply_chat_template(openai, add_generation_prompt=True)
    assert normalize_messages(openai)[0]["content"][0] == {"type": "image", "url": "data:image/png;base64,AAAA"}
    assert message_images(normalize_messages(openai)) == ["data:image/png;base64,AAAA"]


def test_message_images_in_order_and_keys():
    messages = normalize_messages([
        {"role": "user", "content": [{"type": "image", "path": "a.png"}, text("x"), {"type": "image", "url": "b.png"}]},
        {"role": "assistant", "content": "ok", "tool_calls": None},
        {"role": "user", "content": [{"type": "image", "base64": "aGk="}, {"type": "image", "image": "c.png"}]},
    ])  # fmt: skip
    assert "tool_calls" not in messages[1]  # None values dropped, as transformers does
    assert message_images(messages) == ["a.png", "b.png", b"hi", "c.png"]


def test_rendered_images_become_placeholders():
    """The template sees plain data only: a decoded image in a part is a '<Image>' string, never the object."""
    from PIL import Image

    template = ChatTemplate("{% for m in messages %}{{ m['content'][0]['image'] }}{% endfor %}")
    assert template.render([{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (2, 2))}]}]) == (
        "<Image>"
    )


def test_template_sees_special_tokens(ours):
    template = ChatTemplate("{{ bos_token }}|{{ eos_token }}|{{ pad_token }}", ours.tokenizer.template_variables())
    assert template.render([]) == "<|im_start|>|<end_of_utterance>|<|im_end|>"


def test_jinja_environment_like_transformers(reference):
    source = (
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
        "{% set ns.n = ns.n + 1 %}{% generation %}{{ m['content'] | tojson }}{% endgeneration %}{% endfor %}"
        "|{{ ns.n }}|{{ dict(a=1) | tojson }}|{{ strftime_now('%Y') | length }}"
        "{% if add_generation_prompt %}|{{ x }}{% endif %}"
    )
    conversation = [{"role": "user", "content": "<b>é</b>"}, {"role": "user", "content": "2"}, {"role": "user", "content": "3"}]
    ours = ChatTemplate(source).render(conversation, add_generation_prompt=True, x="extra")
    expected = reference.tokenizer.apply_chat_template(
        conversation, chat_template=source, tokenize=False, add_generation_prompt=True, x="extra"
    )
    assert ours == expected == '"<b>é</b>""2"|2|{"a": 1}|4|extra'


@pytest.mark.parametrize(
    "source, message",
    [
        ("{{ raise_exception('only user and assistant roles are supported') }}", "only user and assistant"),
        ("{{ messages.append(1) }}", "unsafe"),  # the sandbox is immutable
        ("{% set ns = namespace() %}{% set ns._x = 1 %}", "underscore"),
        ("{% for m in messages %}", "does not compile"),
    ],
)
def test_template_errors_are_prompt_errors(source, message):
    with pytest.raises(PromptError, match=message):
        ChatTemplate(source).render([{"role": "user", "content": "hi"}])


def test_template_loading_order(tmp_path):
    """processor_config.json's key > chat_template.json > chat_template.jinja > tokenizer_config.json."""
    assert load_chat_template(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "from tokenizer_config"}))
    assert load_chat_template(tmp_path) == "from tokenizer_config"
    (tmp_path / "chat_template.jinja").write_text("from jinja")
    assert load_chat_template(tmp_path) == "from jinja"
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "from json"}))
    assert load_chat_template(tmp_path) == "from json"
    (tmp_path / "processor_config.json").write_text(json.dumps({"chat_template": "from processor_config"}))
    assert load_chat_template(tmp_path) == "from processor_config"


def test_named_templates_in_tokenizer_config(tmp_path):
    templates = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "plain"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": templates}))
    assert load_chat_template(tmp_path) == "plain"
