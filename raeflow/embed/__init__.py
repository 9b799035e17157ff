"""Ray Data: batch embedding of image and document corpora, and search over the embeddings."""
