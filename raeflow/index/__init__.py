"""Approximate nearest-neighbour indexes over a ``raeflow embed`` output (``raeflow index``), on faiss.

:mod:`raeflow.index.build` trains and fills an index by streaming the Parquet files in chunks and adds the
files a later ``raeflow embed --resume`` commits; :mod:`raeflow.index.query` opens it (refusing an index made
for another model's codes or from other files) and answers queries with the same hits as the exact
:class:`raeflow.embed.search.Index`. Plain Python: no Ray, no torch.
"""
from raeflow.index.build import KINDS, BuildSummary, build_index
from raeflow.index.query import EXACT_BELOW, AnnIndex, IndexMismatch, open_index

__all__ = ["KINDS", "BuildSummary", "build_index", "EXACT_BELOW", "AnnIndex", "IndexMismatch", "open_index"]
