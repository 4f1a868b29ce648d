"""Gendered pronoun: "So {name} is a really great friend, isn't" → " he" / " she".

    python -c "from attrpatch import load_tokenizer, make_batch; print(make_batch('pronoun', load_tokenizer(), 4).prompts)"

The corruption ``flip`` replaces the name with one of the other gender (one token for one token), so the
expected pronoun flips and the corrupted logit difference is negative.
"""

from __future__ import annotations

import random

from attrpatch.tasks import Prompt, TaskConfig, register_task

MALE = ("John Michael David James Robert Daniel Thomas Mark Paul Steven Kevin Brian Peter George Frank Jack "
        "Henry Harry Joe Tom Tim Bob Jim Mike Steve Adam Eric Sam Ben Ryan Scott").split()
FEMALE = ("Mary Sarah Jessica Jennifer Amanda Lisa Laura Rachel Emily Anna Emma Kate Jane Alice Rose Grace Lucy "
          "Helen Susan Ruth Ann Beth Amy Megan Nicole Michelle Rebecca Angela Katie Julia").split()
TEMPLATE = "So {name} is a really great friend, isn't"


@register_task("pronoun", corruptions=("flip",))
def pronoun(cfg: TaskConfig) -> list[Prompt]:
    """Alternating male and female names; deterministic in ``cfg.seed``."""
    rng = random.Random(cfg.seed)
    out = []
    for i in range(cfg.n_prompts):
        male = i % 2 == 0
        name, other = (rng.choice(MALE), rng.choice(FEMALE)) if male else (rng.choice(FEMALE), rng.choice(MALE))
        ans, wrong = (" he", " she") if male else (" she", " he")
        out.append(Prompt(TEMPLATE.format(name=name), TEMPLATE.format(name=other), ans, wrong))
    return out
