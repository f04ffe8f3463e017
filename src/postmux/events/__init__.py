"""One stream of typed events feeds the log, the metrics, webhooks and the dashboard."""
