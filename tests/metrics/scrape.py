"""Reading a ``/metrics`` page in tests: its samples by name and labels."""

from __future__ import annotations

import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def fetch(url: str, token: str = "") -> tuple[int, str]:
    """GET ``url`` (with ``Authorization: Bearer token`` if given): the status and the body."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): float(sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample ``name`` with exactly ``labels`` (0.0 if there is none: a counter never incremented)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def by_label(samples: Samples, name: str, label: str, **others: str) -> dict[str, float]:
    """Samples of ``name`` whose other labels are ``others``, keyed by the value of ``label``."""
    found = {}
    for (sample, labels), number in samples.items():
        keyed = dict(labels)
        if sample == name and label in keyed and all(keyed.get(k) == v for k, v in others.items()):
            found[keyed[label]] = number
    return found
