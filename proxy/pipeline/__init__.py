"""The request pipeline: one module per stage (auth, upstream, and later guard, route, cache, prune, ledger)."""
