"""Parses an OpenMetrics exposition from stdin with the Prometheus client's own parser and
prints its samples as JSON: [{"name": ..., "labels": {...}, "value": ...}, ...].
Exits 1 with the parser's error on anything it rejects."""
import json
import sys

from prometheus_client.openmetrics.parser import text_string_to_metric_families

samples = []
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        samples.append({"name": s.name, "labels": s.labels, "value": s.value, "type": family.type})
json.dump(samples, sys.stdout)
