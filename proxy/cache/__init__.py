"""The response cache: exact (hash of the canonical request), tenant-scoped, Redis or in-process."""
