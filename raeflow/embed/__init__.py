"""Ray Data: batch embedding of image and document corpora, and search over the embeddings.

- :mod:`~raeflow.embed.encoder` — ``Encoder``: a trained model as a plain callable, batch -> embeddings, and the
  one definition of the embeddings' columns (by capability) (no Ray);
- :mod:`~raeflow.data.readers` — reading and decoding inputs one block at a time (no Ray);
- :mod:`~raeflow.embed.output` — ``PartWriter``: atomic Parquet parts, resume, the errors table, the manifest
  (no Ray);
- :mod:`~raeflow.data.sources` — the ``--input`` kinds as Ray Data streams over the readers (Ray);
- :mod:`~raeflow.embed.job` — ``run_embed``: the Ray Data pipeline (Ray);
- :mod:`~raeflow.embed.search` — ``Index``: exact cosine search over an embeddings directory (no Ray);
- :mod:`~raeflow.embed.retrieval` — retrieval quality: precision-recall for documents vs LSA, precision@k for
  images vs pixels and PCA (no Ray).

Importing this package imports nothing heavy; Ray is imported only when a job runs.
"""
