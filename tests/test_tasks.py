"""Tasks: every generator builds a checked batch; padding never reaches the metric; bad input is one clear error."""

import pytest
import torch

from attrpatch import make_batch
from attrpatch.tasks import Prompt, TaskConfig, TaskError, generate, tokenize_prompts
from attrpatch.tasks import ioi as ioi_mod
from attrpatch.tasks import pronoun as pronoun_mod

TASK_NAMES = ["ioi", "ioi_seed8", "pronoun", "factual"]


@pytest.mark.parametrize("name", TASK_NAMES)
def test_every_task_builds_a_batch(name, tokenizer):
    batch = make_batch(name, tokenizer, n_prompts=24, seed=1)
    assert len(batch) == 24
    assert batch.clean_tokens.shape == batch.corrupt_tokens.shape
    assert (batch.clean_tokens[:, 0] == tokenizer.eos_token_id).all()  # BOS
    assert (batch.answer_ids != batch.wrong_ids).all()
    for n, p in enumerate(batch.prompts):  # each answer position is the prompt's last real token
        ids = tokenizer(p.clean)["input_ids"]
        assert int(batch.answer_pos[n]) == len(ids)
        assert batch.clean_tokens[n, len(ids)].item() == ids[-1]
        assert tokenizer.decode(batch.answer_ids[n]) == p.answer


@pytest.mark.parametrize("name", TASK_NAMES)
def test_generators_are_deterministic(name):
    a = generate(TaskConfig(name, n_prompts=10, seed=5))
    assert a == generate(TaskConfig(name, n_prompts=10, seed=5))


def test_name_lists_are_single_tokens(tokenizer):
    for name in ioi_mod.NAMES + pronoun_mod.MALE + pronoun_mod.FEMALE:
        assert len(tokenizer(" " + name)["input_ids"]) == 1, name


def test_ioi_orders_and_corruptions(tokenizer):
    prompts = generate(TaskConfig("ioi", n_prompts=40, seed=0, corruption="abc"))
    for n, p in enumerate(prompts):
        io, s = p.answer.strip(), p.wrong.strip()
        words = p.clean.replace(",", " ").replace(".", " ").split()
        assert words.count(s) == 2 and words.count(io) == 1
        first = [w for w in words if w in (io, s)][0]
        assert first == (s if n % 2 == 0 else io)  # BABA then ABBA
        cw = p.corrupt.replace(",", " ").replace(".", " ").split()
        assert io not in cw and s not in cw  # all three names replaced
    flipped = generate(TaskConfig("ioi", n_prompts=10, seed=0, corruption="flip"))
    for p in flipped:
        words = p.corrupt.replace(",", " ").replace(".", " ").split()
        assert words.count(p.answer.strip()) == 2 and words.count(p.wrong.strip()) == 1


def test_ioi_split_holds_out_name_pairs():
    train = generate(TaskConfig("ioi", n_prompts=200, seed=0, split="train"))
    test = generate(TaskConfig("ioi", n_prompts=200, seed=0, split="test"))
    pairs = lambda ps: {frozenset((p.answer, p.wrong)) for p in ps}  # noqa: E731
    assert pairs(train).isdisjoint(pairs(test))


def test_seed8_is_the_demo():
    prompts = generate(TaskConfig("ioi_seed8", n_prompts=8))
    assert prompts[0].clean == "When John and Mary went to the shops, John gave the bag to"
    assert prompts[0].corrupt == prompts[1].clean and prompts[1].corrupt == prompts[0].clean
    assert [p.answer for p in prompts[:2]] == [" Mary", " John"]


def test_select_and_shards(tokenizer):
    batch = make_batch("ioi", tokenizer, n_prompts=10)
    shards = batch.shards(4)
    assert [len(s) for s in shards] == [4, 4, 2]
    assert torch.equal(torch.cat([s.prompt_ids for s in shards]), batch.prompt_ids)
    assert all(s.n_pos == int(s.answer_pos.max()) + 1 for s in shards)


def test_unknown_task(tokenizer):
    with pytest.raises(TaskError, match="unknown task 'iio'.*ioi"):
        make_batch("iio", tokenizer)


def test_unknown_corruption(tokenizer):
    with pytest.raises(TaskError, match="no corruption 'xyz'.*abc"):
        make_batch("ioi", tokenizer, corruption="xyz")


def test_empty_prompt_set(tokenizer):
    with pytest.raises(TaskError, match="n_prompts must be at least 1"):
        make_batch("ioi", tokenizer, n_prompts=0)
    with pytest.raises(TaskError, match="prompt set is empty"):
        tokenize_prompts([], tokenizer)


def test_different_lengths(tokenizer):
    p = Prompt("When John and Mary went to the shops, John gave the bag to",
               "When Jonathan-Christopher and Mary went to the shops, John gave the bag to", " Mary", " John")
    with pytest.raises(TaskError, match="prompt 0: clean and corrupted prompts tokenize to different lengths"):
        tokenize_prompts([p], tokenizer)


def test_multi_token_answer(tokenizer):
    p = Prompt("The capital of France is", "The capital of Spain is", " Parisienne", " Madrid")
    with pytest.raises(TaskError, match=r"answer ' Parisienne' is \d+ tokens.*one GPT-2 token"):
        tokenize_prompts([p], tokenizer)
