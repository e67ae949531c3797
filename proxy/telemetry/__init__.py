"""Telemetry: Prometheus ``/metrics`` (whole-server figures across workers) and OTLP traces when configured.

``metrics`` records each exchange after the ledger, ``exposition`` renders the scrape,
``tracing`` holds the only imports of the OpenTelemetry SDK, ``schema`` the names.
"""

from proxy.telemetry.metrics import Telemetry
from proxy.telemetry.schema import CONTENT_TYPE
from proxy.telemetry.tracing import Tracing, open_tracing

__all__ = ["CONTENT_TYPE", "Telemetry", "Tracing", "open_tracing"]
