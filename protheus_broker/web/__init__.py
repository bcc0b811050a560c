"""The broker screen: status page, JSON API, Prometheus metrics and admin actions."""
