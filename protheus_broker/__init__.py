"""protheus-broker: a load-balancing broker for TOTVS Protheus application servers."""

__version__ = "0.3.0"
