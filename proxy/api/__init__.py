"""HTTP surface: thin routes, the one error middleware, and the OpenAI wire format."""
