#!/usr/bin/env python3
"""Parse Prometheus exposition text from stdin with the official Python client.

Usage: prom_parse.py [openmetrics|text] [--dump] < exposition

The format defaults to OpenMetrics when the input ends with "# EOF", else the
classic text format 0.0.4. Exits 0 and prints "<families> <samples>" when the
input parses, 1 on a parse error (message on stderr), 2 if prometheus_client is
not installed. Used by tests/admin.rs to check nodedns's /metrics output
against a second, independent parser.
"""
import sys

try:
    from prometheus_client.openmetrics.parser import (
        text_string_to_metric_families as parse_openmetrics,
    )
    from prometheus_client.parser import (
        text_string_to_metric_families as parse_text,
    )
except ImportError as e:
    print(f"prometheus_client not available: {e}", file=sys.stderr)
    sys.exit(2)


def main() -> int:
    text = sys.stdin.read()
    fmt = sys.argv[1] if len(sys.argv) > 1 else (
        "openmetrics" if text.rstrip("\n").endswith("# EOF") else "text"
    )
    parse = {"openmetrics": parse_openmetrics, "text": parse_text}.get(fmt)
    if parse is None:
        print(f"unknown format {fmt!r}", file=sys.stderr)
        return 1
    try:
        # The parsers are generators: errors surface while iterating.
        families = list(parse(text))
    except Exception as e:  # noqa: BLE001 - any parser exception is a failure
        print(f"{fmt} parse error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    if not families:
        print("no metric families parsed", file=sys.stderr)
        return 1
    if "--dump" in sys.argv[2:]:
        # One `name{k="v",...} value` line per sample, labels in exposition order, so a test can
        # read values through this parser instead of its own.
        for f in families:
            for smp in f.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in smp.labels.items())
                name = f"{smp.name}{{{labels}}}" if labels else smp.name
                print(f"{name} {float(smp.value)}")
        return 0
    samples = sum(len(f.samples) for f in families)
    print(f"{len(families)} {samples}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
