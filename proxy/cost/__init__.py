"""Prices, token counts, the priced ledger record, its stores and the reports built on them."""
