"""Ray Data: batch embedding of image and document corpora, and search over the embeddings.

- :mod:`~raeflow.embed.encoder` — ``Encoder``: a saved model as a plain callable, batch -> embeddings (no Ray);
- :mod:`~raeflow.embed.sources` — the ``--input`` kinds as Ray Data streams of decoded rows (per-block
  functions are plain Python);
- :mod:`~raeflow.embed.job` — ``run_embed``: the pipeline, atomic Parquet parts, resume, the errors table;
- :mod:`~raeflow.embed.search` — ``Index``: exact cosine search over an embeddings directory (no Ray);
- :mod:`~raeflow.embed.retrieval` — retrieval quality: precision-recall for documents vs LSA, precision@k for
  images vs pixels and PCA (no Ray).

Importing this package imports nothing heavy; Ray is imported only when a job runs.
"""
