"""Knowledge: cleaning, chunking, vector stores and the index deployment."""
