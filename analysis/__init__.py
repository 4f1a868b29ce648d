"""Analysis over a results root: DuckDB views, approximation-quality tables and figures, MIB export.

    python -m analysis.compare ROOT          # the cross-model comparison table and figures
    python -m analysis.mib ROOT --model gpt2-small --task ioi --method eap_ig --out ioi_gpt2.json

Analysis never re-runs a model: it reads the Parquet dataset of the results contract (``attrpatch.results``).
"""

from analysis.query import open_results

__all__ = ["open_results"]
