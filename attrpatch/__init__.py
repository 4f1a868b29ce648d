"""attrpatch: attribution patching, edge attribution patching and exact patching for GPT-2.

    from attrpatch import load_model, make_batch
    model = load_model("ioi-tiny")
    batch = make_batch("ioi", model.tokenizer, n_prompts=16, seed=0)
"""

from attrpatch.errors import AttrpatchError
from attrpatch.models import LoadedModel, load_model, load_tokenizer
from attrpatch.tasks import PromptBatch, make_batch

__all__ = ["AttrpatchError", "LoadedModel", "PromptBatch", "load_model", "load_tokenizer", "make_batch"]
