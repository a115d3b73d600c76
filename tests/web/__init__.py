"""The operator's console: web pages, REST API, /metrics, /healthz."""
