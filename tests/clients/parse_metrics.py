"""Parses Prometheus text exposition (stdin) with the Prometheus project's
own Python parser, as a scraper reads /metrics, and prints every sample as
JSON lines: {"name", "labels", "value"}. Fails on text it cannot parse.
tests/metrics.rs runs it on flaghost's /metrics.
"""

import json
import sys

from prometheus_client.parser import text_string_to_metric_families

for family in text_string_to_metric_families(sys.stdin.read()):
    for sample in family.samples:
        print(json.dumps({"name": sample.name, "labels": sample.labels, "value": sample.value}))
