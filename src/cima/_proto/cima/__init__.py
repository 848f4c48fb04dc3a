"""Generated from cima_server.proto (CIMA-compatible) and agent.proto (native); see README.md."""
