"""Policy: the model and schema, YAML loading, compiled matchers, the engine, explain, learn and its CLI."""
