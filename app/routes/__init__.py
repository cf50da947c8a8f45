"""Thin routers over `app.service.Service`: tasks (/chat ...), openai (/v1/...), utility (probes, tokens)."""
