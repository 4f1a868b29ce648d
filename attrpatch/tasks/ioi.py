"""Indirect object identification (Wang et al. 2022, "Interpretability in the Wild").

    python -c "from attrpatch import load_tokenizer, make_batch; b = make_batch('ioi', load_tokenizer(), 4, corruption='abc'); print(b.prompts)"

``ioi``: templates of the IOI paper in both name orders (ABBA and BABA), single-token names, places and
objects, a seed and N prompts. The answer is the indirect object (IO), the wrong answer the subject (S).

Corruptions (the clean prompt's answers are kept):
* ``abc`` — all three names replaced by three other names ("ABC->XYZ, BAB->XYZ"): no name repeats, so the
  corrupted logit difference is near 0;
* ``flip`` — the second subject mention S2 becomes the IO, so the other name repeats and the corrupted
  logit difference is negative.

``split``: name pairs are hashed into a train (80%) and a test (20%) set, so a model trained on ``train``
is evaluated on held-out name combinations.

``ioi_seed8``: the eight prompts of the Attribution Patching Demo, corrupted by swapping neighbours.
"""

from __future__ import annotations

import random
import zlib

from attrpatch.tasks import Prompt, TaskConfig, register_task

NAMES = (
    "Michael Christopher Jessica Matthew Ashley Jennifer Joshua Amanda Daniel David James Robert John Joseph "
    "Andrew Ryan Brandon Jason Justin Sarah William Jonathan Stephanie Brian Nicole Nicholas Anthony Heather "
    "Eric Elizabeth Adam Megan Melissa Kevin Steven Thomas Timothy Christina Kyle Rachel Laura Lauren Amber "
    "Brittany Danielle Richard Kimberly Jeffrey Amy Crystal Michelle Tiffany Jeremy Benjamin Mark Emily Aaron "
    "Charles Rebecca Jacob Stephen Patrick Sean Erin Jamie Kelly Samantha Nathan Sara Dustin Paul Angela Tyler "
    "Scott Katherine Andrea Gregory Erica Mary Travis Lisa Kenneth Bryan Lindsey Kristen Jose Alexander Jesse "
    "Katie Lindsay Shannon Vanessa Courtney Christine Alicia Cody Allison Bradley Samuel Tom Dan Sid Martin "
    "Anna Emma Kate Jane Alice Rose Grace Lucy Sophie Helen Carol Susan Peter George Frank Jack Henry Harry Joe "
    "Max Sam Ben Tim Bob Bill Jim Mike Steve Ruth Ann Beth"
).split()  # each is one GPT-2 token with its leading space (tests check)

PLACES = ("store garden restaurant school hospital office house station park shops beach library market "
          "museum church theater cafe airport lake farm").split()
OBJECTS = ("ring kiss bone basketball computer necklace drink snack plate bag ball book letter cake flower "
           "ticket phone key pen hat").split()

# The IOI paper's templates, written for the BABA order; ABBA swaps the first two names.
TEMPLATES = (
    "Then, {B} and {A} went to the {PLACE}. {S2} gave a {OBJECT} to",
    "Then, {B} and {A} had a lot of fun at the {PLACE}. {S2} gave a {OBJECT} to",
    "Then, {B} and {A} were working at the {PLACE}. {S2} decided to give a {OBJECT} to",
    "Then, {B} and {A} were thinking about going to the {PLACE}. {S2} wanted to give a {OBJECT} to",
    "Then, {B} and {A} had a long argument, and afterwards {S2} said to",
    "After {B} and {A} went to the {PLACE}, {S2} gave a {OBJECT} to",
    "When {B} and {A} got a {OBJECT} at the {PLACE}, {S2} decided to give it to",
    "When {B} and {A} got a {OBJECT} at the {PLACE}, {S2} decided to give the {OBJECT} to",
    "While {B} and {A} were working at the {PLACE}, {S2} gave a {OBJECT} to",
    "While {B} and {A} were commuting to the {PLACE}, {S2} gave a {OBJECT} to",
    "After the lunch, {B} and {A} went to the {PLACE}. {S2} gave a {OBJECT} to",
    "Afterwards, {B} and {A} went to the {PLACE}. {S2} gave a {OBJECT} to",
    "Then, {B} and {A} had a long argument. Afterwards {S2} said to",
    "The {PLACE} {B} and {A} went to had a {OBJECT}. {S2} gave it to",
    "Friends {B} and {A} found a {OBJECT} at the {PLACE}. {S2} gave it to",
)


def pair_split(a: str, b: str) -> str:
    """'test' for 20% of unordered name pairs (stable across runs and machines), else 'train'."""
    key = "|".join(sorted((a, b))).encode()
    return "test" if zlib.crc32(key) % 5 == 0 else "train"


def _fill(template: str, first: str, second: str, s2: str, place: str, obj: str) -> str:
    return template.format(B=first, A=second, S2=s2, PLACE=place, OBJECT=obj)


@register_task("ioi", corruptions=("abc", "flip"))
def ioi(cfg: TaskConfig) -> list[Prompt]:
    """N IOI prompts, alternating ABBA and BABA; deterministic in ``cfg.seed``."""
    rng = random.Random(cfg.seed)
    corruption = cfg.corruption or "abc"
    prompts = []
    while len(prompts) < cfg.n_prompts:
        t = rng.randrange(len(TEMPLATES))
        io, s = rng.sample(NAMES, 2)
        place, obj = rng.choice(PLACES), rng.choice(OBJECTS)
        x, y, z = rng.sample([n for n in NAMES if n not in (io, s)], 3)
        if cfg.split != "all" and pair_split(io, s) != cfg.split:
            continue
        baba = len(prompts) % 2 == 0
        first, second = (s, io) if baba else (io, s)
        clean = _fill(TEMPLATES[t], first, second, s, place, obj)
        if corruption == "abc":
            cx, cy = (y, x) if baba else (x, y)  # x replaces IO, y replaces S1, z replaces S2
            corrupt = _fill(TEMPLATES[t], cx, cy, z, place, obj)
        else:  # flip: S2 becomes the IO
            corrupt = _fill(TEMPLATES[t], first, second, io, place, obj)
        prompts.append(Prompt(clean, corrupt, " " + io, " " + s, template=t))
    return prompts


SEED8 = (
    ("When John and Mary went to the shops, John gave the bag to", " Mary", " John"),
    ("When John and Mary went to the shops, Mary gave the bag to", " John", " Mary"),
    ("When Tom and James went to the park, James gave the ball to", " Tom", " James"),
    ("When Tom and James went to the park, Tom gave the ball to", " James", " Tom"),
    ("When Dan and Sid went to the shops, Sid gave an apple to", " Dan", " Sid"),
    ("When Dan and Sid went to the shops, Dan gave an apple to", " Sid", " Dan"),
    ("After Martin and Amy went to the park, Amy gave a drink to", " Martin", " Amy"),
    ("After Martin and Amy went to the park, Martin gave a drink to", " Amy", " Martin"),
)


@register_task("ioi_seed8", corruptions=("swap",))
def ioi_seed8(cfg: TaskConfig) -> list[Prompt]:
    """The Attribution Patching Demo's eight prompts; the corrupted prompt is the neighbour's (i ^ 1)."""
    out = []
    for i in range(cfg.n_prompts):
        j = i % len(SEED8)
        clean, ans, wrong = SEED8[j]
        out.append(Prompt(clean, SEED8[j ^ 1][0], ans, wrong, template=j // 2))
    return out
