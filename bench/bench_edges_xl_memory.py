"""Peak memory of edge attribution patching on a gpt2-xl-shaped random model (48 layers, 1600 wide, 25 heads).

    .venv/bin/python bench/bench_edges_xl_memory.py                    # the Demo's 8 IOI prompts (15 tokens), per prompt & position
    .venv/bin/python bench/bench_edges_xl_memory.py --no-per-position  # scores summed over positions

The weights are random tensors in the engine's layout (``attrpatch.engine.Weights``), made directly with no
Hugging Face model or bridge in between (that would hold a second 6 GB copy); the unembedding shares the
embedding's storage, as GPT-2 ties them. EAP then runs exactly as ``run_method("edge_attribution", …)`` does on a
loaded model (``eap_scores`` on the model's weights), chunking the prompts so a pass stays inside
``MEMORY_BUDGET``. Peak memory is the process's maximum resident set size (``getrusage``), which includes the
weights; the baseline line shows the RSS right after the weights were made.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from attrpatch import load_tokenizer, make_batch
from attrpatch.engine import Weights
from attrpatch.graph import EdgeGraph
from attrpatch.methods.edge_attribution import MEMORY_BUDGET, eap_scores, rows_per_pass


def gib_peak() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def random_weights(n_layers: int, d_model: int, n_heads: int, vocab: int = 50257, n_ctx: int = 1024) -> Weights:
    """GPT-2 weights of the given shape, std 0.02 like GPT-2's init, made without autograd or a model."""
    gen = torch.Generator().manual_seed(0)
    d_head, d_mlp = d_model // n_heads, 4 * d_model

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).mul_(0.02)

    W_E = r(vocab, d_model)
    return Weights(
        W_E=W_E, W_pos=r(n_ctx, d_model),
        ln1_w=torch.ones(n_layers, d_model), ln1_b=torch.zeros(n_layers, d_model),
        W_Q=r(n_layers, n_heads, d_model, d_head), b_Q=torch.zeros(n_layers, n_heads, d_head),
        W_K=r(n_layers, n_heads, d_model, d_head), b_K=torch.zeros(n_layers, n_heads, d_head),
        W_V=r(n_layers, n_heads, d_model, d_head), b_V=torch.zeros(n_layers, n_heads, d_head),
        W_O=r(n_layers, n_heads, d_head, d_model), b_O=torch.zeros(n_layers, d_model),
        ln2_w=torch.ones(n_layers, d_model), ln2_b=torch.zeros(n_layers, d_model),
        W_in=r(n_layers, d_model, d_mlp), b_in=torch.zeros(n_layers, d_mlp),
        W_out=r(n_layers, d_mlp, d_model), b_out=torch.zeros(n_layers, d_model),
        lnf_w=torch.ones(d_model), lnf_b=torch.zeros(d_model),
        W_U=W_E.T, b_U=torch.zeros(vocab),  # tied, as in GPT-2: no second copy of the embedding
        eps=1e-5, act="gelu_new",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--task", default="ioi_seed8", help="the Demo's 8 IOI prompts: 15 tokens each")
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--d-model", type=int, default=1600)
    parser.add_argument("--heads", type=int, default=25)
    parser.add_argument("--no-per-position", dest="per_position", action="store_false")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    t = time.perf_counter()
    w = random_weights(args.layers, args.d_model, args.heads)
    n_params = sum(x.numel() for x in (w.W_E, w.W_pos, w.W_Q, w.W_K, w.W_V, w.W_O, w.W_in, w.W_out))
    print(f"random weights: {n_params / 1e9:.2f} B parameters in {time.perf_counter() - t:.0f} s; "
          f"RSS after weights {gib_peak():.2f} GiB")
    batch = make_batch(args.task, load_tokenizer(), n_prompts=args.prompts, seed=0)
    graph = EdgeGraph.of(w)
    rows = rows_per_pass(w, batch.n_pos, max_rows=256)
    print(f"{len(batch)} prompts x {batch.n_pos} positions; {graph.n_edges} edges "
          f"({graph.n_src} sources x {graph.n_dst} targets); {rows} prompt(s) per pass "
          f"(budget {MEMORY_BUDGET / 2**30:.0f} GiB); per position: {args.per_position}")
    t = time.perf_counter()
    scores = eap_scores(w, batch, ("denoise",), per_prompt=True, per_position=args.per_position)["denoise"]
    elapsed = time.perf_counter() - t
    assert torch.isfinite(scores).all()
    print(f"EAP done in {elapsed:.0f} s; scores {tuple(scores.shape)} "
          f"({scores.numel() * scores.element_size() / 2**30:.2f} GiB); peak RSS {gib_peak():.2f} GiB")


if __name__ == "__main__":
    main()
