"""The measurement agent: policy, collectors, the durable journal, views and the API server."""
