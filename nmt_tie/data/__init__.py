"""Data: reading text, tokenization (sacremoses + SentencePiece), preparation, batching."""
