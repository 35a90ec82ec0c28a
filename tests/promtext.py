"""Reading a gateway's /metrics in tests: samples by name and labels, summed over the labels not given."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

METRICS_TOKEN = "metrics-token"


@dataclass(frozen=True)
class Samples:
    text: str
    rows: list[tuple[str, dict[str, str], float]]

    def total(self, name: str, **labels: str) -> float:
        """Sum of the samples called `name` whose labels include `labels`."""
        return sum(
            value for n, have, value in self.rows
            if n == name and all(have.get(k) == v for k, v in labels.items())
        )

    def labelsets(self, name: str) -> list[dict[str, str]]:
        return [have for n, have, _ in self.rows if n == name]


async def scrape(client: Any, token: str = METRICS_TOKEN) -> Samples:
    resp = await client.get("/metrics", headers={"Authorization": f"Bearer {token}"})
    assert resp.status == 200, await resp.text()
    text = await resp.text()
    rows = [
        (s.name, dict(s.labels), s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]
    return Samples(text, rows)
