"""Corpus preparation, tokenizer, token shards and the Lightning DataModule."""
