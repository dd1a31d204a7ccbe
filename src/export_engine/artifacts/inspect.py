"""Human-readable summary of an artifact manifest."""

from __future__ import annotations

from typing import Any

from export_engine.artifacts.status import artifact_status


def _shape(shape: list[Any]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def _size(num_bytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if num_bytes < 1000 or unit == "GB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1000  # type: ignore[assignment]
    return str(num_bytes)


def describe(manifest: dict[str, Any], verification: dict[str, Any] | None = None) -> str:
    lines = [
        f"model       {manifest['model']}",
        f"precision   {manifest['precision']}",
        f"attention   {manifest.get('attention', 'dense')}",
        f"resolution  {manifest.get('resolution', '?')}",
        f"backend     {manifest.get('backend', '?')}",
        f"created     {manifest.get('created', '?')} (schema {manifest.get('schema_version')})",
    ]
    weights = manifest.get("weights", {})
    if weights.get("random_weights"):
        lines.append(f"weights     random (seed {weights.get('seed')})")
    else:
        lines.append(f"weights     {weights.get('source')} sha256 {str(weights.get('sha256'))[:16]}...")
    for graph in manifest["graphs"]:
        lines.append(
            f"graph       {graph['name']}: {graph['file']} (opset {graph['opset']}, {graph['nodes']} nodes, "
            f"{graph['exporter']} exporter)"
        )
        for io in ("inputs", "outputs"):
            for t in graph[io]:
                lines.append(f"  {io[:-1]:7s} {t['name']:28s} {t['dtype']:8s} {_shape(t['shape'])}")
    status = artifact_status(manifest, verification)
    lines.append(f"status      {status.status}")
    for line_status, what in status.lines:
        lines.append(f"  {line_status:8s} {what}")
    parity = manifest.get("parity", {})
    for name, worst in parity.get("worst", {}).items():
        lines.append(f"  {name:36s} max abs {worst['max_abs']:.3g}  max rel {worst['max_rel']:.3g}")
    for engine in manifest.get("engines", []):
        build = engine.get("build", {})
        attention = build.get("attention", [])
        precisions = sorted({a.get("q_dtype", "?") for a in attention})
        targets = engine.get("header", {}).get("targets")
        lines.append(
            f"engine      {engine['graph']}: {engine['file']} ({engine['backend']} {engine.get('backend_version')}, "
            f"{_size(build.get('engine_bytes', 0))}, built in {build.get('build_seconds', 0):.1f} s)"
        )
        lines.append(
            f"  layers  {build.get('network_layers')} network layers; {len(attention)} fused attention layers "
            f"({', '.join(precisions) or '-'}), {sum(a.get('decomposable', False) for a in attention)} decomposable"
        )
        if targets:
            lines.append(f"  targets compute capability {', '.join(map(str, targets))}")
        parity = engine.get("parity", {})
        lines.append(f"  parity  {parity.get('status')}{': ' + parity['reason'] if parity.get('reason') else ''}")
    total = sum(f["bytes"] for f in manifest["files"].values())
    lines.append(f"files       {len(manifest['files'])} files, {_size(total)} (sha256 in manifest)")
    for name, record in manifest["files"].items():
        lines.append(f"  {name:36s} {_size(record['bytes']):>9s}  {record['sha256'][:16]}...")
    versions = manifest.get("versions", {})
    lines.append("versions    " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    return "\n".join(lines)
