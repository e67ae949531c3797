"""Context management: pruning a conversation to a token budget and summarizing what is dropped."""
