"""Data sources for DEPT: the embedded corpus, local files and Hugging Face datasets."""
