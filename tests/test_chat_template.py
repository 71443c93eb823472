"""Chat templates: SmolLM2's own, llama.cpp's collection of real ones, and hostile ones."""

from __future__ import annotations

from typing import Any

import pytest

from tests import vectors
from workbench.errors import ModelError, UserError
from workbench.gguf.chat import CHATML, ChatTemplate

# tokenizer.chat_template of SmolLM2-135M-Instruct (the GGUF the workbench ships with).
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CONVERSATION = [
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "It is 4."},
]

# Templates of llama.cpp's collection that cannot render CONVERSATION, and why.
NEEDS_MORE = {
    # Reads caller-supplied `functions` and `datetime` variables and concatenates them.
    "fireworks-ai-llama-3-firefunction-v2.jinja": "model.bad_chat_template",
}


def test_smollm2_without_system_message_adds_its_default() -> None:
    t = ChatTemplate(SMOLLM2)
    out = t.render([{"role": "user", "content": "Hi"}])
    assert out == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_smollm2_with_system_message() -> None:
    t = ChatTemplate(SMOLLM2)
    messages = [{"role": "system", "content": "Be brief."}, *CONVERSATION]
    assert t.render(messages, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n"
        "<|im_start|>assistant\nIt is 4.<|im_end|>\n"
    )


def test_from_metadata_reads_template_and_special_token_texts() -> None:
    md = {
        "tokenizer.chat_template": "{{ bos_token }}{{ messages[0]['content'] }}{{ eos_token }}",
        "tokenizer.ggml.tokens": ["<unk>", "<s>", "</s>"],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
    }
    assert ChatTemplate.from_metadata(md).render(CONVERSATION) == "<s>What is 2 + 2?</s>"


def test_missing_template_falls_back_to_chatml() -> None:
    t = ChatTemplate.from_metadata({"tokenizer.ggml.tokens": ["a"]})
    assert t.source == CHATML
    assert t.render(CONVERSATION) == (
        "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\nIt is 4.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_helpers_hf_templates_rely_on() -> None:
    src = (
        "{{ messages | tojson }}|{{ strftime_now('%Y') | length }}"
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}|{{ m.role }}"
        "{% endfor %}"
        "{% generation %}|gen{% endgeneration %}"
    )
    out = ChatTemplate(src).render([{"role": "user", "content": "héllo <b>"}, *CONVERSATION])
    assert out == '[{"role": "user", "content": "héllo <b>"}, ' + (
        '{"role": "user", "content": "What is 2 + 2?"}, '
        '{"role": "assistant", "content": "It is 4."}]|4|user|gen'
    )


def test_trim_and_lstrip_blocks_as_hf() -> None:
    src = (
        "{% for m in messages %}\n    {% if true %}\n[{{ m.role }}]\n    {% endif %}\n{% endfor %}"
    )
    assert ChatTemplate(src).render(CONVERSATION) == "[user]\n[assistant]\n"


def test_raise_exception_is_a_user_error() -> None:
    t = ChatTemplate("{{ raise_exception('Conversation roles must alternate') }}")
    with pytest.raises(UserError) as e:
        t.render(CONVERSATION)
    assert e.value.code == "user.chat_rejected"
    assert e.value.message == "Conversation roles must alternate"


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user"}],
        [{"role": "user", "content": None}],
        [{"role": 3, "content": "x"}],
        ["user: hi"],
        "user: hi",
        None,
    ],
)
def test_messages_need_string_role_and_content(messages: Any) -> None:
    with pytest.raises(UserError) as e:
        ChatTemplate(SMOLLM2).render(messages)
    assert e.value.code == "user.bad_messages"


def test_syntax_error_is_a_model_error_with_jinja_message() -> None:
    with pytest.raises(ModelError) as e:
        ChatTemplate("{% for m in messages %}{{ m.content }}")
    assert e.value.code == "model.bad_chat_template"
    assert "endfor" in e.value.message


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ self._TemplateReference__context }}",
        "{{ messages['__class__'] }}",
        "{{ ''|attr('__class__') }}",
        "{% set x = joiner.__init__.__globals__.os.system('touch /tmp/pwned') %}",
    ],
)
def test_templates_reaching_for_internals_are_refused_before_running(source: str) -> None:
    with pytest.raises(ModelError) as e:
        ChatTemplate(source + "{{ raise_exception('ran') }}")
    assert e.value.code == "model.unsafe_chat_template"


@pytest.mark.parametrize(
    "source",
    [
        # Names built at run time escape any reading of the source; the sandbox stops them.
        "{% set n = '__cla' ~ 'ss__' %}{{ ''|attr(n) }}",
        "{% set n = '__cla' ~ 'ss__' %}{{ messages[n] }}",
        "{{ messages.append({'role': 'x', 'content': 'y'}) }}",
        "{% for m in messages %}{{ loop._iterator }}{% endfor %}",
        "{{ 'x' * 10**9 }}",
        "{{ 2 ** 99999999 }}",
    ],
)
def test_unsafe_operations_are_stopped_at_run_time(source: str) -> None:
    messages = [dict(m) for m in CONVERSATION]
    with pytest.raises(ModelError) as e:
        ChatTemplate(source).render(messages)
    assert e.value.code == "model.unsafe_chat_template"
    assert messages == CONVERSATION


def test_underscore_dict_keys_are_data() -> None:
    t = ChatTemplate("{% set d = {'_k': 'v'} %}{{ d['_k'] }}{{ d._k }}")
    assert t.render(CONVERSATION) == "vv"


def test_runtime_failure_is_a_model_error() -> None:
    with pytest.raises(ModelError) as e:
        ChatTemplate("{{ messages[0]['content'] + 1 }}").render(CONVERSATION)
    assert e.value.code == "model.bad_chat_template"


@pytest.mark.vectors
def test_llama_cpp_templates_render_a_conversation() -> None:
    files = sorted(vectors.templates_dir().glob("*.jinja"))
    assert len(files) > 20
    failures = []
    for path in files:
        template = ChatTemplate(path.read_text(encoding="utf-8"), bos_token="<s>", eos_token="</s>")
        try:
            out = template.render(CONVERSATION, add_generation_prompt=False)
        except ModelError as e:
            if NEEDS_MORE.get(path.name) != e.code:
                failures.append(f"{path.name}: {e.code}: {e.message}")
            continue
        if path.name in NEEDS_MORE:
            failures.append(f"{path.name}: rendered, remove it from NEEDS_MORE")
        elif "What is 2 + 2?" not in out or "It is 4." not in out:
            failures.append(f"{path.name}: the messages are missing from {out!r}")
    assert not failures, "\n".join(failures)
