"""Arms of a comparison study: the spec a user writes, and its errors."""

import pytest

from clinfed.common.arms import Arm, parse_arms
from clinfed.common.config import ConfigError


def test_default_comparison_parses_in_order():
    arms = parse_arms("minilm:lora, minilm:head-only, smollm2:lora, smollm2:lora:prompt")
    assert [a.name for a in arms] == ["minilm:lora", "minilm:head-only", "smollm2:lora", "smollm2:lora:prompt"]
    assert arms[3] == Arm("smollm2", "lora", "prompt")
    assert parse_arms("") == []


def test_lora_rank_arm_sets_rank_and_alpha():
    (arm,) = parse_arms("tiny-bert:lora-r16")
    assert arm.rank == 16 and arm.name == "tiny-bert:lora-r16"
    assert arm.overrides({})["lora-rank"] == 16 and arm.overrides({})["lora-alpha"] == 32


@pytest.mark.parametrize("text,msg", [
    ("minilm", "not model:method"),
    ("minilm:qlora", "unknown method 'qlora'"),
    ("minilm:lora:chat", "unknown form 'chat'"),
    ("smollm2:head-only:prompt", "prompt form tunes LoRA"),
    ("minilm:lora-r0", "outside 1-1024"),
    ("minilm:lora, minilm:lora", "listed twice"),
    ("a:b:c:d", "not model:method"),
])
def test_bad_arms_are_named(text, msg):
    with pytest.raises(ConfigError, match=msg):
        parse_arms(text)
