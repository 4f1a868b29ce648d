"""Factual recall: "The Eiffel Tower is located in the city of" → " Paris", corrupted by another landmark.

    python -c "from attrpatch import load_tokenizer, make_batch; print(make_batch('factual', load_tokenizer(), 4).prompts)"

Pairs of landmarks whose prompts have the same number of GPT-2 tokens (tests check); each pair is used in
both directions, so the clean answer of one prompt is the wrong answer of the other. ``swap`` is the only
corruption: the landmark of the pair's other prompt.
"""

from __future__ import annotations

from attrpatch.tasks import Prompt, TaskConfig, register_task

PAIRS = (
    (("The Eiffel Tower", " Paris"), ("The Colosseum", " Rome")),
    (("The Brandenburg Gate", " Berlin"), ("The Space Needle", " Seattle")),
    (("Big Ben", " London"), ("The Kremlin", " Moscow")),
    (("The Acropolis", " Athens"), ("The Forbidden City", " Beijing")),
    (("The Sydney Opera House", " Sydney"), ("The Prado Museum", " Madrid")),
    (("Tokyo Tower", " Tokyo"), ("The CN Tower", " Toronto")),
    (("The Blue Mosque", " Istanbul"), ("The Charles Bridge", " Prague")),
    (("The Atomium", " Brussels"), ("The Duomo", " Florence")),
    (("The Sagrada Familia", " Barcelona"), ("The Rijksmuseum", " Amsterdam")),
    (("The Little Mermaid statue", " Copenhagen"), ("The Tower of London", " London")),
)
TEMPLATE = "{landmark} is located in the city of"


@register_task("factual", corruptions=("swap",))
def factual(cfg: TaskConfig) -> list[Prompt]:
    """Cycles through the pairs, both directions; deterministic (the seed rotates the start)."""
    facts = [(a, b) for a, b in PAIRS] + [(b, a) for a, b in PAIRS]
    start = cfg.seed % len(facts)
    out = []
    for i in range(cfg.n_prompts):
        (lm, ans), (other, wrong) = facts[(start + i) % len(facts)]
        out.append(Prompt(TEMPLATE.format(landmark=lm), TEMPLATE.format(landmark=other), ans, wrong,
                          template=(start + i) % len(PAIRS)))
    return out
