"""thrifty: a cost-optimizing, OpenAI-compatible LLM gateway (import package ``proxy``)."""

__version__ = "0.1.0"
